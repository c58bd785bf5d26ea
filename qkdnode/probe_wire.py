"""Wire form of an error-rate probe: disclosed detections the receiver sends in a
``link.probe`` reply (JSON header of a peer message, at most ``bus.max_control_frame_bytes``).

Slots are sent as the first slot plus uint32 gaps, channels as int8, both base64: about
6.7 bytes per detection whatever the slot numbers. (JSON lists cost a byte more per slot
with every tenfold growth of the slot counter, so a probe that fitted at start-up no
longer fitted after ~7 minutes of a 25 MHz link.)
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import numpy.typing as npt

#: Upper bound of the encoded size per detection (base64 of 4 + 1 bytes, rounded up).
BYTES_PER_DETECTION = 7


class ProbeWireError(ValueError):
    """A probe that cannot be encoded (slots not increasing, gap over 2**32 - 1) or a
    reply that does not decode (field missing, bad base64, lengths differ)."""


def encode_probe(slots: npt.NDArray[np.int64], channels: npt.NDArray[np.int8]) -> dict[str, Any]:
    """``{"n", "first_slot", "gaps", "channels"}`` for increasing ``slots``."""
    s = np.asarray(slots, dtype=np.int64)
    c = np.asarray(channels, dtype=np.int8)
    if s.shape != c.shape or s.ndim != 1:
        raise ProbeWireError("slots and channels must be 1-d arrays of the same length")
    gaps = np.diff(s)
    if gaps.size and (int(gaps.min()) < 0 or int(gaps.max()) > 0xFFFF_FFFF):
        raise ProbeWireError("probe slots must increase by at most 2**32 - 1")
    return {
        "n": int(s.shape[0]),
        "first_slot": int(s[0]) if s.size else 0,
        "gaps": base64.b64encode(gaps.astype("<u4").tobytes()).decode("ascii"),
        "channels": base64.b64encode(c.tobytes()).decode("ascii"),
    }


def decode_probe(
    reply: dict[str, Any], max_n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]:
    """Slots and channels of a probe reply of at most ``max_n`` detections."""
    try:
        n = reply["n"]
        first = reply["first_slot"]
        gaps_b = base64.b64decode(reply["gaps"], validate=True)
        chans_b = base64.b64decode(reply["channels"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ProbeWireError(f"probe reply: {type(exc).__name__}: {exc}") from exc
    if not isinstance(n, int) or not isinstance(first, int) or not 0 <= n <= max_n:
        raise ProbeWireError(f"probe reply: n must be an integer in 0..{max_n}")
    if len(chans_b) != n or len(gaps_b) != 4 * max(n - 1, 0):
        raise ProbeWireError(f"probe reply: buffers do not hold {n} detections")
    gaps = np.frombuffer(gaps_b, dtype="<u4").astype(np.int64)
    slots = np.empty(n, dtype=np.int64)
    if n:
        slots[0] = first
        np.cumsum(gaps, out=slots[1:])
        slots[1:] += first
    return slots, np.frombuffer(chans_b, dtype=np.int8).copy()
