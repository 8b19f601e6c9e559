"""Property tests: whatever the write pattern and however TCP slices the
bytes, each stream must deliver exactly what was written, in order."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from velo.mux import (
    DataReceived,
    ProtocolError,
    Session,
    StreamEnded,
    StreamOpened,
    StreamReset,
    encode_frame,
)
from velo.mux.frames import FLAG_SYN, INITIAL_WINDOW, TYPE_WINDOW_UPDATE

from . import Pair, feed

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Endpoint:
    """Receiving side bookkeeping: bytes per stream, ends seen, ack policy."""

    def __init__(self, session: Session, ack_prob: float) -> None:
        self.session = session
        self.ack_prob = ack_prob
        self.got: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.unacked: dict[int, int] = {}

    def handle(self, events, draw_bool) -> None:
        s = self.session
        for ev in events:
            if isinstance(ev, DataReceived):
                assert ev.data, "empty DataReceived"
                assert ev.stream_id not in self.ended
                self.got.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                self.unacked[ev.stream_id] = self.unacked.get(ev.stream_id, 0) + len(ev.data)
                # The flow-control promise: never more than a window in flight.
                assert self.unacked[ev.stream_id] <= INITIAL_WINDOW
            elif isinstance(ev, StreamEnded):
                self.ended.add(ev.stream_id)
            else:
                assert not isinstance(ev, StreamReset)
        # Lazily acknowledge some streams to exercise partial windows.
        for sid, n in list(self.unacked.items()):
            if n and draw_bool(self.ack_prob):
                s.acknowledge_received_data(sid, n)
                self.unacked[sid] = 0

    def ack_all(self) -> None:
        for sid, n in self.unacked.items():
            if n:
                self.session.acknowledge_received_data(sid, n)
        self.unacked.clear()


@SETTINGS
@given(
    data=st.data(),
    n_client_streams=st.integers(1, 3),
    n_server_streams=st.integers(0, 2),
    max_frame=st.integers(7, 1500),
    ops=st.lists(
        st.tuples(
            st.integers(0, 4),
            st.booleans(),
            # Mostly small writes, some big enough to exhaust a window.
            st.one_of(st.integers(0, 3000), st.integers(50_000, 300_000)),
        ),
        max_size=25,
    ),
    ack_prob=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_random_writes_random_splits_deliver_exact_bytes(
    data, n_client_streams, n_server_streams, max_frame, ops, ack_prob
):
    p = Pair(max_frame=max_frame)
    streams = [p.client.open_stream() for _ in range(n_client_streams)]
    streams += [p.server.open_stream() for _ in range(n_server_streams)]
    p.pump()  # SYN/ACK first: a side cannot write to a stream it has not heard of
    c_end, s_end = Endpoint(p.client, ack_prob), Endpoint(p.server, ack_prob)
    # What each direction of each stream must eventually carry.
    want = {(sid, to_server): bytearray() for sid in streams for to_server in (True, False)}
    backlog = {k: bytearray() for k in want}

    def draw_bool(prob):
        return prob >= 1.0 or (prob > 0 and data.draw(st.booleans()))

    def move(src: Session, dst: Endpoint) -> None:
        wire = src.data_to_send()
        if wire:
            cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6))
            dst.handle(feed(dst.session, wire, cuts), draw_bool)

    def flush_backlog() -> None:
        for (sid, to_server), buf in backlog.items():
            if buf:
                sender = p.client if to_server else p.server
                n = sender.send_data(sid, bytes(buf))
                if n < len(buf):
                    event("writer blocked by flow control")
                del buf[:n]

    seq = 0
    for idx, to_server, size in ops:
        sid = streams[idx % len(streams)]
        # Cheap, position-dependent bytes so reordering or loss shows up.
        chunk = bytes((seq + i) % 251 for i in range(min(size, 64))) * (size // 64 + 1)
        chunk = chunk[:size]
        seq += 1
        want[(sid, to_server)] += chunk
        backlog[(sid, to_server)] += chunk
        flush_backlog()
        move(p.client, s_end)
        move(p.server, c_end)

    # Drain: everyone acknowledges, writers push their backlog, then FIN.
    for _ in range(1000):
        c_end.ack_all()
        s_end.ack_all()
        flush_backlog()
        move(p.client, s_end)
        move(p.server, c_end)
        if not any(backlog.values()) and not p.client.has_data_to_send() and not p.server.has_data_to_send():
            break
    assert not any(backlog.values())
    for sid in streams:
        p.client.end_stream(sid)
        p.server.end_stream(sid)
    move(p.client, s_end)
    move(p.server, c_end)

    for sid in streams:
        assert bytes(s_end.got.get(sid, b"")) == bytes(want[(sid, True)])
        assert bytes(c_end.got.get(sid, b"")) == bytes(want[(sid, False)])
    assert s_end.ended == c_end.ended == set(streams)
    # Both FINs seen on both sides: all state released.
    assert p.client.open_stream_ids == p.server.open_stream_ids == frozenset()


@SETTINGS
@given(junk=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=5), preopen=st.booleans())
def test_garbage_never_crashes_with_anything_but_protocol_error(junk, cuts, preopen):
    s = Session(client=False, max_streams=4)
    if preopen:
        s.receive_data(encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    try:
        feed(s, junk, cuts)
    except ProtocolError as exc:
        assert exc.reason
    assert len(s.open_stream_ids) <= 4
    s.data_to_send()


@SETTINGS
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20),
    cut_seed=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_split_points_do_not_change_events(payloads, cut_seed):
    """Same bytes, any slicing: identical non-data events and identical bytes."""
    def run(cuts):
        p = Pair(max_frame=64)
        sid = p.client.open_stream()
        for i, pl in enumerate(payloads):
            p.client.send_data(sid, pl, end_stream=i == len(payloads) - 1)
            p.client.ping(i)
        wire = p.client.data_to_send()
        ev = feed(p.server, wire, [c % (len(wire) + 1) for c in cuts])
        data = b"".join(e.data for e in ev if isinstance(e, DataReceived))
        return data, [e for e in ev if not isinstance(e, DataReceived)]

    whole = run([])
    assert run(cut_seed) == whole
    assert whole[0] == b"".join(payloads)
    assert whole[1][0] == StreamOpened(1) and StreamEnded(1) in whole[1]
