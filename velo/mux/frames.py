"""yamux wire format (hashicorp/yamux spec.md).

Kept separate from the session so the layout can be unit-tested and reused
(debug tooling, fuzzers) without pulling in stream state.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

VERSION = 0

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3
FRAME_TYPES = (TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY)

FLAG_SYN = 1
FLAG_ACK = 2
FLAG_FIN = 4
FLAG_RST = 8

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

HEADER_SIZE = 12
# Both peers assume this window for a fresh stream; only increases are
# negotiable (via the SYN/ACK window update), never decreases.
INITIAL_WINDOW = 256 * 1024
MAX_U32 = 0xFFFFFFFF

HEADER = struct.Struct(">BBHII")
# The session's hot path reads version, type and flags as one u32 so that
# "plain data frame, no flags" is a single falsy test.
FAST_HEADER = struct.Struct(">III")


class ProtocolError(ValueError):
    """The peer violated the protocol; the session cannot continue.

    ``events`` holds whatever was parsed before the violation, so callers can
    still deliver data that arrived intact ahead of the garbage.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.events: list = []


class FrameHeader(NamedTuple):
    version: int
    type: int
    flags: int
    stream_id: int
    length: int


def encode_frame(
    frame_type: int,
    flags: int = 0,
    stream_id: int = 0,
    length: int | None = None,
    payload: bytes = b"",
) -> bytes:
    """Build one frame; for data frames ``length`` defaults to the payload size.

    Validates ranges because a silently truncated field corrupts the stream
    for every other stream sharing the connection.
    """
    if frame_type not in FRAME_TYPES:
        raise ValueError(f"unknown frame type {frame_type}")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"flags out of range: {flags}")
    if not 0 <= stream_id <= MAX_U32:
        raise ValueError(f"stream id out of range: {stream_id}")
    if frame_type == TYPE_DATA:
        if length is None:
            length = len(payload)
        elif length != len(payload):
            raise ValueError("data frame length must equal payload size")
    else:
        if payload:
            raise ValueError("only data frames carry a payload")
        if length is None:
            length = 0
    if not 0 <= length <= MAX_U32:
        raise ValueError(f"length out of range: {length}")
    header = HEADER.pack(VERSION, frame_type, flags, stream_id, length)
    return header + bytes(payload) if payload else header


def decode_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> FrameHeader:
    """Parse and sanity-check one header (payload, if any, follows it)."""
    if len(buf) - offset < HEADER_SIZE:
        raise ValueError("need 12 bytes for a frame header")
    hdr = FrameHeader._make(HEADER.unpack_from(buf, offset))
    if hdr.version != VERSION:
        raise ProtocolError(f"unsupported version {hdr.version}")
    if hdr.type not in FRAME_TYPES:
        raise ProtocolError(f"unknown frame type {hdr.type}")
    return hdr
