"""The data plane end to end: real `velo gateway` and `velo up` processes, real sockets.

The path under test is always  test -> velo up's listener -> tunnel -> gateway -> target
(forward) or  test -> gateway's reverse port -> tunnel -> velo up -> local candidate
(reverse).  Targets are separate processes (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time

import psutil
import pytest

from tests.helpers import TOKEN, free_port, http_get, status_cli, wait_for, write_config
from velo.protocol import PROTOCOL

# Large transfers, 500 streams, the stalled reader, restarts, bad tokens and silent peers
# are checked for every backend in tests/conformance/.
MiB = 1 << 20
KiB = 1 << 10


async def _echo_one(port: int, size: int, timeout: float) -> str:
    """One connection: send ``size`` random bytes, read them back; the outcome in a word."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect failed: {exc.strerror or exc}"
    payload = os.urandom(size)
    try:
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(size), timeout)
        return "ok" if got == payload else "corrupted"
    except (TimeoutError, asyncio.TimeoutError):
        return "stalled"
    except asyncio.IncompleteReadError:
        return "eof before the echo"
    except OSError as exc:
        return f"error: {exc.strerror or exc}"
    finally:
        writer.close()


def echo_burst(port: int, connections: int, size: int, timeout: float = 120) -> dict[str, int]:
    """``connections`` concurrent echoes of ``size`` bytes; {outcome: count}."""
    import collections

    import uvloop

    async def main():
        return await asyncio.gather(*(_echo_one(port, size, timeout) for _ in range(connections)))

    return dict(collections.Counter(uvloop.run(main())))


@pytest.fixture
def mesh(procs, tmp_path):
    """A gateway, an echo and an HTTP target, a local candidate, and velo up between them."""
    echo = procs.server("echo")
    http = procs.server("http", text="remote-hello")
    candidate = procs.server("http", text="local-candidate")
    expose = free_port()
    gateway = procs.gateway(f"127.0.0.1:{echo}", f"127.0.0.1:{http}", allow_reverse=[expose])
    config = write_config(
        tmp_path / "velocity.toml",
        gateway_url=gateway.url,
        remote={"echo": f"127.0.0.1:{echo}", "web": f"127.0.0.1:{http}"},
        local={"website": (candidate, expose)},
        free_ports=True,
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
                          remote={"ok": f"127.0.0.1:{allowed}", "nope": f"127.0.0.1:{forbidden}"}, free_ports=True)
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
    expose = free_port()
    gateway = procs.gateway(allow_reverse=[expose])
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, local={"website": (candidate, expose)}, free_ports=True)
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
    config2 = write_config(other / "velocity.toml", gateway_url=gateway.url, local={"website": (second, expose)}, free_ports=True)
    up2 = procs.up(config2)
    wait_for(lambda: up2.status()["reverses"][0]["state"] == "listening", 10, "reverse listener for the next client")
    assert http_get(expose).endswith(b"second-laptop")


def test_a_frozen_gateway_is_noticed_within_keepalive_timeout(procs, tmp_path):
    """No FIN, no RST: the peer just stops answering (a frozen VM, a dead NAT entry).
    keepalive_timeout is "seconds without an answer": the freeze must be noticed within
    keepalive_timeout plus one keepalive_interval (before: up to timeout + 2 intervals)."""
    interval, timeout = 2.0, 4.0
    http = procs.server("http", text="alive")
    gateway = procs.gateway(f"127.0.0.1:{http}")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"web": f"127.0.0.1:{http}"},
                          free_ports=True, keepalive=(interval, timeout))
    up = procs.up(config)
    frozen = time.monotonic()
    gateway.proc.signal(signal.SIGSTOP)
    try:
        status = up.wait_state("reconnecting", timeout=timeout + interval + 5)
        noticed = time.monotonic() - frozen
        assert "no keepalive answer" in status["tunnel"]["last_error"]
        # velo notices `timeout` after the peer's last byte; the documented ceiling is one
        # interval more.  Halfway, so that the old timing (1-2 intervals late) cannot pass by a hair.
        assert noticed < timeout + interval / 2, f"a frozen gateway was noticed after {noticed:.2f}s"
    finally:
        gateway.proc.signal(signal.SIGCONT)
    up.wait_state("up", timeout=10)
    assert http_get(up.port("web")).endswith(b"alive")


# ---- bursts: nothing stalls, nothing is refused ------------------------------------------


