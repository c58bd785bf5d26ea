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


def run(free_running_hz: float, readings: int) -> tuple[DarkRateResult, LinkParams]:
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
        result = asyncio.run(
            measure_dark_rate(
                inst["detectors"],
                integration_s=link.chunk_s,  # a simulated reading counts over one chunk
                readings=readings,
                wait_integration=lambda: link.step(2),
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
