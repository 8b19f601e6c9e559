"""The third-party backend plugin in plugins/velo-tcp, exercised as a user would.

Nothing here imports the plugin's internals: it is installed as its own
distribution (``pip install -e plugins/velo-tcp``), found by velo through the
``velo`` entry-point group, and driven through real `velo gateway` / `velo up` /
`velo status` processes over real sockets.  The wire checks talk to the real
gateway (and play a gateway for the real client) with plain sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.servers import Echo

from velo import protocol
from velo.mux.frames import FLAG_ACK, FLAG_SYN, HEADER, HEADER_SIZE, TYPE_DATA, TYPE_PING, encode_frame

TOKEN = "tcp-plugin-test-token"
PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins" / "velo-tcp"
INSTALL_HINT = f"the velo-tcp plugin is not installed: run `{sys.executable} -m pip install -e {PLUGIN_DIR}`"


# ---- helpers -------------------------------------------------------------------------------


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy and return it; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # keep polling, show the last problem on timeout
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}" + (f" ({last!r})" if last else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Procs:
    """Every subprocess a test starts; all of them are ended in the fixture's finally."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, *args: str, token: str = TOKEN) -> subprocess.Popen:
        log = self.tmp_path / f"{name}-{len(self.started)}.log"
        env = {**os.environ, "VELO_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "velo", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.started.append((name, proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {name} (pid {p.pid}, rc {p.poll()}):\n{log.read_text(errors='replace')[-3000:]}"
                         for name, p, log in self.started)

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for _name, proc, _log in reversed(self.started):
            self.stop(proc)


class EchoServer:
    """An asyncio echo server on its own loop in a thread (stands in for a cluster service)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            server = await self.loop.create_server(Echo, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._server = server
            self._ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()
        self._server.close()
        self.loop.run_until_complete(self._server.wait_closed())
        self.loop.close()

    def __enter__(self) -> "EchoServer":
        self._thread.start()
        assert self._ready.wait(10), "echo server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def start_gateway(procs: Procs, tmp_path: Path, echo_port: int, *, port: int = 0, token: str = TOKEN,
                  allow_reverse: tuple[int, ...] = ()):
    """`velo gateway --listen tcp://...`; returns (process, bound port) once the ready file says so."""
    ready = tmp_path / f"gateway-ready-{len(procs.started)}"
    proc = procs.start(
        "gateway", "gateway",
        "--listen", f"tcp://127.0.0.1:{port}",
        "--allow", f"127.0.0.1:{echo_port}",
        "--reverse-host", "127.0.0.1",
        *(arg for p in allow_reverse for arg in ("--allow-reverse", str(p))),
        "--ready-file", str(ready),
        "--log-level", "debug",
        token=token,
    )

    def bound():
        assert proc.poll() is None, f"velo gateway exited:\n{procs.logs()}"
        return ready.exists() and ready.read_text().strip()

    url = wait_for(bound, 20, "the gateway's ready file")
    assert url.startswith("tcp://127.0.0.1:"), url
    return proc, int(url.removeprefix("tcp://127.0.0.1:").split("/")[0])


def write_config(tmp_path: Path, *, backend: str, gateway_port: int, echo_port: int,
                 local_port: int | None = None, candidate: tuple[int, int] | None = None,
                 tcp_keys: str = "") -> Path:
    lines = [
        "[project]", 'name = "tcpdemo"', "",
        "[tunnel]", f'prefer = ["{backend}"]', 'token_env = "VELO_TOKEN"',
        "connect_timeout = 5.0", "reconnect_max_delay = 0.5", "",
        "[tunnel.tcp]", f'url = "tcp://127.0.0.1:{gateway_port}"', tcp_keys, "",
        "[remote.services.echo]", f'target = "127.0.0.1:{echo_port}"',
    ]
    if local_port is not None:
        lines.append(f"local_port = {local_port}")
    if candidate is not None:
        local, expose = candidate
        lines += ["", "[local.website]", f"port = {local}", f"expose = {expose}"]
    path = tmp_path / "velocity.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def status(config: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "velo", "status", "--json", "-c", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    return json.loads(out.stdout)


def wait_status(procs: Procs, up: subprocess.Popen, config: Path, predicate, what: str, timeout: float = 20) -> dict:
    def check():
        assert up.poll() is None, f"velo up exited with {up.returncode}:\n{procs.logs()}"
        current = status(config)
        return current if current.get("running") and predicate(current) else None

    try:
        return wait_for(check, timeout, what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast status: {status(config)}\n{procs.logs()}") from None


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def echo_roundtrip(port: int, payload: bytes, timeout: float = 30) -> bytes:
    """Send ``payload`` (from a thread, so big payloads cannot deadlock), half-close, read all back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        def send():
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
        sender.join(timeout)
        return bytes(received)