def test_full_send_queue_never_stalls_a_stream(procs):
    """In-process, real sockets: two Tunnels over a real WebSocket, a send queue far smaller
    than the burst (as 2,000 x 64 KiB is for the 64 MiB default), every echo must come back.
    Before the fix, streams the full queue refused waited for a window update that never came."""
    from velo.backends.websocket import WebSocketBackend
    from velo.engine.mesh import ForwardListener
    from velo.plan import Forward
    from velo.transport import Endpoint, GatewayListen
    from velo.tunnel import Tunnel

    echo = procs.server("echo")
    small_queue = 256 * KiB

    async def main():
        backend = WebSocketBackend()

        async def resolve(header):
            return "127.0.0.1", echo

        server = await backend.serve(GatewayListen("127.0.0.1", 0, "/t"), lambda token: token == "k",
                                     lambda: Tunnel(client=False, resolve=resolve, max_buffered=small_queue))
        client = Tunnel(client=True, max_buffered=small_queue)
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/t"
        await backend.connect(Endpoint("websocket", url, "k"), lambda: client, timeout=10)
        await client.connected
        spec = Forward("echo", "", 0, "127.0.0.1", 0, "127.0.0.1", echo)
        listener = ForwardListener(spec, client)  # a Tunnel opens streams like a TunnelClient
        await listener.start()
        port = listener.server.sockets[0].getsockname()[1]
        outcomes = await asyncio.gather(*(_echo_one(port, 64 * KiB, 30) for _ in range(200)))
        listener.close()
        client.close()
        server.close()
        return outcomes

    import collections

    import uvloop

    assert collections.Counter(uvloop.run(main())) == {"ok": 200}


def _echo_mesh(procs, tmp_path):
    """An echo target behind the gateway (forward "echo") and a local echo candidate behind
    the gateway's reverse port ``expose``, with velo up between them."""
    echo = procs.server("echo")
    local_echo = procs.server("echo")
    expose = free_port()
    gateway = procs.gateway(f"127.0.0.1:{echo}", allow_reverse=[expose])
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          remote={"echo": f"127.0.0.1:{echo}"}, local={"candidate": (local_echo, expose)},
                          free_ports=True)
    up = procs.up(config)
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    return up, gateway, expose


@pytest.mark.slow
def test_2000_concurrent_64kib_echoes_forward_and_reverse(procs, tmp_path):
    up, _gateway, expose = _echo_mesh(procs, tmp_path)
    assert echo_burst(up.port("echo"), 2000, 64 * KiB) == {"ok": 2000}       # forward
    assert echo_burst(expose, 2000, 64 * KiB) == {"ok": 2000}                # reverse
    wait_for(lambda: up.forward("echo")["open"] == 0, 30, "every forward stream to close")
    status = up.status()
    assert status["forwards"][0]["errors"] == 0 and status["reverse_streams"]["errors"] == 0


def _connected(socks) -> int:
    """How many of these non-blocking connects have completed their handshake."""
    import select

    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLOUT)
    done = {fd for fd, mask in poller.poll(0) if mask & select.POLLOUT}
    return sum(1 for sock in socks if sock.fileno() in done and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))


def _listen_backlog(port: int) -> int:
    """The accept-queue size the kernel gives a listening socket (ss shows it as Send-Q)."""
    import subprocess

    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


@pytest.mark.slow
def test_2000_simultaneous_connects_are_all_accepted(procs, tmp_path):
    """All at once, as a load test or a connection pool warming up does: the kernel's accept
    queue must hold the burst (it had 100 places), on the forward and the reverse listeners."""
    up, gateway, expose = _echo_mesh(procs, tmp_path)
    for port in (up.port("echo"), expose):
        # SIGSTOP: nothing accepts while the burst arrives, so the queue alone must hold it.
        owner = up.proc if port != expose else gateway.proc
        owner.signal(signal.SIGSTOP)
        socks = []
        try:
            for _ in range(2000):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                socks.append(sock)
            # The kernel completes each handshake on its own, if the queue has room for it;
            # a dropped SYN is only retried after 1 s, 3 s, 7 s... and stays dropped here.
            wait_for(lambda: _connected(socks) == len(socks), 20,
                     f"all 2000 handshakes while nothing accepts (listen backlog {_listen_backlog(port)})")
        finally:
            owner.signal(signal.SIGCONT)
        try:
            for sock in socks:
                sock.setblocking(True)
                sock.settimeout(60)
                sock.sendall(b"ping")
            for sock in socks:
                got = b""
                while len(got) < 4:
                    chunk = sock.recv(4 - len(got))
                    assert chunk, "connection ended before its echo"
                    got += chunk
                assert got == b"ping"
        finally:
            for sock in socks:
                sock.close()


