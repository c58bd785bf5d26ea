"""The durable key store of one node: SQLite in WAL mode with synchronous=EXTRA.

Keys arrive per block from post-processing, in two phases so that both nodes hold a block
before either hands out a key from it:

1. ``add_block`` on both nodes stores the block's keys as PENDING (durable on return);
2. once each node has heard that the other stored the block, ``commit_block`` on both
   makes the keys AVAILABLE. ``discard_block`` aborts.

Key IDs are secret-seeded (:mod:`qkdnode.keystore.ids`): the first bytes of each block's
final key are its ID seed, so both nodes compute the same IDs and nobody else can. Which
node may hand a key out through enc_keys (the key's *issuer*) is fixed by the parity of its
index in the block: even indices belong to the transmitter's node, odd ones to the
receiver's.

Activation first (ETSI enc_keys at the issuer, dec_keys at the peer):

1. issuer: ``pick_for_enc`` chooses AVAILABLE keys and holds them in memory (in flight);
2. peer: ``activate`` reserves them for the master SAE and its slaves, durably, all or
   nothing, before it acknowledges;
3. issuer: ``confirm_issued`` marks them DELIVERED (durable) and returns the bytes for
   the master; if the peer refused, ``abandon_issue`` puts them back, and if the outcome
   is unknown it erases them (the peer is told to erase them too, and the key-ID sync
   erases them on both sides if that message is lost);
4. peer: ``claim_keys`` serves a reserved key only to a slave it was activated for.

Every state change is one SQLite transaction that is on disk before the method returns;
a key is marked delivered before its bytes leave the store. Erasing a key overwrites its
bytes with zeros, then deletes the row (``secure_delete`` is on); a tombstone without key
bytes remembers why the key is gone.

The database, its WAL and shared-memory files are created mode 0600 in a 0700 directory
whatever the umask; opening a store that other users can read is refused.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from qkdnode.keystore.errors import (
    BlockError,
    KeyRequestError,
    KeyStoreError,
    KeysUnavailableError,
    LinkMismatchError,
    StoreFullError,
    UnknownKeyError,
)
from qkdnode.keystore.ids import ID_SEED_BYTES, block_key_ids
from qkdnode.keystore.models import (
    MAX_PARTS_PER_KEY,
    ActivatedKey,
    ActivationRefusal,
    ActivationReply,
    ActivationRequest,
    BlockSummary,
    DeliveredKey,
    DeliveryNotice,
    EraseReason,
    KeyInfo,
    KeyState,
    Pair,
    Provenance,
    ReconcileActions,
    ReleaseRequest,
    Side,
    SyncSummary,
)
from qkdnode.paths import check_private_file, create_private_file

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 3  # 3: secret-seeded key IDs, activation, key parts
_SIDE_PARITY: dict[str, int] = {"transmitter": 0, "receiver": 1}
#: most bound parameters in one statement (SQLite's smallest default limit is 999)
_SQL_CHUNK = 500
#: A key-ID sync summary names the keys delivered since the last completed sync, and
#: those of this many seconds before it (seconds). A key delivered earlier is gone on both
#: nodes: the sync erased it wherever it was left (as delivered, or, should one node have
#: missed that sync, as uncertain: either way it is never served again).
FETCHED_AFTER_SYNC_S = 600.0

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
    key_id BLOB PRIMARY KEY,
    block_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    size_bits INTEGER NOT NULL,
    enc_parity INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    pair_master TEXT,
    slaves TEXT,
    fetched TEXT,
    delivered_as BLOB,
    part INTEGER,
    delivered_size_bits INTEGER,
    delivered_at REAL,
    via TEXT,
    key BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_pick ON keys (state, enc_parity, block_id, idx);
CREATE UNIQUE INDEX IF NOT EXISTS keys_block ON keys (block_id, idx);
CREATE INDEX IF NOT EXISTS keys_delivered_as ON keys (delivered_as, part);
CREATE TABLE IF NOT EXISTS erased (
    key_id BLOB PRIMARY KEY,
    block_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    reason TEXT NOT NULL,
    state_before TEXT NOT NULL,
    erased_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS erased_block ON erased (block_id);
CREATE INDEX IF NOT EXISTS erased_at ON erased (erased_at);
"""


