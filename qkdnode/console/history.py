"""The console's history: a bounded SQLite time series kept by the node.

One row per link and sampling interval (``samples``, plus ``detector_samples`` per
detector), one per key block (``blocks``), one per alarm raise or clear (``alarms``) and
one per kept telemetry event (``events``: calibration results, sync locks, state
changes). Rows older than the retention are deleted by :meth:`HistoryStore.prune`, and
each table is also capped at :data:`MAX_ROWS` rows (the oldest go first), so the file
cannot grow without bound whatever the sampling interval.

The file survives restarts (WAL journal). It holds no key material: rates, counts, error
ratios, names. Thread-safe: every call takes the store's lock (the console runs them in a
worker thread, away from the node's event loop).

Failure modes: :class:`HistoryError` for a file that cannot be opened or is not a
history store (wrong ``application_id``); ``ValueError`` for a bad query argument.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from qkdnode.console.models import AlarmRecord, BlockRecord, EventRecord, Sample, Series

#: ``PRAGMA application_id`` of a console history file ("QKDH")
APPLICATION_ID = 0x514B4448
SCHEMA_VERSION = 1
#: hard cap on the rows of each table (the oldest are deleted beyond it)
MAX_ROWS = 2_000_000
#: default number of points of a series (the page's "default resolution")
DEFAULT_MAX_POINTS = 2000

Table = Literal["samples", "blocks", "alarms", "events"]
TABLES: tuple[Table, ...] = ("samples", "blocks", "alarms", "events")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    link TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL,
    key_rate_bps REAL NOT NULL, qber REAL, keys_available INTEGER NOT NULL,
    fill_ratio REAL NOT NULL, auth_balance_bits INTEGER NOT NULL, secret_bits INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_link_ts ON samples (link, ts);
CREATE TABLE IF NOT EXISTS detector_samples (
    link TEXT NOT NULL, ts REAL NOT NULL, detector INTEGER NOT NULL, rate_hz REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS detector_samples_link_ts ON detector_samples (link, ts);
CREATE TABLE IF NOT EXISTS blocks (
    link TEXT NOT NULL, ts REAL NOT NULL, block_id INTEGER NOT NULL, ok INTEGER NOT NULL,
    qber_z REAL, qber_x REAL, detections INTEGER NOT NULL, sifted_z INTEGER NOT NULL,
    ec_disclosed_bits INTEGER NOT NULL, final_key_bits INTEGER NOT NULL,
    block_seconds REAL NOT NULL, stats TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_link_ts ON blocks (link, ts);
CREATE TABLE IF NOT EXISTS alarms (
    link TEXT NOT NULL, ts REAL NOT NULL, event TEXT NOT NULL, name TEXT NOT NULL,
    severity TEXT NOT NULL, cause TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alarms_ts ON alarms (ts);
CREATE TABLE IF NOT EXISTS events (
    link TEXT NOT NULL, ts REAL NOT NULL, topic TEXT NOT NULL, payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_link_ts ON events (link, ts);
"""


class HistoryError(Exception):
    """The history file cannot be opened or is not a console history store."""


