"""Durable store of the end-to-end keys relayed to this site (SQLite).

The destination of a relay stores its keys here, reserved for the master SAE and the
slaves named by the origin, before it answers "stored"; the slaves fetch them with ETSI
dec_keys. Same durability as the link stores (WAL, ``synchronous=EXTRA``,
``secure_delete``), same rules as dec_keys on a link: a key goes only to a slave named
for it, for exactly its master, once per slave; every other case gets one and the same
"unknown" answer. A key every slave fetched, a cancelled relay's keys and expired keys
are overwritten and deleted, leaving a tombstone without key bytes.

The origin keeps no key bytes: it records each relay's outcome (``relays`` table) for
status and accounting.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qkdnode.keystore.database import Database
from qkdnode.keystore.errors import KeyRequestError, KeyStoreError, UnknownKeyError
from qkdnode.keystore.models import DeliveredKey
from qkdnode.paths import private_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id BLOB PRIMARY KEY,
    relay_id BLOB NOT NULL,
    origin TEXT NOT NULL,
    master TEXT NOT NULL,
    slaves TEXT NOT NULL,
    fetched TEXT NOT NULL DEFAULT '[]',
    size_bits INTEGER NOT NULL,
    key BLOB NOT NULL,
    stored_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_relay ON keys (relay_id);
CREATE TABLE IF NOT EXISTS gone (
    key_id BLOB PRIMARY KEY,
    relay_id BLOB NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS relays (
    relay_id BLOB PRIMARY KEY,
    role TEXT NOT NULL,
    peer_site TEXT NOT NULL,
    master TEXT NOT NULL,
    keys INTEGER NOT NULL,
    bits INTEGER NOT NULL,
    path TEXT NOT NULL,
    outcome TEXT NOT NULL,
    at REAL NOT NULL
);
"""

UNKNOWN = "key_ID {} is unknown, already delivered, or not issued to this SAE pair"


@dataclass(frozen=True)
class LandedKey:
    """A relayed key as the destination stores it (bytes never in ``repr``)."""

    key_id: uuid.UUID
    size_bits: int
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Claimed:
    keys: list[DeliveredKey]