@dataclass(frozen=True)
class IssuedKey:
    """A key picked for a master SAE: its parts (stored key ID, stored bytes) in order.
    Its ID is the first part's. The bytes never appear in ``repr``."""

    size_bits: int
    parts: tuple[tuple[bytes, bytes], ...] = field(repr=False)

    @property
    def key_id(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.parts[0][0])

    def activated(self) -> ActivatedKey:
        return ActivatedKey(
            key_ID=self.key_id,
            size_bits=self.size_bits,
            parts=[uuid.UUID(bytes=kid) for kid, _ in self.parts],
        )

    def delivered(self) -> DeliveredKey:
        data = b"".join(key for _, key in self.parts)[: self.size_bits // 8]
        return DeliveredKey(self.key_id, self.size_bits, data)


@dataclass(frozen=True)
class Claimed:
    """What ``claim_keys`` handed out, and which of the keys are now delivered to every
    slave they were activated for (the issuer is told, so it erases its copies)."""

    keys: list[DeliveredKey]
    completed: list[uuid.UUID]


def _refuse(refusal: ActivationRefusal, message: str) -> ActivationReply:
    """A refused activation. Raised out of the transaction by the caller's return, which
    commits nothing (no statement changed anything yet)."""
    return ActivationReply(activated=False, refusal=refusal, message=message)


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
        #: parts picked by ``pick_for_enc`` whose activation is under way (never persisted)
        self._inflight: set[bytes] = set()

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
        for suffix in ("", "-wal", "-shm"):
            check_private_file(path.with_name(path.name + suffix), "key store file")
        # SQLite gives the -wal and -shm files the database file's permissions.
        create_private_file(path)
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

    def add_block(
        self,
        block_id: int,
        final_key: bytes,
        key_size_bits: int,
        provenance: Provenance,
    ) -> list[uuid.UUID]:
        """Store a block's keys as PENDING; returns their IDs. Durable on return.

        ``final_key`` is the block's whole privacy-amplified output, identical on both
        nodes: its first :data:`ID_SEED_BYTES` bytes seed the key IDs and are not stored;
        the rest is cut into keys of ``key_size_bits`` (remaining bits are dropped).
        Raises :class:`BlockError` if the block ID was already used (block IDs are never
        reused, except for a block discarded while pending) or the key is too short, and
        :class:`StoreFullError` if the store would hold more than ``max_key_count`` keys.
        """
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
        now = self._clock()
        expires = now + self.key_ttl_s
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
            # A block discarded while pending may come again: its old tombstones go.
            cur.execute("DELETE FROM erased WHERE block_id=?", (block_id,))
            cur.executemany(
                "INSERT INTO keys (key_id, block_id, idx, size_bits, enc_parity, state, "
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
        ids = [r[0] for r in cur.execute("SELECT key_id FROM keys WHERE block_id=?", (block_id,))]
        n = self._erase(cur, ids, EraseReason.DISCARDED)
        cur.execute("DELETE FROM blocks WHERE block_id=?", (block_id,))
        return n

    # -- delivery: the issuer (enc_keys) ----------------------------------------------------

    def pick_for_enc(self, number: int, size_bits: int) -> list[IssuedKey]:
        """Choose keys for ``number`` keys of ``size_bits`` each (ETSI enc_keys), oldest
        first, from AVAILABLE keys of this node's parity. A key longer than a stored key is
        the concatenation of several stored keys (its *parts*); a shorter one is the first
        ``size_bits`` of one. Nothing is written: the parts are held in flight until
        :meth:`confirm_issued` or :meth:`abandon_issue`. All or nothing: raises
        :class:`KeysUnavailableError` if too few keys are available,
        :class:`KeyRequestError` for a bad number or size.
        """
        if number <= 0:
            raise KeyRequestError(f"number must be >= 1, got {number}")
        _validate_size(size_bits)
        now = self._clock()
        with self._lock:
            cur = self._conn.cursor()
            try:
                rows = cur.execute(
                    "SELECT key_id, size_bits, key FROM keys WHERE state=? AND enc_parity=? "
                    "AND expires_at>? ORDER BY block_id, idx",
                    (KeyState.AVAILABLE.value, self._enc_parity, now),
                )
                issued: list[IssuedKey] = []
                parts: list[tuple[bytes, bytes]] = []
                bits = 0
                for kid, stored_bits, key in rows:
                    if kid in self._inflight:
                        continue
                    parts.append((kid, bytes(key)))
                    bits += stored_bits
                    if bits >= size_bits:
                        if len(parts) > MAX_PARTS_PER_KEY:
                            raise KeyRequestError(
                                f"size {size_bits} bits needs more than {MAX_PARTS_PER_KEY} "
                                "stored keys"
                            )
                        issued.append(IssuedKey(size_bits, tuple(parts)))
                        parts, bits = [], 0
                        if len(issued) == number:
                            break
            finally:
                cur.close()
            if len(issued) < number:
                raise KeysUnavailableError(
                    f"{number} keys of {size_bits} bits requested, {len(issued)} available"
                )
            for k in issued:
                self._inflight.update(kid for kid, _ in k.parts)
        return issued

    def confirm_issued(
        self, master: str, slaves: Sequence[str], issued: Sequence[IssuedKey]
    ) -> list[DeliveredKey]:
        """The peer activated ``issued``: mark their parts DELIVERED to ``master`` (durable)
        and return the keys for the master SAE. Raises :class:`KeysUnavailableError` (and
        erases the keys) if a part is no longer AVAILABLE here (expired meanwhile)."""
        now = self._clock()
        parts = [kid for k in issued for kid, _ in k.parts]
        try:
            with self._tx() as cur:
                live = 0
                # in chunks: one IN list of every part may exceed SQLite's variable limit
                for at in range(0, len(parts), _SQL_CHUNK):
                    chunk = parts[at : at + _SQL_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    live += cur.execute(
                        f"SELECT COUNT(*) FROM keys WHERE state=? AND key_id IN ({marks})",  # noqa: S608
                        (KeyState.AVAILABLE.value, *chunk),
                    ).fetchone()[0]
                if live != len(parts):
                    self._erase(cur, parts, EraseReason.UNCERTAIN)
                    gone = KeysUnavailableError("keys expired during their activation; retry")
                else:
                    gone = None
                    slaves_json = json.dumps(list(slaves))
                    cur.executemany(
                        "UPDATE keys SET state=?, pair_master=?, slaves=?, fetched='[]', "
                        "delivered_as=?, part=?, delivered_size_bits=?, delivered_at=?, "
                        "via='enc' WHERE key_id=?",
                        [
                            (
                                KeyState.DELIVERED.value,
                                master,
                                slaves_json,
                                k.key_id.bytes,
                                n,
                                k.size_bits,
                                now,
                                kid,
                            )
                            for k in issued
                            for n, (kid, _) in enumerate(k.parts)
                        ],
                    )
        finally:
            with self._lock:
                self._inflight.difference_update(parts)
        if gone is not None:
            raise gone
        log.info("keystore.keys_issued", master=master, slaves=len(slaves), keys=len(issued))
        return [k.delivered() for k in issued]

    def abandon_issue(self, issued: Sequence[IssuedKey], *, erase: bool) -> int:
        """The activation of ``issued`` failed. ``erase=False``: the peer certainly changed
        nothing, the keys are available again. ``erase=True``: the outcome is unknown (the
        peer may hold them reserved), so they are erased here, durably (the caller tells
        the peer to erase them too). Returns the number of parts erased."""
        parts = [kid for k in issued for kid, _ in k.parts]
        n = 0
        try:
            if erase:
                with self._tx() as cur:
                    n = self._erase(cur, parts, EraseReason.UNCERTAIN)
        finally:
            with self._lock:
                self._inflight.difference_update(parts)
        if erase:
            log.warning("keystore.issue_abandoned", parts=len(parts), erased=n)
        return n

    def inflight_count(self) -> int:
        """Parts held by activations under way."""
        with self._lock:
            return len(self._inflight)

    def release_request(self, issued: Sequence[IssuedKey]) -> ReleaseRequest:
        """The message that asks the peer to erase the parts of an abandoned activation."""
        return ReleaseRequest(
            link_id=self.link_id,
            parts=[uuid.UUID(bytes=kid) for k in issued for kid, _ in k.parts],
        )

    def activation_request(
        self, master: str, slaves: Sequence[str], issued: Sequence[IssuedKey]
    ) -> ActivationRequest:
        """The message that asks the peer to reserve ``issued`` for master and slaves."""
        return ActivationRequest(
            link_id=self.link_id,
            master=master,
            slaves=list(slaves),
            keys=[k.activated() for k in issued],
        )

    # -- delivery: the peer (dec_keys) ---------------------------------------------------------

    def activate(self, req: ActivationRequest) -> ActivationReply:
        """Reserve the keys of the peer's activation for its master and slaves, durably,
        all or nothing. Each part must be a key of the peer's parity held here, PENDING or
        AVAILABLE, not reserved before (an identical repeat of an activation is accepted
        again). Never raises for the peer's content: refusals are in the reply."""
        if req.link_id != self.link_id:
            return ActivationReply(
                activated=False, refusal="bad_request", message="activation for another link"
            )
        peer_parity = 1 - self._enc_parity
        now = self._clock()
        seen: set[bytes] = set()
        updates: list[tuple[str, str, bytes, int, int, bytes]] = []
        slaves_json = json.dumps(list(req.slaves))
        with self._tx() as cur:
            for k in req.keys:
                if k.parts[0] != k.key_ID:
                    return _refuse("bad_request", f"key_ID {k.key_ID} is not its first part")
                bits = 0
                for n, part in enumerate(k.parts):
                    pid = part.bytes
                    if pid in seen:
                        return _refuse("bad_request", f"part {part} appears twice")
                    seen.add(pid)
                    row = cur.execute(
                        "SELECT state, enc_parity, size_bits, expires_at, pair_master, slaves, "
                        "delivered_as, part, delivered_size_bits FROM keys WHERE key_id=?",
                        (pid,),
                    ).fetchone()
                    if row is None:
                        return _refuse("not_available", f"part {part} is not held here")
                    state, parity, stored, expires, pm, sl, das, dpart, dsize = row
                    if parity != peer_parity:
                        return _refuse("bad_request", f"part {part} is not the peer's to issue")
                    if expires <= now:
                        return _refuse("not_available", f"part {part} has expired")
                    if pm is not None:
                        same = (pm, sl, das, dpart, dsize) == (
                            req.master,
                            slaves_json,
                            k.key_ID.bytes,
                            n,
                            k.size_bits,
                        )
                        if not same:
                            return _refuse("not_available", f"part {part} is reserved already")
                    elif state not in (KeyState.AVAILABLE.value, KeyState.PENDING.value):
                        return _refuse("not_available", f"part {part} is {state}")
                    bits += stored
                    updates.append((req.master, slaves_json, k.key_ID.bytes, n, k.size_bits, pid))
                if bits < k.size_bits or bits - stored >= k.size_bits:
                    return _refuse(
                        "bad_request", f"key_ID {k.key_ID}: parts do not make {k.size_bits} bits"
                    )
            cur.executemany(
                # fetched is kept on an identical repeat: a slave that fetched already must
                # not fetch again
                "UPDATE keys SET pair_master=?, slaves=?, fetched=COALESCE(fetched, '[]'), "
                "delivered_as=?, part=?, "
                "delivered_size_bits=?, state = CASE state WHEN 'available' THEN 'reserved' "
                "ELSE state END WHERE key_id=?",
                updates,
            )
        log.info(
            "keystore.keys_activated", master=req.master, slaves=len(req.slaves), keys=len(req.keys)
        )
        return ActivationReply(activated=True)

    def release(self, req: ReleaseRequest) -> int:
        """Erase the parts of an activation the peer abandoned (outcome unknown there):
        keys of the peer's parity not yet fetched by any slave. Returns parts erased."""
        if req.link_id != self.link_id:
            raise LinkMismatchError(
                f"release for link {req.link_id!r}, this store is {self.link_id!r}"
            )
        peer_parity = 1 - self._enc_parity
        with self._tx() as cur:
            ids = [
                r[0]
                for p in req.parts
                for r in cur.execute(
                    "SELECT key_id FROM keys WHERE key_id=? AND enc_parity=? AND "
                    "(fetched IS NULL OR fetched='[]')",
                    (p.bytes, peer_parity),
                )
            ]
            n = self._erase(cur, ids, EraseReason.UNCERTAIN)
        log.info("keystore.released", parts=len(req.parts), erased=n)
        return n

    def claim_keys(self, master: str, slave: str, key_ids: Sequence[uuid.UUID]) -> Claimed:
        """Hand the keys ``key_ids`` to ``slave`` (ETSI dec_keys): only keys the peer
        activated for exactly this master with ``slave`` among its slaves, each slave once.
        All or nothing.

        Raises :class:`UnknownKeyError` with one message for every ID that this slave
        cannot have (never issued, foreign, of another pair, already fetched, expired), so
        that the answer says nothing about keys of others; :class:`KeyRequestError` for an
        ID given twice; :class:`KeysUnavailableError` if a key activated for this pair
        belongs to a block not yet committed here (retry shortly).
        """
        if not key_ids:
            raise KeyRequestError("no key_ID given")
        if len(set(key_ids)) != len(key_ids):
            raise KeyRequestError("a key_ID is requested twice")
        now = self._clock()
        out: list[DeliveredKey] = []
        done: list[uuid.UUID] = []
        with self._tx() as cur:
            fetch_updates: list[tuple[str, bytes]] = []
            erase: list[bytes] = []
            for kid in key_ids:
                rows = cur.execute(
                    "SELECT key_id, state, expires_at, pair_master, slaves, fetched, "
                    "delivered_size_bits, via, part, key FROM keys WHERE delivered_as=? "
                    "ORDER BY part",
                    (kid.bytes,),
                ).fetchall()
                usable = bool(rows) and all(
                    r[3] == master
                    and r[7] is None
                    and r[2] > now
                    and slave in json.loads(r[4] or "[]")
                    and slave not in json.loads(r[5] or "[]")
                    and r[8] == n
                    for n, r in enumerate(rows)
                )
                if not usable:
                    raise UnknownKeyError(
                        f"key_ID {kid} is unknown, already delivered, or not issued to this "
                        "SAE pair"
                    )
                if any(r[1] == KeyState.PENDING.value for r in rows):
                    raise KeysUnavailableError(
                        f"key_ID {kid}: its block is not yet committed on this KME; retry"
                    )
                size = int(rows[0][6])
                data = b"".join(bytes(r[9]) for r in rows)[: size // 8]
                if len(data) * 8 != size:
                    raise UnknownKeyError(
                        f"key_ID {kid} is unknown, already delivered, or not issued to this "
                        "SAE pair"
                    )
                slaves = json.loads(rows[0][4])
                fetched = [*json.loads(rows[0][5] or "[]"), slave]
                if set(slaves) <= set(fetched):
                    erase.extend(r[0] for r in rows)
                    done.append(kid)
                else:
                    fetch_updates.extend((json.dumps(fetched), r[0]) for r in rows)
                out.append(DeliveredKey(kid, size, data))
            cur.executemany("UPDATE keys SET fetched=? WHERE key_id=?", fetch_updates)
            cur.executemany(
                "UPDATE keys SET state=?, delivered_at=?, via='dec' WHERE key_id=?",
                [(KeyState.DELIVERED.value, now, kid) for kid in erase],
            )
            self._erase(cur, erase, EraseReason.DELIVERED)
        log.info("keystore.keys_claimed", master=master, slave=slave, keys=len(out))
        return Claimed(keys=out, completed=done)

    def delivery_notice(self, key_ids: Sequence[uuid.UUID]) -> DeliveryNotice:
        """The notice for the issuer once every slave fetched ``key_ids``."""
        return DeliveryNotice(link_id=self.link_id, key_IDs=list(key_ids))

    def apply_notice(self, notice: DeliveryNotice) -> int:
        """The peer delivered ``notice.key_IDs`` to every slave: erase the parts this node
        issued for them (as delivered). Unknown IDs are ignored. Idempotent. Returns the
        number of parts erased."""
        if notice.link_id != self.link_id:
            raise LinkMismatchError(
                f"delivery notice for link {notice.link_id!r}, this store is {self.link_id!r}"
            )
        with self._tx() as cur:
            ids = [
                r[0]
                for kid in notice.key_IDs
                for r in cur.execute(
                    "SELECT key_id FROM keys WHERE delivered_as=? AND via='enc'", (kid.bytes,)
                )
            ]
            n = self._erase(cur, ids, EraseReason.DELIVERED)
        log.info("keystore.notice_applied", keys=len(notice.key_IDs), erased=n)
        return n

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
            link_id=self.link_id,
            side=self.side,
            blocks=blocks,
            issued=issued,
            reserved=reserved,
            fetched=fetched,
        )

    def apply_reconcile(self, actions: ReconcileActions) -> None:
        """Apply the result of ``reconcile(self.summary(), peer_summary)`` in one transaction.

        Keys delivered at the peer's end are erased as delivered first, then keys whose
        activation state the two nodes disagree on (never served), then the block and key
        discards."""
        with self._tx() as cur:
            delivered = self._erase(
                cur, [k.bytes for k in actions.erase_delivered], EraseReason.DELIVERED
            )
            uncertain = self._erase(
                cur, [k.bytes for k in actions.erase_uncertain], EraseReason.UNCERTAIN
            )
            for b in actions.discard_blocks:
                self._discard_block(cur, b)
            for b in actions.commit_blocks:
                if cur.execute("SELECT 1 FROM blocks WHERE block_id=?", (b,)).fetchone():
                    self._commit(cur, b)
            ids = [
                r[0]
                for b, i in actions.discard_keys
                for r in cur.execute("SELECT key_id FROM keys WHERE block_id=? AND idx=?", (b, i))
            ]
            discarded = self._erase(cur, ids, EraseReason.DISCARDED)
            self._drop_empty_blocks(cur)
            cur.execute(
                "INSERT INTO meta (name, value) VALUES ('last_sync_at', ?) "
                "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                (repr(self._clock()),),
            )
        log.info(
            "keystore.reconciled",
            committed=len(actions.commit_blocks),
            discarded_blocks=len(actions.discard_blocks),
            discarded_keys=discarded,
            erased_delivered=delivered,
            erased_uncertain=uncertain,
        )

    # -- erasure ----------------------------------------------------------------------------

    def _erase(self, cur: sqlite3.Cursor, ids: Sequence[bytes], reason: EraseReason) -> int:
        """Overwrite with zeros, tombstone, then delete the keys ``ids`` (missing ones are
        skipped). Returns the number of keys erased."""
        if not ids:
            return 0
        now = self._clock()
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
            ids = [r[0] for r in cur.execute("SELECT key_id FROM keys WHERE expires_at<=?", (now,))]
            cur.execute(
                "UPDATE keys SET state=? WHERE expires_at<=?", (KeyState.EXPIRED.value, now)
            )
            n = self._erase(cur, ids, EraseReason.EXPIRED)
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
        """Metadata of a stored key (part), or None if it is not (or no longer) stored."""
        with self._lock:
            row = self._conn.execute(
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

    def erase_reason(self, key_id: uuid.UUID) -> EraseReason | None:
        """Why the key (part) ``key_id`` was erased, or None if there is no tombstone."""
        with self._lock:
            row = self._conn.execute(
                "SELECT reason FROM erased WHERE key_id=?", (key_id.bytes,)
            ).fetchone()
        return None if row is None else EraseReason(row[0])

    def key_ids_of_block(self, block_id: int) -> list[uuid.UUID]:
        """IDs of the live keys of a block, by index (for tests and inspection)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key_id FROM keys WHERE block_id=? ORDER BY idx", (block_id,)
            ).fetchall()
        return [uuid.UUID(bytes=r[0]) for r in rows]

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
                "SELECT k.key_id, k.key FROM keys k JOIN blocks b "
                "ON b.block_id = k.block_id WHERE b.committed = 1 ORDER BY k.key_id"
            ).fetchall()
        for kid, key in rows:
            h.update(str(uuid.UUID(bytes=kid)).encode())
            h.update(len(key).to_bytes(4, "big"))
            h.update(key)
        return {"count": len(rows), "sha256": h.hexdigest()}

    def block_provenance(self, block_id: int) -> Provenance | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT provenance FROM blocks WHERE block_id=?", (block_id,)
            ).fetchone()
        return None if row is None else Provenance.model_validate(json.loads(row[0]))
