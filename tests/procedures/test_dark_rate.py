"""The receiver's dark-count rates (light off) against the simulated detectors' truth."""

from __future__ import annotations

import asyncio
import math

import pytest

from drivers.simlink.params import LinkParams, ReceiverParams
from qkdnode.procedures.dark_rate import DarkRateResult, measure_dark_rate
from qkdnode.procedures.simharness import SimLink

CHUNK = 1 << 18


def gated_dark_rate_hz(params: LinkParams, free_running_hz: float) -> float:
    """A gated detector counts its free-running dark rate only while its gate is open."""
    return free_running_hz * params.receiver.gate_width_ps * 1e-12 * params.source.slot_rate_hz


def run(
    free_running_hz: float, readings: int, *, wait_chunks: int = 1, stated: bool = False
) -> tuple[DarkRateResult, LinkParams]:
    """``wait_chunks`` simulated batches between readings (each reading still counts over
    the last one); ``stated``: the counting time is the detectors' own statement."""
    link = SimLink(
        LinkParams(
            chunk_slots=CHUNK,
            start_calibrated=True,
            receiver=ReceiverParams(spread_scale=0.0, dark_count_rates_hz=free_running_hz),
        )
    )
    try:
        inst = link.connect()
        inst["voa"].set_shutter(False)  # the transmitter's light off
        link.step(2)
        counting_s = inst["detectors"][0].count_integration_s() if stated else None
        result = asyncio.run(
            measure_dark_rate(
                inst["detectors"],
                # a simulated reading counts over one chunk
                integration_s=wait_chunks * link.chunk_s,
                reading_time_s=counting_s,
                readings=readings,
                wait_integration=lambda: link.step(2 * wait_chunks),
            )
        )
        return result, link.params
    finally:
        link.close()


def test_dark_rate_interval_holds_the_truth() -> None:
    # 2.5 kHz gated (dead-time losses below 1 %): about 1000 counts per detector
    result, params = run(1e5, 40)
    truth = gated_dark_rate_hz(params, 1e5)
    for d in result.detectors:
        assert d.counts > 500
        assert d.lower_hz <= truth <= d.upper_hz
        assert d.rate_hz == pytest.approx(truth, rel=0.1)
    total = result.total_rate_hz
    assert total == pytest.approx(4 * truth, rel=0.05)


def test_no_dark_count_bounds_the_rate_never_by_zero() -> None:
    result, _ = run(0.0, 3)
    for d in result.detectors:
        assert d.counts == 0 and d.lower_hz == 0.0
        exposure = 3 * CHUNK / 25e6
        assert d.upper_hz == pytest.approx(-math.log(1 - result.confidence) / exposure)


def test_counts_are_those_behind_the_readings_not_the_wait_between_them() -> None:
    """Readings three batches apart, each counting over one batch (what the simulated
    counters state): the interval is built on the counts actually behind the readings and
    holds the truth. Taking the wait as the counting time claims three times the counts
    and an interval sqrt(3) too narrow: more than was measured."""
    result, params = run(1e5, 20, wait_chunks=3, stated=True)
    truth = gated_dark_rate_hz(params, 1e5)
    chunk_s = params.chunk_slots / params.source.slot_rate_hz
    assert result.reading_time_s == pytest.approx(chunk_s)
    for d in result.detectors:
        assert d.lower_hz <= truth <= d.upper_hz
        assert d.counts == pytest.approx(truth * 20 * chunk_s, rel=0.25)
    wrong, _ = run(1e5, 20, wait_chunks=3, stated=False)
    assert sum(d.counts for d in wrong.detectors) > 2.5 * sum(d.counts for d in result.detectors)
    width = result.total_upper_hz - result.total_lower_hz
    assert wrong.total_upper_hz - wrong.total_lower_hz < 0.7 * width


def test_a_counting_time_longer_than_the_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="reading_time_s"):
        asyncio.run(measure_dark_rate([], integration_s=0.1, reading_time_s=0.2))