# ---- a broken transfer never looks complete -----------------------------------------------


def read_until_cut(sock: socket.socket, after: int, cut) -> tuple[str, int]:
    """Read ``after`` bytes, call ``cut()``, read on: ("reset", n) or ("eof", n)."""
    got = 0
    cutting = True
    sock.settimeout(60)
    try:
        while True:
            if cutting and got >= after:
                cutting = False
                cut()
            chunk = sock.recv(1 << 20)
            if not chunk:
                return "eof", got
            got += len(chunk)
    except ConnectionResetError:
        return "reset", got


def _download_mesh(procs, tmp_path, size=512 * MiB, **gateway_kw):
    blob = procs.server("blob", size=size)
    gateway = procs.gateway(f"127.0.0.1:{blob}", **gateway_kw)
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"blob": f"127.0.0.1:{blob}"},
                          free_ports=True)
    return procs.up(config), gateway


def test_gateway_killed_mid_download_resets_the_local_connection(procs, tmp_path):
    up, gateway = _download_mesh(procs, tmp_path)
    with socket.create_connection(("127.0.0.1", up.port("blob"))) as sock:
        how, got = read_until_cut(sock, 4 * MiB, lambda: gateway.proc.signal(signal.SIGKILL))
    assert (how, got < 512 * MiB) == ("reset", True), f"the cut transfer ended with {how} after {got} bytes"


def test_velo_up_stopped_mid_download_resets_the_local_connection(procs, tmp_path):
    up, _gateway = _download_mesh(procs, tmp_path)
    with socket.create_connection(("127.0.0.1", up.port("blob"))) as sock:
        how, _got = read_until_cut(sock, 4 * MiB, lambda: up.proc.signal(signal.SIGTERM))
    assert how == "reset"
    assert up.proc.wait(15) == 0


def test_gateway_stopped_mid_download_resets_the_local_connection(procs, tmp_path):
    up, gateway = _download_mesh(procs, tmp_path)
    with socket.create_connection(("127.0.0.1", up.port("blob"))) as sock:
        how, _got = read_until_cut(sock, 4 * MiB, lambda: gateway.proc.signal(signal.SIGTERM))
    assert how == "reset"


def test_stream_reset_reaches_the_local_socket_both_ways(procs, tmp_path):
    """The far end dies with an RST mid-transfer: the near end must see an RST too,
    forward (target at the gateway, client at the laptop) and reverse (the other way round)."""
    target = procs.server("reset", size=2 * MiB)
    candidate = procs.server("reset", size=2 * MiB)
    expose = free_port()
    gateway = procs.gateway(f"127.0.0.1:{target}", allow_reverse=[expose])
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          remote={"target": f"127.0.0.1:{target}"}, local={"candidate": (candidate, expose)},
                          free_ports=True)
    up = procs.up(config)
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    for port in (up.port("target"), expose):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            how, got = read_until_cut(sock, 2 * MiB, lambda: sock.sendall(b"die now"))
        assert (how, got) == ("reset", 2 * MiB)
    assert up.status()["tunnel"]["reconnects"] == 0, "a stream reset is not a tunnel failure"


def test_keepalive_timeout_mid_download_resets_the_local_connection(procs, tmp_path):
    up, gateway = _download_mesh(procs, tmp_path)
    with socket.create_connection(("127.0.0.1", up.port("blob"))) as sock:
        try:
            how, _got = read_until_cut(sock, 4 * MiB, lambda: gateway.proc.signal(signal.SIGSTOP))
        finally:
            gateway.proc.signal(signal.SIGCONT)
    assert how == "reset"
    assert "no keepalive answer" in up.status()["tunnel"]["last_error"] or up.status()["tunnel"]["reconnects"] >= 1


@pytest.mark.slow
def test_reconnect_after_a_freeze_logs_one_line_per_event(procs, tmp_path):
    """Downloads in flight, the gateway freezes, the client gives up on the tunnel and
    reconnects, the gateway thaws: its old tunnel is gone with streams still sending.
    Before: one "write() called after connection lost" line per write (hundreds)."""
    up, gateway = _download_mesh(procs, tmp_path)
    socks = [socket.create_connection(("127.0.0.1", up.port("blob"))) for _ in range(8)]
    try:
        for sock in socks:
            sock.settimeout(30)
            sock.recv(1 << 20)
        gateway.proc.signal(signal.SIGSTOP)
        try:
            up.wait_state("reconnecting", timeout=15)
        finally:
            gateway.proc.signal(signal.SIGCONT)
        up.wait_state("up", timeout=20)
        gateway.proc.wait_log("attached", timeout=10)
        wait_for(lambda: gateway.proc.log().count("attached") >= 2, 20, "the client's second tunnel")
    finally:
        for sock in socks:
            sock.close()
    log = gateway.proc.log()
    assert "after connection lost" not in log, log[-2000:]
    assert len(log.splitlines()) < 20, log


