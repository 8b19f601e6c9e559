"""Velo's per-stream protocol on top of the multiplexer (sans-IO).

Every stream starts with one *header* message from the opener (what to connect
to) and one *reply* message from the acceptor (did it work).  The opener sends its
payload right after the header without waiting for the reply, so a forwarded
request costs no extra round trip; the acceptor holds that payload (bounded by the
stream's flow-control window) until its dial finishes.

The control stream carries a sequence of the same messages.  A message is a
2-byte big-endian length followed by a JSON object.  Its header carries the client's
release and ``PROTOCOL``; the gateway's first message on it (``hello``) carries its
own, so each side can refuse a peer it would misread (see ``PROTOCOL``).
"""

from __future__ import annotations

import json
import struct

_LEN = struct.Struct(">H")
MAX_MESSAGE = 16 * 1024  # control messages (a reverse list can be long)
MAX_HEADER = 4 * 1024    # a stream's header or reply: a hostile peer gets no more

PROTOCOL = 1
"""The number of this wire protocol: the mux framing, the stream headers and replies, and
the control stream's messages.

The rule: bump it with any change that a peer of the previous number would misread or
refuse (a new frame type, a header field it must understand, a changed meaning); a
release that only adds what older peers ignore keeps it.  Client and gateway exchange it,
with their release versions, when the control stream opens, and work together only when
the numbers are equal: different releases of one protocol are fine.  A peer that sends no
number predates the exchange (a build from before it was added) and counts as protocol 0,
 which is incompatible with every numbered protocol: nothing promises that the two
agree, and one clear error beats a session that fails in odd ways later.
"""

# Header "op" values.
OP_CONNECT = "connect"   # client -> gateway: dial host:port (forward proxy)
OP_REVERSE = "reverse"   # gateway -> client: a connection arrived for a reverse listener
OP_CONTROL = "control"   # client -> gateway: the long-lived control stream
OP_HELLO = "hello"       # gateway -> client: the first control message, the gateway's release and protocol


def encode_header(message: dict | bytes) -> bytes:
    """Listeners pre-encode their (constant) header once; others pass a dict."""
    return message if isinstance(message, bytes) else encode(message)


class MessageError(ValueError):
    """The peer sent a malformed stream message; close that stream (or tunnel)."""


def encode(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise MessageError(f"message too large ({len(body)} bytes)")
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> dict:
    """One message body -> dict; any malformed input raises MessageError, nothing else."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        raise MessageError(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise MessageError("message is not a JSON object")
    return message


class MessageReader:
    """Accumulates bytes and yields complete messages; leftover bytes stay in ``rest``.

    ``limit`` caps one message's length: a length prefix above it is an error at
    once, so a peer can never make us buffer more than ``limit`` bytes.
    """

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self.limit = limit

    def _size(self) -> int:
        (size,) = _LEN.unpack_from(self._buf)
        if size > self.limit:
            raise MessageError(f"message length {size} exceeds {self.limit}")
        return size

    def feed(self, data: bytes | memoryview) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= 2:
            size = self._size()
            if len(self._buf) < 2 + size:
                break
            body = bytes(self._buf[2 : 2 + size])
            del self._buf[: 2 + size]
            out.append(decode(body))
        return out

    def first(self, data: bytes | memoryview) -> tuple[dict | None, bytes]:
        """Feed ``data``; once one message is complete return it and the bytes after it."""
        self._buf += data
        if len(self._buf) < 2:
            return None, b""
        size = self._size()
        if len(self._buf) < 2 + size:
            return None, b""
        message = decode(bytes(self._buf[2 : 2 + size]))
        rest = bytes(self._buf[2 + size :])
        self._buf.clear()
        return message, rest


OK_REPLY = encode({"ok": True})  # the common answer, encoded once


def peer_release(message: dict) -> tuple[str, int]:
    """(release, protocol) named by a control header or hello; ("", 0) for a peer too old to say."""
    version, number = message.get("version"), message.get("protocol")
    version = version[:40] if isinstance(version, str) else ""
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        number = 0
    return version, number


def describe_release(version: str, number: int) -> str:
    """``velo 0.1.0 (protocol 1)``, or what a peer that said nothing is."""
    if not version and not number:
        return "a velo too old to say its version (protocol 0)"
    return f"velo {version or '?'} (protocol {number})"
