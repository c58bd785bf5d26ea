"""The key store's SQLite schema and how its database file is opened.

The tables (``meta``, ``blocks``, ``keys``, ``erased``) and their indexes, the schema
version, and :func:`connect`: the file checks (0600 in a 0700 directory), the pragmas (WAL,
``synchronous=EXTRA``, ``secure_delete``) and the check that the file belongs to this link
and side.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from qkdnode.keystore.errors import KeyStoreError, LinkMismatchError
from qkdnode.keystore.models import Side
from qkdnode.paths import check_private_file, create_private_file

SCHEMA_VERSION = 3  # 3: secret-seeded key IDs, activation, key parts
#: the index parity of the keys each side hands out through enc_keys
SIDE_PARITY: dict[str, int] = {"transmitter": 0, "receiver": 1}

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


def connect(path: Path, *, link_id: str, side: Side) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` for ``link_id`` and ``side``.

    Raises :class:`LinkMismatchError` if the file belongs to another link or side,
    :class:`KeyStoreError` if it has another schema version.
    """
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
    return conn
