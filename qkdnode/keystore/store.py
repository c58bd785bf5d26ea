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

This module is the store's public face: :class:`KeyStore` holds the link, side and limits
and the open :class:`~qkdnode.keystore.database.Database`, and logs every change. The work
is done by :mod:`~qkdnode.keystore.schema` (tables, opening the file),
:mod:`~qkdnode.keystore.database` (connection, transactions, erasure),
:mod:`~qkdnode.keystore.blocks` (add, commit, discard), :mod:`~qkdnode.keystore.issuer`
(enc_keys), :mod:`~qkdnode.keystore.reservations` (dec_keys),
:mod:`~qkdnode.keystore.syncstate` (the key-ID sync), :mod:`~qkdnode.keystore.maintenance`
(expiry, compaction) and :mod:`~qkdnode.keystore.inspection` (read-only views).
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from qkdnode.keystore import (
    blocks,
    consumption,
    inspection,
    maintenance,
    reservations,
    syncstate,
)
from qkdnode.keystore.database import Database
from qkdnode.keystore.issuer import IssuedKey, Issuer
from qkdnode.keystore.models import (
    MAX_PARTS_PER_KEY,
    ActivationReply,
    ActivationRequest,
    DeliveredKey,
    DeliveryNotice,
    EraseReason,
    KeyInfo,
    Provenance,
    ReconcileActions,
    ReleaseRequest,
    Side,
    SyncSummary,
)
from qkdnode.keystore.reservations import Claimed
from qkdnode.keystore.schema import SCHEMA_VERSION, SIDE_PARITY, connect
from qkdnode.keystore.syncstate import FETCHED_AFTER_SYNC_S

__all__ = ["FETCHED_AFTER_SYNC_S", "SCHEMA_VERSION", "Claimed", "IssuedKey", "KeyStore"]

log = structlog.get_logger(__name__)

