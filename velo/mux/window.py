"""Receive-window auto-tuning for the yamux session (receiver side only).

A fixed 256 KiB stream window caps one stream at 256 KiB per round trip: about
13 MB/s with 10 ms each way, whatever the link could do.  A fixed large window
would let every stalled reader pin that much memory.  So, like HTTP/2's BDP
probing and QUIC's auto-tuning (and go-yamux), each stream starts at a modest
window (a tunnel's: ``STREAM_START_WINDOW``, while the budget lasts; else the
yamux default) and its window grows 4x whenever the reader drained half a window in
less than two measured round trips (2x in less than four): then the window, not
the reader, is what limits the stream.  The window stops growing at
``max_window`` and when the session-wide ``budget`` of extra window is spent,
and it only grows when the application acknowledges data (it wrote it onward),
so a stalled reader never grows and holds at most the window it had.

yamux cannot announce a window, only add credit, so growth is sent as a
WindowUpdate whose delta is larger than the bytes consumed.  That is ordinary
yamux: any peer (hashicorp's included) just sees more credit, and nothing needs
negotiating between gateway and client; each end tunes its own receive side.
"""

from __future__ import annotations

import time
from typing import Callable

from .frames import INITIAL_WINDOW

MiB = 1 << 20
STREAM_START_WINDOW = 1 * MiB
"""What a tunnel's new stream may receive before its first credit (velo/tunnel.py), paid
from the budget (the yamux default once it is spent). Measured over the emulated WAN
(bench/wan_bulk.py, 10 ms each way, 1 Gbit/s, 8 alternated rounds): one 64 MiB download
98.5 MB/s over the WebSocket backend and 84.5 over port-forward, against 92.7 and 79.1
when starting at the 256 KiB default; a stalled reader holds at most this much."""


class WindowTuner:
    """Decides, per credit a session is about to send, how much the stream's window grows.

    ``rtt`` is fed by the edge (the tunnel measures it with pings); the clock is
    injected so the policy stays testable without I/O.
    """

    __slots__ = ("start_window", "max_window", "budget", "granted", "rtt", "_clock")

    def __init__(
        self,
        *,
        start_window: int = INITIAL_WINDOW,
        max_window: int = 16 * MiB,
        budget: int = 64 * MiB,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not INITIAL_WINDOW <= start_window <= max_window:
            raise ValueError("need yamux's default window <= start_window <= max_window")
        self.start_window = start_window
        self.max_window = max_window
        self.budget = budget  # extra window (above ``initial``) all streams may hold together
        self.granted = 0
        self.rtt = 0.0  # seconds; 0 until measured, and no growth before that
        self._clock = clock

    def observe_rtt(self, rtt: float) -> None:
        self.rtt = rtt

    def start(self) -> int:
        """A new stream: how much above the default its window starts (from the budget)."""
        extra = min(self.start_window - INITIAL_WINDOW, self.budget - self.granted)
        if extra <= 0:
            return 0
        self.granted += extra
        return extra

    def grow(self, window: int, epoch: float) -> tuple[int, float]:
        """Called when a stream of ``window`` bytes credits half of it back; ``epoch`` is
        when it did so last (0: never).  Returns (extra window, new epoch)."""
        now = self._clock()
        rtt = self.rtt
        if not rtt:
            return 0, now
        if epoch:
            elapsed = now - epoch
            if elapsed >= 4 * rtt:
                return 0, now  # the reader (or the sender) is slower than the window: keep it
            # A window-bound stream credits about once per round trip plus the time half a
            # window takes to arrive: under two round trips means the window, not the link,
            # limits it, so grow 4x (measured over a 10 ms-each-way WAN: credits came every
            # 1.2-1.8 round trips during the ramp, so the old "under one round trip" rule
            # only ever doubled, and a 64 MiB download spent a quarter of its time ramping).
            wanted = 3 * window if elapsed < 2 * rtt else window
        else:
            wanted = window  # first credit of the stream: it read half a window at all
        extra = min(wanted, self.max_window - window, self.budget - self.granted)
        if extra <= 0:
            return 0, now
        self.granted += extra
        return extra, now

    def release(self, extra: int) -> None:
        """A stream that had grown by ``extra`` is gone; that returns to the budget."""
        self.granted -= extra
