"""Wegman-Carter tags of the key managers' messages on one link.

Each tagged message gets a one-time key of its own: 32 bytes of the link's key that its
sender draws from its side of the store (``r || s``). The tag is Poly1305 with that key
over the message's canonical bytes, which bind the link, the direction, the message kind
and every byte of header and buffers:

    m = "qkdnode-kms-tag/v1" | link id | sender site | kind | len | header JSON
        | (len | buffer)*          (lengths as 8-byte big-endian, JSON sorted, compact)

Poly1305 with a uniform one-time ``r`` and pad ``s`` is a Wegman-Carter MAC: a forgery
succeeds with probability at most 8 ceil(L/16) / 2^106 for L message bytes (Bernstein,
FSE 2005, Theorem 3.3), whatever the adversary's computing power. The receiver erases
the named keys as it verifies, so a key never checks two messages and a replayed message
names keys that are gone.
"""

from __future__ import annotations

import hmac
import json
import math
import struct
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.poly1305 import Poly1305

#: bytes of one-time key per tag (Poly1305's r and s)
TAG_KEY_BYTES = 32
TAG_KEY_BITS = TAG_KEY_BYTES * 8
_DOMAIN = b"qkdnode-kms-tag/v1"


def canonical(
    link_id: str, sender: str, kind: str, header: dict[str, Any], buffers: Sequence[bytes]
) -> bytes:
    """The bytes a tag covers (``header`` without its ``auth`` field)."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), default=str).encode()
    parts = [_DOMAIN]
    for field in (link_id.encode(), sender.encode(), kind.encode(), head, *buffers):
        parts.append(struct.pack(">Q", len(field)))
        parts.append(bytes(field))
    return b"".join(parts)


def tag(one_time_key: bytes, message: bytes) -> bytes:
    """Poly1305 of ``message`` under the first 32 bytes of ``one_time_key``.
    ValueError if fewer than 32 bytes are given."""
    if len(one_time_key) < TAG_KEY_BYTES:
        raise ValueError(f"a tag needs {TAG_KEY_BYTES} bytes of key, got {len(one_time_key)}")
    return Poly1305.generate_tag(one_time_key[:TAG_KEY_BYTES], message)


def verify(one_time_key: bytes, message: bytes, expected: bytes) -> bool:
    return len(one_time_key) >= TAG_KEY_BYTES and hmac.compare_digest(
        tag(one_time_key, message), expected
    )


def forgery_bound(message_bytes: int) -> float:
    """Probability that one forged message passes (Poly1305's epsilon for its length)."""
    return 8 * math.ceil(max(message_bytes, 1) / 16) / 2.0**106


def xor(a: bytes, b: bytes) -> bytes:
    """Bytewise XOR of two strings of equal length (ValueError otherwise)."""
    if len(a) != len(b):
        raise ValueError(f"one-time pad of {len(b)} bytes for {len(a)} bytes")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")
