"""The durable key store of one node: SQLite in WAL mode with synchronous=EXTRA.

Keys arrive per block from post-processing, in two phases so that both nodes hold a block
before either hands out a key from it:

1. ``add_block`` on both nodes stores the block's keys as PENDING (durable on return);
2. once each node has heard that the other stored the block, ``commit_block`` on both
   makes the keys AVAILABLE. ``discard_block`` aborts.

Key IDs are computed identically on both nodes (:mod:`qkdnode.keystore.ids`). Which node may
hand a key out through ``take_keys`` (ETSI enc_keys) is fixed by the parity of its index in
the block: even indices belong to the transmitter's node, odd ones to the receiver's. The
other node hands that key only through ``claim_keys`` (ETSI dec_keys) with its ID, so no key
can be handed out by enc_keys on both nodes.

Every state change is one SQLite transaction that is on disk before the method returns;
a key is marked DELIVERED before its bytes leave the store. Erasing a key overwrites its
bytes with zeros, then deletes the row (``secure_delete`` is on); a tombstone without key
bytes remembers why the key is gone.

Thread-safe: one connection guarded by a lock; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import structlog

from qkdnode.keystore.errors import (
    BlockError,
    KeyAlreadyDeliveredError,
    KeyNotForPairError,
    KeyRequestError,
    KeyStoreError,
    KeysUnavailableError,
    LinkMismatchError,
    StoreFullError,
    UnknownKeyError,
)
from qkdnode.keystore.ids import (
    key_ref,
    key_refs,
    make_key_id,
    ref_bytes,
    ref_from_bytes,
    split_key_id,
)
from qkdnode.keystore.models import (
    BlockSummary,
    DeliveredEntry,
    DeliveredKey,
    DeliveryNotice,
    EraseReason,
    KeyInfo,
    KeyState,
    Pair,
    Provenance,
    ReconcileActions,
    Side,
    SyncSummary,
)

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2  # 2: key references stored as 16-byte BLOBs
_SIDE_PARITY: dict[str, int] = {"transmitter": 0, "receiver": 1}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    block_id INTEGER PRIMARY KEY,
    committed INTEGER NOT NULL,
    key_size_bits INTEGER NOT NULL,
    key_count INTEGER NOT NULL,
    created_at REAL NOT NULL,
    provenance TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    ref BLOB PRIMARY KEY,
    block_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    size_bits INTEGER NOT NULL,
    enc_parity INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    pair_master TEXT,
    pair_slave TEXT,
    delivered_size_bits INTEGER,
    delivered_at REAL,
    via TEXT,
    peer_delivered INTEGER NOT NULL DEFAULT 0,
    key BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_pick ON keys (state, enc_parity, block_id, idx);
CREATE INDEX IF NOT EXISTS keys_block ON keys (block_id, idx);
CREATE TABLE IF NOT EXISTS erased (
    ref BLOB PRIMARY KEY,
    block_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    reason TEXT NOT NULL,
    state_before TEXT NOT NULL,
    erased_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS erased_block ON erased (block_id);
CREATE INDEX IF NOT EXISTS erased_at ON erased (erased_at);
"""


def _validate_size(size_bits: int) -> None:
    if size_bits <= 0 or size_bits % 8:
        raise KeyRequestError(f"key size {size_bits} bits is not a positive multiple of 8")


