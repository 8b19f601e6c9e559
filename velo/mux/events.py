"""Events returned by ``Session.receive_data``.

Plain slotted dataclasses (not frozen): one is built per received frame on
the hot path and frozen dataclasses pay for ``object.__setattr__`` per field.
"""

from __future__ import annotations

from dataclasses import dataclass


class Event:
    """Common base so callers can type-annotate ``list[Event]``."""

    __slots__ = ()


@dataclass(slots=True)
class StreamOpened(Event):
    """The peer opened a stream; it has already been acknowledged."""

    stream_id: int


@dataclass(slots=True)
class DataReceived(Event):
    """Payload for a stream.

    A frame split across ``receive_data`` calls is delivered in pieces rather
    than buffered, so boundaries carry no meaning: treat it as a byte stream.
    Call ``acknowledge_received_data`` once the bytes are consumed, or the
    peer stalls when the window runs out.
    """

    stream_id: int
    data: bytes


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer half-closed (FIN): no more data will arrive on this stream."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The peer aborted the stream (RST); its state is already gone."""

    stream_id: int


@dataclass(slots=True)
class WindowUpdated(Event):
    """Our send window grew (credit or ACK); blocked writers may resume."""

    stream_id: int
    send_window: int


@dataclass(slots=True)
class PingReceived(Event):
    """The peer pinged us; the pong is already queued."""

    opaque: int


@dataclass(slots=True)
class PongReceived(Event):
    """Answer to one of our pings, for RTT / liveness tracking."""

    opaque: int


@dataclass(slots=True)
class GoAwayReceived(Event):
    """The peer will accept no new streams; existing ones continue."""

    code: int
