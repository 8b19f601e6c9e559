"""What the fuzzers check, as plain functions (the corpus replay in the tests uses them too).

The property for both parsers: any input either parses or raises the protocol's own
error (``mux.ProtocolError``, ``protocol.MessageError``); anything else escaping is a
bug, because the edge only catches those and a stray exception would take down more
than the one misbehaving peer.
"""

from __future__ import annotations

from velo import protocol
from velo.mux import (
    DataReceived,
    ProtocolError,
    Session,
    SessionClosedError,
    StreamClosedError,
    StreamOpened,
)


def _chunks(data: bytes):
    """The first byte says where to cut, so the fuzzer also explores split frames."""
    if not data:
        return [b""]
    step = data[0] % 17 + 1
    body = data[1:]
    return [body[i : i + step * 7] for i in range(0, len(body), step * 7)] or [b""]


def mux_input(data: bytes) -> None:
    """Feed bytes to a session as a peer would, acting on events the way the tunnel edge does."""
    session = Session(client=bool(data[:1]) and data[0] & 1 == 1, max_buffered=1 << 20)
    opened = []
    for chunk in _chunks(data):
        try:
            events = session.receive_data(chunk)
        except ProtocolError:
            try:
                session.receive_data(b"\0" * 12)
            except ProtocolError:
                pass  # a failed session stays failed
            else:
                raise AssertionError("a failed session accepted more input")
            assert session.data_to_send().endswith(b"\x00\x00\x00\x01")  # GoAway(protocol error)
            return
        for event in events:
            if type(event) is DataReceived:
                session.acknowledge_received_data(event.stream_id, len(event.data))
            elif type(event) is StreamOpened:
                opened.append(event.stream_id)
        for sid in opened[-4:]:
            try:
                session.send_data(sid, b"reply", end_stream=len(opened) % 2 == 0)
            except StreamClosedError:
                pass
        if len(opened) % 3 == 2:
            session.reset_stream(opened[0])
        try:
            session.open_stream()
        except SessionClosedError:
            pass
        session.data_to_send()


def header_input(data: bytes) -> None:
    """Stream header / reply (one message, then payload) and the control stream (many)."""
    reader = protocol.MessageReader(protocol.MAX_HEADER)
    for chunk in _chunks(data):
        try:
            message, rest = reader.first(chunk)
        except protocol.MessageError:
            break
        if message is not None:
            assert isinstance(message, dict) and isinstance(rest, bytes)
            version, number = protocol.peer_release(message)  # a control header's version fields
            assert isinstance(version, str) and len(version) <= 40 and isinstance(number, int) and number >= 0
            protocol.describe_release(version, number)
            break
    control = protocol.MessageReader()
    for chunk in _chunks(data):
        try:
            messages = control.feed(chunk)
        except protocol.MessageError:
            return
        for message in messages:
            assert isinstance(message, dict)
            try:
                protocol.encode(message)
            except protocol.MessageError:
                pass
            except (TypeError, ValueError) as exc:  # a parsed message must encode again
                raise AssertionError(f"parsed message does not encode: {exc}") from None
