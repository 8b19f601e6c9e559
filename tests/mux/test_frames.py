from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from velo.mux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    HEADER_SIZE,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FrameHeader,
    ProtocolError,
    decode_header,
    encode_frame,
)
from velo.mux.frames import HEADER

ALL_TYPES = (TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY)
ALL_FLAG_COMBOS = [
    sum(combo) for r in range(5) for combo in itertools.combinations((FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST), r)
]


def test_flag_combos_cover_all_16():
    assert sorted(ALL_FLAG_COMBOS) == list(range(16))


@pytest.mark.parametrize("ftype", ALL_TYPES)
@pytest.mark.parametrize("flags", ALL_FLAG_COMBOS)
def test_roundtrip_every_type_and_flag_combination(ftype, flags):
    payload = b"hello" if ftype == TYPE_DATA else b""
    length = None if ftype == TYPE_DATA else 0xDEADBEEF
    raw = encode_frame(ftype, flags, 7, length, payload)
    hdr = decode_header(raw)
    assert hdr == FrameHeader(0, ftype, flags, 7, len(payload) if ftype == TYPE_DATA else 0xDEADBEEF)
    assert raw[HEADER_SIZE:] == payload


@given(
    ftype=st.sampled_from(ALL_TYPES),
    flags=st.integers(0, 0xFFFF),
    sid=st.integers(0, 2**32 - 1),
    value=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=64),
)
def test_roundtrip_property(ftype, flags, sid, value, payload):
    if ftype == TYPE_DATA:
        raw = encode_frame(ftype, flags, sid, payload=payload)
        expect_len = len(payload)
    else:
        raw = encode_frame(ftype, flags, sid, value)
        expect_len = value
    assert len(raw) == HEADER_SIZE + (len(payload) if ftype == TYPE_DATA else 0)
    assert decode_header(raw) == (0, ftype, flags, sid, expect_len)
    assert decode_header(b"junk" + raw, 4) == (0, ftype, flags, sid, expect_len)


def test_header_is_big_endian_spec_layout():
    raw = encode_frame(TYPE_WINDOW_UPDATE, FLAG_SYN | FLAG_ACK, 0x01020304, 0x0A0B0C0D)
    assert raw == bytes([0, 1, 0, 3, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D])


def test_decode_rejects_bad_version_and_type():
    with pytest.raises(ProtocolError) as exc:
        decode_header(HEADER.pack(1, 0, 0, 1, 0))
    assert "version" in exc.value.reason
    with pytest.raises(ProtocolError) as exc:
        decode_header(HEADER.pack(0, 4, 0, 1, 0))
    assert "type" in exc.value.reason
    assert isinstance(exc.value, ValueError)


def test_decode_needs_full_header():
    with pytest.raises(ValueError):
        decode_header(b"\x00" * 11)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(frame_type=9),
        dict(frame_type=TYPE_DATA, flags=0x10000),
        dict(frame_type=TYPE_DATA, stream_id=2**32),
        dict(frame_type=TYPE_DATA, length=3, payload=b"ab"),
        dict(frame_type=TYPE_PING, payload=b"x"),
        dict(frame_type=TYPE_PING, length=-1),
    ],
)
def test_encode_validates(kwargs):
    with pytest.raises(ValueError):
        encode_frame(**kwargs)
