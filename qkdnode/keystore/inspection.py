"""Read-only views of the key store: counts, key metadata, tombstones, digest.

Nothing here changes the store or returns key bytes. Each function is the body of the
:class:`~qkdnode.keystore.store.KeyStore` method of the same name, which documents it.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from qkdnode.keystore.database import Database
from qkdnode.keystore.models import EraseReason, KeyInfo, KeyState, Pair, Provenance


def counts(db: Database) -> dict[str, int]:
    with db.lock:
        rows = db.conn.execute("SELECT state, COUNT(*) FROM keys GROUP BY state").fetchall()
    out = {s.value: 0 for s in KeyState}
    out.update({state: n for state, n in rows})
    return out


def available_for_enc(db: Database, enc_parity: int, min_size_bits: int) -> int:
    with db.lock:
        row = db.conn.execute(
            "SELECT COUNT(*) FROM keys WHERE state=? AND enc_parity=? AND size_bits>=? "
            "AND expires_at>?",
            (KeyState.AVAILABLE.value, enc_parity, min_size_bits, db.clock()),
        ).fetchone()
    return int(row[0])


def available_bits(db: Database, enc_parity: int) -> int:
    with db.lock:
        row = db.conn.execute(
            "SELECT COALESCE(SUM(size_bits), 0) FROM keys WHERE state=? AND enc_parity=? "
            "AND expires_at>?",
            (KeyState.AVAILABLE.value, enc_parity, db.clock()),
        ).fetchone()
    return int(row[0])


def max_stored_key_size_bits(db: Database, enc_parity: int) -> int | None:
    with db.lock:
        row = db.conn.execute(
            "SELECT MAX(size_bits) FROM keys WHERE state=? AND enc_parity=?",
            (KeyState.AVAILABLE.value, enc_parity),
        ).fetchone()
    return None if row[0] is None else int(row[0])


def key_info(db: Database, key_id: uuid.UUID) -> KeyInfo | None:
    with db.lock:
        row = db.conn.execute(
            "SELECT block_id, idx, size_bits, state, created_at, expires_at, pair_master, "
            "slaves, fetched, delivered_as FROM keys WHERE key_id=?",
            (key_id.bytes,),
        ).fetchone()
    if row is None:
        return None
    block_id, idx, size, state, created, expires, pm, sl, fetched, das = row
    slaves = tuple(json.loads(sl or "[]"))
    return KeyInfo(
        key_id=key_id,
        block_id=block_id,
        index=idx,
        size_bits=size,
        state=KeyState(state),
        created_at=created,
        expires_at=expires,
        pair=None if pm is None else Pair(master=pm, slave=slaves[0]),
        slaves=slaves,
        fetched_by=tuple(json.loads(fetched or "[]")),
        delivered_as=None if das is None else uuid.UUID(bytes=das),
    )


def erase_reason(db: Database, key_id: uuid.UUID) -> EraseReason | None:
    with db.lock:
        row = db.conn.execute(
            "SELECT reason FROM erased WHERE key_id=?", (key_id.bytes,)
        ).fetchone()
    return None if row is None else EraseReason(row[0])


def key_ids_of_block(db: Database, block_id: int) -> list[uuid.UUID]:
    with db.lock:
        rows = db.conn.execute(
            "SELECT key_id FROM keys WHERE block_id=? ORDER BY idx", (block_id,)
        ).fetchall()
    return [uuid.UUID(bytes=r[0]) for r in rows]


def last_block_id(db: Database) -> int:
    with db.lock:
        row = db.conn.execute("SELECT value FROM meta WHERE name='max_block_id'").fetchone()
    return -1 if row is None else int(row[0])


def digest(db: Database) -> dict[str, object]:
    h = hashlib.sha256()
    with db.lock:
        rows = db.conn.execute(
            "SELECT k.key_id, k.key FROM keys k JOIN blocks b "
            "ON b.block_id = k.block_id WHERE b.committed = 1 ORDER BY k.key_id"
        ).fetchall()
    for kid, key in rows:
        h.update(str(uuid.UUID(bytes=kid)).encode())
        h.update(len(key).to_bytes(4, "big"))
        h.update(key)
    return {"count": len(rows), "sha256": h.hexdigest()}


def block_provenance(db: Database, block_id: int) -> Provenance | None:
    with db.lock:
        row = db.conn.execute(
            "SELECT provenance FROM blocks WHERE block_id=?", (block_id,)
        ).fetchone()
    return None if row is None else Provenance.model_validate(json.loads(row[0]))
