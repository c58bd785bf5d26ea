"""Deterministic key IDs shared by both nodes of a link.

Both nodes hold the same final key bits for a block and number blocks identically, so
each can compute the ID of key ``index`` of block ``block_id`` without asking the other.
An ID is an RFC 9562 version-8 UUID:

- bits 127..16: the first bytes of SHA-256("qkdnode-key-id/v1" | link id | block id | index),
  with the version (8) and variant (10) bits set. Nothing secret goes in: an ID reveals
  nothing about the key bits.
- bits 15..0: the delivered key size in bytes (1..65535).

The store keys its rows by the *reference* of an ID (the ID with the size field cleared),
so a key delivered shorter than its stored size (its first ``size`` bits) keeps a
reference the other node can look up, and the other node learns the delivered size from
the ID alone.
"""

from __future__ import annotations

import hashlib
import uuid

ID_DOMAIN = b"qkdnode-key-id/v1"
_SIZE_MASK = 0xFFFF
_VERSION_MASK = 0xF << 76
_VARIANT_MASK = 0x3 << 62
MAX_KEY_SIZE_BYTES = _SIZE_MASK


def link_id_for(node_id: str, peer_id: str) -> str:
    """The link ID both nodes compute identically from their two node IDs."""
    a, b = sorted((node_id, peer_id))
    return f"{a}<->{b}"


_CLEAR = ~(_VERSION_MASK | _VARIANT_MASK | _SIZE_MASK)
_SET = (8 << 76) | (0x2 << 62)


def key_refs(link_id: str, block_id: int, count: int, start: int = 0) -> list[int]:
    """References (size field zero) of keys ``start .. start+count-1`` of a block."""
    if block_id < 0 or start < 0 or count < 0:
        raise ValueError("block_id, start and count must be >= 0")
    prefix = hashlib.sha256(b"|".join((ID_DOMAIN, link_id.encode(), str(block_id).encode(), b"")))
    refs = []
    for index in range(start, start + count):
        h = prefix.copy()
        h.update(str(index).encode())
        refs.append((int.from_bytes(h.digest()[:16], "big") & _CLEAR) | _SET)
    return refs


def key_ref(link_id: str, block_id: int, index: int) -> int:
    """The 128-bit reference (size field zero) of key ``index`` of block ``block_id``:
    SHA-256 of "qkdnode-key-id/v1|<link id>|<block id>|<index>"."""
    if index < 0:
        raise ValueError("index must be >= 0")
    return key_refs(link_id, block_id, 1, index)[0]


def make_key_id(ref: int, size_bits: int) -> uuid.UUID:
    """The key ID of the first ``size_bits`` bits of the key with reference ``ref``."""
    if size_bits <= 0 or size_bits % 8 or size_bits // 8 > MAX_KEY_SIZE_BYTES:
        raise ValueError(f"size_bits {size_bits} must be a positive multiple of 8 <= 524280")
    return uuid.UUID(int=(ref & ~_SIZE_MASK) | (size_bits // 8))


def split_key_id(key_id: uuid.UUID) -> tuple[int, int]:
    """``(reference, size_bits)`` of a key ID; ValueError if it is not one of ours."""
    value = key_id.int
    if (value >> 76) & 0xF != 8 or (value >> 62) & 0x3 != 0x2 or value & _SIZE_MASK == 0:
        raise ValueError(f"key_ID {key_id} is not a key ID issued by this link")
    return value & ~_SIZE_MASK, (value & _SIZE_MASK) * 8


def ref_bytes(ref: int) -> bytes:
    """The database form of a reference (16 bytes, big-endian)."""
    return ref.to_bytes(16, "big")


def ref_from_bytes(raw: bytes) -> int:
    return int.from_bytes(raw, "big")
