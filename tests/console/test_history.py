"""The console's history store: survives a restart, stays bounded, downsamples, exports."""

from __future__ import annotations

import csv
import io
import sqlite3
from pathlib import Path

import pytest

from qkdnode.console.history import HistoryError, HistoryStore
from qkdnode.console.models import AlarmRecord, BlockRecord, EventRecord, Sample

DAY_S = 86400.0


def sample(link: str, ts: float, rate: float, detectors: tuple[float, ...] = ()) -> Sample:
    return Sample(
        link=link,
        ts_s=ts,
        state="EXCHANGING",
        key_rate_bps=rate,
        qber=0.02,
        keys_available=10,
        fill_ratio=0.1,
        auth_balance_bits=1000,
        secret_bits=5000,
        detector_rates_hz=detectors,
    )


def test_rows_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    store = HistoryStore(path, retention_s=7 * DAY_S)
    store.add_samples([sample("ab", 1000.0 + i, 100.0 + i, (5.0, 6.0)) for i in range(5)])
    store.add_block(BlockRecord(link="ab", ts_s=1002.0, block_id=3, ok=True, qber_z=0.01))
    store.add_alarm(
        AlarmRecord(link="ab", ts_s=1003.0, event="raise", name="no_light", severity="major")
    )
    store.add_event(EventRecord(link="ab", ts_s=1001.0, topic="sync", payload={"ppm": 3.5}))
    store.close()

    again = HistoryStore(path, retention_s=7 * DAY_S)
    series = again.series("ab", 900.0, 1100.0)
    assert series.ts_s == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]
    assert series.key_rate_bps == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert series.detector_rates_hz == [[5.0] * 5, [6.0] * 5]
    assert [b.block_id for b in again.blocks("ab")] == [3]
    assert [(a.name, a.event) for a in again.alarms()] == [("no_light", "raise")]
    assert again.events("ab", ["sync"])[0].payload == {"ppm": 3.5}
    assert again.series("other", 900.0, 1100.0).ts_s == []


def test_retention_and_row_cap_bound_the_file(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite", retention_s=DAY_S, max_rows=100)
    now = 10 * DAY_S
    store.add_samples(sample("ab", now - 2 * DAY_S + i, 1.0) for i in range(50))  # too old
    store.add_samples(sample("ab", now - 1000 + i, 2.0) for i in range(150))  # over the cap
    deleted = store.prune(now)
    counts = store.counts()
    assert counts["samples"] == 100
    assert deleted == 50 + 50 + 0  # 50 expired, 50 beyond the cap (no detector rows)
    kept = store.series("ab", now - 3 * DAY_S, now, max_points=1000)
    assert set(kept.key_rate_bps) == {2.0}
    assert kept.ts_s[0] == now - 1000 + 50  # the oldest went first


def test_a_day_of_samples_comes_back_at_the_page_resolution(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite", retention_s=7 * DAY_S)
    t0 = 1_000_000.0
    store.add_samples(sample("ab", t0 + 10.0 * i, float(i % 2), (1.0,)) for i in range(8640))
    series = store.series("ab", t0, t0 + DAY_S, max_points=500)
    assert 450 <= len(series.ts_s) <= 501
    assert series.bucket_s == pytest.approx(DAY_S / 500)
    # averages of alternating 0/1 over whole buckets
    assert all(0.3 <= r <= 0.7 for r in series.key_rate_bps if r is not None)
    assert series.detector_rates_hz[0][:3] == [1.0, 1.0, 1.0]
    store.add_blocks(  # a block every 28.8 s, alternating error rates
        BlockRecord(link="ab", ts_s=t0 + 28.8 * j, block_id=j, ok=True, qber_z=0.01 * (j % 2))
        for j in range(3000)
    )
    series = store.series("ab", t0, t0 + DAY_S, max_points=500)
    assert 450 <= len(series.block_ts_s) <= 501
    assert all(0.003 <= q <= 0.007 for q in series.qber_z if q is not None)
    assert series.qber_x == [None] * len(series.block_ts_s)
    raw = store.series("ab", t0, t0 + 288.0, max_points=500)
    assert raw.qber_z == [0.0, 0.01] * 5 + [0.0]
    with pytest.raises(ValueError, match="max_points"):
        store.series("ab", t0, t0 + 1, max_points=1)
    with pytest.raises(ValueError, match="until_s"):
        store.series("ab", t0, t0)


def test_csv_export_has_a_header_and_every_row(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.sqlite", retention_s=7 * DAY_S)
    store.add_samples([sample("ab", 10.0, 1.5), sample("cd", 11.0, 2.5)])
    store.add_block(
        BlockRecord(link="ab", ts_s=12.0, block_id=1, ok=False, stats={"reason": "a,b"})
    )
    rows = list(csv.reader(io.StringIO(store.export_csv("samples", "ab", 0.0, 100.0))))
    assert rows[0][:4] == ["link", "ts", "state", "key_rate_bps"]
    assert rows[1][:4] == ["ab", "10.0", "EXCHANGING", "1.5"]
    assert len(rows) == 2
    everyone = list(csv.reader(io.StringIO(store.export_csv("samples", None, 0.0, 100.0))))
    assert len(everyone) == 3
    blocks = list(csv.DictReader(io.StringIO(store.export_csv("blocks", "ab", 0.0, 100.0))))
    assert blocks[0]["stats"] == '{"reason": "a,b"}'  # quoted, not split
    with pytest.raises(ValueError, match="table must be one of"):
        store.export_csv("keys", None, 0.0, 1.0)  # type: ignore[arg-type]


def test_a_foreign_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE keys (id TEXT)")
    db.commit()
    db.close()
    with pytest.raises(HistoryError, match="not a console history file"):
        HistoryStore(path, retention_s=DAY_S)
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("keys",)]
