from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.oif_itla import (
    Status,
    bip4,
    decode_reply,
    encode_reply,
    encode_request,
    frequency_to_fcf,
    to_signed16,
    to_unsigned16,
)


def test_known_request_frames() -> None:
    # computed by hand from the MSA definition of BIP-4
    assert encode_request(0x00) == bytes([0x00, 0x00, 0x00, 0x00])
    assert encode_request(0x02) == bytes([0x20, 0x02, 0x00, 0x00])
    assert encode_request(0x32, 0x0008, write=True) == bytes([0x81, 0x32, 0x00, 0x08])


def test_reply_fields() -> None:
    frame = encode_reply(Status.AEA, 0x02, 11)
    r = decode_reply(frame)
    assert (r.status, r.register, r.data, r.ce) == (Status.AEA, 0x02, 11, False)
    assert decode_reply(encode_reply(Status.XE, 0x30, 0, ce=True)).ce


@given(st.sampled_from(list(Status)), st.integers(0, 255), st.integers(0, 0xFFFF), st.booleans())
def test_reply_roundtrip(status: Status, reg: int, data: int, ce: bool) -> None:
    r = decode_reply(encode_reply(status, reg, data, ce))
    assert (r.status, r.register, r.data, r.ce) == (status, reg, data, ce)


@given(
    st.sampled_from(list(Status)), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 31)
)
def test_every_single_bit_error_is_detected(status: Status, reg: int, data: int, bit: int) -> None:
    frame = bytearray(encode_reply(status, reg, data))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ValueError, match="checksum"):
        decode_reply(bytes(frame))


def test_bip4_ignores_its_own_nibble() -> None:
    assert bip4(bytes([0xF1, 2, 3, 4])) == bip4(bytes([0x01, 2, 3, 4]))


def test_request_range_checked() -> None:
    with pytest.raises(ValueError):
        encode_request(0x100)
    with pytest.raises(ValueError):
        encode_request(0x31, 0x10000)


def test_signed_and_fcf_helpers() -> None:
    assert to_signed16(to_unsigned16(-1234)) == -1234
    assert frequency_to_fcf(193.41449) == (193, 4145)
    assert frequency_to_fcf(196.0) == (196, 0)
