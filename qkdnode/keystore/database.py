"""The open database of one key store, shared by all its operations.

:class:`Database` holds the one SQLite connection and the lock that guards it, the clock,
the transaction every state change runs in, and the erasure of key rows (overwrite with
zeros, tombstone, delete), which blocks, deliveries, the key-ID sync and expiry all use.
It also remembers whether erased bytes may linger in free pages since the last compaction.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from qkdnode.keystore.models import EraseReason


class Database:
    """One connection guarded by a lock; ``clock`` returns Unix time in seconds."""

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float]) -> None:
        self.conn = conn
        self.lock = threading.RLock()
        self.clock = clock
        # Unknown after a restart (a crash may have left erased bytes in free page space).
        self.erased_since_compact = True
        self.last_compact = -math.inf

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Cursor]:
        """One ``BEGIN IMMEDIATE`` transaction under the lock: committed when the block
        ends, rolled back if it raises."""
        with self.lock:
            cur = self.conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def erase(self, cur: sqlite3.Cursor, ids: Sequence[bytes], reason: EraseReason) -> int:
        """Overwrite with zeros, tombstone, then delete the keys ``ids`` (missing ones are
        skipped). Returns the number of keys erased."""
        if not ids:
            return 0
        now = self.clock()
        params = [(r,) for r in ids]
        cur.executemany("UPDATE keys SET key=zeroblob(length(key)) WHERE key_id=?", params)
        cur.executemany(
            "INSERT OR REPLACE INTO erased (key_id, block_id, idx, reason, state_before, "
            "erased_at) SELECT key_id, block_id, idx, ?, state, ? FROM keys WHERE key_id=?",
            [(reason.value, now, r) for r in ids],
        )
        cur.executemany("DELETE FROM keys WHERE key_id=?", params)
        n = cur.rowcount
        if n:
            self.erased_since_compact = True
            drop_empty_blocks(cur)
        return n


def drop_empty_blocks(cur: sqlite3.Cursor) -> None:
    """Forget the blocks that have no stored key left."""
    cur.execute(
        "DELETE FROM blocks WHERE NOT EXISTS "
        "(SELECT 1 FROM keys WHERE keys.block_id = blocks.block_id)"
    )
