"""The sweep's distance parsing, table, CSV and plot (from given summaries)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from qkdnode.demo.config import DemoConfig
from qkdnode.demo.summary import DemoSummary, LinkStats, build_summary
from qkdnode.demo.sweep import (
    CSV_COLUMNS,
    parse_distances,
    plot_sweep,
    sweep_table,
    theory_curve,
    write_csv,
)


def _point(distance_km: float, secret_bits: int) -> DemoSummary:
    digest = {"count": 1, "sha256": "00" * 32}
    return build_summary(
        stats=LinkStats(pulses=10**9, detections=10**6, secret_bits=secret_bits, blocks_ok=1),
        distance_km=distance_km,
        exchange_wall_s=20.0,
        requested_duration_s=20.0,
        digests={"alice": digest, "bob": digest},
        theory={"secret_bits_per_pulse": 1e-3, "plob_bits_per_pulse": 0.1},
        eve=None,
        seed=None,
        security="curve",
        exit_codes={"alice": 0, "bob": 0},
        out_dir="x",
    )


def test_parse_distances() -> None:
    assert parse_distances("0, 25,50,") == [0.0, 25.0, 50.0]
    for bad in ("", "a,b", "10,-5", "1000"):
        with pytest.raises(ValueError, match="--sweep"):
            parse_distances(bad)


def test_table_and_csv(tmp_path: Path) -> None:
    points = [_point(0, 5_000_000), _point(50, 300_000), _point(100, 0)]
    table = sweep_table(points)
    assert len(table.splitlines()) == 2 + len(points)
    path = write_csv(points, tmp_path / "sweep.csv")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["distance_km"]) for r in rows] == [0.0, 50.0, 100.0]
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert float(rows[1]["secret_bits_per_pulse"]) == pytest.approx(300_000 / 1e9)


def test_plot_is_a_png(tmp_path: Path) -> None:
    points = [_point(0, 5_000_000), _point(50, 300_000), _point(100, 0)]
    path = plot_sweep(points, DemoConfig(), tmp_path / "sweep.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_theory_curve_shape() -> None:
    d, rate, plob = theory_curve(DemoConfig(), 100.0, points=11)
    assert d[0] == 0 and d[-1] == 100 and len(rate) == len(plob) == 11
    if np.isfinite(plob).all():  # theory module present
        assert np.all(np.diff(plob) < 0)
        assert np.all(rate[np.isfinite(rate)] <= plob[np.isfinite(rate)])
