"""The public synchronization pattern the transmitter emits while the receiver locks.

Slots are grouped in frames of :data:`FRAME_SLOTS` slots. During synchronization every
slot of a frame is sent at signal intensity ("bright") or not at all ("dark"), as decided
by a public pseudo-random bit per frame. Both nodes compute the same bits from the public
seed, so the receiver can cross-correlate its detection times with the pattern.

The bit of frame ``k`` is the lowest bit of ``splitmix64(seed_mix ^ k)``: a counter-based
generator, so any frame is computed directly, in any order, with no state.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FRAME_SLOTS = 256

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The splitmix64 finaliser applied elementwise (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _seed_mix(public_seed: int) -> np.uint64:
    mixed = splitmix64(np.array([public_seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return np.uint64(mixed[0])


def frame_bright(public_seed: int, frame_index: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """True where frame ``frame_index`` is bright in the pattern ``public_seed``."""
    frames = np.asarray(frame_index, dtype=np.int64).astype(np.uint64)
    return (splitmix64(frames ^ _seed_mix(public_seed)) & np.uint64(1)).astype(np.bool_)


def slot_bright(public_seed: int, slot_index: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """True where slot ``slot_index`` is sent at signal intensity in the pattern."""
    return frame_bright(public_seed, np.asarray(slot_index, dtype=np.int64) // FRAME_SLOTS)
