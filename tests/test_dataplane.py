"""The data plane end to end: real `velo gateway` and `velo up` processes, real sockets.

The path under test is always  test -> velo up's listener -> tunnel -> gateway -> target
(forward) or  test -> gateway's reverse port -> tunnel -> velo up -> local candidate
(reverse).  Targets are separate processes (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import psutil
import pytest

from tests.helpers import TOKEN, free_port, http_get, status_cli, wait_for, write_config

# Large transfers, 500 streams, the stalled reader, restarts, bad tokens and silent peers
# are checked for every backend in tests/conformance/.


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





def test_websocket_upgrade_with_a_wrong_token_gets_401(procs, tmp_path):
    http = procs.server("http", text="secret")
    gateway = procs.gateway(f"127.0.0.1:{http}")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(
            b"GET /velo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: Bearer wrong\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 401")


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