def read_frames(sock: socket.socket, buf: bytearray, want, timeout: float) -> None:
    """Read yamux frames from ``sock`` (after ``buf``) until ``want(header)`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        while len(buf) >= HEADER_SIZE:
            version, ftype, flags, sid, length = HEADER.unpack_from(buf)
            size = HEADER_SIZE + (length if ftype == 0 else 0)
            if len(buf) < size:
                break
            del buf[:size]
            if want(ftype, flags, sid, length):
                return
        remaining = deadline - time.monotonic()
        assert remaining > 0, "timed out waiting for the expected yamux frame"
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, "peer closed before sending the expected yamux frame"
        buf += chunk


def recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return bytes(data)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def tcp_procs(tmp_path):
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture
def plugin_installed():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="velo")}
    if names.get("tcp") != "velo_tcp":
        pytest.fail(INSTALL_HINT)


# ---- installation ------------------------------------------------------------------------------


def test_plugin_registers_through_the_velo_entry_point_group():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="velo")}
    assert "tcp" in eps, INSTALL_HINT
    assert eps["tcp"].value == "velo_tcp"
    assert eps["tcp"].dist is not None and eps["tcp"].dist.name == "velo-tcp"
    assert "velo" in " ".join(eps["tcp"].dist.requires or [])

    out = subprocess.run([sys.executable, "-m", "velo", "plugins"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    line = next((l for l in out.stdout.splitlines() if l.split()[:1] == ["tcp"]), None)
    assert line is not None, out.stdout
    assert "tcp://" in line and "raw TCP with a token handshake (trusted networks, port-forward)" in line


# ---- end to end through velo gateway / velo up ---------------------------------------------------


def test_forward_echo_through_tcp_tunnel(plugin_installed, tcp_procs, echo, tmp_path):
    _gateway, gateway_port = start_gateway(tcp_procs, tmp_path, echo.port)
    config = write_config(tmp_path, backend="tcp", gateway_port=gateway_port, echo_port=echo.port,
                          local_port=free_port())
    up = tcp_procs.start("up", "up", "-c", str(config))

    current = wait_status(tcp_procs, up, config, lambda s: s["tunnel"]["state"] == "up", 'tunnel state "up"')
    assert current["tunnel"]["backend"] == "tcp"
    assert current["tunnel"]["url"] == f"tcp://127.0.0.1:{gateway_port}"

    env = read_env_file(tmp_path / ".env")
    port = int(env["ECHO_SERVICE_PORT"])
    assert env["ECHO_SERVICE_HOST"] == "127.0.0.1"

    assert echo_roundtrip(port, b"hello through tcp\n") == b"hello through tcp\n"
    big = os.urandom(8 * 1024 * 1024)  # many windows' worth: flow control and backpressure over the pipe
    assert echo_roundtrip(port, big) == big

    # several connections at once share the one tunnel
    payloads = [os.urandom(200_000 + i) for i in range(8)]
    results: list[bytes | None] = [None] * len(payloads)

    def run(i):
        results[i] = echo_roundtrip(port, payloads[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == payloads

    forwards = wait_status(tcp_procs, up, config, lambda s: s["forwards"][0]["total"] >= 10, "forward stats")
    assert forwards["forwards"][0]["bytes_up"] >= len(big)
    assert forwards["tunnel"]["connects"] == 1


def test_reverse_echo_through_tcp_tunnel(plugin_installed, tcp_procs, echo, tmp_path):
    """Cluster -> laptop: a connection to the gateway's exposed port reaches the local candidate."""
    expose = free_port()
    _gateway, gateway_port = start_gateway(tcp_procs, tmp_path, echo.port, allow_reverse=(expose,))
    config = write_config(tmp_path, backend="tcp", gateway_port=gateway_port, echo_port=echo.port,
                          local_port=free_port(), candidate=(echo.port, expose))
    up = tcp_procs.start("up", "up", "-c", str(config))
    wait_status(tcp_procs, up, config,
                lambda s: s["tunnel"]["state"] == "up" and s["reverses"] and s["reverses"][0]["state"] == "listening",
                "the reverse listener on the gateway")
    payload = os.urandom(1024 * 1024)
    assert echo_roundtrip(expose, payload) == payload






