"""Each fit states a standard uncertainty that its own noise bears out, and refuses
what its counts cannot carry.

The data are drawn from the procedures' physical models with the noise of the
instrument (a power meter's additive noise, Poisson counts, timing jitter): over many
draws the errors divided by the stated uncertainties must spread like a standard
normal's, never beyond the coverage factor.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from drivers.simlink.params import ClockParams, LinkParams, ReceiverParams
from qkdnode.procedures.common import COVERAGE_FACTOR, CalibrationError
from qkdnode.procedures.detector_timing import (
    DetectorTimingConfig,
    _check_fit,
    fit_gate_scan,
    gate_model,
)
from qkdnode.procedures.modulator import fit_transfer, transfer
from qkdnode.procedures.simharness import SimLink
from qkdnode.procedures.sync import SyncConfig, acquire_lock
from qkdnode.procedures.sync_model import ClockModel, fit_clock


def spread_ok(z: list[float]) -> None:
    """Errors in units of the stated uncertainty spread like a standard normal's: a
    standard deviation near 1, and beyond the coverage factor no more often than a
    normal's 0.27 % allows among these draws (one at most), never far beyond it."""
    arr = np.abs(np.asarray(z))
    assert 0.7 < float(np.sqrt(np.mean(arr**2))) < 1.3, arr
    assert int(np.sum(arr > COVERAGE_FACTOR)) <= 1, arr
    assert float(arr.max()) < COVERAGE_FACTOR + 1.5, arr


def test_modulator_sweep_uncertainty_matches_the_meter_noise() -> None:
    """A thousandth of a percent of meter noise on a 100 nW sweep: the old relative
    weights stated V_pi ten times more precisely than it was (errors up to 11 sigma)."""
    rng = np.random.default_rng(1)
    z_v_pi, z_v0 = [], []
    volts = np.linspace(-10, 10, 61)
    for _ in range(30):
        v_pi, v0 = rng.uniform(3.4, 4.0), rng.uniform(0.7, 1.7)
        clean = transfer(volts, 1e-11, 1e-7, v0, v_pi)
        readings = np.mean([clean + rng.normal(0, 1e-12, volts.size) for _ in range(3)], axis=0)
        fit = fit_transfer(volts, readings)
        v0_true = v0 + 2 * v_pi * round((fit.v0_v - v0) / (2 * v_pi))
        z_v_pi.append((fit.v_pi_v - v_pi) / fit.v_pi_err_v)
        z_v0.append((fit.v0_v - v0_true) / fit.v0_err_v)
        lower, upper = fit.v_pi_interval_v
        assert upper - lower == pytest.approx(2 * COVERAGE_FACTOR * fit.v_pi_err_v)
    spread_ok(z_v_pi)
    spread_ok(z_v0)


def test_gate_delay_uncertainty_from_poisson_counts() -> None:
    rng = np.random.default_rng(7)
    period, t = 40_000.0, 0.0105
    z = []
    for _ in range(30):
        true = rng.uniform(10_000, 14_000)
        d = np.concatenate(
            [np.arange(true - 1800, true + 1800, 800.0), np.arange(true - 800, true + 800, 40.0)]
        )
        d = np.round(d / 40.0) * 40.0  # the scan's grid does not know the pulse
        rates = rng.poisson(gate_model(d, true, 1000.0, 30.0, 1e5, 5.0) * t) / t
        fit = fit_gate_scan(d, rates, 1000.0, period, reading_time_s=t)
        _check_fit(fit, DetectorTimingConfig(reading_time_s=t))
        z.append((fit.pulse_delay_ps - true) / fit.pulse_delay_err_ps)
    spread_ok(z)


def test_gate_delay_refused_below_its_counts() -> None:
    """A weak pulse (40 counts per reading on the plateau) is refused by name."""
    rng = np.random.default_rng(3)
    t = 0.0105
    d = np.arange(11_000.0, 13_700.0, 40.0)
    rates = rng.poisson(gate_model(d, 12_345.0, 1000.0, 30.0, 40 / t, 5.0) * t) / t
    fit = fit_gate_scan(d, rates, 1000.0, 40_000.0, reading_time_s=t)
    with pytest.raises(CalibrationError, match="counts per reading on the plateau"):
        _check_fit(fit, DetectorTimingConfig(reading_time_s=t))


def test_clock_fit_uncertainty_from_the_tags() -> None:
    """Tags on a line of known rate with 50 ps jitter, numbered by a model off by 0.3 ppm
    and 20 ps: the refit finds the line within its stated uncertainty."""
    rng = np.random.default_rng(11)
    period = 40_000.0
    z_ppm, z_off = [], []
    for _ in range(30):
        ppm, offset = rng.uniform(-20, 20), rng.uniform(-1e6, 1e6)
        slots = np.sort(rng.choice(np.arange(10_000_000, 11_250_000), 20_000, replace=False))
        true = ClockModel(offset, 1 + ppm * 1e-6)
        times = true.slot_rx_time_ps(slots, 25e6) + rng.normal(0, 50.0, slots.size)
        guess = ClockModel(offset + 20.0, true.rate + 0.3e-6)
        residuals = times - guess.slot_rx_time_ps(slots, 25e6)
        fit = fit_clock(slots, residuals, guess, period)
        z_ppm.append((fit.model.ppm - ppm) / fit.ppm_sigma)
        centre = fit.centre_slot
        at_centre = fit.model.slot_rx_time_ps(np.array([centre]), 25e6)[0]
        z_off.append(
            (at_centre - true.slot_rx_time_ps(np.array([centre]), 25e6)[0]) / fit.offset_sigma_ps
        )
    spread_ok(z_ppm)
    spread_ok(z_off)
    # the clock's wander adds to the frequency's uncertainty, as the square root of the span
    still = fit_clock(slots, residuals, guess, period)
    wandering = fit_clock(slots, residuals, guess, period, wander_ppm_per_sqrt_s=0.01)
    span_s = (slots[-1] - slots[0]) / 25e6
    assert wandering.ppm_sigma == pytest.approx(
        math.hypot(still.ppm_sigma, 0.01 * math.sqrt(13 / 35 * span_s))
    )


def test_sync_refuses_a_frequency_it_cannot_claim() -> None:
    """The acquisition's frequency known to about 0.004 ppm (3 sigma): asked for
    0.0001 ppm, the lock is refused with the reason."""
    params = LinkParams(
        chunk_slots=1 << 18,
        start_calibrated=True,
        clock=ClockParams(offset_s=0.4, frequency_offset_ppm=7.0),
        receiver=ReceiverParams(spread_scale=0.0),
    )
    link = SimLink(params)
    try:
        inst = link.connect()
        inst["source"].set_sync_pattern(21)
        link.step(1)
        inst["tagger"].start_stream()
        link.advance(0.08)
        cfg = SyncConfig(confirm_blocks=0, max_ppm_uncertainty=1e-4)
        sync, _ = asyncio.run(acquire_lock(inst["tagger"], 21, params.source.slot_rate_hz, cfg))
    finally:
        link.close()
    assert not sync.locked
    assert "acquire longer" in sync.message
    assert sync.ppm == pytest.approx(7.0, abs=COVERAGE_FACTOR * sync.ppm_sigma + 0.01)
    assert sync.ppm_sigma > 0 and sync.offset_sigma_ps > 0