class HistoryStore:
    """The history file at ``path`` (created when missing)."""

    def __init__(self, path: Path, *, retention_s: float, max_rows: int = MAX_ROWS) -> None:
        if retention_s <= 0:
            raise ValueError(f"retention_s must be > 0, got {retention_s}")
        self.path = path
        self.retention_s = retention_s
        self.max_rows = max_rows
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise HistoryError(f"console history {path}: cannot open: {exc}") from None
        try:
            (app_id,) = db.execute("PRAGMA application_id").fetchone()
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id != APPLICATION_ID and (app_id != 0 or tables):
                raise HistoryError(
                    f"console history {path}: not a console history file "
                    f"(application_id {app_id:#x}); move it away or set console.history_file"
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise HistoryError(f"console history {path}: {exc}") from None
        except HistoryError:
            db.close()
            raise
        self._db = db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes -------------------------------------------------------------------------

    def add_samples(self, samples: Iterable[Sample]) -> None:
        rows = list(samples)
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        s.link,
                        s.ts_s,
                        s.state,
                        s.key_rate_bps,
                        s.qber,
                        s.keys_available,
                        s.fill_ratio,
                        s.auth_balance_bits,
                        s.secret_bits,
                    )
                    for s in rows
                ],
            )
            self._db.executemany(
                "INSERT INTO detector_samples VALUES (?,?,?,?)",
                [
                    (s.link, s.ts_s, i, rate)
                    for s in rows
                    for i, rate in enumerate(s.detector_rates_hz)
                    if math.isfinite(rate)
                ],
            )

    def add_block(self, block: BlockRecord) -> None:
        self.add_blocks([block])

    def add_blocks(self, blocks: Iterable[BlockRecord]) -> None:
        """Key blocks, in one transaction."""
        rows = [
            (
                b.link,
                b.ts_s,
                b.block_id,
                int(b.ok),
                b.qber_z,
                b.qber_x,
                b.detections,
                b.sifted_z,
                b.ec_disclosed_bits,
                b.final_key_bits,
                b.block_seconds,
                json.dumps(b.stats, allow_nan=False),
            )
            for b in blocks
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT INTO blocks VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def add_alarm(self, alarm: AlarmRecord) -> None:
        a = alarm
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO alarms VALUES (?,?,?,?,?,?)",
                (a.link, a.ts_s, a.event, a.name, a.severity, a.cause),
            )

    def add_event(self, event: EventRecord) -> None:
        e = event
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO events VALUES (?,?,?,?)",
                (e.link, e.ts_s, e.topic, json.dumps(e.payload, allow_nan=False, default=str)),
            )

    def prune(self, now_s: float | None = None) -> int:
        """Delete rows older than the retention, then the oldest beyond ``max_rows`` per
        table. Returns the number of rows deleted."""
        cutoff = (time.time() if now_s is None else now_s) - self.retention_s
        deleted = 0
        with self._lock, self._db:
            for table in (*TABLES, "detector_samples"):
                cur = self._db.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,))  # noqa: S608
                deleted += cur.rowcount
                (n,) = self._db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
                if n > self.max_rows:
                    cur = self._db.execute(
                        f"DELETE FROM {table} WHERE rowid IN "  # noqa: S608
                        f"(SELECT rowid FROM {table} ORDER BY ts LIMIT ?)",
                        (n - self.max_rows,),
                    )
                    deleted += cur.rowcount
        return deleted

    # -- reads --------------------------------------------------------------------------

    def series(
        self,
        link: str,
        since_s: float,
        until_s: float,
        max_points: int = DEFAULT_MAX_POINTS,
    ) -> Series:
        """Samples of ``link`` in ``[since_s, until_s]``, averaged over equal buckets so
        that at most ``max_points`` remain (raw rows when they are fewer)."""
        if not until_s > since_s:
            raise ValueError(f"until_s ({until_s}) must be after since_s ({since_s})")
        if not 2 <= max_points <= 100_000:
            raise ValueError(f"max_points must be in [2, 100000], got {max_points}")
        with self._lock:
            (n,) = self._db.execute(
                "SELECT count(*) FROM samples WHERE link=? AND ts BETWEEN ? AND ?",
                (link, since_s, until_s),
            ).fetchone()
            bucket = 0.0 if n <= max_points else (until_s - since_s) / max_points
            if bucket == 0.0:
                rows = self._db.execute(
                    "SELECT ts, key_rate_bps, qber, fill_ratio, keys_available, "
                    "auth_balance_bits FROM samples WHERE link=? AND ts BETWEEN ? AND ? "
                    "ORDER BY ts",
                    (link, since_s, until_s),
                ).fetchall()
                det = self._db.execute(
                    "SELECT ts, detector, rate_hz FROM detector_samples "
                    "WHERE link=? AND ts BETWEEN ? AND ? ORDER BY ts",
                    (link, since_s, until_s),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT avg(ts), avg(key_rate_bps), avg(qber), avg(fill_ratio), "
                    "avg(keys_available), avg(auth_balance_bits) FROM samples "
                    "WHERE link=? AND ts BETWEEN ? AND ? "
                    "GROUP BY CAST((ts - ?) / ? AS INTEGER) ORDER BY 1",
                    (link, since_s, until_s, since_s, bucket),
                ).fetchall()
                det = self._db.execute(
                    "SELECT CAST((ts - ?) / ? AS INTEGER) AS b, detector, avg(rate_hz) "
                    "FROM detector_samples WHERE link=? AND ts BETWEEN ? AND ? "
                    "GROUP BY b, detector ORDER BY b",
                    (since_s, bucket, link, since_s, until_s),
                ).fetchall()
            (n_blocks,) = self._db.execute(
                "SELECT count(*) FROM blocks WHERE link=? AND ts BETWEEN ? AND ?",
                (link, since_s, until_s),
            ).fetchone()
            block_bucket = 0.0 if n_blocks <= max_points else (until_s - since_s) / max_points
            # raw blocks: buckets of a microsecond (one block each)
            blocks = self._db.execute(
                "SELECT avg(ts), avg(qber_z), avg(qber_x), avg(final_key_bits) FROM blocks "
                "WHERE link=? AND ts BETWEEN ? AND ? "
                "GROUP BY CAST((ts - ?) / ? AS INTEGER) ORDER BY 1",
                (link, since_s, until_s, since_s, block_bucket or 1e-6),
            ).fetchall()
        ts = [float(r[0]) for r in rows]
        n_det = 1 + max((int(d[1]) for d in det), default=-1)
        columns: list[list[float | None]] = [[None] * len(ts) for _ in range(n_det)]
        if n_det:
            if bucket == 0.0:
                index = {t: i for i, t in enumerate(ts)}
                for t, d, rate in det:
                    i = index.get(float(t))
                    if i is not None:
                        columns[int(d)][i] = float(rate)
            else:
                index = {int((t - since_s) / bucket): i for i, t in enumerate(ts)}
                for b, d, rate in det:
                    i = index.get(int(b))
                    if i is not None:
                        columns[int(d)][i] = float(rate)
        return Series(
            link=link,
            since_s=since_s,
            until_s=until_s,
            bucket_s=bucket,
            ts_s=ts,
            key_rate_bps=[_f(r[1]) for r in rows],
            qber=[_f(r[2]) for r in rows],
            fill_ratio=[_f(r[3]) for r in rows],
            keys_available=[_f(r[4]) for r in rows],
            auth_balance_bits=[_f(r[5]) for r in rows],
            detector_rates_hz=columns,
            block_ts_s=[float(b[0]) for b in blocks],
            qber_z=[_f(b[1]) for b in blocks],
            qber_x=[_f(b[2]) for b in blocks],
            final_key_bits=[_f(b[3]) for b in blocks],
        )

    def blocks(self, link: str, since_s: float = 0.0, limit: int = 500) -> list[BlockRecord]:
        """The last ``limit`` blocks of ``link`` since ``since_s``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT link, ts, block_id, ok, qber_z, qber_x, detections, sifted_z, "
                "ec_disclosed_bits, final_key_bits, block_seconds, stats FROM blocks "
                "WHERE link=? AND ts >= ? ORDER BY ts DESC LIMIT ?",
                (link, since_s, limit),
            ).fetchall()
        return [
            BlockRecord(
                link=r[0],
                ts_s=r[1],
                block_id=r[2],
                ok=bool(r[3]),
                qber_z=r[4],
                qber_x=r[5],
                detections=r[6],
                sifted_z=r[7],
                ec_disclosed_bits=r[8],
                final_key_bits=r[9],
                block_seconds=r[10],
                stats=json.loads(r[11]),
            )
            for r in reversed(rows)
        ]

    def alarms(self, since_s: float = 0.0, limit: int = 1000) -> list[AlarmRecord]:
        """The last ``limit`` alarm events of every link since ``since_s``, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT link, ts, event, name, severity, cause FROM alarms WHERE ts >= ? "
                "ORDER BY ts DESC LIMIT ?",
                (since_s, limit),
            ).fetchall()
        return [
            AlarmRecord(link=r[0], ts_s=r[1], event=r[2], name=r[3], severity=r[4], cause=r[5])
            for r in rows
        ]

    def events(
        self, link: str, topics: Sequence[str], since_s: float = 0.0, limit: int = 500
    ) -> list[EventRecord]:
        """Kept events of ``link`` whose topic is one of ``topics`` or starts with one
        ending in ``.`` (``"calibration."``), oldest first."""
        clauses = " OR ".join("topic LIKE ?" if t.endswith(".") else "topic = ?" for t in topics)
        args = [t + "%" if t.endswith(".") else t for t in topics]
        if not clauses:
            return []
        with self._lock:
            rows = self._db.execute(
                f"SELECT link, ts, topic, payload FROM events WHERE link=? AND ts >= ? "  # noqa: S608
                f"AND ({clauses}) ORDER BY ts DESC LIMIT ?",
                (link, since_s, *args, limit),
            ).fetchall()
        return [
            EventRecord(link=r[0], ts_s=r[1], topic=r[2], payload=json.loads(r[3]))
            for r in reversed(rows)
        ]

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self._lock:
            return {
                t: int(self._db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # noqa: S608
                for t in (*TABLES, "detector_samples")
            }

    # -- export -------------------------------------------------------------------------

    def export_csv(self, table: Table, link: str | None, since_s: float, until_s: float) -> str:
        """Rows of ``table`` (of one link, or all) in ``[since_s, until_s]`` as CSV with a
        header line; ``ts`` is Unix seconds. ValueError for an unknown table."""
        if table not in TABLES:
            raise ValueError(f"table must be one of {', '.join(TABLES)}, got {table!r}")
        where = "ts BETWEEN ? AND ?"
        args: list[Any] = [since_s, until_s]
        if link is not None:
            where += " AND link = ?"
            args.append(link)
        with self._lock:
            cur = self._db.execute(
                f"SELECT * FROM {table} WHERE {where} ORDER BY ts",  # noqa: S608
                args,
            )
            header = [d[0] for d in cur.description]
            rows = cur.fetchall()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()


def _f(x: Any) -> float | None:
    return None if x is None else float(x)