def test_unknown_backend_makes_velo_up_exit_2(plugin_installed, tmp_path):
    config = write_config(tmp_path, backend="tcpx", gateway_port=free_port(), echo_port=free_port(),
                          local_port=free_port())
    try:
        out = subprocess.run(
            [sys.executable, "-m", "velo", "up", "-c", str(config)],
            capture_output=True, text=True, timeout=15, env={**os.environ, "VELO_TOKEN": TOKEN},
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:  # subprocess.run has already killed it
        pytest.fail("velo up with an unknown backend kept running instead of exiting 2")
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith('velo: tunnel.prefer[0]: unknown tunnel backend "tcpx"; did you mean "tcp"? installed: ')
    installed = lines[0].rsplit("installed: ", 1)[1].split(", ")
    assert "tcp" in installed and "websocket" in installed
    assert installed == sorted(installed)


def test_unknown_backend_in_config_check_lists_installed_backends(plugin_installed, tmp_path):
    """The message velo up should give; `velo config check` already gives it."""
    config = write_config(tmp_path, backend="tcpx", gateway_port=free_port(), echo_port=free_port())
    out = subprocess.run(
        [sys.executable, "-m", "velo", "config", "check", "-c", str(config)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "VELO_TOKEN": TOKEN},
    )
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith('velo: tunnel.prefer[0]: unknown tunnel backend "tcpx"; did you mean "tcp"? installed: ')
    installed = lines[0].rsplit("installed: ", 1)[1].split(", ")
    assert "tcp" in installed and "websocket" in installed


# ---- the plugin's own table: keys velo's core does not know -------------------------------------------


def config_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velo", "config", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=30, env={**os.environ, "VELO_TOKEN": TOKEN})


@pytest.mark.parametrize(("keys", "message"), [
    ("so_keepalve = true", 'tunnel.tcp.so_keepalve: unknown key; did you mean "so_keepalive"?'),
    ('so_keepalive = "yes"', 'tunnel.tcp.so_keepalive: expected true or false, got "yes"'),
])
def test_plugin_table_is_validated_like_a_core_table(plugin_installed, tmp_path, keys, message):
    config = write_config(tmp_path, backend="tcp", gateway_port=free_port(), echo_port=free_port(), tcp_keys=keys)
    out = config_check(config)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"velocity.toml: {message}"), out.stderr
    assert "Traceback" not in out.stderr


def test_plugin_table_url_scheme_is_checked(plugin_installed, tmp_path):
    config = write_config(tmp_path, backend="tcp", gateway_port=free_port(), echo_port=free_port())
    config.write_text(config.read_text().replace("tcp://127.0.0.1", "ws://127.0.0.1"))
    out = config_check(config)
    assert out.returncode == 2 and "tunnel.tcp.url: expected a tcp:// URL (this backend serves no ws://)" in out.stderr


