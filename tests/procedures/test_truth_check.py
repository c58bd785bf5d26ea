"""Calibration claims no more than it measured: the chain against the simulator's truth.

Each seed draws both boxes' hardware truths (the simulator's documented spreads); the
calibration chain runs on the link and every estimate must lie within its stated
interval (``COVERAGE_FACTOR`` standard uncertainties) of the hidden truth. A miss is an
understated uncertainty: the fix belongs in the procedure, never in this check.
"""

from __future__ import annotations

import math

import pytest

from qkdnode.cli import main
from qkdnode.procedures.common import COVERAGE_FACTOR
from qkdnode.procedures.truth_check import TruthRow, check_seeds, summarize

#: What the chain must report on every seed (per detector where there are four).
QUANTITIES = {
    "im_v_pi": 1,
    "im_bias": 1,
    "im_drive_v_pi": 1,
    "mu_signal": 1,
    "mu_decoy": 1,
    "delay": 4,
    "clock_ppm": 1,
    "encoder_v_pi": 1,
    "encoder_bias": 1,
    "efficiency": 4,
    "dark_rate": 4,
    "polarization": 3,  # about S1, S2, S3
}


def assert_honest(rows: list[TruthRow]) -> None:
    misses = [r for r in rows if not r.within]
    assert not misses, "\n".join(
        f"seed {r.seed} {r.quantity}: {r.estimate} vs truth {r.truth} "
        f"(interval {r.lower}..{r.upper}, z {r.z})"
        for r in misses
    )
    for r in rows:
        if r.z is not None:
            assert r.standard_uncertainty is not None and r.standard_uncertainty > 0
            assert abs(r.z) <= COVERAGE_FACTOR
        else:  # a bound only: no point value is claimed
            assert r.estimate is None


def test_two_seeds_within_their_stated_uncertainty() -> None:
    rows = check_seeds([101, 102])
    assert_honest(rows)
    for seed in (101, 102):
        families: dict[str, int] = {}
        for r in rows:
            if r.seed == seed:
                name = r.quantity.split("[")[0]
                families[name] = families.get(name, 0) + 1
        assert families == QUANTITIES
    # the two boxes differ: the truths are drawn, not the nominal values
    by_seed = {r.seed: r.truth for r in rows if r.quantity == "im_v_pi"}
    assert by_seed[101] != by_seed[102]
    assert all(abs(t - 3.7) >= 0.02 * 3.7 * 0.999 for t in by_seed.values())


def test_summary_reports_the_worst_error_per_quantity() -> None:
    rows = [
        TruthRow(
            seed=1,
            quantity="delay[a]",
            unit="ps",
            estimate=10.0,
            lower=7.0,
            upper=13.0,
            truth=11.0,
            standard_uncertainty=1.0,
            z=-1.0,
            coverage_factor=3.0,
        ),
        TruthRow(
            seed=2,
            quantity="delay[b]",
            unit="ps",
            estimate=10.0,
            lower=7.0,
            upper=13.0,
            truth=14.0,
            standard_uncertainty=1.0,
            z=-4.0,
            coverage_factor=3.0,
        ),
        TruthRow(
            seed=1,
            quantity="dark_rate[a]",
            unit="Hz",
            estimate=None,
            lower=0.0,
            upper=5.0,
            truth=2.0,
            standard_uncertainty=None,
            z=None,
            coverage_factor=3.0,
        ),
    ]
    summary = {s.quantity: s for s in summarize(rows)}
    assert summary["delay"].rows == 2 and summary["delay"].max_abs_z == 4.0
    assert summary["delay"].max_abs_error == 4.0 and summary["delay"].misses == 1
    assert summary["dark_rate"].max_abs_z is None and summary["dark_rate"].misses == 0


def test_cli_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["calibration", "truth", "--seeds", "1", "--first-seed", "103", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["coverage_factor"] == COVERAGE_FACTOR and out["seeds"] == [103]
    assert {s["quantity"] for s in out["summary"]} == set(QUANTITIES)
    assert all(s["misses"] == 0 for s in out["summary"])
    assert len(out["rows"]) == sum(QUANTITIES.values())
    assert main(["calibration", "truth", "--seeds", "0"]) == 2


@pytest.mark.system
def test_twenty_seeds_within_their_stated_uncertainty() -> None:
    """The acceptance: 20 seeds of drawn truths, every quantity within its interval."""
    rows = check_seeds(range(20))
    assert_honest(rows)
    summary = summarize(rows)
    assert {s.quantity for s in summary} == set(QUANTITIES)
    for s in summary:
        assert s.misses == 0
        assert s.max_abs_z is None or math.isfinite(s.max_abs_z)
