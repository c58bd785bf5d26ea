"""Keys the site's key manager consumes from a link's store (trusted-node relay).

A relay hop spends key of the link it crosses: the relayed key itself on the first hop,
a one-time pad of the same length on every later hop, and one-time keys for the hop's
message tags. The node that *sends* on the link draws from its own index parity (the
keys its enc_keys would hand out, so the two ends never draw the same key), names the
stored keys' IDs in the message, and erases them before the message leaves
(:func:`consume_own`); the receiving node erases the same keys when it reads them
(:func:`consume_named`). Both erase with a tombstone whose reason says what the key was
spent on (``relayed`` or ``authentication``), so a key-ID sync never revives them and the
accounting can be checked against the tombstones.

Each function is one transaction: on failure nothing changed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from qkdnode.keystore.database import Database
from qkdnode.keystore.errors import KeyRequestError, KeysUnavailableError
from qkdnode.keystore.models import MAX_PARTS_PER_KEY, EraseReason, KeyState

#: reasons a key may be consumed for
CONSUME_REASONS = (EraseReason.RELAYED, EraseReason.AUTHENTICATION)


def _check_reason(reason: EraseReason) -> None:
    if reason not in CONSUME_REASONS:
        raise ValueError(f"keys are consumed as relayed or authentication, not {reason.value}")


def consume_own(
    db: Database,
    *,
    enc_parity: int,
    size_bits: int,
    reason: EraseReason,
    inflight: set[bytes],
    max_parts: int = MAX_PARTS_PER_KEY,
    keep_bits: int = 0,
) -> list[tuple[uuid.UUID, bytes]]:
    """Take AVAILABLE, unexpired keys of this node's parity (oldest first, skipping the
    parts ``inflight`` in an enc_keys activation) until they hold ``size_bits``, erase
    them durably as ``reason`` and return ``[(stored key ID, bytes), ...]`` in order.
    ``keep_bits``: at least this much must be left after them (a reserve for other uses).

    Raises :class:`KeysUnavailableError` when the store holds too little (nothing
    changes), :class:`KeyRequestError` for a size that is not a positive multiple of 8 or
    would need more than ``max_parts`` stored keys. Call with ``db.lock`` free.
    """
    _check_reason(reason)
    if size_bits <= 0 or size_bits % 8:
        raise KeyRequestError(f"key size {size_bits} bits is not a positive multiple of 8")
    now = db.clock()
    with db.tx() as cur:
        taken: list[tuple[bytes, bytes]] = []
        bits = 0
        # stored keys are 64 bits or more: this many rows always suffice (the index
        # keys_pick serves them in order, without reading the rest of the store)
        limit = (size_bits + keep_bits) // 64 + 2 + len(inflight)
        left = 0
        for kid, stored_bits, key in cur.execute(
            "SELECT key_id, size_bits, key FROM keys WHERE state=? AND enc_parity=? "
            "AND expires_at>? ORDER BY block_id, idx LIMIT ?",
            (KeyState.AVAILABLE.value, enc_parity, now, limit),
        ).fetchall():
            if kid in inflight:
                continue
            if bits < size_bits:
                taken.append((kid, bytes(key)))
                bits += stored_bits
            else:
                left += stored_bits
                if left >= keep_bits:
                    break
        if bits < size_bits or left < keep_bits:
            raise KeysUnavailableError(
                f"{size_bits} bits of key requested"
                + (f" beyond a reserve of {keep_bits}" if keep_bits else "")
                + f", {bits + left} available on this link"
            )
        if len(taken) > max_parts:
            raise KeyRequestError(f"{size_bits} bits need more than {max_parts} stored keys")
        db.erase(cur, [kid for kid, _ in taken], reason)
    return [(uuid.UUID(bytes=kid), key) for kid, key in taken]


def consume_named(
    db: Database,
    *,
    peer_parity: int,
    key_ids: Sequence[uuid.UUID],
    reason: EraseReason,
) -> bytes:
    """Erase the stored keys ``key_ids`` (of the peer's parity: the peer drew them) as
    ``reason`` and return their bytes concatenated in the order given.

    A key the peer drew may still be PENDING here (its block's commit reply is in flight)
    and is accepted then; it must not be reserved, delivered or expired. Raises
    :class:`KeysUnavailableError` naming how many were not usable (nothing changes) and
    :class:`KeyRequestError` for an empty or repeated list.
    """
    _check_reason(reason)
    if not key_ids:
        raise KeyRequestError("no key IDs named")
    raw = [k.bytes for k in key_ids]
    if len(set(raw)) != len(raw):
        raise KeyRequestError("a key ID is named twice")
    now = db.clock()
    usable = (KeyState.AVAILABLE.value, KeyState.PENDING.value)
    with db.tx() as cur:
        found: dict[bytes, bytes] = {}
        for kid in raw:
            row = cur.execute(
                "SELECT key, state, enc_parity, expires_at FROM keys WHERE key_id=?", (kid,)
            ).fetchone()
            if row is None:
                continue
            key, state, parity, expires_at = row
            if state in usable and parity == peer_parity and expires_at > now:
                found[kid] = bytes(key)
        if len(found) != len(raw):
            raise KeysUnavailableError(
                f"{len(raw) - len(found)} of {len(raw)} named keys are not held here "
                "(unknown, of the wrong side, reserved or expired)"
            )
        db.erase(cur, raw, reason)
    return b"".join(found[kid] for kid in raw)


def consumed_counts(db: Database) -> dict[str, int]:
    """Tombstones of consumed keys, by reason (``relayed``, ``authentication``)."""
    with db.lock:
        rows = db.conn.execute(
            "SELECT reason, COUNT(*) FROM erased WHERE reason IN (?, ?) GROUP BY reason",
            tuple(r.value for r in CONSUME_REASONS),
        ).fetchall()
    out = {r.value: 0 for r in CONSUME_REASONS}
    out.update({reason: n for reason, n in rows})
    return out
