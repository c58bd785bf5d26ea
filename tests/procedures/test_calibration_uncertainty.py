"""Calibration results state their uncertainty and claim no more than the data allow.

Against the simulated link with its hardware truths set explicitly (``spread_scale`` 0):
the mean photon numbers rest on the commissioning value the node is given (not on the
simulator's), the intervals contain the truth, the vacuum class below the meter's
resolution gets an upper bound, the encoder's V_pi is measured, and the dark-count and
efficiency rules follow the counts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers.interfaces import BB84State, LaserStatus
from drivers.simlink.params import LinkParams, ReceiverParams, TransmitterHardwareParams
from qkdnode.procedures.common import (
    CalibrationError,
    one_sided_confidence,
    poisson_lower,
    poisson_upper,
)
from qkdnode.procedures.dark_counts import DarkCountConfig, measure_dark_counts_and_efficiency
from qkdnode.procedures.encoder_v_pi import (
    STATE_PHASE,
    EncoderVPiConfig,
    StateErrors,
    calibrate_encoder_v_pi,
    count_state_errors,
    fit_encoder_v_pi,
    state_error_model,
)
from qkdnode.procedures.encoding_compensation import qber_from_detections
from qkdnode.procedures.mean_photon_number import (
    IntensityUncertainty,
    MeanPhotonConfig,
    MeanPhotonResult,
    calibrate_mean_photon_number,
    intensity_interval,
)
from qkdnode.procedures.modulator import ModulatorResult, calibrate_modulator
from qkdnode.procedures.simharness import SimLink, drain
from qkdnode.procedures.sync import SlotTracker, SyncConfig, acquire_lock

CHUNK = 1 << 18  # 10.5 ms at 25 MHz
NOMINAL_TAP_DB = 50.0
TRUE_TAP_DB = 53.0  # this box: 3 dB above the nominal value


def tx_hardware(**truths: Any) -> TransmitterHardwareParams:
    """Transmitter truths exactly as given (no unit-to-unit spread), laser warm at once."""
    return TransmitterHardwareParams(spread_scale=0.0, laser_warmup_s=0.0, **truths)


def rx_hardware(**truths: Any) -> ReceiverParams:
    return ReceiverParams(spread_scale=0.0, **truths)


@dataclass
class TxBench:
    link: SimLink
    inst: dict[str, Any]
    modulator: ModulatorResult


def tx_bench(hw: TransmitterHardwareParams) -> TxBench:
    link = SimLink(
        LinkParams(
            chunk_slots=CHUNK, start_calibrated=False, transmitter=hw, receiver=rx_hardware()
        )
    )
    inst = link.connect()
    # the meter's noise from a fixed seed: a pure-noise reading passes 3 sigma in 0.13 %
    # of runs, which a test must not leave to chance
    inst["meter"]._rng = np.random.default_rng(2026)
    inst["laser"].set_emission(True)
    assert inst["laser"].status() == LaserStatus.LOCKED
    modulator = asyncio.run(calibrate_modulator(inst["im"], inst["meter"], voa=inst["voa"]))
    return TxBench(link, inst, modulator)


def measure_mu(
    bench: TxBench, cfg: MeanPhotonConfig, state_dir: Path | None = None
) -> MeanPhotonResult:
    src = bench.link.params.source
    return asyncio.run(
        calibrate_mean_photon_number(
            bench.inst["laser"],
            bench.inst["im"],
            bench.inst["voa"],
            bench.inst["meter"],
            bench.modulator,
            mu_signal=src.mu_signal,
            mu_decoy=src.mu_decoy,
            slot_rate_hz=src.slot_rate_hz,
            cfg=cfg,
            state_dir=state_dir,
        )
    )


@pytest.fixture(scope="module")
def box_53db() -> Iterator[TxBench]:
    bench = tx_bench(tx_hardware(tap_to_output_db=TRUE_TAP_DB))
    yield bench
    bench.link.close()


# --- mean photon number -------------------------------------------------------------------


def test_commissioned_box_measures_mu_within_its_stated_uncertainty(
    box_53db: TxBench, tmp_path: Path
) -> None:
    cfg = MeanPhotonConfig(
        tap_to_output_db=TRUE_TAP_DB,
        uncertainty=IntensityUncertainty(tap_to_output_uncertainty_db=0.1),
    )
    mu = measure_mu(box_53db, cfg, tmp_path)
    truth = box_53db.link.tx.mu_per_class()  # hidden truth, read in assertions only
    assert mu.ok
    for (lower, upper), true_mu in zip(mu.bounds(), truth, strict=True):
        assert lower <= true_mu <= upper
    # no hidden meter or laser error in this box: the estimates are the truth to the noise
    assert mu.mu_signal == pytest.approx(truth[0], rel=1e-3)
    assert mu.mu_decoy == pytest.approx(truth[1], rel=1e-3)
    assert truth[0] == pytest.approx(0.5, rel=0.03)
    # the vacuum class is resolved at 40 dB extinction (about 5e-5)
    assert mu.vacuum.resolved and mu.vacuum.mu == pytest.approx(truth[2], rel=0.1)
    assert 2e-5 < truth[2] < 1e-4
    # the interval is the stated budget, not a guess: systematics 3 %, 0.1 dB, 5 % drift
    assert mu.signal.upper / mu.mu_signal == pytest.approx(1.03 * 10**0.01 * 1.05, rel=1e-3)
    saved = json.loads((tmp_path / "calibration" / "mean_photon_number.json").read_text())
    assert saved["tap_to_output_db"] == TRUE_TAP_DB
    assert saved["uncertainty"]["tap_to_output_uncertainty_db"] == 0.1
    assert saved["signal"]["lower"] <= saved["signal"]["mu"] <= saved["signal"]["upper"]
    assert saved["vacuum"]["upper"] > 0


def test_wrong_commissioning_value_is_wrong_by_exactly_its_error(box_53db: TxBench) -> None:
    """Given the nominal 50 dB for a 53 dB box, the node believes its value (it cannot know
    better): it sets the VOA for 0.5 and sends half of that."""
    mu = measure_mu(box_53db, MeanPhotonConfig(tap_to_output_db=NOMINAL_TAP_DB))
    truth = box_53db.link.tx.mu_per_class()
    tap_error = 10 ** ((TRUE_TAP_DB - NOMINAL_TAP_DB) / 10)
    assert mu.mu_signal == pytest.approx(0.5, rel=0.02)  # on target, as far as it knows
    assert mu.mu_signal / truth[0] == pytest.approx(tap_error, rel=1e-3)
    assert mu.mu_decoy / truth[1] == pytest.approx(tap_error, rel=1e-3)
    assert truth[0] < mu.signal.lower  # a 3 dB error is far outside a 0.2 dB budget


def test_uncommissioned_box_refuses_to_calibrate(box_53db: TxBench) -> None:
    with pytest.raises(CalibrationError, match=r"calibration\.tap_to_output_db"):
        measure_mu(box_53db, MeanPhotonConfig(tap_to_output_db=None))


def test_vacuum_below_the_meter_resolution_gets_an_upper_bound() -> None:
    # a noisy meter: 0.1 nW per reading against about 20 pW of vacuum light at the tap
    bench = tx_bench(tx_hardware(power_meter_noise_w=1e-10))
    try:
        tap_db = bench.link.params.transmitter.tap_to_output_db
        mu = measure_mu(bench, MeanPhotonConfig(tap_to_output_db=tap_db))
        truth = bench.link.tx.mu_per_class()
    finally:
        bench.link.close()
    assert mu.signal.resolved and mu.decoy.resolved
    assert not mu.vacuum.resolved and mu.vacuum.mu is None
    assert mu.vacuum.lower == 0.0
    assert truth[2] <= mu.vacuum.upper < 0.05 * mu.mu_decoy
    assert mu.vacuum.mu_or_upper == mu.vacuum.upper
    for (lower, upper), true_mu in zip(mu.bounds(), truth, strict=True):
        assert lower <= true_mu <= upper


def test_interval_core_rules() -> None:
    budget = IntensityUncertainty(
        coverage_factor=3,
        meter_uncertainty=0.0,
        tap_to_output_uncertainty_db=0.0,
        drift_allowance=0.0,
    )
    interval = functools.partial(
        intensity_interval,
        wavelength_nm=1550.0,
        slot_rate_hz=25e6,
        tap_to_output_db=50.0,
        budget=budget,
    )
    resolved = interval(1e-7, 1e-10)
    assert resolved.mu is not None and resolved.lower < resolved.mu < resolved.upper
    assert resolved.upper / resolved.mu == pytest.approx(1 + 3e-3)
    below = interval(2e-12, 1e-12)  # 2 sigma: not resolved
    assert below.mu is None and below.lower == 0
    assert below.upper == pytest.approx(resolved.upper * 5e-12 / (1e-7 + 3e-10))
    with pytest.raises(CalibrationError, match="resolution"):
        interval(0.0, 0.0)  # no light and no noise: nothing to bound with


# --- encoder V_pi -------------------------------------------------------------------------


@dataclass
class SyncedLink:
    link: SimLink
    inst: dict[str, Any]
    tracker: SlotTracker


@pytest.fixture(scope="module")
def encoder_2v7() -> Iterator[SyncedLink]:
    """A synchronized link whose encoder's V_pi is 2.7 V (the node believes 3.0 V)."""
    params = LinkParams(
        chunk_slots=CHUNK,
        start_calibrated=True,
        transmitter=tx_hardware(encoder_v_pi_v=2.7, encoder_bias_opt_v=0.8),
        receiver=rx_hardware(),
    )
    link = SimLink(params)
    inst = link.connect()
    inst["source"].set_sync_pattern(77)
    link.step(1)
    inst["tagger"].start_stream()
    link.advance(0.1)
    sync, tracker = asyncio.run(
        acquire_lock(inst["tagger"], 77, params.source.slot_rate_hz, SyncConfig(confirm_blocks=0))
    )
    assert sync.locked
    inst["source"].set_sync_pattern(None)
    yield SyncedLink(link, inst, tracker)
    link.close()


