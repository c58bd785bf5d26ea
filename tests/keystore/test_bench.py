from __future__ import annotations

from qkdnode.keystore.bench import run_benchmarks


def test_quick_benchmarks_report_measured_rates() -> None:
    rows = run_benchmarks(quick=True)
    assert {r["name"] for r in rows} == {
        "keystore.keys_stored_per_s",
        "keystore.pick_confirm_per_s",
        "etsi.enc_keys_requests_per_s",
        "etsi.enc_dec_round_trips_per_s",
        "keystore.compact_s",
    }
    for r in rows:
        assert set(r) == {"name", "value", "unit", "target", "note"}
        assert isinstance(r["value"], float) and r["value"] > 0
