"""Verification of the corrected key with a universal hash (Poly1305 with a public key).

The transmitter draws a fresh 32-byte hash key *after* error correction and sends it; both
sides hash their packed key (length-prefixed) and compare 128-bit tags. Poly1305 with a
uniformly random r is an epsilon-almost-universal family: two different messages of L
16-byte blocks collide with probability <= 8 * ceil(L) / 2**106 (Bernstein 2005), which
:func:`collision_bound` returns and the pipeline checks against ``eps_cor``. The tag is
public; its 128 bits are counted as disclosed.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.poly1305 import Poly1305

TAG_BITS = 128
HASH_KEY_BYTES = 32


def collision_bound(n_bits: int) -> float:
    """Probability that two different ``n_bits`` keys get the same tag."""
    blocks = math.ceil((n_bits // 8 + 16) / 16)
    return 8.0 * blocks / 2.0**106


def key_tag(key_bits: npt.NDArray[np.uint8], hash_key: bytes) -> bytes:
    """128-bit Poly1305 tag of ``key_bits`` (0/1 array). Raises ValueError on a bad key."""
    if len(hash_key) != HASH_KEY_BYTES:
        raise ValueError(f"hash key must be {HASH_KEY_BYTES} bytes, got {len(hash_key)}")
    n = int(key_bits.shape[0])
    mac = Poly1305(hash_key)
    mac.update(n.to_bytes(8, "little"))
    mac.update(np.packbits(key_bits).tobytes())
    return mac.finalize()