def probe(s: SyncedLink, seconds: float = 0.02) -> tuple[Any, Any]:
    drain(s.inst["tagger"])
    s.link.advance(seconds)
    mapped, status = s.tracker.update(drain(s.inst["tagger"]))
    assert status.locked
    return mapped, s.inst["source"].prepared(mapped.slot_index)


def test_encoder_v_pi_is_measured_within_its_uncertainty(encoder_2v7: SyncedLink) -> None:
    async def measure() -> StateErrors:
        mapped, prep = probe(encoder_2v7)
        return count_state_errors(mapped.channel, prep.basis, prep.bit)

    encoder = encoder_2v7.inst["encoder"]
    encoder.set_bias_v(0.0)  # away from the optimum, as after power-on
    res = asyncio.run(calibrate_encoder_v_pi(encoder, measure, EncoderVPiConfig(v_pi_guess_v=3.0)))
    assert res.ok
    assert res.v_pi_lower_v <= 2.7 <= res.v_pi_upper_v
    assert res.v_pi_upper_v - res.v_pi_lower_v < 0.02 * 2.7
    assert res.v_pi_lower_v == pytest.approx(res.v_pi_v - 3 * res.v_pi_sigma_v)
    # the drives follow the measurement, the bias sits on the optimum: a low error rate
    drives = [encoder.drive_v(s) for s in BB84State]
    np.testing.assert_allclose(drives, STATE_PHASE * res.v_pi_v)
    assert math.remainder(encoder.bias_v() - 0.8, 2 * 2.7) == pytest.approx(0, abs=0.02)
    mapped, prep = probe(encoder_2v7, 0.05)
    assert qber_from_detections(mapped.channel, prep.basis, prep.bit).qber < 0.015