@pytest.mark.slow
def test_client_leaving_mid_download_logs_one_line_per_event(procs, tmp_path):
    """`velo up` stops (a polite go-away) while downloads stream from the gateway's targets."""
    up, gateway = _download_mesh(procs, tmp_path)
    socks = [socket.create_connection(("127.0.0.1", up.port("blob"))) for _ in range(8)]
    try:
        for sock in socks:
            sock.settimeout(30)
            sock.recv(1 << 20)
        up.proc.signal(signal.SIGTERM)
        assert up.proc.wait(15) == 0
        gateway.proc.wait_log("gone", timeout=15)
        up2 = procs.up(up.config)  # and the next `velo up` of the same project is served
        assert up2.status()["tunnel"]["state"] == "up"
    finally:
        for sock in socks:
            sock.close()
    log = gateway.proc.log()
    assert "after connection lost" not in log, log[-2000:]
    assert len(log.splitlines()) < 12, log


# ---- the gateway trusts nothing ------------------------------------------------------------


def test_reverse_port_outside_the_allow_list_is_refused(procs, tmp_path):
    candidate = procs.server("http", text="local")
    allowed, forbidden = free_port(), free_port()
    gateway = procs.gateway(allow_reverse=[allowed])
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url,
                          local={"ok": (candidate, allowed), "nope": (candidate, forbidden)})
    up = procs.up(config)
    states = wait_for(lambda: (r := {x["name"]: x["state"] for x in up.status()["reverses"]})
                      and "pending" not in r.values() and r, 10, "both reverse answers")
    assert states["ok"] == "listening"
    assert "not allowed by the gateway's --allow-reverse" in states["nope"]
    assert http_get(allowed).endswith(b"local")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", forbidden), timeout=2)
    assert gateway.proc.log().count("not in --allow-reverse") == 1


class Hostile:
    """A peer with the token that speaks yamux by hand (velo.mux over a real WebSocket)."""

    def __init__(self, url: str):
        self.url = url
        self.session = None
        self.resets: set[int] = set()
        self.closed = None

    async def connect(self):
        from picows import WSListener, WSMsgType, ws_connect

        from velo.mux import GoAwayReceived, Session, StreamReset

        self.session = Session(client=True)
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        outer = self

        class Listener(WSListener):
            def on_ws_frame(self, transport, frame):
                if frame.msg_type == WSMsgType.BINARY:
                    for event in outer.session.receive_data(frame.get_payload_as_bytes()):
                        if isinstance(event, StreamReset):
                            outer.resets.add(event.stream_id)
                        elif isinstance(event, GoAwayReceived) and not outer.closed.done():
                            outer.closed.set_result("go-away")

            def on_ws_disconnected(self, transport):
                if not outer.closed.done():
                    outer.closed.set_result("disconnected")

        self.ws, _ = await ws_connect(Listener, self.url, extra_headers={"Authorization": f"Bearer {TOKEN}"})
        return self

    def open(self, header: dict | bytes) -> int:
        from velo import protocol

        sid = self.session.open_stream()
        self.session.send_data(sid, header if isinstance(header, bytes) else protocol.encode(header))
        self.flush()
        return sid

    def send(self, sid: int, message: dict) -> None:
        from velo import protocol

        self.session.send_data(sid, protocol.encode(message))
        self.flush()

    def flush(self):
        from picows import WSMsgType

        data = self.session.data_to_send()
        if data:
            self.ws.send(WSMsgType.BINARY, data)


