"""The HTTP/2 backend's stream layer (H2Session), sans-IO: two ends wired back to back.

H2Session gives the tunnel mux.Session's API over the real `h2` library, so these
tests drive both ends in memory and check the wire-level promises of the issue:
windows above HTTP/2's 64 KiB default that grow with the round trip, sending that
stops at a zero window and resumes on WINDOW_UPDATE, GOAWAY and stream-id
exhaustion surfacing as a clean end, reverse streams over parked CONNECTs.
End-to-end behaviour over real processes is in tests/conformance/.
"""

from __future__ import annotations

import signal

import pytest

from velo.backends.h2 import PARKED, H2Session
from velo.mux import (
    INITIAL_WINDOW,
    DataReceived,
    GoAwayReceived,
    ProtocolError,
    SessionClosedError,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
)
from velo.mux.window import WindowTuner

TOKEN = "h2-test-token"


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


def pump(a: H2Session, b: H2Session) -> tuple[list, list]:
    """Shuttle bytes until both ends are quiet; (events at a, events at b)."""
    ea, eb = [], []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return ea, eb
        if out_a:
            eb += b.receive_data(out_a)
        if out_b:
            ea += a.receive_data(out_b)


def connected(token: str = TOKEN, server_tuner=None, client_tuner=None, **client_kw):
    client = H2Session(client=True, token=token, tuner=client_tuner, **client_kw)
    server = H2Session(client=False, authenticate=lambda t: t == TOKEN, tuner=server_tuner)
    pump(client, server)
    return client, server