def test_encoder_v_pi_refuses_a_claim_the_counts_cannot_support(encoder_2v7: SyncedLink) -> None:
    async def measure() -> StateErrors:
        mapped, prep = probe(encoder_2v7, 0.002)  # a few thousand detections per point
        return count_state_errors(mapped.channel, prep.basis, prep.bit)

    encoder = encoder_2v7.inst["encoder"]
    encoder.set_bias_v(0.3)
    cfg = EncoderVPiConfig(v_pi_guess_v=3.0, max_relative_uncertainty=0.001)
    with pytest.raises(CalibrationError, match="less precise"):
        asyncio.run(calibrate_encoder_v_pi(encoder, measure, cfg))
    assert encoder.bias_v() == 0.3  # left where it was


@pytest.mark.parametrize(("v_pi", "bias_v_pi"), [(2.7, None), (3.2, None), (3.3, 4.0)])
def test_v_pi_fit_core(v_pi: float, bias_v_pi: float | None) -> None:
    rng = np.random.default_rng(5)
    biases = np.linspace(-3, 3, 13)
    drives = STATE_PHASE * 3.0
    p = state_error_model(
        biases, drives, bias_opt_v=0.6, v_pi_v=v_pi, e0=0.01, amp=0.98, bias_v_pi_v=bias_v_pi
    )
    n = np.tile([6000, 6000, 400, 400], (biases.size, 1))
    fit = fit_encoder_v_pi(
        biases, drives, rng.binomial(n, p), n, 3.0, separate_bias_v_pi=bias_v_pi is not None
    )
    assert abs(fit.v_pi_v - v_pi) <= 3 * fit.v_pi_sigma_v
    assert fit.v_pi_sigma_v < 0.01
    if bias_v_pi is not None:
        assert abs(fit.bias_v_pi_v - bias_v_pi) <= 3 * fit.bias_v_pi_sigma_v


