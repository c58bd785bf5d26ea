"""Key IDs that only the two nodes of a link can compute.

Each block's final key (the output of privacy amplification, identical on both nodes) begins
with :data:`ID_SEED_BYTES` bytes that are never delivered: the block's *ID seed*. The ID of
key ``index`` of block ``block_id`` is an RFC 9562 version-4 UUID whose 122 free bits are
the first bits of SHA-256("qkdnode-key-id/v2" | seed | block id | index). So

- both nodes compute the same IDs without a message;
- an outsider cannot name a key: the seed is as secret as the key itself (256 bits of the
  same privacy-amplified output), and 122 bits of each ID come from a hash keyed by it;
- two stores (even of the same node IDs) never share an ID except with probability
  about n^2 / 2^123 for n keys.

An ID says nothing about the key's size or position; the store maps IDs to rows. Revealing
IDs (they travel to the SAEs) reveals nothing of the key bits: the seed and the delivered
keys are disjoint parts of the privacy-amplified output.
"""

from __future__ import annotations

import hashlib
import uuid

ID_DOMAIN = b"qkdnode-key-id/v2"
#: bytes at the start of every block's final key reserved as the block's ID seed
ID_SEED_BYTES = 32
_VERSION_MASK = 0xF << 76
_VARIANT_MASK = 0x3 << 62
_CLEAR = ~(_VERSION_MASK | _VARIANT_MASK) & ((1 << 128) - 1)
_SET = (4 << 76) | (0x2 << 62)


def link_id_for(node_id: str, peer_id: str) -> str:
    """The link ID both nodes compute identically from their two node IDs."""
    a, b = sorted((node_id, peer_id))
    return f"{a}<->{b}"


def block_key_ids(seed: bytes, block_id: int, count: int, start: int = 0) -> list[uuid.UUID]:
    """IDs of keys ``start .. start+count-1`` of block ``block_id`` with ID seed ``seed``.

    Raises ValueError for a seed shorter than 16 bytes or negative numbers."""
    if len(seed) < 16:
        raise ValueError(f"ID seed must be at least 16 bytes, got {len(seed)}")
    if block_id < 0 or start < 0 or count < 0:
        raise ValueError("block_id, start and count must be >= 0")
    prefix = hashlib.sha256(b"|".join((ID_DOMAIN, seed, str(block_id).encode(), b"")))
    out = []
    for index in range(start, start + count):
        h = prefix.copy()
        h.update(str(index).encode())
        value = (int.from_bytes(h.digest()[:16], "big") & _CLEAR) | _SET
        out.append(uuid.UUID(int=value))
    return out


def is_key_id(key_id: uuid.UUID) -> bool:
    """True if ``key_id`` has the shape of an ID this project issues (version 4, RFC
    variant). Says nothing about whether such a key exists."""
    return key_id.version == 4 and key_id.variant == uuid.RFC_4122
