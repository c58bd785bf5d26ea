"""The two-phase life of a block in the key store: add (PENDING), commit, discard.

:func:`add_block` stores a block's keys as PENDING in its own transaction (the body of
:meth:`KeyStore.add_block <qkdnode.keystore.store.KeyStore.add_block>`). :func:`commit`
makes a block's keys AVAILABLE (RESERVED if the peer activated them already) and
:func:`discard` erases them, both inside a transaction the caller holds: the key store's
``commit_block`` and ``discard_block`` run them alone, the key-ID sync together with its
other actions.
"""

from __future__ import annotations

import sqlite3
import uuid

from qkdnode.keystore.database import Database
from qkdnode.keystore.errors import BlockError, StoreFullError
from qkdnode.keystore.ids import ID_SEED_BYTES, block_key_ids
from qkdnode.keystore.models import EraseReason, KeyState, Provenance


def add_block(
    db: Database,
    block_id: int,
    final_key: bytes,
    key_size_bits: int,
    provenance: Provenance,
    *,
    key_ttl_s: float,
    max_key_count: int,
) -> list[uuid.UUID]:
    if block_id < 0:
        raise BlockError(f"block_id must be >= 0, got {block_id}")
    if key_size_bits <= 0 or key_size_bits % 8:
        raise BlockError(f"key_size_bits {key_size_bits} must be a positive multiple of 8")
    unit = key_size_bits // 8
    seed, key_bytes = final_key[:ID_SEED_BYTES], final_key[ID_SEED_BYTES:]
    count = len(key_bytes) // unit
    if len(seed) < ID_SEED_BYTES or count == 0:
        raise BlockError(
            f"block {block_id}: {len(final_key) * 8} bits give no key of {key_size_bits} "
            f"bits after the {ID_SEED_BYTES * 8}-bit ID seed"
        )
    now = db.clock()
    expires = now + key_ttl_s
    ids = block_key_ids(seed, block_id, count)
    rows = [
        (
            ids[i].bytes,
            block_id,
            i,
            key_size_bits,
            i % 2,
            KeyState.PENDING.value,
            now,
            expires,
            key_bytes[i * unit : (i + 1) * unit],
        )
        for i in range(count)
    ]
    with db.tx() as cur:
        if cur.execute("SELECT 1 FROM blocks WHERE block_id=?", (block_id,)).fetchone():
            raise BlockError(f"block {block_id} is already stored")
        if cur.execute(
            "SELECT 1 FROM erased WHERE block_id=? AND state_before != ? LIMIT 1",
            (block_id, KeyState.PENDING.value),
        ).fetchone():
            raise BlockError(f"block {block_id} was used before; block IDs are never reused")
        stored = cur.execute("SELECT COUNT(*) FROM keys").fetchone()[0]
        if stored + count > max_key_count:
            raise StoreFullError(
                f"block {block_id}: {count} keys would exceed max_key_count "
                f"{max_key_count} ({stored} stored)"
            )
        cur.execute(
            "INSERT INTO blocks (block_id, committed, key_size_bits, key_count, created_at, "
            "provenance) VALUES (?, 0, ?, ?, ?, ?)",
            (block_id, key_size_bits, count, now, provenance.model_dump_json()),
        )
        cur.execute(
            "INSERT INTO meta (name, value) VALUES ('max_block_id', ?) ON CONFLICT(name) "
            "DO UPDATE SET value = max(CAST(value AS INTEGER), "
            "CAST(excluded.value AS INTEGER))",
            (block_id,),
        )
        # A block discarded while pending may come again: its old tombstones go.
        cur.execute("DELETE FROM erased WHERE block_id=?", (block_id,))
        cur.executemany(
            "INSERT INTO keys (key_id, block_id, idx, size_bits, enc_parity, state, "
            "created_at, expires_at, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return ids


def commit(cur: sqlite3.Cursor, block_id: int) -> int:
    row = cur.execute("SELECT committed FROM blocks WHERE block_id=?", (block_id,)).fetchone()
    if row is None:
        raise BlockError(f"block {block_id} is not stored")
    if row[0]:
        return 0
    cur.execute("UPDATE blocks SET committed=1 WHERE block_id=?", (block_id,))
    cur.execute(
        "UPDATE keys SET state = CASE WHEN pair_master IS NULL THEN ? ELSE ? END "
        "WHERE block_id=? AND state=?",
        (
            KeyState.AVAILABLE.value,
            KeyState.RESERVED.value,
            block_id,
            KeyState.PENDING.value,
        ),
    )
    return cur.rowcount


def discard(db: Database, cur: sqlite3.Cursor, block_id: int) -> int:
    ids = [r[0] for r in cur.execute("SELECT key_id FROM keys WHERE block_id=?", (block_id,))]
    n = db.erase(cur, ids, EraseReason.DISCARDED)
    cur.execute("DELETE FROM blocks WHERE block_id=?", (block_id,))
    return n