# --- dark counts and efficiency -----------------------------------------------------------


def run_dark_counts(rx: ReceiverParams, **cfg: Any) -> tuple[Any, LinkParams]:
    link = SimLink(
        LinkParams(chunk_slots=CHUNK, start_calibrated=True, transmitter=tx_hardware(), receiver=rx)
    )
    try:
        inst = link.connect()
        truth = link.tx.mu_per_class()
        src = link.params.source

        async def set_light(on: bool) -> None:
            inst["voa"].set_shutter(on)

        result = asyncio.run(
            measure_dark_counts_and_efficiency(
                inst["detectors"],
                set_light,
                src.slot_rate_hz,
                [(src.p_signal, truth[0]), (src.p_decoy, truth[1]), (src.p_vacuum, truth[2])],
                DarkCountConfig(
                    reading_time_s=link.chunk_s,
                    rx_p_basis_z=rx.p_basis_z,
                    tx_p_basis_z=src.p_basis_z,
                    **cfg,
                ),
                mu_bounds=[(m * 0.95, m * 1.05) for m in truth],
                channel_transmittance=link.params.fiber.transmittance,
                # the link starts at its optimum: its error rate is the optical misalignment
                encoding_qber=link.params.fiber.misalignment,
                wait_integration=lambda: link.step(2),
            )
        )
        return result, link.params
    finally:
        link.close()


def gated_dark_rate_hz(params: LinkParams, free_running_hz: float) -> float:
    rx = params.receiver
    return free_running_hz * rx.gate_width_ps * 1e-12 * params.source.slot_rate_hz


def test_few_dark_counts_give_an_upper_bound_never_zero() -> None:
    result, params = run_dark_counts(rx_hardware(dark_count_rates_hz=100.0))
    truth_hz = gated_dark_rate_hz(params, 100.0)  # 2.5 Hz: about 0.1 count in 50 ms
    for d in result.detectors:
        assert d.dark_counts < 100
        assert d.dark_rate_hz is None and d.dark_probability_per_slot is None
        assert d.dark_rate_lower_hz <= truth_hz <= d.dark_rate_upper_hz
        assert d.dark_rate_upper_hz >= -math.log(1 - result.confidence) / d.counting_time_s
        # the efficiency is measured, with an interval that holds the truth
        assert d.detector_efficiency_lower <= 0.6 <= d.detector_efficiency_upper


