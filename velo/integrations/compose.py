"""Docker Compose: containerized candidates get velo's env and both directions of the mesh.

`velo compose` writes an override file (``docker-compose.velo.yml``) that Compose merges
over the project's own files. For every candidate that is a Compose service it adds:

- ``extra_hosts: host.docker.internal:host-gateway``: the host as seen from the container
  (the docker bridge's gateway address, on Linux too);
- ``environment``: the plan's env with every forward address spelled
  ``host.docker.internal:<port>``, so the container reaches velo's forward listeners;
- ``ports: 127.0.0.1:<local port>:<container port>``: the reverse path. velo's reverse
  route dials the candidate's ``host:port`` on this machine, and Docker publishes that to
  the container (unless the project's file already publishes it there).

The forward listeners must be bound where containers reach them: the docker bridge's
gateway address, which `velo up --compose` finds and binds instead of loopback (never all
interfaces). The override holds the env, secrets included, so it is written 0600 like the
env file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from velo.plan import Plan, service_env

log = logging.getLogger("velo.compose")

HOST_ALIAS = "host.docker.internal"
HOST_GATEWAY = f"{HOST_ALIAS}:host-gateway"
# Compose's own lookup order when no -f is given (compose-spec "compose file" names)
DEFAULT_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")


class ComposeError(Exception):
    """A problem the user can fix (no engine, no compose file, an unknown service)."""


# ---- the docker CLI ----------------------------------------------------------------


def _docker(args: list[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        out = subprocess.run(["docker", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    except FileNotFoundError:
        raise ComposeError("the docker CLI is not installed (needed for Compose); install Docker") from None
    except subprocess.TimeoutExpired:
        raise ComposeError(f"{what}: `docker {' '.join(args[:2])}` did not answer in 60 s") from None
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise ComposeError(f"{what}: {detail[-1] if detail else f'exit code {out.returncode}'}")
    return out.stdout


def bridge_gateway() -> str:
    """The docker bridge's gateway address: where ``host-gateway`` points from a container.

    An engine that found its bridge interface already configured (restarted on a machine it
    ran on before) reports the subnet without a gateway; the gateway is then the subnet's
    first address, which is what the engine gives the bridge and ``host-gateway``."""
    out = _docker(["network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
                  what="cannot find the docker bridge (is the Docker engine running?)")
    for entry in json.loads(out or "null") or []:
        try:
            gateway = ipaddress.ip_address(entry.get("Gateway", ""))
        except ValueError:
            try:
                gateway = next(ipaddress.ip_network(entry.get("Subnet", "")).hosts())
            except (ValueError, StopIteration):
                continue
        if gateway.version == 4:
            return str(gateway)
    raise ComposeError("the docker bridge network has no IPv4 gateway; set remote.listen to an address "
                       "containers reach")


# ---- the project's compose files ---------------------------------------------------


def project_files(config) -> list[Path]:
    """The project's own Compose files (not the override), as Compose would pick them."""
    if config.compose.files:
        files = [config.resolve_path(f) for f in config.compose.files]
        for i, path in enumerate(files):
            if not path.is_file():
                raise ComposeError(f"{config.source_path}: compose.files[{i}]: {path}: file not found")
        return files
    for name in DEFAULT_FILES:
        if (config.root / name).is_file():
            return [config.root / name]
    raise ComposeError(f"no Compose file in {config.root} ({', '.join(DEFAULT_FILES)}); "
                       "set compose.files in velocity.toml")


def override_path(config) -> Path:
    return config.resolve_path(config.compose.override)


def compose_args(config, *, with_override: bool = True) -> list[str]:
    """``compose --project-directory ROOT -f base... [-f override]`` (after ``docker``)."""
    args = ["compose", "--project-directory", str(config.root)]
    for path in project_files(config):
        args += ["-f", str(path)]
    if with_override:
        args += ["-f", str(override_path(config))]
    return args


def read_services(config) -> dict[str, dict]:
    """The project's services as Compose itself resolves them (`docker compose config`)."""
    out = _docker([*compose_args(config, with_override=False), "config", "--format", "json"],
                  cwd=config.root, what="docker compose config failed")
    return json.loads(out).get("services") or {}


# ---- the override ------------------------------------------------------------------


def container_env(config, plan: Plan) -> dict[str, str]:
    """The plan's env as a container sees it: forwards at host.docker.internal."""
    env = dict(plan.env)
    env.update(service_env([dataclasses.replace(f, local_host=HOST_ALIAS) for f in plan.forwards]))
    env.update(config.env.vars)  # the user's overrides win, as in the plan
    return env


def _published(service: dict) -> tuple[set[int], list[int]]:
    """(host ports the service already publishes, its container ports) from `compose config`."""
    published, targets = set(), []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            targets.append(int(entry["target"]))
            if entry.get("published"):
                published.add(int(str(entry["published"]).split("-")[0]))
    for port in service.get("expose") or []:
        targets.append(int(str(port).split("/")[0].split("-")[0]))
    return published, targets