async def _until(predicate, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_caps_on_streams_header_control_and_tunnels(procs, tmp_path):
    """Each cap: the offending stream or tunnel is closed, one log line, the gateway lives on
    and keeps serving a well-behaved client."""
    echo = procs.server("echo")
    gateway = procs.gateway(f"127.0.0.1:{echo}", extra=["--limit", "streams=5", "--limit", "control=5",
                                                       "--limit", "tunnels=3"])
    connect = {"op": "connect", "host": "127.0.0.1", "port": echo}

    async def main():
        # streams per tunnel: the 6th and later are reset, the first five are not
        peer = await Hostile(gateway.url).connect()
        sids = [peer.open(connect) for _ in range(12)]
        await _until(lambda: len(peer.resets) == 7)
        assert peer.resets == set(sids[5:])
        # header size: one stream with a 5 KiB header is reset (the tunnel stays)
        big = await Hostile(gateway.url).connect()
        sid = big.open(b"\x14\x00" + b" " * 0x1400)
        await _until(lambda: sid in big.resets)
        assert not big.closed.done()
        # control messages: a flood of them closes that tunnel
        chatty = await Hostile(gateway.url).connect()
        control = chatty.open({"op": "control", "session": "hostile", "client": "x", "protocol": PROTOCOL})
        for _ in range(10):
            chatty.send(control, {"op": "reverse", "listeners": []})
        assert await asyncio.wait_for(chatty.closed, 10)
        # tunnels per token: three are open (peer, big, plus one), the next is turned away
        third = await Hostile(gateway.url).connect()
        fourth = await Hostile(gateway.url).connect()
        assert await asyncio.wait_for(fourth.closed, 10) == "go-away"
        assert not third.closed.done()
        for hostile in (peer, big, third):
            hostile.ws.disconnect()

    asyncio.run(main())
    log = gateway.proc.log()
    assert log.count("more than 5 streams open") == 1, log
    assert log.count("exceeds 4096") == 1, log
    assert log.count("more than 5 control messages") == 1, log
    assert log.count("tunnels are open") == 1, log
    assert gateway.proc.running()
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"echo": f"127.0.0.1:{echo}"},
                          free_ports=True)
    up = procs.up(config)
    assert echo_burst(up.port("echo"), 3, 1024) == {"ok": 3}


def test_control_socket_directory_must_be_private(procs, tmp_path, monkeypatch):
    """Another user (or a careless chmod) must not be able to plant the socket velo talks to."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # velo up and the test's status calls agree
    base = runtime / f"velo-{os.getuid()}"
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    http = procs.server("http", text="x")
    gateway = procs.gateway(f"127.0.0.1:{http}")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"web": f"127.0.0.1:{http}"},
                          free_ports=True)
    proc = procs.start("up", [sys.executable, "-m", "velo", "up", "-c", str(config)], cwd=tmp_path)
    assert proc.wait(30) != 0
    assert f"{base} is open to other users (mode 777)" in proc.log(), proc.log()
    assert "Traceback" not in proc.log()
    base.chmod(0o700)
    up = procs.up(config)
    assert up.proc.running()


def test_token_never_shows_in_repr_logs_errors_or_status(procs, tmp_path):
    from velo.provider import Endpoint

    secret = "s3cret-token-that-must-not-leak"
    assert secret not in repr(Endpoint("websocket", "ws://gw/velo", secret))
    http = procs.server("http", text="x")
    gateway = procs.gateway(f"127.0.0.1:{http}", token=secret, extra=["--log-level", "debug"])
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, remote={"web": f"127.0.0.1:{http}"},
                          free_ports=True, token_env="LEAKY_TOKEN")
    up = procs.up(config, env={"LEAKY_TOKEN": secret})
    assert http_get(up.port("web")).endswith(b"x")
    gateway.proc.signal(signal.SIGKILL)  # errors and reconnect attempts get logged
    up.wait_state("reconnecting")
    status = status_cli(up.config)
    assert secret not in json.dumps(status)
    up.proc.stop()
    for proc in procs.all:
        assert secret not in proc.log(), f"the token is in {proc.name}'s log"


def test_client_killed_mid_reverse_download_resets_the_gateway_side_connection(procs, tmp_path):
    """The gateway's side of the same rule: a cluster client downloading from the laptop
    through a reverse port sees an RST when the laptop's `velo up` dies."""
    candidate = procs.server("blob", size=512 * MiB)
    expose = free_port()
    gateway = procs.gateway(allow_reverse=[expose])
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, local={"candidate": (candidate, expose)},
                          free_ports=True)
    up = procs.up(config)
    wait_for(lambda: up.status()["reverses"][0]["state"] == "listening", 10, "reverse listener")
    with socket.create_connection(("127.0.0.1", expose)) as sock:
        how, got = read_until_cut(sock, 4 * MiB, lambda: up.proc.signal(signal.SIGKILL))
    assert (how, got < 512 * MiB) == ("reset", True), f"the cut transfer ended with {how} after {got} bytes"