def _keepalive_timers(port: int) -> list[str]:
    """`ss` shows timer:(keepalive,...) on sockets with SO_KEEPALIVE: what the OS really does."""
    out = subprocess.run(["ss", "-tno", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    return [line for line in out.splitlines()[1:] if line.strip()]


@pytest.mark.parametrize("keepalive", [True, False])
def test_plugin_setting_reaches_the_backend(plugin_installed, tcp_procs, echo, tmp_path, keepalive):
    """[tunnel.tcp] so_keepalive is handed to the plugin's connect through velo, untouched."""
    _gateway, gateway_port = start_gateway(tcp_procs, tmp_path, echo.port)
    config = write_config(tmp_path, backend="tcp", gateway_port=gateway_port, echo_port=echo.port,
                          local_port=free_port(), tcp_keys=f"so_keepalive = {'true' if keepalive else 'false'}")
    up = tcp_procs.start("up", "up", "-c", str(config))
    wait_status(tcp_procs, up, config, lambda s: s["tunnel"]["state"] == "up", 'tunnel state "up"')
    lines = wait_for(lambda: _keepalive_timers(gateway_port), 10, "the tunnel socket in ss")
    assert len(lines) == 1, lines
    assert ("keepalive" in lines[0]) is keepalive, lines[0]


# ---- the preference order: every attempt tries it from the top -------------------------------------------


def test_prefer_falls_back_and_returns_to_the_first_choice(plugin_installed, tcp_procs, echo, tmp_path):
    """prefer = ["tcp", "websocket"]: tcp is down, so websocket carries the session and
    status says why tcp was skipped; when the tunnel drops and tcp is up, the next attempt
    uses tcp again (each backend with its own URL)."""
    tcp_port = free_port()
    ready = tmp_path / "ws-gateway.ready"
    ws_gateway = tcp_procs.start("gateway", "gateway", "--listen", "ws://127.0.0.1:0/velo", "--allow",
                                 f"127.0.0.1:{echo.port}", "--ready-file", str(ready))
    ws_url = wait_for(lambda: ready.exists() and ready.read_text().strip(), 20, "the ws gateway")
    config = write_config(tmp_path, backend="tcp", gateway_port=tcp_port, echo_port=echo.port, local_port=free_port())
    config.write_text(config.read_text().replace('prefer = ["tcp"]', 'prefer = ["tcp", "websocket"]')
                      + f'\n[tunnel.websocket]\nurl = "{ws_url}"\n')
    up = tcp_procs.start("up", "up", "-c", str(config))
    current = wait_status(tcp_procs, up, config, lambda s: s["tunnel"]["state"] == "up", 'tunnel state "up"')
    tunnel = current["tunnel"]
    assert tunnel["backend"] == "websocket" and tunnel["url"] == ws_url
    assert [s["backend"] for s in tunnel["skipped"]] == ["tcp"]
    assert f"tcp://127.0.0.1:{tcp_port}" in tunnel["skipped"][0]["reason"]
    port = int(read_env_file(tmp_path / ".env")["ECHO_SERVICE_PORT"])
    assert echo_roundtrip(port, b"via websocket\n") == b"via websocket\n"

    start_gateway(tcp_procs, tmp_path, echo.port, port=tcp_port)
    Procs.stop(ws_gateway)  # the tunnel drops; the next attempt starts from the top
    back = wait_status(tcp_procs, up, config,
                       lambda s: s["tunnel"]["state"] == "up" and s["tunnel"]["backend"] == "tcp", "tunnel via tcp")
    assert back["tunnel"]["skipped"] == [] and back["tunnel"]["connects"] == 2
    assert echo_roundtrip(port, b"via tcp\n") == b"via tcp\n"
    log = next(path for name, proc, path in tcp_procs.started if proc is up).read_text()
    assert "tunnel up via websocket" in log and "skipped tcp: tcp://127.0.0.1:" in log, log
    assert "tunnel back via tcp" in log, log


# ---- the wire protocol, against the real processes ---------------------------------------------------


def test_gateway_handshake_on_the_wire(plugin_installed, tcp_procs, echo, tmp_path):
    _gateway, port = start_gateway(tcp_procs, tmp_path, echo.port)

    # a wrong token: exactly DENIED, then the gateway closes
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"VELO/1 wrong-token\n")
        assert recv_all(sock, 10) == b"DENIED\n"

    # no token at all
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"VELO/1\n")
        assert recv_all(sock, 10) == b"DENIED\n"

    # the right token, with a yamux ping in the same write: OK, then the tunnel answers the
    # ping, so bytes that came with the greeting reached velo's session
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"VELO/1 {TOKEN}\n".encode() + encode_frame(TYPE_PING, FLAG_SYN, 0, 0xC0FFEE))
        buf = bytearray()
        while len(buf) < 3:
            chunk = sock.recv(65536)
            assert chunk, "gateway closed after a valid greeting"
            buf += chunk
        assert buf[:3] == b"OK\n"
        del buf[:3]
        read_frames(sock, buf, lambda t, f, sid, n: t == TYPE_PING and f & FLAG_ACK and n == 0xC0FFEE, 10)

    # not a velo greeting, and an over-long one: closed without an answer
    for greeting in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"VELO/1 " + b"x" * 2048):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(greeting)
            assert recv_all(sock, 10) == b""

    # silence: dropped after the 5 s handshake deadline
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        assert recv_all(sock, 15) == b""
        assert 4.0 <= time.monotonic() - started < 10

    # the gateway is still fine after all that
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"VELO/1 {TOKEN}\n".encode())
        assert sock.recv(3) == b"OK\n"


