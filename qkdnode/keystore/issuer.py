"""The issuer's side of key delivery (ETSI enc_keys): the keys this node hands out.

:class:`Issuer` picks AVAILABLE keys of this node's parity and holds their parts in flight
(in memory only) while the peer activates them, then marks them DELIVERED, or puts them
back or erases them if the activation failed; once the peer reports that every slave
fetched a key, it erases the parts it issued for it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from qkdnode.keystore.database import Database
from qkdnode.keystore.errors import KeyRequestError, KeysUnavailableError, LinkMismatchError
from qkdnode.keystore.models import (
    MAX_PARTS_PER_KEY,
    ActivatedKey,
    DeliveredKey,
    DeliveryNotice,
    EraseReason,
    KeyState,
)

#: most bound parameters in one statement (SQLite's smallest default limit is 999)
_SQL_CHUNK = 500


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


def _validate_size(size_bits: int) -> None:
    if size_bits <= 0 or size_bits % 8:
        raise KeyRequestError(f"key size {size_bits} bits is not a positive multiple of 8")


class Issuer:
    """The enc_keys side of the store of ``link_id``: ``enc_parity`` is the index parity
    of the keys this node hands out. The parts picked by :meth:`pick_for_enc` whose
    activation is under way are held in flight (never persisted), guarded by the database
    lock. Each method is the body of the :class:`~qkdnode.keystore.store.KeyStore` method
    of the same name, which documents it."""

    def __init__(self, db: Database, *, link_id: str, enc_parity: int) -> None:
        self._db = db
        self._link_id = link_id
        self._enc_parity = enc_parity
        self._inflight: set[bytes] = set()

    def pick_for_enc(self, number: int, size_bits: int) -> list[IssuedKey]:
        if number <= 0:
            raise KeyRequestError(f"number must be >= 1, got {number}")
        _validate_size(size_bits)
        now = self._db.clock()
        with self._db.lock:
            cur = self._db.conn.cursor()
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
        now = self._db.clock()
        parts = [kid for k in issued for kid, _ in k.parts]
        try:
            with self._db.tx() as cur:
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
                    self._db.erase(cur, parts, EraseReason.UNCERTAIN)
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
            with self._db.lock:
                self._inflight.difference_update(parts)
        if gone is not None:
            raise gone
        return [k.delivered() for k in issued]

    def abandon_issue(self, issued: Sequence[IssuedKey], *, erase: bool) -> int:
        parts = [kid for k in issued for kid, _ in k.parts]
        n = 0
        try:
            if erase:
                with self._db.tx() as cur:
                    n = self._db.erase(cur, parts, EraseReason.UNCERTAIN)
        finally:
            with self._db.lock:
                self._inflight.difference_update(parts)
        return n

    def inflight_parts(self) -> set[bytes]:
        """The parts in flight (the live set: read it under the database lock)."""
        return self._inflight

    def inflight_count(self) -> int:
        with self._db.lock:
            return len(self._inflight)

    def apply_notice(self, notice: DeliveryNotice) -> int:
        if notice.link_id != self._link_id:
            raise LinkMismatchError(
                f"delivery notice for link {notice.link_id!r}, this store is {self._link_id!r}"
            )
        with self._db.tx() as cur:
            ids = [
                r[0]
                for kid in notice.key_IDs
                for r in cur.execute(
                    "SELECT key_id FROM keys WHERE delivered_as=? AND via='enc'", (kid.bytes,)
                )
            ]
            n = self._db.erase(cur, ids, EraseReason.DELIVERED)
        return n
