"""Receive-window auto-tuning: windows grow with the round trip, within a cap and a budget.

The sender is a plain Session (as any yamux peer would be): growth reaches it only
as WindowUpdate credit, so what it may send is the observable window.
"""

from __future__ import annotations

import pytest

from velo.mux import INITIAL_WINDOW, DataReceived, ProtocolError, Session, StreamOpened
from velo.mux.frames import TYPE_DATA, encode_frame
from velo.mux.window import WindowTuner

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tuned_pair(rtt: float = 0.02, **tuner_kw):
    """client = sender (untuned), server = receiver with a tuner on a fake clock."""
    clock = Clock()
    tuner = WindowTuner(clock=clock, **tuner_kw)
    tuner.observe_rtt(rtt)
    sender = Session(client=True)
    receiver = Session(client=False, tuner=tuner)
    return sender, receiver, tuner, clock


def open_stream(sender: Session, receiver: Session) -> int:
    sid = sender.open_stream()
    assert receiver.receive_data(sender.data_to_send()) == [StreamOpened(sid)]
    sender.receive_data(receiver.data_to_send())  # the ACK (and any larger window)
    return sid


def move(sender: Session, receiver: Session, sid: int, clock: Clock, *, read: bool, step: float) -> int:
    """One round: the sender fills its window, the receiver reads (acknowledges) it or not."""
    sent = sender.send_data(sid, b"x" * sender.send_window(sid))
    got = sum(len(e.data) for e in receiver.receive_data(sender.data_to_send()) if isinstance(e, DataReceived))
    assert got == sent
    clock.now += step
    if read:
        receiver.acknowledge_received_data(sid, got)
        sender.receive_data(receiver.data_to_send())
    return sent


def test_window_grows_while_the_window_limits_the_stream():
    sender, receiver, tuner, clock = tuned_pair(max_window=16 * MiB)
    sid = open_stream(sender, receiver)
    assert sender.send_window(sid) == INITIAL_WINDOW
    per_round = [move(sender, receiver, sid, clock, read=True, step=0.01) for _ in range(8)]
    assert per_round[0] == INITIAL_WINDOW
    assert per_round == sorted(per_round) and per_round[-1] == 16 * MiB, per_round
    assert sender.send_window(sid) == 16 * MiB  # capped: never more than max_window in flight


def test_a_reader_slower_than_the_window_keeps_its_window():
    sender, receiver, _, clock = tuned_pair(rtt=0.02)
    sid = open_stream(sender, receiver)
    move(sender, receiver, sid, clock, read=True, step=0.01)  # first credit may grow once
    window = sender.send_window(sid)
    for _ in range(5):  # half a window takes 4+ round trips to drain: no growth
        assert move(sender, receiver, sid, clock, read=True, step=0.1) == window
    assert sender.send_window(sid) == window


def test_a_stalled_reader_holds_no_more_than_its_window():
    sender, receiver, tuner, clock = tuned_pair()
    sid = open_stream(sender, receiver)
    assert move(sender, receiver, sid, clock, read=False, step=0.001) == INITIAL_WINDOW
    for _ in range(5):
        assert sender.send_data(sid, b"y" * 1000) == 0
    assert tuner.granted == 0
    # A sender ignoring the window is a protocol error, not more buffering.
    with pytest.raises(ProtocolError):
        receiver.receive_data(encode_frame(TYPE_DATA, 0, sid, payload=b"z" * 10))


def test_session_budget_bounds_the_sum_of_grown_windows_and_is_returned_on_close():
    sender, receiver, tuner, clock = tuned_pair(max_window=16 * MiB, budget=4 * MiB)
    a, b = open_stream(sender, receiver), open_stream(sender, receiver)
    for _ in range(6):
        move(sender, receiver, a, clock, read=True, step=0.001)
        move(sender, receiver, b, clock, read=True, step=0.001)
    extra = (sender.send_window(a) - INITIAL_WINDOW) + (sender.send_window(b) - INITIAL_WINDOW)
    assert extra == tuner.granted <= 4 * MiB
    assert tuner.granted == 4 * MiB
    receiver.reset_stream(a)
    sender.receive_data(receiver.data_to_send())
    assert tuner.granted == sender.send_window(b) - INITIAL_WINDOW
    c = open_stream(sender, receiver)
    for _ in range(6):
        move(sender, receiver, c, clock, read=True, step=0.001)
    assert sender.send_window(c) > INITIAL_WINDOW  # the freed budget is used again


def test_no_growth_before_a_round_trip_was_measured():
    sender, receiver, _, clock = tuned_pair(rtt=0.0)
    sid = open_stream(sender, receiver)
    for _ in range(4):
        assert move(sender, receiver, sid, clock, read=True, step=0.0001) == INITIAL_WINDOW


def test_start_window_is_announced_in_the_ack_and_paid_from_the_budget():
    sender, receiver, tuner, _ = tuned_pair(start_window=1 * MiB, budget=1 * MiB - INITIAL_WINDOW)
    first = open_stream(sender, receiver)
    second = open_stream(sender, receiver)
    assert sender.send_window(first) == 1 * MiB
    assert sender.send_window(second) == INITIAL_WINDOW  # budget spent: the yamux default
    assert tuner.granted == 1 * MiB - INITIAL_WINDOW



def test_a_window_bound_stream_over_a_wan_grows_4x_per_credit():
    """Over a real path a window-bound stream's credits come a round trip plus half a
    window's arrival apart (1.2-1.8 round trips at 10 ms each way, measured): that is
    window-bound, and the window must quadruple, not just double, or a 64 MiB download
    spends a quarter of its time ramping up (bench/wan_bulk.py)."""
    sender, receiver, _, clock = tuned_pair(rtt=0.02, max_window=16 * MiB)
    sid = open_stream(sender, receiver)
    move(sender, receiver, sid, clock, read=True, step=0.03)  # first credit: 2x
    assert sender.send_window(sid) == 2 * INITIAL_WINDOW
    move(sender, receiver, sid, clock, read=True, step=0.03)  # 1.5 round trips later
    assert sender.send_window(sid) == 8 * INITIAL_WINDOW


def test_a_tunnels_streams_start_at_1_mib_from_its_budget():
    """A download over a WAN spends its first round trips ramping the window up: a tunnel's
    new stream may take 1 MiB before its first credit (bench/wan_bulk.py measured 6-7 %
    more for one 64 MiB download), paid from the budget, so many streams at once fall
    back to the yamux default and memory stays bounded."""
    import asyncio

    from velo.mux.window import STREAM_START_WINDOW
    from velo.tunnel import Tunnel

    async def main():
        tunnel = Tunnel(client=False)
        sender = Session(client=True)
        assert STREAM_START_WINDOW == 1 * MiB
        budget = tunnel.window_tuner.budget
        ids = [sender.open_stream() for _ in range(budget // (STREAM_START_WINDOW - INITIAL_WINDOW) + 1)]
        tunnel.session.receive_data(sender.data_to_send())
        sender.receive_data(tunnel.session.data_to_send())  # the ACKs, each announcing its window
        windows = [sender.send_window(sid) for sid in ids]
        assert windows[0] == STREAM_START_WINDOW
        assert windows[-1] < STREAM_START_WINDOW  # the budget is spent: no more than it, ever
        assert sum(w - INITIAL_WINDOW for w in windows) <= budget

    asyncio.run(main())
