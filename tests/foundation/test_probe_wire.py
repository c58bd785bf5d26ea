"""The wire form of an error-rate probe (link.probe reply)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qkdnode.probe_wire import BYTES_PER_DETECTION, ProbeWireError, decode_probe, encode_probe


@pytest.mark.parametrize("first", [0, 1_000_000_000, 13_445_890_048, 2**62])
def test_round_trip_and_size_do_not_grow_with_the_slot_counter(first: int) -> None:
    rng = np.random.default_rng(1)
    slots = first + np.cumsum(rng.integers(1, 2_000, 20_000)).astype(np.int64)
    chans = rng.integers(0, 4, 20_000).astype(np.int8)
    reply = encode_probe(slots, chans)
    size = len(json.dumps(reply))
    assert size <= 20_000 * BYTES_PER_DETECTION  # fits 256 KiB control frames
    s, c = decode_probe(json.loads(json.dumps(reply)), 20_000)
    assert np.array_equal(s, slots) and np.array_equal(c, chans)


def test_empty_and_single_detection() -> None:
    for n in (0, 1):
        s, c = decode_probe(encode_probe(np.arange(n) + 5, np.zeros(n, np.int8)), 10)
        assert s.tolist() == list(range(5, 5 + n)) and c.tolist() == [0] * n


@pytest.mark.parametrize(
    "slots",
    [np.array([5, 4]), np.array([0, 2**32 + 5])],
    ids=["decreasing", "gap-too-large"],
)
def test_unencodable_slots_are_refused(slots: np.ndarray) -> None:
    with pytest.raises(ProbeWireError):
        encode_probe(slots.astype(np.int64), np.zeros(slots.size, np.int8))


def test_bad_replies_name_what_is_wrong() -> None:
    good = encode_probe(np.array([1, 2, 3]), np.array([0, 1, 2], np.int8))
    with pytest.raises(ProbeWireError, match="KeyError"):
        decode_probe({k: v for k, v in good.items() if k != "gaps"}, 10)
    with pytest.raises(ProbeWireError, match=r"0\.\.2"):
        decode_probe(good, 2)
    with pytest.raises(ProbeWireError, match="buffers"):
        decode_probe({**good, "n": 2}, 10)
    with pytest.raises(ProbeWireError):
        decode_probe({**good, "gaps": "not base64!"}, 10)