def build_override(config, plan: Plan, services: dict[str, dict]) -> tuple[dict, list[str]]:
    """The override document and one line per candidate saying what it got."""
    env = {k: v.replace("$", "$$") for k, v in container_env(config, plan).items()}  # no interpolation
    doc: dict = {"services": {}}
    lines = []
    for name, local in config.local.items():
        service_name = config.compose.services.get(name, name)
        if service_name not in services:
            if name in config.compose.services:
                known = ", ".join(sorted(services)) or "none"
                raise ComposeError(f"{config.source_path}: compose.services.{name}: no Compose service "
                                   f"{service_name!r} (the project's services: {known})")
            continue  # a candidate that runs on the host, not in Compose
        published, targets = _published(services[service_name])
        local_ports = [local.port] if local.port is not None else list((local.ports or {}).values())
        ports = []
        for port in local_ports:
            if port in published:
                continue  # the project's file already publishes it on this machine
            # one port, one container port: map it; otherwise the container listens on the same port
            target = targets[0] if len(local_ports) == 1 and len(set(targets)) == 1 else port
            ports.append(f"{local.host}:{port}:{target}")
        entry = {"extra_hosts": [HOST_GATEWAY], "environment": env}
        if ports:
            entry["ports"] = ports
        doc["services"][service_name] = entry
        lines.append(f"  compose {service_name:24} {len(env)} env variables, forwards at {HOST_ALIAS}"
                     + (f", reverse {', '.join(ports)}" if ports else ""))
    if not doc["services"]:
        raise ComposeError(
            f"none of the candidates ({', '.join(sorted(config.local)) or 'none'}) is a Compose service "
            f"({', '.join(sorted(services)) or 'none'}); map them with [compose.services] in velocity.toml"
        )
    return doc, lines


def write_override(path: Path, doc: dict) -> None:
    """Atomic and private from the first byte: the environment may hold secrets."""
    text = ("# Written by `velo compose` from velocity.toml; regenerated by velo, do not edit.\n"
            "# Use: docker compose -f <your compose file> -f " + path.name + " up\n"
            + yaml.safe_dump(doc, sort_keys=True, default_flow_style=False))
    tmp = path.with_name(f".{path.name}.velo-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write(config, plan: Plan) -> tuple[Path, list[str]]:
    """Read the project's services, write the override; (its path, lines for the user)."""
    doc, lines = build_override(config, plan, read_services(config))
    path = override_path(config)
    write_override(path, doc)
    return path, lines


# ---- velo up --compose -------------------------------------------------------------


class ComposeRun:
    """`docker compose ... up` as a child of `velo up`, its output prefixed ``[compose]``.

    It runs under velo's guard process (``velo.engine.guard``), like a candidate: when velo
    stops, or dies even by SIGKILL, compose gets SIGTERM (it then stops the containers),
    and SIGKILL after the grace period. Its output goes to a file that velo follows, not to
    a pipe: after a SIGKILL of velo a pipe would be broken, and compose, writing "stopping"
    into it, would die of SIGPIPE and leave the containers running.
    """

    GRACE = 30.0
    FOLLOW_INTERVAL = 0.1

    def __init__(self, config, say: Callable[[str], None]):
        self.config = config
        self.say = say
        self.process: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None
        self._pump: asyncio.Task | None = None
        self._reader = None  # compose's output file, already unlinked

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "velo.engine.guard", str(self.GRACE), "--",
                "docker", *compose_args(self.config), "up", "--remove-orphans"]

    async def start(self, on_exit: Callable[[int], None]) -> None:
        fd, name = tempfile.mkstemp(prefix="velo-compose-", suffix=".log")
        self._reader = open(name, "rb")
        os.unlink(name)  # nothing left behind, whatever happens to velo
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, cwd=self.config.root, start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
            )
        finally:
            os.close(fd)
        self.say(f"velo: started docker compose up (pid {self.process.pid})")
        self._pump = asyncio.create_task(self._output(on_exit), name="docker compose up")

    async def _output(self, on_exit: Callable[[int], None]) -> None:
        assert self.process is not None and self._reader is not None
        pending = b""
        with self._reader as log_file:
            while True:
                exited = self.process.returncode is not None
                chunk = log_file.read()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.say(f"[compose] {line.decode(errors='replace').rstrip()}")
                if exited and not chunk:
                    break
                if not chunk:
                    try:
                        await asyncio.wait_for(asyncio.shield(self.process.wait()), self.FOLLOW_INTERVAL)
                    except asyncio.TimeoutError:
                        pass
        if pending:
            self.say(f"[compose] {pending.decode(errors='replace').rstrip()}")
        self.exit_code = self.process.returncode
        on_exit(self.exit_code)

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            # the guard passes SIGTERM to compose and SIGKILLs the group after GRACE itself
            for signum, wait in ((signal.SIGTERM, self.GRACE + 5), (signal.SIGKILL, 5.0)):
                try:
                    process.send_signal(signum) if signum == signal.SIGTERM else os.killpg(process.pid, signum)
                except ProcessLookupError:
                    break
                try:
                    await asyncio.wait_for(process.wait(), wait)
                    break
                except asyncio.TimeoutError:
                    continue
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._pump, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._pump.cancel()
