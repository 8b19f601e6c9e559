"""Real processes for real tests: start, wait for a fact, always clean up."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from velo.engine.control import request, socket_path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last problem on timeout
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port: int, timeout: float = 5, host: str = "127.0.0.1") -> bytes:
    """One HTTP/1.1 GET with Connection: close; the raw response."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


class Proc:
    def __init__(self, name: str, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.name = name
        self.args = args
        self.log_path = log
        self._log = open(log, "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10) -> None:
        wait_for(lambda: text in self.log(), timeout, f"{text!r} in {self.name}'s log:\n{self.log()[-2000:]}")

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            os.kill(self.popen.pid, signum)

    def wait(self, timeout: float = 10) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10) -> int | None:
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


class Procs:
    """Every process a test starts; the fixture stops them all, pass or fail."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.all: list[Proc] = []

    def start(self, name: str, args: list[str], **kw) -> Proc:
        proc = Proc(name, args, self.tmp / f"{name}-{len(self.all)}.log", **kw)
        self.all.append(proc)
        return proc

    def server(self, kind: str, **options) -> int:
        """Start a tests/servers.py server; return its port."""
        ready = self.tmp / f"{kind}-{len(self.all)}.port"
        args = [sys.executable, "-m", "tests.servers", kind, "--ready-file", str(ready)]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        proc = self.start(kind, args, cwd=ROOT)
        return int(wait_for(lambda: ready.exists() and ready.read_text(), 15, f"{kind} server to listen"))

    def gateway(self, *allow: str, port: int = 0, token: str = TOKEN, scheme: str = "ws", extra=(),
                allow_reverse=(), env: dict | None = None, cwd: Path | None = None) -> "Gateway":
        ready = self.tmp / f"gateway-{len(self.all)}.ready"
        path = "/velo" if scheme in ("ws", "wss") else ""
        args = [sys.executable, "-m", "velo", "gateway", "--listen", f"{scheme}://127.0.0.1:{port}{path}",
                "--reverse-host", "127.0.0.1", "--ready-file", str(ready), *extra]
        for pattern in allow:
            args += ["--allow", pattern]
        for reverse_port in allow_reverse:
            args += ["--allow-reverse", str(reverse_port)]
        proc = self.start("gateway", args, env={"VELO_TOKEN": token, **(env or {})}, cwd=cwd)
        url = wait_for(lambda: ready.exists() and ready.read_text().strip(), 15, "gateway to listen")
        return Gateway(proc, url, int(url.rsplit(":", 1)[1].split("/")[0]))

    def up(self, config: Path, wait_up: bool = True, env: dict | None = None) -> "Up":
        proc = self.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)], env=env, cwd=config.parent)
        up = Up(proc, config)
        wait_for(lambda: up.status() or not proc.running(), 20, "velo up to start")
        assert proc.running(), f"velo up exited:\n{proc.log()}"
        if wait_up:
            up.wait_state("up")
        return up

    def web_mesh(self, text: str) -> tuple["Up", "Gateway", int]:
        """The common setup: an HTTP target answering ``text``, a gateway allowed to reach it,
        and `velo up` forwarding it as service "web" (config in this test's tmp folder)."""
        http = self.server("http", text=text)
        gateway = self.gateway(f"127.0.0.1:{http}")
        config = write_config(self.tmp / "velocity.toml", gateway_url=gateway.url, remote={"web": f"127.0.0.1:{http}"},
                              free_ports=True)
        return self.up(config), gateway, http

    def stop_all(self) -> None:
        for proc in reversed(self.all):
            proc.stop()


class Gateway:
    def __init__(self, proc: Proc, url: str, port: int):
        self.proc = proc
        self.url = url
        self.port = port


class Up:
    def __init__(self, proc: Proc, config: Path):
        self.proc = proc
        self.config = config

    def status(self) -> dict | None:
        try:
            return request(socket_path(self.config.parent), "status", timeout=2)
        except (ConnectionError, OSError, ValueError):
            return None

    def wait_state(self, state: str, timeout: float = 15) -> dict:
        return wait_for(
            lambda: (s := self.status()) and s["tunnel"]["state"] == state and s,
            timeout, f"tunnel state {state!r}; velo up log:\n{self.proc.log()[-3000:]}",
        )

    def env(self) -> dict[str, str]:
        """The env file as python-dotenv (a real reader of it) reads it."""
        from dotenv import dotenv_values

        return dict(dotenv_values(self.config.parent / ".env", interpolate=False))

    def port(self, service: str) -> int:
        status = self.status()
        for forward in status["forwards"]:
            if forward["name"].split("/")[0] == service:
                return int(forward["listen"].rsplit(":", 1)[1])
        raise KeyError(service)

    def forward(self, service: str) -> dict:
        return next(f for f in self.status()["forwards"] if f["name"].split("/")[0] == service)


def write_config(path: Path, *, gateway_url: str | None, remote: dict[str, str] | None = None,
                 local: dict[str, tuple[int, int]] | None = None, backend: str = "websocket",
                 extra: str = "", token_env: str = "VELO_TEST_TOKEN", settings: dict | None = None,
                 free_ports: bool = False, keepalive: tuple[float, float] = (1.0, 3.0)) -> Path:
    """A static-provider velocity.toml: remote = {name: "host:port"}, local = {name: (port, expose)}.

    ``settings`` are more keys of the backend's own table (e.g. ca_file; no ``gateway_url``:
    the table names the gateway otherwise, e.g. port-forward's pod). ``free_ports``
    pins each remote's local port to a free one instead of velo's stable default, for
    tests that run while other checkouts run the same test on this machine."""
    lines = [
        '[project]', 'name = "test"', '',
        '[tunnel]', f'token_env = "{token_env}"',
        'reconnect_max_delay = 0.5', f'keepalive_interval = {keepalive[0]}', f'keepalive_timeout = {keepalive[1]}', '',
        f'[tunnel.{backend}]', *([f'url = "{gateway_url}"'] if gateway_url else []),
        *(f"{key} = {json.dumps(value)}" for key, value in (settings or {}).items()), '',
    ]
    for name, (port, expose) in (local or {}).items():
        lines += [f"[local.{name}]", f"port = {port}", f"expose = {expose}", ""]
    for name, target in (remote or {}).items():
        lines += [f"[remote.services.{name}]", f'target = "{target}"']
        lines += [f"local_port = {free_port()}", ""] if free_ports else [""]
    lines.append(extra)
    path.write_text("\n".join(lines))
    return path


def status_cli(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "velo", "status", "--json", "-c", str(config)],
                         capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)


class KwokPod:
    """A pod on the kwok node whose pods/portforward reaches a port of this machine (a kwok
    ``PortForward`` of the same name), standing in for a pod a user runs `velo gateway` in."""

    def __init__(self, cluster, namespace: str, node: str | None = None) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.node = node or cluster.node_name  # another name: a pod no kubelet runs (stays Pending)
        self.name = f"gateway-{secrets.token_hex(3)}"
        from velo.backends.portforward import DEFAULT_PORT

        self.port = DEFAULT_PORT  # [tunnel.port-forward] port's default, so a config need not say it
        self.target: int | None = None

    def forward_to(self, target: int) -> None:
        """The pod exists (Ready, on the kwok node), and its port goes to 127.0.0.1:``target``."""
        from kubernetes import client

        body = {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"forwards": [{"ports": [self.port], "target": {"address": "127.0.0.1", "port": target}}]}}
        custom = self.cluster.custom
        if self.target is None:
            self.cluster.core.create_namespaced_pod(self.namespace, client.V1Pod(
                metadata=client.V1ObjectMeta(name=self.name),
                spec=client.V1PodSpec(node_name=self.node, containers=[client.V1Container(
                    name="gateway", image="registry.invalid/velo-gateway",
                    ports=[client.V1ContainerPort(container_port=self.port)])])))
            custom.create_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", self.namespace, "portforwards", body)
            if self.node == self.cluster.node_name:
                self.cluster.kubectl("wait", "--for=condition=Ready", f"pod/{self.name}", "-n", self.namespace,
                                     "--timeout=60s", timeout=90)
        elif target != self.target:
            custom.patch_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", self.namespace, "portforwards",
                                                  self.name, {"spec": body["spec"]})
        self.target = target

    def delete(self) -> None:
        if self.target is None:
            return
        for delete in (lambda: self.cluster.custom.delete_namespaced_custom_object(
                           "kwok.x-k8s.io", "v1alpha1", self.namespace, "portforwards", self.name),
                       lambda: self.cluster.core.delete_namespaced_pod(self.name, self.namespace,
                                                                       grace_period_seconds=0)):
            try:
                delete()
            except Exception:  # noqa: BLE001 - the namespace goes at the end of the module anyway
                pass
