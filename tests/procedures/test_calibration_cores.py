"""Pure cores of the calibration procedures on synthetic data, and result saving."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qkdnode.procedures.common import CalibrationError, CalibrationResult, save_result
from qkdnode.procedures.dark_counts import (
    click_probability,
    dead_time_corrected,
    solve_system_efficiency,
)
from qkdnode.procedures.detector_timing import fit_gate_scan, gate_model
from qkdnode.procedures.encoding_compensation import (
    fit_qber_curve,
    qber_curve,
    qber_from_detections,
)
from qkdnode.procedures.mean_photon_number import mu_from_power
from qkdnode.procedures.modulator import decoy_drive_v, fit_transfer, transfer


@pytest.mark.parametrize(("v0", "v_pi"), [(1.23, 3.7), (-4.0, 2.1), (7.5, 5.5)])
def test_transfer_fit_recovers_curve(v0: float, v_pi: float) -> None:
    rng = np.random.default_rng(1)
    v = np.linspace(-10, 10, 61)
    p = transfer(v, 1e-8, 1e-4, v0, v_pi) * (1 + rng.normal(0, 0.002, v.size))
    fit = fit_transfer(v, p)
    assert fit.v_pi_v == pytest.approx(v_pi, rel=0.005)
    # V0 is defined modulo 2 V_pi
    assert math.remainder(fit.v0_v - v0, 2 * v_pi) == pytest.approx(0, abs=0.01)
    assert fit.extinction_db == pytest.approx(40, abs=1.5)


@pytest.mark.parametrize("seed", [3, 12, 126, 169, 612, 720, 900])
def test_transfer_fit_of_a_weak_sweep_in_meter_noise(seed: int) -> None:
    """A bias sweep at the VOA's power-on attenuation: 0.1-10 nW at the tap, 0.6 pW of
    meter noise. These seeds once failed: fits that swapped P_min and P_max, and relative
    weights that chased the noise around the minimum."""
    rng = np.random.default_rng(seed)
    scale = 10 ** rng.uniform(-10, -8)
    v = np.linspace(-10, 10, 61)
    p = transfer(v, scale * 1e-4, scale, 1.23, 3.7) + rng.normal(0, 1e-12 / math.sqrt(3), v.size)
    fit = fit_transfer(v, p)
    assert fit.p_max_w > fit.p_min_w
    assert fit.v_pi_v == pytest.approx(3.7, rel=0.02)
    assert math.remainder(fit.v0_v - 1.23, 2 * 3.7) == pytest.approx(0, abs=0.05)


def test_transfer_fit_refuses_flat_data() -> None:
    with pytest.raises(CalibrationError):
        fit_transfer(np.linspace(0, 1, 20), np.full(20, 1e-3))


def test_decoy_drive_hits_ratio() -> None:
    fit = fit_transfer(np.linspace(-8, 8, 41), transfer(np.linspace(-8, 8, 41), 1e-8, 1e-4, 0.3, 3))
    d = decoy_drive_v(fit, 0.2, signal_v=0.3, vacuum_v=3.3)
    assert float(fit.relative(d)) == pytest.approx(0.2, rel=1e-4)


def test_gate_fit_finds_pulse_within_jitter() -> None:
    rng = np.random.default_rng(2)
    period = 40_000.0
    d = np.concatenate([np.arange(0, period, 800.0), np.arange(12_345 - 800, 12_345 + 800, 40.0)])
    rate = gate_model(d, 12_345.0, 1000.0, 30.0, 2e5, 20.0)
    counts = rng.poisson(rate * 0.01) / 0.01
    fit = fit_gate_scan(d, counts, 1000.0, period)
    assert fit.pulse_delay_ps == pytest.approx(12_345.0, abs=30.0)
    assert fit.jitter_ps == pytest.approx(30.0, rel=0.5)


def test_gate_fit_wraps_around_the_slot() -> None:
    period = 40_000.0
    d = np.arange(0, period, 100.0)
    true = 39_900.0
    rate = gate_model((d - true + period / 2) % period - period / 2 + true, true, 1000, 30, 1e5, 5)
    fit = fit_gate_scan(d, rate, 1000.0, period)
    assert math.remainder(fit.pulse_delay_ps - true, period) == pytest.approx(0, abs=5)


def test_efficiency_inversion_roundtrip() -> None:
    mix = [(0.7, 0.5), (0.2, 0.1), (0.1, 0.0)]
    for x in (1e-4, 0.05, 0.6):
        p = click_probability(x, mix, 0.9, 0.9, 0.01)
        assert solve_system_efficiency(p, mix, 0.9, 0.9, 0.01) == pytest.approx(x, rel=1e-9)


def test_dead_time_correction() -> None:
    assert dead_time_corrected(1e6, 50) == pytest.approx(1e6 / 0.95)
    with pytest.raises(CalibrationError):
        dead_time_corrected(3e7, 50)


def test_mu_from_power() -> None:
    photon_j = 6.62607015e-34 * 299_792_458 / 1550e-9
    p = 0.5 * photon_j * 25e6 * 1e5  # 0.5 photons per pulse after 50 dB
    assert mu_from_power(p, 1550.0, 25e6, 50.0) == pytest.approx(0.5, rel=1e-9)


def test_qber_curve_fit_finds_minimum() -> None:
    b = np.array([0.0, 0.36, -0.36, 0.6])
    q = qber_curve(b, 0.01, 0.98, 0.55, 3.0)
    e0, amp, bs = fit_qber_curve(b, q, 3.0)
    assert bs == pytest.approx(0.55, abs=1e-3)
    assert e0 == pytest.approx(0.01, abs=1e-3)


def test_qber_from_detections() -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    basis = rng.integers(0, 2, n).astype(np.uint8)
    bit = rng.integers(0, 2, n).astype(np.uint8)
    rx_basis = rng.integers(0, 2, n)
    flip = rng.random(n) < 0.03
    rx_bit = np.where(rx_basis == basis, bit ^ flip, rng.integers(0, 2, n))
    channel = (2 * rx_basis + rx_bit).astype(np.int8)
    est = qber_from_detections(channel, basis, bit)
    assert est.qber == pytest.approx(0.03, abs=0.003)
    assert est.n_sifted == pytest.approx(n / 2, rel=0.02)


def test_save_result_writes_json_and_png(tmp_path: Path) -> None:
    res = CalibrationResult(procedure="demo", message="hello")

    def plot(r: CalibrationResult, fig: object) -> None:
        fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])  # type: ignore[attr-defined]

    path = save_result(res, tmp_path, plot)
    assert json.loads(path.read_text())["message"] == "hello"
    png = tmp_path / "calibration" / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "calibration").glob("demo-*.json"))) == 1


def test_gate_fit_to_stray_dark_counts_is_refused() -> None:
    """No light: a delay scan with a few single dark counts (one count per integration
    shows as 24 Hz) must not yield a gate delay."""
    from qkdnode.procedures.detector_timing import DetectorTimingConfig, _check_fit

    delays = np.arange(22_050.0, 24_450.0, 40.0)
    rates = np.zeros_like(delays)
    rates[[4, 8, 27, 30, 38, 41, 49]] = 24.0
    with pytest.raises(CalibrationError):
        _check_fit(fit_gate_scan(delays, rates, 1000.0, 40_000.0), DetectorTimingConfig())
