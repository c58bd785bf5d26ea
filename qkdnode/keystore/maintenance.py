"""Upkeep of the key store file: expiry of keys and tombstones, compaction.

:func:`erase_expired` erases the keys whose time to live ended and forgets old
tombstones; :func:`compact` rewrites the file (VACUUM) so that no stale copy of an erased
key survives in free page space, and :func:`compaction_due` says when that is worth its
cost; otherwise :func:`truncate_wal` only truncates the WAL.
"""

from __future__ import annotations

import time

from qkdnode.keystore.database import Database
from qkdnode.keystore.models import EraseReason, KeyState


def erase_expired(db: Database, *, key_ttl_s: float, tombstone_ttl_s: float | None) -> int:
    """Erase keys whose time to live ended and tombstones older than ``tombstone_ttl_s``
    (default: twice ``key_ttl_s``), in one transaction. Returns the number of keys erased."""
    now = db.clock()
    keep_s = 2 * key_ttl_s if tombstone_ttl_s is None else tombstone_ttl_s
    with db.tx() as cur:
        ids = [r[0] for r in cur.execute("SELECT key_id FROM keys WHERE expires_at<=?", (now,))]
        cur.execute("UPDATE keys SET state=? WHERE expires_at<=?", (KeyState.EXPIRED.value, now))
        n = db.erase(cur, ids, EraseReason.EXPIRED)
        cur.execute("DELETE FROM erased WHERE erased_at<?", (now - keep_s,))
    return n


def compaction_due(db: Database, interval_s: float) -> bool:
    """Keys were erased since the last compaction, which is ``interval_s`` ago or more."""
    return db.erased_since_compact and time.monotonic() - db.last_compact >= interval_s


def truncate_wal(db: Database) -> None:
    """Checkpoint the WAL into the database file and truncate it."""
    with db.lock:
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def compact(db: Database) -> None:
    """Rewrite the database file (VACUUM) and truncate the WAL."""
    with db.lock:
        db.conn.execute("VACUUM")
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.erased_since_compact = False
        db.last_compact = time.monotonic()
