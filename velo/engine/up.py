"""`velo up`: config -> provider -> plan -> mesh, then keep them in step.

Three things can change the plan while it runs: an edit of velocity.toml, the
provider's inventory (services appearing in the cluster), and nothing else.
Each goes through the same ``_apply`` so there is one reconciler.  A bad edit
keeps the last good config running and says why.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import signal
import time
from pathlib import Path
from typing import Callable

from velo.config import ConfigError, VelocityConfig, load_config
from velo.engine import envfile
from velo.engine.candidates import Candidate
from velo.engine.client import TunnelClient
from velo.engine.control import ControlServer, socket_path
from velo.engine.mesh import Mesh
from velo.plan import WILDCARD_HOSTS, Inventory, Plan, build_plan, describe, describe_forward
from velo.plugins import PluginError, get_backend, get_provider
from velo.provider import ProviderError, ProviderSession

log = logging.getLogger("velo.up")


class StartupError(Exception):
    """`velo up` cannot start; the message is for the user (exit code 2)."""


class Up:
    def __init__(self, config: VelocityConfig, *, say: Callable[[str], None] = print,
                 listen_host: str | None = None):
        self.config = config
        self.say = say
        self.listen_host = listen_host  # overrides remote.listen (velo up --compose)
        self.session_id = secrets.token_hex(6)
        self.provider: ProviderSession | None = None
        self.inventory = Inventory()
        self.client: TunnelClient | None = None
        self.mesh: Mesh | None = None
        self.control: ControlServer | None = None
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.reloads = 0
        self.fatal = ""
        self.last_reload_error = ""
        self._config_digest = _digest(config.source_path)
        self._tasks: list[asyncio.Task] = []
        self.candidates: list[Candidate] = []

    # ---- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        check_backends(config)
        provider = get_provider(config.cluster.provider)
        self.provider = await provider.open(config)
        self.inventory = await self.provider.inventory()
        tunnel = config.tunnel
        self.client = TunnelClient(
            self._endpoints,
            self._resolve_reverse,
            session_id=self.session_id,
            connect_timeout=tunnel.connect_timeout,
            keepalive_interval=tunnel.keepalive_interval,
            keepalive_timeout=tunnel.keepalive_timeout,
            reconnect_max_delay=tunnel.reconnect_max_delay,
            wait_for_tunnel=tunnel.wait_for_tunnel,
        )
        self.mesh = Mesh(self.client)
        self.control = ControlServer(
            socket_path(config.root), {"status": lambda _r: self.status(), "shutdown": self._shutdown_request}
        )
        try:
            await self.control.start()
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        plan = build_plan(config, self.inventory, listen_host=self.listen_host)
        problems = await self.mesh.apply(plan)
        if problems:
            raise StartupError("\n".join(problems))
        await self.provider.start(self.say)
        self._write_env(plan)
        self.client.start()
        for name, local in config.local.items():
            if local.run:
                candidate = Candidate(name, local.run, config.root, self.say)
                self.candidates.append(candidate)
                await candidate.start(plan.env)
        for coro, name in ((self._watch_config(), "watching velocity.toml"), (self._watch_provider(), "watching the provider"),
                           (self.provider.keepalive(), "keeping the session alive")):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        self._describe(plan)

    async def _endpoints(self):
        return await self.provider.endpoints()

    async def _resolve_reverse(self, header: dict):
        return await self.mesh.resolve_reverse(header)

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self.stopping.set)
            except (NotImplementedError, RuntimeError):
                pass
        await self.stopping.wait()

    async def stop(self) -> None:
        for candidate in self.candidates:
            await candidate.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self.mesh is not None:
            self.mesh.close()
        if self.client is not None:
            await self.client.stop()
        if self.provider is not None:
            try:
                await self.provider.close()
            except ProviderError as exc:
                self.say(f"velo: cleaning up failed: {exc}; run `velo down` to retry")
        if self.control is not None:
            self.control.close()

    def _task_done(self, task: asyncio.Task) -> None:
        """A watcher must never die quietly: that would freeze the mesh without a word."""
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        if isinstance(exc, ProviderError):
            self.say(f"velo: {exc}")
            self.fatal = str(exc)
            self.stopping.set()
        elif exc is not None:
            log.error("%s failed: %r; stopping", task.get_name(), exc, exc_info=exc)
            self.fatal = f"{task.get_name()} failed: {exc}"
            self.stopping.set()

    def _shutdown_request(self, _request: dict) -> dict:
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return {"ok": True}

    # ---- reconciling ------------------------------------------------------------

    async def _apply(self, reason: str) -> None:
        plan = build_plan(self.config, self.inventory, listen_host=self.listen_host)
        before = self.mesh.plan
        problems = await self.mesh.apply(plan)
        for problem in problems:
            self.say(f"velo: {problem}")
        self._write_env(plan)
        added = {f.key for f in plan.forwards} - {f.key for f in before.forwards}
        removed = {f.key for f in before.forwards} - {f.key for f in plan.forwards}
        if added or removed or plan.reverses != before.reverses:
            self.say(f"velo: {reason}: " + ", ".join(
                [f"+{k}" for k in sorted(added)] + [f"-{k}" for k in sorted(removed)]
                or ["reverse routes updated"]
            ))
            for forward in plan.forwards:
                if forward.key in added and forward.key in self.mesh.forwards:
                    self.say(describe_forward(forward))

    async def _watch_config(self) -> None:
        from watchfiles import awatch

        path = self.config.source_path
        async for _changes in awatch(
            path.parent,
            watch_filter=lambda _change, changed: Path(changed).name == path.name,
            debounce=100,
            step=50,
        ):
            digest = _digest(path)
            if digest == self._config_digest:
                continue
            self._config_digest = digest
            try:
                new = load_config(path)
                check_backends(new)
            except (ConfigError, PluginError) as exc:
                self.last_reload_error = str(exc)
                self.say(f"velo: {path.name} not applied, still running the last good config:\n{exc}")
                continue
            await self._reload(new)

    async def _reload(self, new: VelocityConfig) -> None:
        old, self.config = self.config, new
        self.last_reload_error = ""
        self.reloads += 1
        if new.cluster != old.cluster or new.tunnel != old.tunnel:
            await self.provider.close()
            self.provider = await get_provider(new.cluster.provider).open(new)
            tunnel = new.tunnel
            client = self.client
            client.connect_timeout = tunnel.connect_timeout
            client.keepalive_interval = tunnel.keepalive_interval
            client.keepalive_timeout = tunnel.keepalive_timeout
            client.reconnect_max_delay = tunnel.reconnect_max_delay
            client.wait_for_tunnel = tunnel.wait_for_tunnel
            client.restart()
        else:
            self.provider.update_config(new)
        self.inventory = await self.provider.inventory()
        await self._apply(f"{new.source_path.name} changed")

    async def _watch_provider(self) -> None:
        async for inventory in self.provider.watch():
            self.inventory = inventory
            await self._apply("cluster changed")

    # ---- output -----------------------------------------------------------------

    def _write_env(self, plan: Plan) -> None:
        env = self.config.env
        if env.file:
            envfile.write(self.config.root / env.file, plan.env, env.format)

    def _describe(self, plan: Plan) -> None:
        config = self.config
        self.say(f"velo: project {config.project.name}, provider {config.cluster.provider}, session {self.session_id}")
        for line in describe(plan):
            self.say(line)
        if plan.forwards and plan.forwards[0].local_host in WILDCARD_HOSTS:
            self.say(f"velo: forwards listen on all interfaces ({plan.forwards[0].local_host}): "
                     "anyone who reaches this machine reaches the cluster's services through them")
        if config.env.file:
            self.say(f"  env     {len(plan.env)} variables in {config.env.file}")
        self.say("velo: running; Ctrl-C stops and cleans up")

    def status(self) -> dict:
        status = self.mesh.status()
        status.update(
            project=self.config.project.name,
            provider=self.config.cluster.provider,
            session=self.session_id,
            config=str(self.config.source_path),
            started=self.started,
            reloads=self.reloads,
            last_reload_error=self.last_reload_error,
        )
        return status


def check_backends(config: VelocityConfig) -> None:
    """Fail now, naming the key, rather than retrying a backend that cannot exist."""
    get_backend(config.tunnel.backend)
    for i, name in enumerate(config.tunnel.fallback):
        get_backend(name, key=f"tunnel.fallback[{i}]")
    get_provider(config.cluster.provider)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