class NetworkKeyStore:
    """The site's store of end-to-end keys. Thread-safe (one lock); every method is one
    transaction, durable on return. Raises :class:`KeyStoreError` subclasses."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        self._db = Database(conn, clock)
        self._conn = conn
        self.path = path
        self._clock = clock
        self._lock = self._db.lock
        self._tx = self._db.tx

    @classmethod
    def open(cls, path: str | Path, *, clock: Callable[[], float] = time.time) -> NetworkKeyStore:
        path = Path(path)
        private_dir(path.parent)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=EXTRA")
            conn.execute("PRAGMA secure_delete=ON")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"{path}: cannot open the network key store: {exc}") from None
        path.chmod(0o600)
        return cls(conn, path, clock)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _erase(self, cur: sqlite3.Cursor, ids: Sequence[bytes], reason: str) -> int:
        now = self._clock()
        params = [(k,) for k in ids]
        cur.executemany("UPDATE keys SET key=zeroblob(length(key)) WHERE key_id=?", params)
        cur.executemany(
            "INSERT OR REPLACE INTO gone (key_id, relay_id, reason, at) "
            "SELECT key_id, relay_id, ?, ? FROM keys WHERE key_id=?",
            [(reason, now, k) for k in ids],
        )
        n = 0
        for p in params:
            n += cur.execute("DELETE FROM keys WHERE key_id=?", p).rowcount
        return n

    # -- destination ------------------------------------------------------------------------

    def land(
        self,
        relay_id: uuid.UUID,
        *,
        origin: str,
        master: str,
        slaves: Sequence[str],
        keys: Sequence[LandedKey],
        ttl_s: float,
    ) -> None:
        """Store the keys of a relay, reserved for ``master`` and ``slaves``: all or
        nothing. The same relay landing again (a repeated message) is accepted as it is;
        a key ID held or erased before for another relay raises ``KeyRequestError``."""
        now = self._clock()
        with self._tx() as cur:
            for k in keys:
                row = cur.execute(
                    "SELECT relay_id FROM keys WHERE key_id=? UNION ALL "
                    "SELECT relay_id FROM gone WHERE key_id=?",
                    (k.key_id.bytes, k.key_id.bytes),
                ).fetchone()
                if row is not None:
                    if row[0] == relay_id.bytes:
                        continue
                    raise KeyRequestError(f"key_ID {k.key_id} is already used")
                cur.execute(
                    "INSERT INTO keys (key_id, relay_id, origin, master, slaves, size_bits, "
                    "key, stored_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        k.key_id.bytes,
                        relay_id.bytes,
                        origin,
                        master,
                        json.dumps(list(slaves)),
                        k.size_bits,
                        k.key,
                        now,
                        now + ttl_s,
                    ),
                )

    def claim(self, master: str, slave: str, key_ids: Sequence[uuid.UUID]) -> Claimed:
        """dec_keys: the keys ``key_ids`` for ``slave`` of ``master``, all or nothing.
        ``UnknownKeyError`` (one message for every reason) or ``KeyRequestError``."""
        if not key_ids:
            raise KeyRequestError("no key_ID given")
        if len(set(key_ids)) != len(key_ids):
            raise KeyRequestError("a key_ID is requested twice")
        now = self._clock()
        out: list[DeliveredKey] = []
        with self._tx() as cur:
            done: list[bytes] = []
            for kid in key_ids:
                row = cur.execute(
                    "SELECT master, slaves, fetched, size_bits, key, expires_at FROM keys "
                    "WHERE key_id=?",
                    (kid.bytes,),
                ).fetchone()
                if row is None:
                    raise UnknownKeyError(UNKNOWN.format(kid))
                m, slaves_json, fetched_json, size, key, expires_at = row
                slaves, fetched = json.loads(slaves_json), json.loads(fetched_json)
                if m != master or slave not in slaves or slave in fetched or expires_at <= now:
                    raise UnknownKeyError(UNKNOWN.format(kid))
                fetched.append(slave)
                if set(slaves) <= set(fetched):
                    done.append(kid.bytes)
                else:
                    cur.execute(
                        "UPDATE keys SET fetched=? WHERE key_id=?", (json.dumps(fetched), kid.bytes)
                    )
                out.append(DeliveredKey(kid, int(size), bytes(key)))
            self._erase(cur, done, "delivered")
        return Claimed(out)

    def cancel(self, relay_id: uuid.UUID, key_ids: Sequence[uuid.UUID]) -> int:
        """Erase the named keys of relay ``relay_id`` (the origin gave up on it)."""
        with self._tx() as cur:
            ids = [
                k.bytes
                for k in key_ids
                if cur.execute(
                    "SELECT 1 FROM keys WHERE key_id=? AND relay_id=?", (k.bytes, relay_id.bytes)
                ).fetchone()
            ]
            n = self._erase(cur, ids, "cancelled")
            # a cancel that overtakes its relay: the keys may never land
            cur.executemany(
                "INSERT OR IGNORE INTO gone (key_id, relay_id, reason, at) VALUES (?, ?, ?, ?)",
                [(k.bytes, relay_id.bytes, "cancelled", self._clock()) for k in key_ids],
            )
        return n

    def erase_expired(self, tombstone_ttl_s: float = 86400.0) -> int:
        now = self._clock()
        with self._tx() as cur:
            ids = [r[0] for r in cur.execute("SELECT key_id FROM keys WHERE expires_at<=?", (now,))]
            n = self._erase(cur, ids, "expired")
            cur.execute("DELETE FROM gone WHERE at<?", (now - tombstone_ttl_s,))
        return n

    # -- origin and accounting ---------------------------------------------------------------

    def record_relay(
        self,
        relay_id: uuid.UUID,
        *,
        role: str,
        peer_site: str,
        master: str,
        keys: int,
        bits: int,
        path: Sequence[str],
        outcome: str,
    ) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO relays (relay_id, role, peer_site, master, keys, bits, "
                "path, outcome, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    relay_id.bytes,
                    role,
                    peer_site,
                    master,
                    keys,
                    bits,
                    json.dumps(list(path)),
                    outcome,
                    self._clock(),
                ),
            )

    def counts(self) -> dict[str, int]:
        """Keys held, tombstones by reason, relays by role and outcome (no key bytes)."""
        with self._lock:
            out = {"held": self._conn.execute("SELECT COUNT(*) FROM keys").fetchone()[0]}
            for reason, n in self._conn.execute(
                "SELECT reason, COUNT(*) FROM gone GROUP BY reason"
            ):
                out[f"gone_{reason}"] = n
            for role, outcome, n in self._conn.execute(
                "SELECT role, outcome, COUNT(*) FROM relays GROUP BY role, outcome"
            ):
                out[f"relays_{role}_{outcome}"] = n
        return out

    def consumed_bits_by_master(self) -> dict[str, int]:
        """Bits of end-to-end key issued from this site per master SAE (successful
        relays it originated): ETSI 015's ``consumed_bits`` of each application."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT master, SUM(bits) FROM relays WHERE role='origin' AND outcome='stored' "
                "GROUP BY master"
            ).fetchall()
        return {m: int(b) for m, b in rows}