def test_gateway_handles_a_greeting_and_frames_split_across_reads(plugin_installed, tcp_procs, echo, tmp_path):
    """TCP has no message boundaries: the greeting and a yamux frame, dribbled one byte per segment,
    still make a tunnel that answers the ping."""
    _gateway, port = start_gateway(tcp_procs, tmp_path, echo.port)
    wire = f"VELO/1 {TOKEN}\n".encode() + encode_frame(TYPE_PING, FLAG_SYN, 0, 0xD1B)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(wire)):
            sock.sendall(wire[i : i + 1])
            time.sleep(0.003)  # not a wait for state: it only keeps the bytes in separate segments
        buf = bytearray()
        while len(buf) < 3:
            chunk = sock.recv(65536)
            assert chunk, f"gateway closed the connection:\n{tcp_procs.logs()}"
            buf += chunk
        assert buf[:3] == b"OK\n"
        del buf[:3]
        read_frames(sock, buf, lambda t, f, sid, n: t == TYPE_PING and f & FLAG_ACK and n == 0xD1B, 10)


def test_client_keeps_bytes_that_arrive_with_ok(plugin_installed, tcp_procs, tmp_path):
    """Play the gateway for a real `velo up`: send OK and a yamux ping in one write; the client must
    answer the ping (the bytes after "OK\\n" were handed to its tunnel, not dropped)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict = {}

    def fake_gateway():
        try:
            listener.settimeout(20)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(20)
                greeting = bytearray()
                while b"\n" not in greeting:
                    chunk = conn.recv(1024)
                    if not chunk:
                        return
                    greeting += chunk
                line, _, rest = bytes(greeting).partition(b"\n")
                seen["greeting"] = line
                conn.sendall(b"OK\n" + encode_frame(TYPE_PING, FLAG_SYN, 0, 0xBEEF))
                frames = bytearray(rest)
                read_frames(conn, frames,
                            lambda t, f, sid, n: t == TYPE_PING and f & FLAG_ACK and n == 0xBEEF, 20)
                seen["pong"] = True
                # answer the control stream as a gateway does: its reply, then the hello
                control = []
                read_frames(conn, frames, lambda t, f, sid, n: f & FLAG_SYN and sid % 2 == 1
                            and not control.append(sid), 20)
                hello = {"op": protocol.OP_HELLO, "version": "test", "protocol": protocol.PROTOCOL}
                conn.sendall(encode_frame(TYPE_DATA, FLAG_ACK, control[0],
                                          payload=protocol.OK_REPLY + protocol.encode(hello)))
                # stay connected until the test is done
                recv_all(conn, 30)
        except Exception as exc:  # reported by the assertions below
            seen["error"] = repr(exc)

    thread = threading.Thread(target=fake_gateway, daemon=True)
    thread.start()
    try:
        config = write_config(tmp_path, backend="tcp", gateway_port=port, echo_port=free_port(),
                              local_port=free_port())
        up = tcp_procs.start("up", "up", "-c", str(config))
        wait_for(lambda: "pong" in seen or "error" in seen or up.poll() is not None, 20,
                 "the client's answer to the ping sent with OK")
        assert seen.get("greeting") == f"VELO/1 {TOKEN}".encode(), (seen, tcp_procs.logs())
        assert seen.get("pong"), (seen, tcp_procs.logs())
        current = wait_status(tcp_procs, up, config, lambda s: s["tunnel"]["state"] == "up", 'tunnel state "up"')
        assert current["tunnel"]["backend"] == "tcp"
    finally:
        tcp_procs.stop_all()
        listener.close()
        thread.join(10)