def test_enough_dark_counts_give_a_value_with_its_interval() -> None:
    # 25 kHz of dark counts against about 140 kHz of light on the X detectors: counting
    # 50 ms leaves the efficiency at +/-6 %, more than the 5 % allowed; 200 ms will do
    with pytest.raises(CalibrationError, match="count longer"):
        run_dark_counts(rx_hardware(dark_count_rates_hz=1e6))
    result, params = run_dark_counts(rx_hardware(dark_count_rates_hz=1e6), readings=20)
    truth_hz = gated_dark_rate_hz(params, 1e6)  # about 5000 counts in 200 ms
    for d in result.detectors:
        assert d.dark_counts >= 100
        assert d.dark_rate_hz is not None
        assert d.dark_rate_lower_hz <= truth_hz <= d.dark_rate_upper_hz
        assert d.dark_rate_hz == pytest.approx(truth_hz, rel=0.15)


def test_efficiency_refused_when_the_counts_cannot_give_the_precision() -> None:
    with pytest.raises(CalibrationError, match="count longer"):
        run_dark_counts(rx_hardware(), max_efficiency_uncertainty=0.002)


def test_efficiency_with_the_encoding_at_power_on_is_refused_never_wrong() -> None:
    """The clumsy operator: the detector efficiency measured before the encoder is
    calibrated (bias at its power-on 0 V, 1.1 V from the optimum; drives of the datasheet
    V_pi, 3.0 V, on an encoder of 2.85 V). The states' light then splits unevenly between
    the two detectors of a basis: an efficiency from it is off by far more than its
    interval (with a link budget known to 0.05 dB). The procedure must refuse, not
    report it."""
    hw = tx_hardware(encoder_v_pi_v=2.85, encoder_bias_opt_v=1.1)
    link = SimLink(LinkParams(chunk_slots=CHUNK, start_calibrated=True, transmitter=hw))
    rx = link.params.receiver
    try:
        inst = link.connect()
        encoder = inst["encoder"]
        encoder.set_bias_v(0.0)
        for state, phase in zip(BB84State, STATE_PHASE, strict=True):
            encoder.set_drive_v(state, float(phase * 3.0))
        truth = link.tx.mu_per_class()
        src = link.params.source

        async def set_light(on: bool) -> None:
            inst["voa"].set_shutter(on)

        try:
            result = asyncio.run(
                measure_dark_counts_and_efficiency(
                    inst["detectors"],
                    set_light,
                    src.slot_rate_hz,
                    [(src.p_signal, truth[0]), (src.p_decoy, truth[1]), (src.p_vacuum, truth[2])],
                    DarkCountConfig(
                        reading_time_s=link.chunk_s,
                        readings=20,
                        rx_p_basis_z=rx.p_basis_z,
                        tx_p_basis_z=src.p_basis_z,
                    ),
                    mu_bounds=[(m * 0.999, m * 1.001) for m in truth],
                    channel_transmittance=link.params.fiber.transmittance,
                    channel_transmittance_uncertainty_db=0.05,
                    wait_integration=lambda: link.step(2),
                )
            )
        except CalibrationError as exc:
            assert "encoding" in str(exc)
            assert inst["voa"].shutter_open()  # refused before switching the light off
            return
    finally:
        link.close()
    for d, eff in zip(result.detectors, rx.detector_efficiency, strict=True):
        assert d.detector_efficiency_lower is not None
        assert d.detector_efficiency_upper is not None
        assert d.detector_efficiency_lower <= eff <= d.detector_efficiency_upper, (
            d.detector,
            d.detector_efficiency,
            eff,
        )


def test_poisson_bounds() -> None:
    conf = one_sided_confidence(3.0)
    assert conf == pytest.approx(0.99865, abs=1e-5)
    assert poisson_upper(0, conf) == pytest.approx(-math.log(1 - conf))
    assert poisson_lower(0, conf) == 0.0
    assert poisson_lower(100, conf) < 100 < poisson_upper(100, conf)
    assert poisson_upper(10_000, conf) == pytest.approx(10_000 + 3 * 100, rel=2e-3)
