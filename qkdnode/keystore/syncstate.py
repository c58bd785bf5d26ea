"""The key store's side of the key-ID sync: its summary, and the reconcile actions applied.

:func:`summary` reads what the store holds (blocks, live key indices, issued, reserved and
recently delivered keys) in one read transaction; :func:`apply_reconcile` applies the
actions :func:`qkdnode.keystore.sync.reconcile` computed, in one transaction, and records
when the sync completed. The decisions themselves are in :mod:`qkdnode.keystore.sync`.
"""

from __future__ import annotations

import uuid
from typing import NamedTuple

from qkdnode.keystore.blocks import commit, discard
from qkdnode.keystore.database import Database, drop_empty_blocks
from qkdnode.keystore.models import (
    BlockSummary,
    EraseReason,
    ReconcileActions,
    Side,
    SyncSummary,
)

#: A key-ID sync summary names the keys delivered since the last completed sync, and
#: those of this many seconds before it (seconds). A key delivered earlier is gone on both
#: nodes: the sync erased it wherever it was left (as delivered, or, should one node have
#: missed that sync, as uncertain: either way it is never served again).
FETCHED_AFTER_SYNC_S = 600.0


class Reconciled(NamedTuple):
    """Keys erased by :func:`apply_reconcile`, by reason."""

    erased_delivered: int
    erased_uncertain: int
    discarded_keys: int


def summary(db: Database, *, link_id: str, side: Side) -> SyncSummary:
    with db.lock:
        cur = db.conn.cursor()
        try:
            cur.execute("BEGIN")
            committed = dict(cur.execute("SELECT block_id, committed FROM blocks").fetchall())
            live: dict[int, list[int]] = {b: [] for b in committed}
            for block_id, idx in cur.execute(
                "SELECT block_id, idx FROM keys ORDER BY block_id, idx"
            ):
                live.setdefault(block_id, []).append(idx)
            issued = [
                uuid.UUID(bytes=r[0])
                for r in cur.execute("SELECT key_id FROM keys WHERE via='enc'")
            ]
            reserved = [
                uuid.UUID(bytes=r[0])
                for r in cur.execute(
                    "SELECT key_id FROM keys WHERE pair_master IS NOT NULL AND via IS NULL"
                )
            ]
            # Tombstones of keys delivered before the last completed sync are gone on
            # both nodes (the sync erased them wherever they were left): only the
            # recent ones go out, so the summary does not grow with every delivery.
            row = cur.execute("SELECT value FROM meta WHERE name='last_sync_at'").fetchone()
            since = float(row[0]) - FETCHED_AFTER_SYNC_S if row else float("-inf")
            fetched = [
                uuid.UUID(bytes=r[0])
                for r in cur.execute(
                    "SELECT key_id FROM erased WHERE reason=? AND erased_at>=?",
                    (EraseReason.DELIVERED.value, since),
                )
            ]
            cur.execute("COMMIT")
        finally:
            cur.close()
    blocks = [
        BlockSummary(block_id=b, committed=bool(committed.get(b, 0)), live_indices=idx)
        for b, idx in sorted(live.items())
    ]
    return SyncSummary(
        link_id=link_id,
        side=side,
        blocks=blocks,
        issued=issued,
        reserved=reserved,
        fetched=fetched,
    )


def apply_reconcile(db: Database, actions: ReconcileActions) -> Reconciled:
    with db.tx() as cur:
        delivered = db.erase(cur, [k.bytes for k in actions.erase_delivered], EraseReason.DELIVERED)
        uncertain = db.erase(cur, [k.bytes for k in actions.erase_uncertain], EraseReason.UNCERTAIN)
        for b in actions.discard_blocks:
            discard(db, cur, b)
        for b in actions.commit_blocks:
            if cur.execute("SELECT 1 FROM blocks WHERE block_id=?", (b,)).fetchone():
                commit(cur, b)
        ids = [
            r[0]
            for b, i in actions.discard_keys
            for r in cur.execute("SELECT key_id FROM keys WHERE block_id=? AND idx=?", (b, i))
        ]
        discarded = db.erase(cur, ids, EraseReason.DISCARDED)
        drop_empty_blocks(cur)
        cur.execute(
            "INSERT INTO meta (name, value) VALUES ('last_sync_at', ?) "
            "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
            (repr(db.clock()),),
        )
    return Reconciled(delivered, uncertain, discarded)
