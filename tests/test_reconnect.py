"""Issue 12: reconnect forever, stop at once.

Real `velo up` processes against real sockets: a "gateway" that is down for thousands
of attempts, a TCP server that accepts and never answers (a stuck WebSocket handshake),
a listener whose backlog is full (a stuck dial), and signals delivered at many points.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, http_get, wait_for, write_config


class CountingRefuser:
    """Stands where the gateway was: accepts each connection and resets it at once.

    The count is what velo really did (one TCP connection per attempt), seen from
    outside the process.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()
            self.accepted += 1

    def close(self) -> None:
        self.sock.close()  # accept() raises in the thread, which ends
        self._thread.join(5)


class SilentServer:
    """Accepts TCP connections and never sends a byte: a WebSocket handshake that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


class FullBacklog:
    """A listener that never accepts, with its backlog filled: a new connect stays in SYN-SENT,
    like a dial to a host that drops packets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(8):  # Linux queues backlog+1; extra fillers just hang in SYN-SENT themselves
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()


def _config(tmp_path: Path, url: str, http: int, *, max_delay: float, connect_timeout: float = 10.0,
            extra: str = "") -> Path:
    config = write_config(tmp_path / "velocity.toml", gateway_url=url, remote={"web": f"127.0.0.1:{http}"},
                          extra=extra)
    text = config.read_text().replace("reconnect_max_delay = 0.5", f"reconnect_max_delay = {max_delay}")
    # a pinned free port: the default one is the same for every test (and every worktree) named "web"
    text = text.replace(f'target = "127.0.0.1:{http}"', f'target = "127.0.0.1:{http}"\nlocal_port = {free_port()}')
    config.write_text(text.replace("[tunnel]\n", f"[tunnel]\nconnect_timeout = {connect_timeout}\n", 1))
    return config


def _stops_within(proc, seconds: float) -> float:
    started = time.monotonic()
    try:
        proc.popen.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"velo up still running {seconds}s after the signal:\n{proc.log()[-3000:]}")
    return time.monotonic() - started


@pytest.mark.slow
def test_gateway_down_for_thousands_of_attempts_then_back(procs, tmp_path):
    """The backoff used to overflow at attempt ~1,024 and end the loop for good."""
    http = procs.server("http", text="back again")
    port = free_port()
    gateway = procs.gateway(f"127.0.0.1:{http}", port=port)
    config = _config(tmp_path, gateway.url, http, max_delay=0.001, connect_timeout=2.0)
    up = procs.up(config)
    listener = up.port("web")
    assert http_get(listener).endswith(b"back again")

    gateway.proc.stop()
    refuser = CountingRefuser(port)
    try:
        wait_for(lambda: refuser.accepted > 2100, 240, "more than 2,000 reconnect attempts", interval=0.2)
        status = up.status()["tunnel"]
        assert status["state"] == "reconnecting" and status["attempts"] > 1000, status
        assert status["last_error"], status
        assert status["down_for"] > 0, status
    finally:
        refuser.close()
    assert up.proc.running(), up.proc.log()[-3000:]

    gateway = procs.gateway(f"127.0.0.1:{http}", port=port)
    back = time.monotonic()
    body = http_get(listener, timeout=10)  # the same listener, still bound throughout
    took = time.monotonic() - back
    assert body.endswith(b"back again")
    assert took < 2.0, f"request took {took:.2f}s after the gateway came back"

    log = up.proc.log()
    assert log.count("tunnel down:") == 1, log[-3000:]
    assert log.count("tunnel back via websocket") == 1 and "down, " in log, log[-3000:]
    assert "Traceback" not in log and "OverflowError" not in log
    assert len(log.splitlines()) < 40, "one line per event, not one per attempt"


def _start_up(procs, config: Path):
    proc = procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)], cwd=config.parent)
    wait_for(lambda: "velo: running" in proc.log() or not proc.running(), 20, "velo up to start")
    assert proc.running(), proc.log()
    return proc


def _status(config: Path) -> dict:
    from velo.engine.control import request, socket_path

    return request(socket_path(config.parent), "status", timeout=2)["tunnel"]


# Offsets (seconds after the state was observed) spread the signal over the cycle.
OFFSETS = [0.0, 0.03, 0.2, 0.7]


