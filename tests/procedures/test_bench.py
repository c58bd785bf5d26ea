"""The benchmark runs end to end and reports every procedure."""

from __future__ import annotations

import pytest

from qkdnode.procedures.bench import run_benchmarks


@pytest.mark.slow
def test_run_benchmarks_quick() -> None:
    rows = run_benchmarks(quick=True)
    names = {r["name"] for r in rows}
    for proc in (
        "modulator",
        "mean_photon_number",
        "detector_timing",
        "dark_counts",
        "encoding_compensation",
        "encoder_v_pi",
    ):
        assert f"procedure.{proc}" in names
    assert {"sync.acquire_core", "sync.acquire_lock", "sync.tracker_throughput"} <= names
    for r in rows:
        assert set(r) == {"name", "value", "unit", "target", "note"}
        assert isinstance(r["value"], float | int) and r["value"] > 0