class KeyStore:
    """Keys of one node of one link. Open with :meth:`open`; close with :meth:`close`.

    ``side`` is this node's role; it decides which keys ``take_keys`` may hand out.
    ``clock`` returns Unix time in seconds (injectable for expiry tests).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        link_id: str,
        side: Side,
        key_ttl_s: float,
        max_key_count: int,
        clock: Callable[[], float],
        compact_interval_s: float = 300.0,
    ) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path
        self.link_id = link_id
        self.side: Side = side
        self.key_ttl_s = key_ttl_s
        self.max_key_count = max_key_count
        self._clock = clock
        self._enc_parity = _SIDE_PARITY[side]
        self.compact_interval_s = compact_interval_s
        # Unknown after a restart (a crash may have left erased bytes in free page space).
        self._erased_since_compact = True
        self._last_compact = -math.inf

    def __repr__(self) -> str:
        return f"KeyStore(path={str(self.path)!r}, link_id={self.link_id!r}, side={self.side!r})"

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        link_id: str,
        side: Side,
        key_ttl_s: float = 86400.0,
        max_key_count: int = 100_000,
        clock: Callable[[], float] = time.time,
        compact_interval_s: float = 300.0,
    ) -> KeyStore:
        """Open (creating if needed) the store at ``path``.

        Raises :class:`LinkMismatchError` if the file belongs to another link or side.
        """
        if side not in _SIDE_PARITY:
            raise ValueError(f"side must be 'transmitter' or 'receiver', got {side!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot enable WAL mode on {path} (got {mode})")
            conn.execute("PRAGMA synchronous=EXTRA")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA temp_store=MEMORY")  # VACUUM's copy never touches the disk
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            if not meta:
                conn.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    [("schema", str(SCHEMA_VERSION)), ("link_id", link_id), ("side", side)],
                )
            elif meta.get("schema") != str(SCHEMA_VERSION):
                conn.execute("ROLLBACK")
                raise KeyStoreError(
                    f"key store {path} has schema {meta.get('schema')}, this version needs "
                    f"{SCHEMA_VERSION}; move the file away (the peer discards the keys this "
                    "node no longer holds at the next summary exchange)"
                )
            elif meta.get("link_id") != link_id or meta.get("side") != side:
                conn.execute("ROLLBACK")
                raise LinkMismatchError(
                    f"key store {path} belongs to link {meta.get('link_id')!r} side "
                    f"{meta.get('side')!r}, not {link_id!r} side {side!r}"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        store = cls(
            conn,
            path,
            link_id=link_id,
            side=side,
            key_ttl_s=key_ttl_s,
            max_key_count=max_key_count,
            clock=clock,
            compact_interval_s=compact_interval_s,
        )
        log.info("keystore.opened", path=str(path), link_id=link_id, side=side, **store.counts())
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
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

    # -- blocks ---------------------------------------------------------------------------

    def key_ids_for_block(
        self, block_id: int, key_count: int, key_size_bits: int
    ) -> list[uuid.UUID]:
        """IDs of the keys of a block (computable without the store, identical on both nodes)."""
        return [make_key_id(r, key_size_bits) for r in key_refs(self.link_id, block_id, key_count)]

    def add_block(
        self,
        block_id: int,
        key_bytes: bytes,
        key_size_bits: int,
        provenance: Provenance,
    ) -> list[uuid.UUID]:
        """Store a block's keys as PENDING; returns their IDs. Durable on return.

        The block is cut into ``len(key_bytes) * 8 // key_size_bits`` keys; remaining bits
        are dropped. Raises :class:`BlockError` if the block ID was already used (block IDs
        are never reused, except for a block discarded while pending) and
        :class:`StoreFullError` if the store would hold more than ``max_key_count`` keys.
        """
        if block_id < 0:
            raise BlockError(f"block_id must be >= 0, got {block_id}")
        if key_size_bits <= 0 or key_size_bits % 8:
            raise BlockError(f"key_size_bits {key_size_bits} must be a positive multiple of 8")
        unit = key_size_bits // 8
        count = len(key_bytes) // unit
        if count == 0:
            raise BlockError(
                f"block {block_id}: {len(key_bytes) * 8} bits give no key of {key_size_bits} bits"
            )
        now = self._clock()
        expires = now + self.key_ttl_s
        refs = key_refs(self.link_id, block_id, count)
        ids = [make_key_id(r, key_size_bits) for r in refs]
        rows = [
            (
                ref_bytes(refs[i]),
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
        with self._tx() as cur:
            if cur.execute("SELECT 1 FROM blocks WHERE block_id=?", (block_id,)).fetchone():
                raise BlockError(f"block {block_id} is already stored")
            if cur.execute(
                "SELECT 1 FROM erased WHERE block_id=? AND state_before != ? LIMIT 1",
                (block_id, KeyState.PENDING.value),
            ).fetchone():
                raise BlockError(f"block {block_id} was used before; block IDs are never reused")
            stored = cur.execute("SELECT COUNT(*) FROM keys").fetchone()[0]
            if stored + count > self.max_key_count:
                raise StoreFullError(
                    f"block {block_id}: {count} keys would exceed max_key_count "
                    f"{self.max_key_count} ({stored} stored)"
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
            cur.executemany(
                "INSERT OR REPLACE INTO keys (ref, block_id, idx, size_bits, enc_parity, state, "
                "created_at, expires_at, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        log.info(
            "keystore.block_added",
            block_id=block_id,
            keys=count,
            key_size_bits=key_size_bits,
            qber=provenance.qber,
        )
        return ids

    def commit_block(self, block_id: int) -> int:
        """Make a PENDING block's keys AVAILABLE (RESERVED if the peer already delivered
        them). Idempotent. Returns the number of keys changed."""
        with self._tx() as cur:
            changed = self._commit(cur, block_id)
        log.info("keystore.block_committed", block_id=block_id, keys=changed)
        return changed

    def _commit(self, cur: sqlite3.Cursor, block_id: int) -> int:
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

    def discard_block(self, block_id: int) -> int:
        """Erase all keys of a block (aborted or not held by both nodes). Returns keys erased."""
        with self._tx() as cur:
            n = self._discard_block(cur, block_id)
        log.info("keystore.block_discarded", block_id=block_id, keys=n)
        return n

    def _discard_block(self, cur: sqlite3.Cursor, block_id: int) -> int:
        refs = [r[0] for r in cur.execute("SELECT ref FROM keys WHERE block_id=?", (block_id,))]
        n = self._erase(cur, refs, EraseReason.DISCARDED)
        cur.execute("DELETE FROM blocks WHERE block_id=?", (block_id,))
        return n

    # -- delivery ---------------------------------------------------------------------------

    def take_keys(self, pair: Pair, number: int, size_bits: int) -> list[DeliveredKey]:
        """Hand ``number`` keys of ``size_bits`` to the master SAE of ``pair`` (ETSI enc_keys).

        Only AVAILABLE keys of this node's parity are used, oldest first; each delivered key
        is the first ``size_bits`` bits of a stored key at least that long. All or nothing:
        raises :class:`KeysUnavailableError` if fewer keys are available,
        :class:`KeyRequestError` for a bad size or number.
        """
        if number <= 0:
            raise KeyRequestError(f"number must be >= 1, got {number}")
        _validate_size(size_bits)
        now = self._clock()
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT ref, key FROM keys WHERE state=? AND enc_parity=? AND size_bits>=? "
                "AND expires_at>? ORDER BY block_id, idx LIMIT ?",
                (KeyState.AVAILABLE.value, self._enc_parity, size_bits, now, number),
            ).fetchall()
            if len(rows) < number:
                raise KeysUnavailableError(
                    f"{number} keys of {size_bits} bits requested, {len(rows)} available"
                )
            cur.executemany(
                "UPDATE keys SET state=?, pair_master=?, pair_slave=?, delivered_size_bits=?, "
                "delivered_at=?, via='enc' WHERE ref=?",
                [
                    (KeyState.DELIVERED.value, pair.master, pair.slave, size_bits, now, ref)
                    for ref, _ in rows
                ],
            )
        keys = [
            DeliveredKey(
                make_key_id(ref_from_bytes(ref), size_bits), size_bits, bytes(key[: size_bits // 8])
            )
            for ref, key in rows
        ]
        log.info(
            "keystore.keys_taken",
            master=pair.master,
            slave=pair.slave,
            keys=len(keys),
            size_bits=size_bits,
        )
        return keys

    def claim_keys(
        self, pair: Pair, key_ids: Sequence[uuid.UUID], *, require_reserved: bool = False
    ) -> list[DeliveredKey]:
        """Hand the keys ``key_ids`` (issued by the peer's enc_keys) to the slave SAE of
        ``pair`` (ETSI dec_keys). All or nothing.

        Raises :class:`UnknownKeyError` (never held, expired, discarded),
        :class:`KeyAlreadyDeliveredError`, :class:`KeyNotForPairError` (reserved for another
        pair, or a key that this node hands out itself), :class:`KeysUnavailableError` (the
        key's block is not committed here yet, or ``require_reserved`` and the peer's
        delivery notice has not arrived yet: retry shortly).
        """
        if not key_ids:
            raise KeyRequestError("no key_ID given")
        parsed: list[tuple[uuid.UUID, bytes, int]] = []
        seen: set[bytes] = set()
        for kid in key_ids:
            try:
                ref, size = split_key_id(kid)
            except ValueError as exc:
                raise UnknownKeyError(str(exc)) from None
            h = ref_bytes(ref)
            if h in seen:
                raise KeyRequestError(f"key_ID {kid} is requested twice")
            seen.add(h)
            parsed.append((kid, h, size))
        now = self._clock()
        out: list[DeliveredKey] = []
        with self._tx() as cur:
            updates = []
            for kid, h, size in parsed:
                row = cur.execute(
                    "SELECT state, enc_parity, size_bits, expires_at, pair_master, pair_slave, "
                    "delivered_size_bits, peer_delivered, key FROM keys WHERE ref=?",
                    (h,),
                ).fetchone()
                if row is None:
                    raise self._gone_error(cur, kid, h)
                state, parity, stored_bits, expires, pm, ps, dsize, _, key = row
                if parity == self._enc_parity:
                    raise KeyNotForPairError(
                        f"key_ID {kid} is handed out by this KME's enc_keys, not by dec_keys"
                    )
                if state == KeyState.DELIVERED.value:
                    raise KeyAlreadyDeliveredError(f"key_ID {kid} was already delivered")
                if state == KeyState.PENDING.value:
                    raise KeysUnavailableError(
                        f"key_ID {kid}: its block is not yet committed on this KME; retry"
                    )
                if expires <= now:
                    raise UnknownKeyError(f"key_ID {kid} has expired")
                if size > stored_bits:
                    raise UnknownKeyError(f"key_ID {kid}: size exceeds the stored key")
                if state == KeyState.RESERVED.value and (
                    (pm, ps) != (pair.master, pair.slave) or (dsize is not None and dsize != size)
                ):
                    raise KeyNotForPairError(
                        f"key_ID {kid} was not issued to master SAE {pair.master!r} for "
                        f"slave SAE {pair.slave!r}"
                    )
                if require_reserved and state == KeyState.AVAILABLE.value:
                    raise KeysUnavailableError(
                        f"key_ID {kid}: the peer KME has not announced its delivery yet; retry"
                    )
                updates.append((h, size))
                out.append(DeliveredKey(kid, size, bytes(key[: size // 8])))
            cur.executemany(
                "UPDATE keys SET state=?, pair_master=?, pair_slave=?, delivered_size_bits=?, "
                "delivered_at=?, via='dec' WHERE ref=?",
                [
                    (KeyState.DELIVERED.value, pair.master, pair.slave, size, now, h)
                    for h, size in updates
                ],
            )
            done = [
                r[0]
                for h, _ in updates
                for r in cur.execute("SELECT ref FROM keys WHERE ref=? AND peer_delivered=1", (h,))
            ]
            self._erase(cur, done, EraseReason.DELIVERED)
        log.info("keystore.keys_claimed", master=pair.master, slave=pair.slave, keys=len(out))
        return out

    def _gone_error(self, cur: sqlite3.Cursor, kid: uuid.UUID, h: bytes) -> KeyRequestError:
        row = cur.execute("SELECT reason, state_before FROM erased WHERE ref=?", (h,)).fetchone()
        if row is None:
            return UnknownKeyError(f"key_ID {kid} is unknown to this KME")
        reason, before = row
        if before == KeyState.DELIVERED.value or reason == EraseReason.DELIVERED.value:
            return KeyAlreadyDeliveredError(f"key_ID {kid} was already delivered")
        if reason == EraseReason.EXPIRED.value:
            return UnknownKeyError(f"key_ID {kid} has expired")
        return UnknownKeyError(f"key_ID {kid} was discarded (not held by both KMEs)")

    def notice(
        self, pair: Pair, via: Literal["enc", "dec"], keys: Iterable[DeliveredKey]
    ) -> DeliveryNotice:
        """The notice to send to the peer after ``take_keys`` (via 'enc') or ``claim_keys``
        (via 'dec') returned ``keys``."""
        return DeliveryNotice(
            link_id=self.link_id,
            entries=[DeliveredEntry(key_id=k.key_id, pair=pair, via=via) for k in keys],
        )

    def apply_notice(self, notice: DeliveryNotice) -> int:
        """Apply the peer's delivery notice: keys it delivered via enc are reserved here for
        the pair's slave; keys delivered on both nodes are erased. Unknown IDs are ignored.
        Idempotent. Returns the number of keys changed."""
        if notice.link_id != self.link_id:
            raise LinkMismatchError(
                f"delivery notice for link {notice.link_id!r}, this store is {self.link_id!r}"
            )
        with self._tx() as cur:
            n = self._apply_entries(cur, notice.entries)
        log.info("keystore.notice_applied", entries=len(notice.entries), changed=n)
        return n

    def _apply_entries(self, cur: sqlite3.Cursor, entries: Sequence[DeliveredEntry]) -> int:
        changed = 0
        to_erase: list[bytes] = []
        for e in entries:
            try:
                ref, size = split_key_id(e.key_id)
            except ValueError:
                continue
            h = ref_bytes(ref)
            row = cur.execute(
                "SELECT state, enc_parity, peer_delivered FROM keys WHERE ref=?", (h,)
            ).fetchone()
            if row is None:
                continue
            state, parity, peer_done = row
            # A peer's enc delivery must be of a key of the peer's parity and vice versa;
            # anything else is a protocol error we refuse to act on.
            peer_parity = 1 - self._enc_parity
            if (e.via == "enc") != (parity == peer_parity):
                log.warning("keystore.notice_parity_mismatch", key_id=str(e.key_id), via=e.via)
                continue
            if state == KeyState.DELIVERED.value:
                to_erase.append(h)
                continue
            if peer_done:
                continue
            if state in (KeyState.AVAILABLE.value, KeyState.PENDING.value):
                new_state = KeyState.RESERVED.value if state == KeyState.AVAILABLE.value else state
                cur.execute(
                    "UPDATE keys SET state=?, pair_master=?, pair_slave=?, delivered_size_bits=?, "
                    "peer_delivered=1 WHERE ref=?",
                    (new_state, e.pair.master, e.pair.slave, size, h),
                )
            else:
                cur.execute("UPDATE keys SET peer_delivered=1 WHERE ref=?", (h,))
            changed += 1
        changed += self._erase(cur, to_erase, EraseReason.DELIVERED)
        return changed

    # -- synchronisation ------------------------------------------------------------------

    def summary(self) -> SyncSummary:
        """What this node holds, for the peer (see :mod:`qkdnode.keystore.sync`)."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN")
                committed = dict(cur.execute("SELECT block_id, committed FROM blocks").fetchall())
                live: dict[int, list[int]] = {b: [] for b in committed}
                for block_id, idx in cur.execute(
                    "SELECT block_id, idx FROM keys ORDER BY block_id, idx"
                ):
                    live.setdefault(block_id, []).append(idx)
                delivered = [
                    DeliveredEntry(
                        key_id=make_key_id(ref_from_bytes(ref), dsize),
                        pair=Pair(master=pm, slave=ps),
                        via=via,
                    )
                    for ref, dsize, pm, ps, via in cur.execute(
                        "SELECT ref, delivered_size_bits, pair_master, pair_slave, via FROM keys "
                        "WHERE state=?",
                        (KeyState.DELIVERED.value,),
                    )
                ]
                cur.execute("COMMIT")
            finally:
                cur.close()
        blocks = [
            BlockSummary(block_id=b, committed=bool(committed.get(b, 0)), live_indices=idx)
            for b, idx in sorted(live.items())
        ]
        return SyncSummary(link_id=self.link_id, side=self.side, blocks=blocks, delivered=delivered)

    def apply_reconcile(self, actions: ReconcileActions) -> None:
        """Apply the result of ``reconcile(self.summary(), peer_summary)`` in one transaction."""
        with self._tx() as cur:
            for b in actions.discard_blocks:
                self._discard_block(cur, b)
            for b in actions.commit_blocks:
                if cur.execute("SELECT 1 FROM blocks WHERE block_id=?", (b,)).fetchone():
                    self._commit(cur, b)
            refs = [ref_bytes(key_ref(self.link_id, b, i)) for b, i in actions.discard_keys]
            discarded = self._erase(cur, refs, EraseReason.DISCARDED)
            self._drop_empty_blocks(cur)
            self._apply_entries(cur, actions.peer_delivered)
        log.info(
            "keystore.reconciled",
            committed=len(actions.commit_blocks),
            discarded_blocks=len(actions.discard_blocks),
            discarded_keys=discarded,
            peer_delivered=len(actions.peer_delivered),
        )

    # -- erasure ----------------------------------------------------------------------------

    def _erase(self, cur: sqlite3.Cursor, refs: Sequence[bytes], reason: EraseReason) -> int:
        """Overwrite with zeros, tombstone, then delete the keys ``refs``."""
        now = self._clock()
        params = [(r,) for r in refs]
        cur.executemany("UPDATE keys SET key=zeroblob(length(key)) WHERE ref=?", params)
        cur.executemany(
            "INSERT OR REPLACE INTO erased (ref, block_id, idx, reason, state_before, erased_at) "
            "SELECT ref, block_id, idx, ?, state, ? FROM keys WHERE ref=?",
            [(reason.value, now, r) for r in refs],
        )
        cur.executemany("DELETE FROM keys WHERE ref=?", params)
        n = cur.rowcount
        if n:
            self._erased_since_compact = True
            self._drop_empty_blocks(cur)
        return n

    def _drop_empty_blocks(self, cur: sqlite3.Cursor) -> None:
        cur.execute(
            "DELETE FROM blocks WHERE NOT EXISTS "
            "(SELECT 1 FROM keys WHERE keys.block_id = blocks.block_id)"
        )

    def erase_due(self, *, tombstone_ttl_s: float | None = None) -> int:
        """Erase keys whose time to live ended (any state), forget tombstones older than
        ``tombstone_ttl_s`` (default: twice the key TTL), then :meth:`compact` if keys were
        erased and ``compact_interval_s`` has passed since the last compaction (else only
        truncate the WAL). Call periodically. Returns the number of keys erased."""
        now = self._clock()
        keep_s = 2 * self.key_ttl_s if tombstone_ttl_s is None else tombstone_ttl_s
        with self._tx() as cur:
            refs = [r[0] for r in cur.execute("SELECT ref FROM keys WHERE expires_at<=?", (now,))]
            cur.execute(
                "UPDATE keys SET state=? WHERE expires_at<=?", (KeyState.EXPIRED.value, now)
            )
            n = self._erase(cur, refs, EraseReason.EXPIRED)
            cur.execute("DELETE FROM erased WHERE erased_at<?", (now - keep_s,))
        if n:
            log.info("keystore.expired", keys=n)
        if (
            self._erased_since_compact
            and time.monotonic() - self._last_compact >= self.compact_interval_s
        ):
            self.compact()
        else:
            with self._lock:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def compact(self) -> None:
        """Rewrite the database file (VACUUM) and truncate the WAL.

        ``secure_delete`` zeroes a deleted row in place, but SQLite leaves stale copies of
        rows in the unallocated gap of b-tree pages it rebalanced earlier; only a rebuild of
        the file removes them. Cost is proportional to the file size (blocks the store)."""
        t0 = time.monotonic()
        with self._lock:
            self._conn.execute("VACUUM")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._erased_since_compact = False
            self._last_compact = time.monotonic()
        log.info("keystore.compacted", duration_s=round(self._last_compact - t0, 4))

    # -- inspection -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of stored keys per state (no key bytes)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM keys GROUP BY state").fetchall()
        out = {s.value: 0 for s in KeyState}
        out.update({state: n for state, n in rows})
        return out

    def available_for_enc(self, min_size_bits: int = 8) -> int:
        """Keys this node may hand out through ``take_keys`` right now."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM keys WHERE state=? AND enc_parity=? AND size_bits>=? "
                "AND expires_at>?",
                (KeyState.AVAILABLE.value, self._enc_parity, min_size_bits, self._clock()),
            ).fetchone()
        return int(row[0])

    def max_stored_key_size_bits(self) -> int | None:
        """Largest size of the keys ``take_keys`` could hand out now (None if none)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT MAX(size_bits) FROM keys WHERE state=? AND enc_parity=?",
                (KeyState.AVAILABLE.value, self._enc_parity),
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def key_info(self, key_id: uuid.UUID) -> KeyInfo | None:
        """Metadata of a stored key, or None if it is not (or no longer) stored."""
        try:
            ref, _ = split_key_id(key_id)
        except ValueError:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT block_id, idx, size_bits, state, created_at, expires_at, pair_master, "
                "pair_slave, peer_delivered FROM keys WHERE ref=?",
                (ref_bytes(ref),),
            ).fetchone()
        if row is None:
            return None
        block_id, idx, size, state, created, expires, pm, ps, peer_done = row
        return KeyInfo(
            key_id=make_key_id(ref, size),
            block_id=block_id,
            index=idx,
            size_bits=size,
            state=KeyState(state),
            created_at=created,
            expires_at=expires,
            pair=None if pm is None else Pair(master=pm, slave=ps),
            peer_delivered=bool(peer_done),
        )

    def last_block_id(self) -> int:
        """Highest block ID ever stored here (-1 if none); survives erasure of its keys."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE name='max_block_id'").fetchone()
        return -1 if row is None else int(row[0])

    def digest(self) -> dict[str, object]:
        """Count and SHA-256 over (key ID, key bytes) of the keys of committed blocks, sorted
        by ID: lets the two nodes compare their stores without revealing keys."""
        h = hashlib.sha256()
        with self._lock:
            rows = self._conn.execute(
                "SELECT k.ref, k.size_bits, k.key FROM keys k JOIN blocks b "
                "ON b.block_id = k.block_id WHERE b.committed = 1 ORDER BY k.ref"
            ).fetchall()
        for ref, size, key in rows:
            h.update(str(make_key_id(ref_from_bytes(ref), size)).encode())
            h.update(len(key).to_bytes(4, "big"))
            h.update(key)
        return {"count": len(rows), "sha256": h.hexdigest()}

    def block_provenance(self, block_id: int) -> Provenance | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT provenance FROM blocks WHERE block_id=?", (block_id,)
            ).fetchone()
        return None if row is None else Provenance.model_validate(json.loads(row[0]))