@pytest.mark.slow
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("where", ["dial", "handshake", "backoff"])
def test_sigterm_stops_velo_up_at_any_point_of_the_reconnect_cycle(procs, tmp_path, where, offset):
    http = procs.server("http", text="x")
    if where == "dial":
        target = FullBacklog()
        url, max_delay = f"ws://127.0.0.1:{target.port}/velo", 0.05
    elif where == "handshake":
        target = SilentServer()
        url, max_delay = f"ws://127.0.0.1:{target.port}/velo", 0.05
    else:
        target = None
        url, max_delay = f"ws://127.0.0.1:{free_port()}/velo", 30.0  # refused, then a long sleep
    try:
        config = _config(tmp_path, url, http, max_delay=max_delay, connect_timeout=30.0)
        proc = _start_up(procs, config)
        if where == "handshake":
            wait_for(lambda: target.conns, 10, "velo to open the TCP connection")
        elif where == "backoff":
            wait_for(lambda: _status(config)["attempts"] >= 6, 20, "a few refused attempts (then long sleeps)")
        else:
            wait_for(lambda: _status(config)["state"] == "connecting", 10, "velo to be dialling")
        time.sleep(offset)  # deliberately: a point in the cycle, not a readiness wait
        proc.signal(signal.SIGTERM)
        took = _stops_within(proc, 5.0)
    finally:
        if target is not None:
            target.close()
    assert proc.popen.returncode == 0, proc.log()[-3000:]
    log = proc.log()
    assert "velo: stopping" in log and "Traceback" not in log, log[-3000:]
    assert took < 5.0


@pytest.mark.slow
def test_velo_down_stops_velo_up_during_a_stuck_handshake(procs, tmp_path):
    http = procs.server("http", text="x")
    silent = SilentServer()
    try:
        config = _config(tmp_path, f"ws://127.0.0.1:{silent.port}/velo", http, max_delay=0.05, connect_timeout=30.0)
        proc = _start_up(procs, config)
        wait_for(lambda: silent.conns, 10, "velo to open the TCP connection")
        started = time.monotonic()
        down = subprocess.run([sys.executable, "-m", "velo", "down", "-c", str(config)], capture_output=True,
                              text=True, timeout=30, cwd=ROOT)
        assert down.returncode == 0, down.stderr
        _stops_within(proc, 5.0)
        assert time.monotonic() - started < 8.0
    finally:
        silent.close()
    assert proc.popen.returncode == 0 and "Traceback" not in proc.log()


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(procs, tmp_path):
    """A candidate that ignores SIGTERM makes the clean stop slow (5 s grace); the second
    Ctrl-C does not wait for it."""
    http = procs.server("http", text="x")
    gateway = procs.gateway(f"127.0.0.1:{http}")
    candidate = free_port()
    config = _config(tmp_path, gateway.url, http, max_delay=0.5,
                     extra=f"[local.website]\nport = {candidate}\nexpose = {free_port()}\n"
                           "run = \"trap '' TERM; echo stubborn; while true; do sleep 0.1; done\"\n")
    proc = _start_up(procs, config)
    wait_for(lambda: "[website] stubborn" in proc.log(), 10, "the candidate to run")
    pid = int(re.search(r"started website: .* \(pid (\d+)\)", proc.log())[1])
    try:
        proc.signal(signal.SIGINT)
        wait_for(lambda: "velo: stopping" in proc.log(), 5, "the first Ctrl-C to start stopping")
        proc.signal(signal.SIGINT)
        took = _stops_within(proc, 2.0)
    finally:  # exiting at once leaves the stubborn candidate behind: that is the point
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.popen.returncode == 130, proc.log()[-2000:]
    assert "second Ctrl-C" in proc.log()
    assert took < 2.0


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{{name: hung, cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}}}]
users: [{{name: me, user: {{token: "t"}}}}]
contexts: [{{name: hung, context: {{cluster: hung, user: me, namespace: shop}}}}]
current-context: hung
"""


@pytest.mark.slow
def test_sigterm_stops_velo_up_while_waiting_for_a_hung_apiserver(procs, tmp_path):
    """Start-up waits on the cluster (here an apiserver that accepts and never answers):
    a stop must not wait for it."""
    silent = SilentServer()
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(KUBECONFIG.format(port=silent.port))
        config = tmp_path / "velocity.toml"
        config.write_text('[project]\nname = "hung"\n[cluster]\nprovider = "kubernetes"\n')
        proc = procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)], cwd=tmp_path,
                           env={"KUBECONFIG": str(kubeconfig)})
        wait_for(lambda: silent.conns, 20, "velo to connect to the apiserver")
        proc.signal(signal.SIGTERM)
        took = _stops_within(proc, 5.0)
    finally:
        silent.close()
    assert "Traceback" not in proc.log(), proc.log()
    assert proc.popen.returncode == 0 and "velo: stopping" in proc.log(), proc.log()  # a clean stop, not a kill
    assert took < 5.0
