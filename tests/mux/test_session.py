from __future__ import annotations

import pytest

from velo.mux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    ProtocolError,
    Session,
    SessionClosedError,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    decode_header,
    encode_frame,
)
from velo.mux.frames import HEADER

from . import Pair, feed, received_bytes

KIB = 1024


def frames_of(wire: bytes):
    """Split raw output into (header, payload) pairs for wire-level asserts."""
    out, pos = [], 0
    while pos < len(wire):
        hdr = decode_header(wire, pos)
        pos += 12
        plen = hdr.length if hdr.type == TYPE_DATA else 0
        out.append((hdr, wire[pos : pos + plen]))
        pos += plen
    return out


def opened_pair(**kw):
    p = Pair(**kw)
    sid = p.client.open_stream()
    _, sev = p.pump()
    assert sev == [StreamOpened(sid)]
    return p, sid


# ---------------------------------------------------------------- lifecycle


def test_open_sends_syn_and_peer_acks():
    p = Pair()
    sid = p.client.open_stream()
    assert sid == 1
    [(hdr, _)] = frames_of(p.client.data_to_send())
    assert (hdr.type, hdr.flags, hdr.stream_id, hdr.length) == (TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)
    assert p.server.receive_data(encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)) == [StreamOpened(1)]
    [(hdr, _)] = frames_of(p.server.data_to_send())
    assert (hdr.type, hdr.flags, hdr.stream_id) == (TYPE_WINDOW_UPDATE, FLAG_ACK, 1)
    assert p.client.receive_data(encode_frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0)) == [
        WindowUpdated(1, INITIAL_WINDOW)
    ]