#: :meth:`KeyStore.counts` counts again after at most this long even with no change made
#: through the store (seconds): another process writing the file shows within it.
COUNTS_MAX_AGE_S = 1.0


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
        #: the connection (tests reach it to trace or limit SQL statements)
        self._conn = conn
        self._db = Database(conn, clock)
        self.path = path
        self.link_id = link_id
        self.side: Side = side
        self.key_ttl_s = key_ttl_s
        self.max_key_count = max_key_count
        self._enc_parity = SIDE_PARITY[side]
        self.compact_interval_s = compact_interval_s
        self._issuer = Issuer(self._db, link_id=link_id, enc_parity=self._enc_parity)
        #: (``total_changes`` and monotonic time when counted, the counts): :meth:`counts`
        self._counts: tuple[int, float, dict[str, int]] | None = None

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
        if side not in SIDE_PARITY:
            raise ValueError(f"side must be 'transmitter' or 'receiver', got {side!r}")
        path = Path(path)
        conn = connect(path, link_id=link_id, side=side)
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
        with self._db.lock:
            self._db.conn.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        ids = blocks.add_block(
            self._db,
            block_id,
            final_key,
            key_size_bits,
            provenance,
            key_ttl_s=self.key_ttl_s,
            max_key_count=self.max_key_count,
        )
        log.info(
            "keystore.block_added",
            block_id=block_id,
            keys=len(ids),
            key_size_bits=key_size_bits,
            qber=provenance.qber,
        )
        return ids

    def commit_block(self, block_id: int) -> int:
        """Make a PENDING block's keys AVAILABLE (RESERVED if the peer already delivered
        them). Idempotent. Returns the number of keys changed."""
        with self._db.tx() as cur:
            changed = blocks.commit(cur, block_id)
        log.info("keystore.block_committed", block_id=block_id, keys=changed)
        return changed

    def discard_block(self, block_id: int) -> int:
        """Erase all keys of a block (aborted or not held by both nodes). Returns keys erased."""
        with self._db.tx() as cur:
            n = blocks.discard(self._db, cur, block_id)
        log.info("keystore.block_discarded", block_id=block_id, keys=n)
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
        return self._issuer.pick_for_enc(number, size_bits)

    def confirm_issued(
        self, master: str, slaves: Sequence[str], issued: Sequence[IssuedKey]
    ) -> list[DeliveredKey]:
        """The peer activated ``issued``: mark their parts DELIVERED to ``master`` (durable)
        and return the keys for the master SAE. Raises :class:`KeysUnavailableError` (and
        erases the keys) if a part is no longer AVAILABLE here (expired meanwhile)."""
        delivered = self._issuer.confirm_issued(master, slaves, issued)
        log.info("keystore.keys_issued", master=master, slaves=len(slaves), keys=len(issued))
        return delivered

    def abandon_issue(self, issued: Sequence[IssuedKey], *, erase: bool) -> int:
        """The activation of ``issued`` failed. ``erase=False``: the peer certainly changed
        nothing, the keys are available again. ``erase=True``: the outcome is unknown (the
        peer may hold them reserved), so they are erased here, durably (the caller tells
        the peer to erase them too). Returns the number of parts erased."""
        n = self._issuer.abandon_issue(issued, erase=erase)
        if erase:
            log.warning(
                "keystore.issue_abandoned", parts=sum(len(k.parts) for k in issued), erased=n
            )
        return n

    def inflight_count(self) -> int:
        """Parts held by activations under way."""
        return self._issuer.inflight_count()

    # -- consumption by the site's key manager (relay) -------------------------------------

    def consume_own(
        self,
        size_bits: int,
        reason: EraseReason,
        *,
        max_parts: int = MAX_PARTS_PER_KEY,
        keep_bits: int = 0,
    ) -> list[tuple[uuid.UUID, bytes]]:
        """Draw and erase (as ``reason``: relayed or authentication) stored keys of this
        node's parity holding at least ``size_bits``; returns ``[(ID, bytes), ...]``. The
        peer erases the same keys when the message naming them arrives
        (:meth:`consume_named`). ``keep_bits`` must be left after them. Raises
        ``KeysUnavailableError`` (nothing changes) when the link holds too little.
        See :mod:`qkdnode.keystore.consumption`."""
        return consumption.consume_own(
            self._db,
            enc_parity=self._enc_parity,
            size_bits=size_bits,
            reason=reason,
            inflight=self._issuer.inflight_parts(),
            max_parts=max_parts,
            keep_bits=keep_bits,
        )

    def consume_named(self, key_ids: Sequence[uuid.UUID], reason: EraseReason) -> bytes:
        """Erase the peer-drawn stored keys ``key_ids`` (as ``reason``) and return their
        bytes in order; ``KeysUnavailableError`` (nothing changes) if any is not held,
        of this node's own parity, reserved or expired."""
        return consumption.consume_named(
            self._db, peer_parity=1 - self._enc_parity, key_ids=key_ids, reason=reason
        )

    def consumed_counts(self) -> dict[str, int]:
        """Tombstones of keys consumed by the key manager, by reason."""
        return consumption.consumed_counts(self._db)

    def available_bits(self) -> int:
        """Bits of AVAILABLE, unexpired key of this node's parity: what it can draw."""
        return inspection.available_bits(self._db, self._enc_parity)

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
        reply = reservations.activate(
            self._db, req, link_id=self.link_id, enc_parity=self._enc_parity
        )
        if reply.activated:
            log.info(
                "keystore.keys_activated",
                master=req.master,
                slaves=len(req.slaves),
                keys=len(req.keys),
            )
        return reply

    def release(self, req: ReleaseRequest) -> int:
        """Erase the parts of an activation the peer abandoned (outcome unknown there):
        keys of the peer's parity not yet fetched by any slave. Returns parts erased."""
        n = reservations.release(self._db, req, link_id=self.link_id, enc_parity=self._enc_parity)
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
        claimed = reservations.claim_keys(self._db, master, slave, key_ids)
        log.info("keystore.keys_claimed", master=master, slave=slave, keys=len(claimed.keys))
        return claimed

    def delivery_notice(self, key_ids: Sequence[uuid.UUID]) -> DeliveryNotice:
        """The notice for the issuer once every slave fetched ``key_ids``."""
        return DeliveryNotice(link_id=self.link_id, key_IDs=list(key_ids))

    def apply_notice(self, notice: DeliveryNotice) -> int:
        """The peer delivered ``notice.key_IDs`` to every slave: erase the parts this node
        issued for them (as delivered). Unknown IDs are ignored. Idempotent. Returns the
        number of parts erased."""
        n = self._issuer.apply_notice(notice)
        log.info("keystore.notice_applied", keys=len(notice.key_IDs), erased=n)
        return n

    # -- synchronisation ------------------------------------------------------------------

    def summary(self) -> SyncSummary:
        """What this node holds, for the peer (see :mod:`qkdnode.keystore.sync`)."""
        return syncstate.summary(self._db, link_id=self.link_id, side=self.side)

    def apply_reconcile(self, actions: ReconcileActions) -> None:
        """Apply the result of ``reconcile(self.summary(), peer_summary)`` in one transaction.

        Keys delivered at the peer's end are erased as delivered first, then keys whose
        activation state the two nodes disagree on (never served), then the block and key
        discards."""
        done = syncstate.apply_reconcile(self._db, actions)
        log.info(
            "keystore.reconciled",
            committed=len(actions.commit_blocks),
            discarded_blocks=len(actions.discard_blocks),
            discarded_keys=done.discarded_keys,
            erased_delivered=done.erased_delivered,
            erased_uncertain=done.erased_uncertain,
        )

    # -- maintenance ------------------------------------------------------------------------

    def erase_due(self, *, tombstone_ttl_s: float | None = None) -> int:
        """Erase keys whose time to live ended (any state), forget tombstones older than
        ``tombstone_ttl_s`` (default: twice the key TTL), then :meth:`compact` if keys were
        erased and ``compact_interval_s`` has passed since the last compaction (else only
        truncate the WAL). Call periodically. Returns the number of keys erased."""
        n = maintenance.erase_expired(
            self._db, key_ttl_s=self.key_ttl_s, tombstone_ttl_s=tombstone_ttl_s
        )
        if n:
            log.info("keystore.expired", keys=n)
        if maintenance.compaction_due(self._db, self.compact_interval_s):
            self.compact()
        else:
            maintenance.truncate_wal(self._db)
        return n

    def compact(self) -> None:
        """Rewrite the database file (VACUUM) and truncate the WAL.

        ``secure_delete`` zeroes a deleted row in place, but SQLite leaves stale copies of
        rows in the unallocated gap of b-tree pages it rebalanced earlier; only a rebuild of
        the file removes them. Cost is proportional to the file size (blocks the store)."""
        t0 = time.monotonic()
        maintenance.compact(self._db)
        log.info("keystore.compacted", duration_s=round(self._db.last_compact - t0, 4))

    # -- inspection -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of stored keys per state (no key bytes).

        Counting scans the keys index (about 5 ms for 100 000 keys, on the event loop of
        every ``status``), so the last counts are kept while they are known to hold: the
        connection's ``total_changes`` has not moved (no row inserted, updated or deleted
        through this store since) and less than :data:`COUNTS_MAX_AGE_S` passed (a write
        by another process shows within that time).
        """
        with self._db.lock:
            changes = self._conn.total_changes
            now = time.monotonic()
            cached = self._counts
            if cached is None or cached[0] != changes or now - cached[1] >= COUNTS_MAX_AGE_S:
                cached = self._counts = (changes, now, inspection.counts(self._db))
        return dict(cached[2])

    def available_for_enc(self, min_size_bits: int = 8) -> int:
        """Keys this node may hand out through ``take_keys`` right now."""
        return inspection.available_for_enc(self._db, self._enc_parity, min_size_bits)

    def max_stored_key_size_bits(self) -> int | None:
        """Largest size of the keys ``take_keys`` could hand out now (None if none)."""
        return inspection.max_stored_key_size_bits(self._db, self._enc_parity)

    def key_info(self, key_id: uuid.UUID) -> KeyInfo | None:
        """Metadata of a stored key (part), or None if it is not (or no longer) stored."""
        return inspection.key_info(self._db, key_id)

    def erase_reason(self, key_id: uuid.UUID) -> EraseReason | None:
        """Why the key (part) ``key_id`` was erased, or None if there is no tombstone."""
        return inspection.erase_reason(self._db, key_id)

    def key_ids_of_block(self, block_id: int) -> list[uuid.UUID]:
        """IDs of the live keys of a block, by index (for tests and inspection)."""
        return inspection.key_ids_of_block(self._db, block_id)

    def last_block_id(self) -> int:
        """Highest block ID ever stored here (-1 if none); survives erasure of its keys."""
        return inspection.last_block_id(self._db)

    def digest(self) -> dict[str, object]:
        """Count and SHA-256 over (key ID, key bytes) of the keys of committed blocks, sorted
        by ID: lets the two nodes compare their stores without revealing keys."""
        return inspection.digest(self._db)

    def block_provenance(self, block_id: int) -> Provenance | None:
        return inspection.block_provenance(self._db, block_id)
