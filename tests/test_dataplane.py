"""The data plane end to end: real `velo gateway` and `velo up` processes, real sockets.

The path under test is always  test -> velo up's listener -> tunnel -> gateway -> target
(forward) or  test -> gateway's reverse port -> tunnel -> velo up -> local candidate
(reverse).  Targets are separate processes (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import time

import psutil
import pytest

from tests.helpers import TOKEN, free_port, http_get, status_cli, wait_for, write_config
from tests.servers import blob_digest

MiB = 1 << 20


def fetch_all(port: int, send: bytes = b"", timeout: float = 60) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if send:
            sock.sendall(send)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def sha256_stream(port: int, size: int, timeout: float = 120) -> str:
    """Download through a listener and hash as it arrives (never holds it all)."""
    digest = hashlib.sha256()
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
            got += len(chunk)
    assert got == size
    return digest.hexdigest()


@pytest.fixture
def mesh(procs, tmp_path):
    """A gateway, an echo and an HTTP target, a local candidate, and velo up between them."""
    echo = procs.server("echo")
    http = procs.server("http", text="remote-hello")
    candidate = procs.server("http", text="local-candidate")
    gateway = procs.gateway(f"127.0.0.1:{echo}", f"127.0.0.1:{http}")
    expose = free_port()
    config = write_config(
        tmp_path / "velocity.toml",
        gateway_url=gateway.url,
        remote={"echo": f"127.0.0.1:{echo}", "web": f"127.0.0.1:{http}"},
        local={"website": (candidate, expose)},
    )
    up = procs.up(config)
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    return up, gateway, expose


def test_forward_and_reverse_requests(mesh):
    up, _gateway, expose = mesh
    assert http_get(up.port("web")).endswith(b"remote-hello")
    assert http_get(expose).endswith(b"local-candidate")
    env = up.env()
    assert env["WEB_SERVICE_HOST"] == "127.0.0.1"
    assert int(env["WEB_SERVICE_PORT"]) == up.port("web")
    assert env["WEB_URL"] == f"http://127.0.0.1:{up.port('web')}"
    assert oct(os.stat(up.config.parent / ".env").st_mode & 0o777) == "0o600"
    status = status_cli(up.config)
    assert status["running"] and status["tunnel"]["state"] == "up"
    assert status["tunnel"]["rtt_ms"] is not None
    web = next(f for f in status["forwards"] if f["name"] == "web")
    assert web["total"] >= 1 and web["bytes_down"] > 0


@pytest.mark.slow
def test_64mib_forward_and_reverse_are_byte_identical(procs, tmp_path):
    size = 64 * MiB
    blob = procs.server("blob", size=size)
    sink = procs.server("sink")
    local_blob = procs.server("blob", size=size)
    gateway = procs.gateway(f"127.0.0.1:{blob}", f"127.0.0.1:{sink}")
    expose = free_port()
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          remote={"blob": f"127.0.0.1:{blob}", "sink": f"127.0.0.1:{sink}"},
                          local={"candidate": (local_blob, expose)})
    up = procs.up(config)
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    expected = blob_digest(size)
    assert sha256_stream(up.port("blob"), size) == expected          # forward, download
    assert sha256_stream(expose, size) == expected                   # reverse, download
    payload = b"".join(__import__("tests.servers", fromlist=["x"]).blob_chunks(size, seed=11))
    answer = fetch_all(up.port("sink"), payload)                     # forward, upload
    assert answer.decode() == hashlib.sha256(payload).hexdigest()


def test_500_concurrent_streams_echo_their_own_data(mesh):
    up, _, _ = mesh
    port = up.port("echo")

    async def one(i: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = os.urandom(1024 + i * 37)
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
        writer.close()
        return got == payload

    async def main():
        return await asyncio.gather(*(one(i) for i in range(500)))

    results = asyncio.run(main())
    assert all(results) and len(results) == 500
    wait_for(lambda: up.forward("echo")["open"] == 0, 10, "all echo streams to close")
    assert up.forward("echo")["total"] >= 500


@pytest.mark.slow
def test_stalled_reader_does_not_stall_others_and_memory_stays_bounded(procs, tmp_path):
    size = 256 * MiB
    big = procs.server("blob", size=size)
    other = procs.server("blob", size=32 * MiB)
    gateway = procs.gateway(f"127.0.0.1:{big}", f"127.0.0.1:{other}")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          remote={"big": f"127.0.0.1:{big}", "other": f"127.0.0.1:{other}"})
    up = procs.up(config)
    rss = lambda: psutil.Process(up.proc.pid).memory_info().rss + psutil.Process(gateway.proc.pid).memory_info().rss
    baseline = rss()
    stalled = socket.create_connection(("127.0.0.1", up.port("big")))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        # The stalled stream fills its window and socket buffers, then stops growing.
        wait_for(lambda: up.forward("big")["bytes_down"] > 256 * 1024, 10, "the stalled stream to fill up")
        plateau = up.forward("big")["bytes_down"]
        # Meanwhile another stream moves 32 MiB, intact.
        assert sha256_stream(up.port("other"), 32 * MiB) == blob_digest(32 * MiB)
        assert up.forward("big")["bytes_down"] < plateau + 8 * MiB, "the stalled stream kept buffering"
        assert rss() - baseline < 48 * MiB, f"memory grew by {(rss() - baseline) / MiB:.0f} MiB"
    finally:
        stalled.close()


def test_gateway_restart_reconnects_and_listener_keeps_accepting(procs, tmp_path):
    up, gateway, http = procs.web_mesh("still-here")
    port = up.port("web")
    assert http_get(port).endswith(b"still-here")

    gateway.proc.signal(signal.SIGKILL)
    gateway.proc.wait()
    up.wait_state("reconnecting")
    # The local listener never stops accepting: a connection made now waits for the tunnel.
    waiting = socket.create_connection(("127.0.0.1", port), timeout=2)
    waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    restarted = procs.gateway(f"127.0.0.1:{http}", port=gateway.port)
    back = time.monotonic()
    body = wait_for(lambda: http_get(port, timeout=2), 5, "a request through the same listener")
    elapsed = time.monotonic() - back
    assert body.endswith(b"still-here")
    assert elapsed < 2.0, f"first request succeeded {elapsed:.2f}s after the gateway was back"
    waiting.settimeout(5)
    assert waiting.recv(65536).startswith(b"HTTP/1.1 200"), "the connection that waited was served"
    waiting.close()
    assert up.status()["tunnel"]["reconnects"] >= 1
    assert restarted.proc.running()


def test_wrong_token_gets_401_and_no_stream(procs, tmp_path):
    http = procs.server("http", text="secret")
    gateway = procs.gateway(f"127.0.0.1:{http}")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            b"GET /velo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: Bearer wrong\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 401")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          remote={"web": f"127.0.0.1:{http}"}, token_env="WRONG_TOKEN")
    up = procs.up(config, wait_up=False, env={"WRONG_TOKEN": "not-" + TOKEN})
    status = up.wait_state("unauthorized")
    assert "rejected the token" in status["tunnel"]["last_error"]
    assert "attached" not in gateway.proc.log(), "no session may exist for a rejected token"


def test_malformed_frames_close_that_tunnel_only(mesh):
    up, gateway, _ = mesh
    from picows import WSListener, WSMsgType, ws_connect

    async def send_garbage() -> bool:
        closed = asyncio.get_running_loop().create_future()

        class Listener(WSListener):
            def on_ws_disconnected(self, transport):
                closed.set_result(True)

        transport, _ = await ws_connect(Listener, gateway.url, extra_headers={"Authorization": f"Bearer {TOKEN}"})
        transport.send(WSMsgType.BINARY, b"\x07garbage that is not a yamux frame")
        return await asyncio.wait_for(closed, 5)

    assert asyncio.run(send_garbage())
    gateway.proc.wait_log("protocol error")
    assert gateway.proc.running()
    assert http_get(up.port("web")).endswith(b"remote-hello"), "the well-behaved client is still served"
    assert up.status()["tunnel"]["reconnects"] == 0


def test_target_outside_allow_list_is_refused(procs, tmp_path):
    allowed = procs.server("http", text="allowed")
    forbidden = procs.server("http", text="forbidden")
    gateway = procs.gateway(f"127.0.0.1:{allowed}")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          remote={"ok": f"127.0.0.1:{allowed}", "nope": f"127.0.0.1:{forbidden}"})
    up = procs.up(config)
    assert http_get(up.port("ok")).endswith(b"allowed")
    try:
        data = http_get(up.port("nope"))
    except OSError:  # reset by velo: also a refusal
        data = b""
    assert b"forbidden" not in data
    wait_for(lambda: "not allowed" in up.forward("nope")["last_error"], 5, "the refusal in status")


def test_sigterm_stops_cleanly_and_leaves_nothing(procs, tmp_path):
    up, gateway, _http = procs.web_mesh("x")
    port = up.port("web")
    children = psutil.Process(up.proc.pid).children(recursive=True)
    up.proc.signal(signal.SIGTERM)
    assert up.proc.wait(10) == 0
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert up.status() is None
    gateway.proc.wait_log("gone")


def test_gateway_frees_reverse_listener_when_client_dies_and_serves_the_next(procs, tmp_path):
    candidate = procs.server("http", text="first-laptop")
    gateway = procs.gateway()
    expose = free_port()
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, local={"website": (candidate, expose)})
    up = procs.up(config)
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    assert http_get(expose).endswith(b"first-laptop")

    up.proc.signal(signal.SIGKILL)  # the laptop vanishes without a word
    up.proc.wait()
    gateway.proc.wait_log("gone")

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", expose), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True

    wait_for(refused, 5, "the reverse port to be released")
    second = procs.server("http", text="second-laptop")
    other = tmp_path / "second"
    other.mkdir()
    config2 = write_config(other / "velocity.toml", gateway_url=gateway.url, local={"website": (second, expose)})
    up2 = procs.up(config2)
    wait_for(lambda: up2.status()["reverses"][0]["state"] == "listening", 10, "reverse listener for the next client")
    assert http_get(expose).endswith(b"second-laptop")


def test_a_silent_gateway_is_detected_by_keepalive_and_recovered(procs, tmp_path):
    """No FIN, no RST: the peer just stops answering (a frozen VM, a dead NAT entry)."""
    up, gateway, _http = procs.web_mesh("alive")  # keepalive_interval 1 s, keepalive_timeout 3 s (write_config)
    gateway.proc.signal(signal.SIGSTOP)
    try:
        status = up.wait_state("reconnecting", timeout=3 + 1 + 3)
        assert "no keepalive answer" in status["tunnel"]["last_error"]
    finally:
        gateway.proc.signal(signal.SIGCONT)
    up.wait_state("up", timeout=10)
    assert http_get(up.port("web")).endswith(b"alive")