def test_stream_id_parity():
    p = Pair()
    assert [p.client.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [p.server.open_stream() for _ in range(3)] == [2, 4, 6]
    cev, sev = p.pump()
    assert [e for e in sev if isinstance(e, StreamOpened)] == [StreamOpened(1), StreamOpened(3), StreamOpened(5)]
    assert [e for e in cev if isinstance(e, StreamOpened)] == [StreamOpened(2), StreamOpened(4), StreamOpened(6)]
    assert p.client.open_stream_ids == p.server.open_stream_ids == {1, 2, 3, 4, 5, 6}


def test_data_half_close_both_ways_and_forget():
    p, sid = opened_pair()
    assert p.client.send_data(sid, b"hello") == 5
    assert p.to_server() == [DataReceived(sid, b"hello")]
    p.client.end_stream(sid)
    assert p.to_server() == [StreamEnded(sid)]
    with pytest.raises(StreamClosedError):
        p.client.send_data(sid, b"more")
    # Half-closed: the other direction still flows.
    assert p.server.send_data(sid, b"world", end_stream=True) == 5
    assert p.to_client() == [DataReceived(sid, b"world"), StreamEnded(sid)]
    assert p.client.open_stream_ids == p.server.open_stream_ids == frozenset()


def test_fin_on_data_frame_emits_data_then_end():
    p, sid = opened_pair()
    p.client.send_data(sid, b"bye", end_stream=True)
    wire = p.client.data_to_send()
    [(hdr, payload)] = frames_of(wire)
    assert hdr.flags == FLAG_FIN and payload == b"bye"
    assert p.server.receive_data(wire) == [DataReceived(sid, b"bye"), StreamEnded(sid)]


def test_server_opened_stream():
    p = Pair()
    sid = p.server.open_stream()
    cev, _ = p.pump()
    assert cev == [StreamOpened(sid)]
    p.server.send_data(sid, b"push")
    assert p.to_client() == [DataReceived(sid, b"push")]


def test_end_stream_twice_raises():
    p, sid = opened_pair()
    p.client.end_stream(sid)
    with pytest.raises(StreamClosedError):
        p.client.end_stream(sid)


def test_send_on_unknown_stream_raises():
    with pytest.raises(StreamClosedError):
        Session(client=True).send_data(1, b"x")
    with pytest.raises(StreamClosedError):
        Session(client=True).send_window(1)


def test_data_may_precede_ack():
    p = Pair()
    sid = p.client.open_stream()
    p.client.send_data(sid, b"early")
    assert p.to_server() == [StreamOpened(sid), DataReceived(sid, b"early")]


def test_peer_opens_with_data_frame_syn():
    s = Session(client=False)
    ev = s.receive_data(encode_frame(TYPE_DATA, FLAG_SYN | FLAG_FIN, 1, payload=b"abc"))
    assert ev == [StreamOpened(1), DataReceived(1, b"abc"), StreamEnded(1)]


def test_large_write_split_by_max_frame():
    p, sid = opened_pair(max_frame=4096)
    data = bytes(range(256)) * 40  # 10240 bytes
    assert p.client.send_data(sid, data, end_stream=True) == len(data)
    wire = p.client.data_to_send()
    frames = frames_of(wire)
    assert [len(pl) for _, pl in frames] == [4096, 4096, 2048]
    assert [h.flags for h, _ in frames] == [0, 0, FLAG_FIN]
    ev = p.server.receive_data(wire)
    assert received_bytes(ev) == {sid: data}
    assert ev[-1] == StreamEnded(sid)


def test_send_data_copies_mutable_buffers():
    p, sid = opened_pair()
    buf = bytearray(b"aaaa")
    p.client.send_data(sid, buf)
    mv = memoryview(bytearray(b"bbbb"))
    p.client.send_data(sid, mv)
    buf[:] = b"XXXX"
    mv[:] = b"YYYY"
    assert received_bytes(p.to_server()) == {sid: b"aaaabbbb"}


# -------------------------------------------------------------------- reset


def test_local_reset():
    p, sid = opened_pair()
    p.server.send_data(sid, b"in flight")
    p.client.reset_stream(sid)
    assert sid not in p.client.open_stream_ids
    with pytest.raises(StreamClosedError):
        p.client.send_data(sid, b"x")
    p.client.reset_stream(sid)  # idempotent
    # Data that crossed the RST on the wire is silently discarded...
    assert p.to_client() == []
    # ...and the peer learns of the reset.
    assert p.to_server() == [StreamReset(sid)]
    assert p.server.open_stream_ids == frozenset()
    with pytest.raises(StreamClosedError):
        p.server.send_data(sid, b"x")


def test_peer_reset_mid_frame_discards_rest():
    p, sid = opened_pair()
    p.server.send_data(sid, b"0123456789")
    wire = p.server.data_to_send()
    assert p.client.receive_data(wire[:15]) == [DataReceived(sid, b"012")]
    p.client.reset_stream(sid)
    assert p.client.receive_data(wire[15:]) == []


def test_unknown_stream_data_is_consumed():
    p, sid = opened_pair()
    sid2 = p.client.open_stream()
    p.pump()
    p.client.send_data(sid, b"A" * 100)
    p.client.send_data(sid2, b"B" * 10)
    p.server.reset_stream(sid)
    ev = p.to_server()
    assert ev == [DataReceived(sid2, b"B" * 10)]


# ------------------------------------------------------------ flow control


def test_window_exhaustion_and_recovery():
    p, sid = opened_pair()
    assert p.client.send_window(sid) == INITIAL_WINDOW
    chunk = b"z" * (100 * KIB)
    assert p.client.send_data(sid, chunk) == 100 * KIB
    assert p.client.send_data(sid, chunk) == 100 * KIB
    assert p.client.send_data(sid, chunk, end_stream=True) == 56 * KIB  # partial, so no FIN
    assert p.client.send_window(sid) == 0
    assert p.client.send_data(sid, chunk) == 0
    ev = p.to_server()
    got = sum(len(e.data) for e in ev if isinstance(e, DataReceived))
    assert got == INITIAL_WINDOW
    assert StreamEnded(sid) not in ev
    # No acknowledgement -> no credit, however often we pump.
    p.pump()
    assert p.client.send_data(sid, chunk) == 0
    # Acks below half a window are batched.
    p.server.acknowledge_received_data(sid, 100 * KIB)
    assert not p.server.has_data_to_send()
    p.server.acknowledge_received_data(sid, 28 * KIB)
    assert p.to_client() == [WindowUpdated(sid, 128 * KIB)]
    assert p.client.send_data(sid, chunk, end_stream=True) == 100 * KIB
    assert received_bytes(p.to_server()) == {sid: chunk}


def test_unacknowledged_data_never_exceeds_window():
    p, sid = opened_pair()
    unacked = 0
    for _ in range(50):
        p.client.send_data(sid, b"q" * 30_000)
        for ev in p.to_server():
            if isinstance(ev, DataReceived):
                unacked += len(ev.data)
        p.to_client()
        assert unacked <= INITIAL_WINDOW
    assert unacked == INITIAL_WINDOW


def test_blocked_stream_does_not_block_others():
    p = Pair()
    slow, fast = p.client.open_stream(), p.client.open_stream()
    p.pump()
    while p.client.send_data(slow, b"s" * 65536):
        pass
    assert p.client.send_window(slow) == 0
    total = 0
    for _ in range(20):  # 20 x 64 KiB = 5x the window on the fast stream
        assert p.client.send_data(fast, b"f" * 65536) == 65536
        for ev in p.to_server():
            if isinstance(ev, DataReceived) and ev.stream_id == fast:
                total += len(ev.data)
                p.server.acknowledge_received_data(fast, len(ev.data))
        p.to_client()
    assert total == 20 * 65536
    assert p.client.send_window(slow) == 0


def test_larger_window_negotiated_via_syn_and_ack():
    big = 1024 * KIB
    p = Pair(client_kw=dict(window=big))
    sid = p.client.open_stream()
    wire = p.client.data_to_send()
    assert decode_header(wire).length == big - INITIAL_WINDOW
    p.server.receive_data(wire)
    p.to_client()
    # Server may now send the client's full 1 MiB; client only the default.
    assert p.server.send_window(sid) == big
    assert p.client.send_window(sid) == INITIAL_WINDOW
    assert p.server.send_data(sid, b"x" * (2 * big)) == big
    assert sum(len(e.data) for e in p.to_client() if isinstance(e, DataReceived)) == big


def test_server_with_larger_window_announces_in_ack():
    big = 512 * KIB
    p = Pair(server_kw=dict(window=big))
    sid = p.client.open_stream()
    p.to_server()
    assert p.to_client() == [WindowUpdated(sid, big)]
    assert p.client.send_data(sid, b"y" * big * 2) == big
    assert sum(len(e.data) for e in p.to_server() if isinstance(e, DataReceived)) == big


def test_over_acknowledging_is_a_bug():
    p, sid = opened_pair()
    p.client.send_data(sid, b"abc")
    p.to_server()
    with pytest.raises(ValueError):
        p.server.acknowledge_received_data(sid, 4)
    p.server.acknowledge_received_data(99, 10)  # unknown: ignored


def test_max_buffered_backpressure():
    p, sid = opened_pair(max_buffered=1000)
    assert p.client.send_data(sid, b"x" * 5000) <= 1000
    assert p.client.send_data(sid, b"x") == 0
    assert p.client.send_window(sid) == 0
    p.client.data_to_send()
    assert p.client.send_window(sid) == 1000


# ------------------------------------------------------- ping / go-away


def test_ping_pong():
    p = Pair()
    assert p.client.ping() == 0
    assert p.client.ping() == 1
    assert p.client.ping(0xCAFE) == 0xCAFE
    assert p.to_server() == [PingReceived(0), PingReceived(1), PingReceived(0xCAFE)]
    assert p.to_client() == [PongReceived(0), PongReceived(1), PongReceived(0xCAFE)]
    wire = encode_frame(TYPE_PING, FLAG_SYN, 0, 7)
    p.client.receive_data(wire)
    assert p.client.data_to_send() == encode_frame(TYPE_PING, FLAG_ACK, 0, 7)


def test_go_away():
    p, sid = opened_pair()
    p.client.go_away()
    with pytest.raises(SessionClosedError):
        p.client.open_stream()
    assert p.to_server() == [GoAwayReceived(0)]
    with pytest.raises(SessionClosedError):
        p.server.open_stream()
    # Existing streams keep working both ways.
    p.client.send_data(sid, b"still")
    p.server.send_data(sid, b"here")
    assert p.to_server() == [DataReceived(sid, b"still")]
    assert p.to_client() == [DataReceived(sid, b"here")]


def test_peer_stream_after_go_away_is_reset():
    c, s = Session(client=True), Session(client=False)
    c.open_stream()  # client did not see the go-away yet: SYN crosses it
    s.go_away(2)
    assert s.receive_data(c.data_to_send()) == []
    frames = frames_of(s.data_to_send())
    assert [(h.type, h.length) for h, _ in frames][0] == (TYPE_GO_AWAY, 2)
    assert frames[1][0].flags == FLAG_RST
    assert c.receive_data(encode_frame(TYPE_GO_AWAY, 0, 0, 2) + encode_frame(
        TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0)) == [GoAwayReceived(2), StreamReset(1)]


def test_max_streams_rejects_with_rst():
    p = Pair(server_kw=dict(max_streams=2))
    ids = [p.client.open_stream() for _ in range(3)]
    cev, sev = p.pump()
    assert sev == [StreamOpened(ids[0]), StreamOpened(ids[1])]
    assert StreamReset(ids[2]) in cev
    assert p.server.open_stream_ids == {ids[0], ids[1]}


# -------------------------------------------------------- split input


def test_byte_by_byte_input():
    p = Pair()
    sid = p.client.open_stream()
    p.client.send_data(sid, b"hello world", end_stream=True)
    p.client.ping(5)
    wire = p.client.data_to_send()
    ev = feed(p.server, wire, range(len(wire)))
    assert received_bytes(ev) == {sid: b"hello world"}
    assert [e for e in ev if not isinstance(e, DataReceived)] == [
        StreamOpened(sid),
        StreamEnded(sid),
        PingReceived(5),
    ]


def test_receive_accepts_bytearray_and_memoryview():
    p, sid = opened_pair()
    p.client.send_data(sid, b"abc")
    wire = p.client.data_to_send()
    assert p.server.receive_data(memoryview(wire)[:14]) == [DataReceived(sid, b"ab")]
    assert p.server.receive_data(bytearray(wire[14:])) == [DataReceived(sid, b"c")]


# ------------------------------------------------------------- garbage


def garbage_case(wire: bytes, *, setup_stream: bool = True) -> ProtocolError:
    s = Session(client=False)
    if setup_stream:
        s.receive_data(encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
        s.data_to_send()
    with pytest.raises(ProtocolError) as exc:
        s.receive_data(wire)
    # The session tells the peer why and refuses further input.
    assert frames_of(s.data_to_send())[-1][0][1:] == (TYPE_GO_AWAY, 0, 0, 1)
    with pytest.raises(ProtocolError):
        s.receive_data(b"")
    return exc.value


@pytest.mark.parametrize(
    "wire, words",
    [
        (HEADER.pack(1, TYPE_DATA, 0, 1, 0), "version"),
        (HEADER.pack(0, 7, 0, 1, 0), "unknown frame type"),
        (HEADER.pack(0, TYPE_DATA, 0, 1, INITIAL_WINDOW + 1), "exceeds receive window"),
        (encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0), "parity"),
        (encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0), "existing"),
        # found by the fuzzer: a reset stream's id opened again got the old stream's late credit
        (encode_frame(TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0) + encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0), "reuses"),
        (encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 5, 0) + encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0), "reuses"),
        (encode_frame(TYPE_DATA, 0, 0, payload=b"x"), "stream 0"),
        (encode_frame(TYPE_PING, FLAG_SYN, 1, 0), "ping on stream"),
        (encode_frame(TYPE_PING, 0, 0, 0), "ping without"),
        (encode_frame(TYPE_GO_AWAY, 0, 3, 0), "go-away on stream"),
        (encode_frame(TYPE_DATA, 0, 99, payload=b"x"), "never opened"),
        (encode_frame(TYPE_DATA, 0, 4, payload=b"x"), "never opened"),
        (encode_frame(TYPE_DATA, FLAG_FIN, 1) + encode_frame(TYPE_DATA, 0, 1, payload=b"x"), "after FIN"),
        (encode_frame(TYPE_DATA, FLAG_FIN, 1) + encode_frame(TYPE_WINDOW_UPDATE, FLAG_FIN, 1), "second FIN"),
        (encode_frame(TYPE_WINDOW_UPDATE, 0, 1, 2**32 - 1), "overflow"),
    ],
)
def test_garbage_raises_protocol_error(wire, words):
    err = garbage_case(wire)
    assert words in err.reason
    assert isinstance(err, ValueError)