def received(events, sid) -> int:
    return sum(len(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_the_token_is_checked_before_any_stream():
    client, server = connected()
    assert client.auth_status == 200 and server.authenticated
    bad, gateway = connected(token="wrong")
    assert bad.auth_status == 401 and not gateway.authenticated
    assert gateway.go_away_sent


def test_forward_stream_carries_bytes_both_ways_and_half_closes():
    client, server = connected()
    sid = client.open_stream()
    client.send_data(sid, b"header+payload")
    ec, es = pump(client, server)
    assert StreamOpened(sid) in es and received(es, sid) == len(b"header+payload")
    server.send_data(sid, b"answer", end_stream=True)
    ec, es = pump(client, server)
    assert received(ec, sid) == 6 and StreamEnded(sid) in ec


def test_windows_start_above_the_http2_default_and_sending_stops_at_zero():
    client, server = connected()
    sid = client.open_stream()
    pump(client, server)
    assert client.send_window(sid) == INITIAL_WINDOW > 65535
    taken = client.send_data(sid, b"x" * (INITIAL_WINDOW + 5000))
    assert taken == INITIAL_WINDOW and client.send_window(sid) == 0
    _, es = pump(client, server)
    assert received(es, sid) == INITIAL_WINDOW
    assert client.send_data(sid, b"more") == 0  # nothing acknowledged: nothing more may go
    server.acknowledge_received_data(sid, INITIAL_WINDOW)  # written onward: credit goes back
    ec, _ = pump(client, server)
    assert any(isinstance(e, WindowUpdated) and e.stream_id == sid for e in ec)
    assert client.send_window(sid) == INITIAL_WINDOW


def test_a_fast_reader_grows_its_window_with_the_round_trip():
    clock = Clock()
    tuner = WindowTuner(clock=clock, max_window=8 << 20)
    tuner.observe_rtt(0.02)
    client, server = connected(server_tuner=tuner)
    sid = client.open_stream()
    pump(client, server)
    windows = []
    for _ in range(8):
        n = client.send_data(sid, b"y" * client.send_window(sid))
        windows.append(n)
        _, es = pump(client, server)
        clock.now += 0.005
        server.acknowledge_received_data(sid, received(es, sid))
        pump(client, server)
    assert windows[0] == INITIAL_WINDOW and windows[-1] == 8 << 20, windows


def test_reverse_streams_ride_on_parked_connects_even_when_none_is_parked_yet():
    client, server = connected()
    assert len(server._parked) == PARKED
    opened = [server.open_stream() for _ in range(PARKED + 3)]  # 3 more than are parked
    for vid in opened:
        server.send_data(vid, b"reverse-header")
    ec, es = pump(client, server)
    streams = [e.stream_id for e in ec if isinstance(e, StreamOpened)]
    assert len(streams) == PARKED + 3, "the client re-parks and the waiting streams are bound"
    assert all(received(ec, sid) == len(b"reverse-header") for sid in streams)
    client.send_data(streams[-1], b"reply", end_stream=True)
    _, es = pump(client, server)
    assert received(es, opened[-1]) == 5 and StreamEnded(opened[-1]) in es


def test_stream_id_exhaustion_refuses_new_streams_so_the_client_reconnects():
    client, server = connected(max_stream_id=1 + 2 * (PARKED + 2))
    client.open_stream()
    client.open_stream()
    with pytest.raises(SessionClosedError):
        client.open_stream()


def test_goaway_is_reported_and_ends_new_streams():
    client, server = connected()
    server.go_away()
    ec, _ = pump(client, server)
    assert any(isinstance(e, GoAwayReceived) for e in ec)
    with pytest.raises(SessionClosedError):
        client.open_stream()


def test_a_gateway_going_away_makes_the_client_reconnect(procs, tmp_path):
    from tests.helpers import http_get, write_config

    http = procs.server("http", text="h2-back")
    gateway = procs.gateway(f"127.0.0.1:{http}", scheme="http")
    config = write_config(tmp_path / "velocity.toml", gateway_url=gateway.url, backend="h2",
                          remote={"h2-goaway-web": f"127.0.0.1:{http}"})
    up = procs.up(config)
    assert http_get(up.port("h2-goaway-web")).endswith(b"h2-back")
    gateway.proc.signal(signal.SIGTERM)  # a graceful stop sends GOAWAY
    gateway.proc.wait()
    up.wait_state("reconnecting")
    up.proc.wait_log("tunnel down: peer is going away")  # GOAWAY seen, not just a lost socket
    procs.gateway(f"127.0.0.1:{http}", scheme="http", port=gateway.port)
    up.wait_state("up")
    assert http_get(up.port("h2-goaway-web")).endswith(b"h2-back")


# ---- the fast path (FAST_PATH) is h2, frame for frame ------------------------------------


def _scripted_run(seed: int, fast: bool, monkeypatch) -> list:
    """A random but seeded conversation: streams opened both ways, bursts larger than a
    frame and than the window, partial acknowledgements, half-closes, resets and pings,
    every byte delivered in random slices (frames cut anywhere).  Returns everything
    observable: the wire bytes each way and every event, in order."""
    import random

    import velo.backends.h2 as h2mod

    monkeypatch.setattr(h2mod, "FAST_PATH", fast)
    rng = random.Random(seed)
    client = H2Session(client=True, token=TOKEN, tuner=WindowTuner(clock=Clock()))
    server = H2Session(client=False, authenticate=lambda t: t == TOKEN, tuner=WindowTuner(clock=Clock()))
    assert client._fast is fast and server._fast is fast
    trace: list = []
    unacked = {id(client): {}, id(server): {}}

    def deliver(src: H2Session, dst: H2Session) -> None:
        wire = src.data_to_send()
        trace.append(("wire", src.client, wire))
        pos = 0
        while pos < len(wire):
            cut = pos + rng.choice([1, 7, 9, 100, 5000, 70000, len(wire)])
            for ev in dst.receive_data(wire[pos:cut]):
                trace.append(("event", dst.client, repr(ev)))
                if isinstance(ev, DataReceived):
                    pending = unacked[id(dst)]
                    pending[ev.stream_id] = pending.get(ev.stream_id, 0) + len(ev.data)
            pos = cut

    deliver(client, server)
    deliver(server, client)
    deliver(client, server)
    streams: list[tuple[H2Session, int]] = []
    for _ in range(400):
        side = client if rng.random() < 0.6 else server
        other = server if side is client else client
        action = rng.random()
        if action < 0.08 or not streams:
            sid = side.open_stream()
            streams.append((side, sid))
            side.send_data(sid, b"h" * rng.randint(1, 40))
        elif action < 0.6:
            owner, sid = rng.choice(streams)
            try:
                sender = owner if rng.random() < 0.5 else (server if owner is client else client)
                size = rng.choice([1, 100, 1024, 16384, 70000, 300000, 1 << 20])
                sender.send_data(sid, bytes([rng.randrange(256)]) * size, end_stream=rng.random() < 0.05)
            except Exception as exc:  # noqa: BLE001 - a closed stream refuses the same way in both runs
                trace.append(("refused", type(exc).__name__))
        elif action < 0.85:
            pending = unacked[id(side)]
            if pending:
                sid = rng.choice(sorted(pending))
                n = pending[sid] if rng.random() < 0.7 else max(1, pending[sid] // 3)
                pending[sid] -= n
                side.acknowledge_received_data(sid, n)
        elif action < 0.92 and streams:
            owner, sid = rng.choice(streams)
            owner.reset_stream(sid)
        else:
            side.ping()
        deliver(side, other)
        if rng.random() < 0.5:
            deliver(other, side)
    return trace


@pytest.mark.parametrize("seed", range(12))
def test_the_fast_path_sends_and_reports_exactly_what_h2_alone_does(seed, monkeypatch):
    slow = _scripted_run(seed, False, monkeypatch)
    fast = _scripted_run(seed, True, monkeypatch)
    assert sum(1 for t in fast if t[0] == "event" and "DataReceived" in t[2]) > 50
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(slow, fast)):
        assert a == b, f"step {i}: h2 alone {str(a)[:200]} != fast path {str(b)[:200]}"


def test_a_peer_overrunning_its_window_fails_the_connection_on_the_fast_path_too():
    client, server = connected()
    sid = client.open_stream()
    client.send_data(sid, b"x")
    pump(client, server)
    assert server._split and server._fast
    window = server.conn.streams[sid]._inbound_window_manager.current_window_size
    frame = b"".join(
        (len(chunk) << 8).to_bytes(4, "big") + b"\x00" + sid.to_bytes(4, "big") + chunk
        for chunk in [b"y" * 16000] * (window // 16000 + 2)
    )
    with pytest.raises(ProtocolError):
        server.receive_data(frame)
    assert b"\x00\x00\x08\x07" in server.data_to_send()  # a GOAWAY (type 7, 8+ bytes) goes out


def test_an_overlong_frame_header_fails_at_once_without_buffering_the_body():
    client, server = connected()
    with pytest.raises(ProtocolError):
        server.receive_data(((1 << 24) - 1).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big"))


def test_a_reverse_stream_reset_by_the_gateway_resets_the_clients_stream():
    """Found by the scripted conversation above: the gateway's reset of a reverse stream
    looked the HTTP/2 id up after forgetting it, so h2 was asked to reset the virtual id
    (NoSuchStreamError inside the tunnel) and the client's stream stayed open."""
    client, server = connected()
    vid = server.open_stream()
    server.send_data(vid, b"hello")
    at_client, _ = pump(client, server)
    opened = [e.stream_id for e in at_client if isinstance(e, StreamOpened)]
    assert len(opened) == 1
    server.reset_stream(vid)
    at_client, _ = pump(client, server)
    assert [type(e).__name__ for e in at_client if e.stream_id == opened[0]] == ["StreamReset"]