def test_oversized_data_detected_from_header_alone():
    # No payload sent: a lying length must not make us wait for (or buffer) 4 GiB.
    err = garbage_case(HEADER.pack(0, TYPE_DATA, 0, 1, 2**32 - 1))
    assert "window" in err.reason


def test_protocol_error_carries_earlier_events():
    s = Session(client=False)
    wire = encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + encode_frame(TYPE_DATA, 0, 1, payload=b"ok")
    with pytest.raises(ProtocolError) as exc:
        s.receive_data(wire + b"\x09" * 12)
    assert exc.value.events == [StreamOpened(1), DataReceived(1, b"ok")]


def test_window_accounting_counts_across_frames():
    s = Session(client=False)
    s.receive_data(encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    big = encode_frame(TYPE_DATA, 0, 1, payload=b"x" * (INITIAL_WINDOW // 2))
    s.receive_data(big + big)
    with pytest.raises(ProtocolError):
        s.receive_data(encode_frame(TYPE_DATA, 0, 1, payload=b"x"))


def test_stale_frames_after_close_are_ignored():
    p, sid = opened_pair()
    p.client.end_stream(sid)
    p.server.end_stream(sid)
    p.pump()
    assert sid not in p.server.open_stream_ids
    late = encode_frame(TYPE_WINDOW_UPDATE, 0, sid, 100) + encode_frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
    assert p.server.receive_data(late) == []
    assert p.client.receive_data(late) == []


def test_window_must_not_be_below_default():
    with pytest.raises(ValueError):
        Session(client=True, window=1000)
