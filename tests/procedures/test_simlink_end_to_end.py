"""Every procedure against the simulated link, true values hidden from the procedures.

The link powers on uncalibrated (laser off, modulator and encoder at 0 V, VOA at 60 dB,
detectors disarmed at 0 ps). The module fixture runs the calibration sequence the state
machine will run; each test checks one acceptance criterion against the simulator's
hidden truth (read here, in assertions only).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers.interfaces import DetectorStatus
from drivers.simlink.params import ClockParams, LinkParams, ReceiverParams
from qkdnode.procedures.bias_tracking import track_bias
from qkdnode.procedures.dark_counts import (
    DarkCountConfig,
    DarkCountResult,
    measure_dark_counts_and_efficiency,
)
from qkdnode.procedures.dark_rate import measure_dark_rate
from qkdnode.procedures.detector_timing import DetectorTimingResult, calibrate_detector_timing
from qkdnode.procedures.encoder_v_pi import (
    EncoderVPiConfig,
    EncoderVPiResult,
    StateErrors,
    calibrate_encoder_v_pi,
    count_state_errors,
)
from qkdnode.procedures.encoding_compensation import (
    EncodingCompensationConfig,
    EncodingCompensationResult,
    compensate_encoding,
    qber_from_detections,
)
from qkdnode.procedures.mean_photon_number import (
    MeanPhotonConfig,
    MeanPhotonResult,
    calibrate_mean_photon_number,
)
from qkdnode.procedures.modulator import BiasTracker, ModulatorResult, calibrate_modulator
from qkdnode.procedures.simharness import SimLink, drain
from qkdnode.procedures.sync import (
    SlotTracker,
    SyncConfig,
    SyncResult,
    acquire_lock,
)
from qkdnode.procedures.sync_model import _slot_residuals

SEED = 4242
CHUNK = 1 << 18  # 10.5 ms at 25 MHz: one detector integration period


@dataclass
class Calibrated:
    link: SimLink
    inst: dict[str, Any]
    modulator: ModulatorResult
    mu: MeanPhotonResult
    timing: DetectorTimingResult
    dark: DarkCountResult
    sync: SyncResult
    tracker: SlotTracker
    v_pi: EncoderVPiResult
    encoding: EncodingCompensationResult
    published: list[tuple[str, dict[str, Any]]]
    state_dir: Path


def make_measure_qber(link: SimLink, inst: dict[str, Any], tracker: SlotTracker) -> Any:
    """What the orchestration supplies: the error rate of the next 50 ms of key exchange,
    from the receiver's mapped detections and the transmitter's prepared states."""

    async def measure_qber() -> float:
        drain(inst["tagger"])
        link.advance(0.05)
        mapped, status = tracker.update(drain(inst["tagger"]))
        assert status.locked
        prepared = inst["source"].prepared(mapped.slot_index)
        return qber_from_detections(mapped.channel, prepared.basis, prepared.bit).qber

    return measure_qber


def make_measure_state_errors(link: SimLink, inst: dict[str, Any], tracker: SlotTracker) -> Any:
    """Errors per prepared state of the next 20 ms of detections (a disclosed probe)."""

    async def measure() -> StateErrors:
        drain(inst["tagger"])
        link.advance(0.02)
        mapped, status = tracker.update(drain(inst["tagger"]))
        assert status.locked
        prepared = inst["source"].prepared(mapped.slot_index)
        return count_state_errors(mapped.channel, prepared.basis, prepared.bit)

    return measure


async def run_sequence(link: SimLink, inst: dict[str, Any], state_dir: Path) -> Calibrated:
    published: list[tuple[str, dict[str, Any]]] = []

    def publish(topic: str, payload: dict[str, Any]) -> None:
        published.append((topic, payload))

    src = link.params.source
    inst["laser"].set_emission(True)
    while inst["laser"].status() != 2:  # LaserStatus.LOCKED after the warm-up
        await asyncio.sleep(0.05)
    modulator = await calibrate_modulator(
        inst["im"], inst["meter"], voa=inst["voa"], state_dir=state_dir, publish=publish
    )
    mu = await calibrate_mean_photon_number(
        inst["laser"],
        inst["im"],
        inst["voa"],
        inst["meter"],
        modulator,
        mu_signal=src.mu_signal,
        mu_decoy=src.mu_decoy,
        slot_rate_hz=src.slot_rate_hz,
        # commissioning value of the box (tap to output): the simulated box's true loss
        cfg=MeanPhotonConfig(tap_to_output_db=link.params.transmitter.tap_to_output_db),
        state_dir=state_dir,
        publish=publish,
    )
    inst["encoder"].set_output(True)
    timing = await calibrate_detector_timing(
        inst["detectors"],
        src.slot_rate_hz,
        wait_integration=lambda: link.step(1),
        state_dir=state_dir,
        publish=publish,
    )

    # the receiver's dark-count rates, light off (what the node measures at calibration)
    inst["voa"].set_shutter(False)
    link.step(2)
    await measure_dark_rate(
        inst["detectors"],
        integration_s=link.chunk_s,
        readings=5,
        wait_integration=lambda: link.step(2),
        state_dir=state_dir,
        publish=publish,
    )
    inst["voa"].set_shutter(True)
    # synchronization: the transmitter switches to the pattern, the receiver locks
    inst["source"].set_sync_pattern(SEED)
    link.step(1)
    inst["tagger"].start_stream()
    link.advance(0.1)
    sync, tracker = await acquire_lock(
        inst["tagger"],
        SEED,
        src.slot_rate_hz,
        SyncConfig(confirm_blocks=0),
        publish=publish,
        state_dir=state_dir,
    )
    inst["source"].set_sync_pattern(None)
    v_pi = await calibrate_encoder_v_pi(
        inst["encoder"],
        make_measure_state_errors(link, inst, tracker),
        EncoderVPiConfig(v_pi_guess_v=3.0),  # the datasheet value
        state_dir=state_dir,
        publish=publish,
    )
    encoding = await compensate_encoding(
        inst["encoder"],
        make_measure_qber(link, inst, tracker),
        None,
        EncodingCompensationConfig(v_pi_v=v_pi.bias_v_pi_v),
        state_dir=state_dir,
        publish=publish,
    )

    # the efficiencies rest on states where they belong: measured once the encoding is
    # compensated (the tagger keeps streaming meanwhile; the tests drain it first)
    async def set_light(on: bool) -> None:
        inst["voa"].set_shutter(on)

    dark = await measure_dark_counts_and_efficiency(
        inst["detectors"],
        set_light,
        src.slot_rate_hz,
        [
            (src.p_signal, mu.mu_signal),
            (src.p_decoy, mu.mu_decoy),
            (src.p_vacuum, mu.vacuum.mu_or_upper),
        ],
        DarkCountConfig(
            reading_time_s=link.chunk_s,  # a simulated reading counts over the last chunk
            rx_p_basis_z=link.params.receiver.p_basis_z,
            tx_p_basis_z=src.p_basis_z,
        ),
        mu_bounds=mu.bounds(),
        channel_transmittance=link.params.fiber.transmittance,  # link budget (known)
        encoding_qber=encoding.final_qber,  # measured with the encoding compensated
        wait_integration=lambda: link.step(4),
        state_dir=state_dir,
        publish=publish,
    )
    # one step of the bias tracking the node runs while key flows
    bias_tracker = BiasTracker(
        inst["im"], inst["meter"], modulator, (src.p_signal, src.p_decoy, src.p_vacuum)
    )
    await track_bias(
        bias_tracker,
        mu,
        (src.p_signal, src.p_decoy, src.p_vacuum),
        allowance=0.05,
        remeasure_at=0.5,
        history=[],
        started_at=time.monotonic(),
        state_dir=state_dir,
        publish=publish,
    )
    return Calibrated(
        link,
        inst,
        modulator,
        mu,
        timing,
        dark,
        sync,
        tracker,
        v_pi,
        encoding,
        published,
        state_dir,
    )


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Calibrated]:
    link = SimLink(LinkParams(chunk_slots=CHUNK, start_calibrated=False))
    state_dir = tmp_path_factory.mktemp("state")
    inst = link.connect()
    yield asyncio.run(run_sequence(link, inst, state_dir))
    link.close()


def test_modulator_half_wave_voltage_and_bias(calibrated: Calibrated) -> None:
    hw = calibrated.link.params.transmitter
    m = calibrated.modulator
    assert m.bias_fit.v_pi_v == pytest.approx(hw.im_v_pi_v, rel=0.02)
    assert m.drive_fit.v_pi_v == pytest.approx(hw.im_v_pi_v, rel=0.02)
    assert m.bias_set_v == pytest.approx(hw.im_bias_opt_v, rel=0.02)
    assert m.extinction_db == pytest.approx(hw.im_extinction_db, abs=3)


def test_mean_photon_numbers_on_target(calibrated: Calibrated) -> None:
    true_mu = calibrated.link.tx.mu_per_class()  # hidden truth
    src = calibrated.link.params.source
    assert calibrated.mu.ok
    assert true_mu[0] == pytest.approx(src.mu_signal, rel=0.05)
    assert true_mu[1] == pytest.approx(src.mu_decoy, rel=0.05)
    assert true_mu[2] < 0.01 * src.mu_decoy
    for truth, measured in zip(true_mu, calibrated.mu.bounds(), strict=True):
        assert measured[0] <= truth <= measured[1]


def test_detector_delay_within_one_jitter(calibrated: Calibrated) -> None:
    rx = calibrated.link.params.receiver
    assert calibrated.timing.ok
    for det in calibrated.inst["detectors"]:
        assert det.delay_ps() == pytest.approx(rx.true_delay_ps, abs=rx.jitter_ps)
        assert det.status() == DetectorStatus.ARMED


def test_detector_efficiency(calibrated: Calibrated) -> None:
    rx = calibrated.link.params.receiver
    for d, true_eff in zip(calibrated.dark.detectors, rx.detector_efficiency, strict=True):
        assert d.detector_efficiency == pytest.approx(true_eff, rel=0.1)
        assert d.detector_efficiency_lower is not None and d.detector_efficiency_upper is not None
        assert d.detector_efficiency_lower <= true_eff <= d.detector_efficiency_upper
        # dark counts: gated rate = free-running rate * gate width * slot rate (~2.5 Hz),
        # too few counts in 50 ms for a value: an upper bound only
        assert d.dark_rate_hz is None
        assert 2.5 <= d.dark_rate_upper_hz < 1000


def test_sync_locked_on_true_slots(calibrated: Calibrated) -> None:
    assert calibrated.sync.locked
    # the truth at power-on, moved since by the clock's random-walk wander
    clock = calibrated.link.params.clock
    elapsed_s = calibrated.link.rx.chunk_index * calibrated.link.chunk_s
    wander_ppm = 4 * clock.wander_ppm_per_sqrt_s * elapsed_s**0.5
    assert calibrated.sync.ppm == pytest.approx(clock.frequency_offset_ppm, abs=0.05 + wander_ppm)


def test_encoder_v_pi_and_bias_from_power_on(calibrated: Calibrated) -> None:
    truth = calibrated.link.params.transmitter.encoder_v_pi_v
    v_pi = calibrated.v_pi
    assert v_pi.v_pi_lower_v <= truth <= v_pi.v_pi_upper_v
    assert v_pi.v_pi_upper_v - v_pi.v_pi_lower_v < 0.02 * truth
    # power-on bias (0 V) far from the optimum: a large error rate for H in the sweep
    i0 = int(np.argmin(np.abs(np.asarray(v_pi.sweep_bias_v))))
    assert v_pi.sweep_errors[i0][0] / v_pi.sweep_sifted[i0][0] > 0.05
    enc = calibrated.encoding
    assert enc.initial_qber < 0.02  # the V_pi step left the bias at the optimum
    assert enc.final_qber < 0.02


#: each procedure and the instruments it used (config names of the simulated link)
USED = {
    "modulator": {"im", "meter", "voa"},
    "mean_photon_number": {"laser", "im", "voa", "meter"},
    "detector_timing": {"spd0", "spd1", "spd2", "spd3"},
    "dark_counts": {"spd0", "spd1", "spd2", "spd3"},
    "dark_rate": {"spd0", "spd1", "spd2", "spd3"},
    "bias_tracking": {"im", "meter"},
    "sync": {"tagger"},
    "encoder_v_pi": {"encoder"},
    "encoding_compensation": {"encoder"},
}


def test_results_saved_and_published(calibrated: Calibrated) -> None:
    """Every procedure (sync included) saves JSON and PNG and publishes; each JSON holds
    the snapshot of the instruments it used: their identity as the instrument gives it
    and the settings the procedure left them at, read back from the instrument here."""
    topics = {t for t, _ in calibrated.published}
    for name, used in USED.items():
        assert f"calibration.{name}" in topics
        saved = json.loads((calibrated.state_dir / "calibration" / f"{name}.json").read_text())
        png = calibrated.state_dir / "calibration" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        snaps = {s["name"]: s for s in saved["instruments"]}
        assert set(snaps) == used, name
        for snap in snaps.values():
            assert snap["identity"] and not snap["identity"].startswith("unavailable")
    assert "sync.acquired" in topics
    inst = calibrated.inst
    # the settings recorded are the instruments' own (asked of them now: nothing moved)
    mod = {
        s["name"]: s
        for s in json.loads((calibrated.state_dir / "calibration" / "modulator.json").read_text())[
            "instruments"
        ]
    }
    im = {x["name"]: x["value"] for x in mod["im"]["settings"]}
    assert im["bias_v"] == pytest.approx(calibrated.modulator.bias_set_v)
    assert mod["im"]["identity"] == inst["im"].identify()
    mu = {
        s["name"]: s
        for s in json.loads(
            (calibrated.state_dir / "calibration" / "mean_photon_number.json").read_text()
        )["instruments"]
    }
    voa = {x["name"]: x["value"] for x in mu["voa"]["settings"]}
    assert voa["attenuation_db"] == pytest.approx(inst["voa"].attenuation_db())
    assert voa["shutter_open"] is True
    timing = {
        s["name"]: s
        for s in json.loads(
            (calibrated.state_dir / "calibration" / "detector_timing.json").read_text()
        )["instruments"]
    }
    for det in inst["detectors"]:
        got = {x["name"]: x["value"] for x in timing[det.name]["settings"]}
        assert got["delay_ps"] == pytest.approx(det.delay_ps())


def test_encoding_drift_compensated_during_key_exchange(calibrated: Calibrated) -> None:
    link, inst = calibrated.link, calibrated.inst
    measure = make_measure_qber(link, inst, calibrated.tracker)

    async def scenario() -> tuple[float, float, EncodingCompensationResult, float]:
        before = np.mean([await measure() for _ in range(3)])
        link.tx.inject("encoding_drift", angle_rad=0.35)
        drifted = await measure()
        t0 = time.monotonic()
        res = await compensate_encoding(
            inst["encoder"],
            measure,
            float(before),
            EncodingCompensationConfig(v_pi_v=calibrated.v_pi.bias_v_pi_v),
        )
        assert time.monotonic() - t0 < 10
        after = np.mean([await measure() for _ in range(3)])
        return float(before), drifted, res, float(after)

    try:
        before, drifted, res, after = asyncio.run(scenario())
    finally:
        link.tx.clear("encoding_drift")
    assert drifted > before + 0.05
    assert abs(after - before) < 0.005
    assert len(res.samples) <= 6  # a handful of blocks, key exchange never stopped


def test_tracking_long_run_never_loses_a_block(calibrated: Calibrated) -> None:
    link, inst, tracker = calibrated.link, calibrated.inst, calibrated.tracker
    drain(inst["tagger"])
    link.record_truth = True
    wrong = 0
    total = 0
    try:
        for _ in range(40):  # 40 blocks of 0.1 s
            link.truth_time.clear()
            link.truth_slot.clear()
            link.advance(0.1)
            tags = drain(inst["tagger"])
            mapped, status = tracker.update(tags)
            assert status.locked and not status.lost
            assert status.in_window_fraction > 0.95
            t_true, s_true = link.truth()
            n, res = _slot_residuals(t_true, tracker.model, 1e12 / link.slot_rate_hz)
            inw = np.abs(res) <= tracker.window_ps / 2
            wrong += int(np.sum(n[inw] != s_true[inw]))
            total += int(inw.sum())
    finally:
        link.record_truth = False
    assert total > 1_000_000
    assert wrong == 0


@pytest.mark.parametrize(
    ("offset_s", "ppm"),
    [(0.0, 0.0), (2.75, 100.0), (-1.9, -100.0), (4.5, -63.0), (0.37, 12.5), (-3.3, 99.0)],
)
def test_sync_locks_across_offsets_and_ppm(offset_s: float, ppm: float) -> None:
    params = LinkParams(
        chunk_slots=CHUNK,
        start_calibrated=True,
        receiver_seed=int(abs(offset_s) * 1000 + abs(ppm)),
        clock=ClockParams(offset_s=offset_s, frequency_offset_ppm=ppm),
        receiver=ReceiverParams(spread_scale=0.0),  # this clock exactly, no drawn spread
    )
    link = SimLink(params)
    try:
        inst = link.connect()
        link.advance(0.3)  # the transmitter has been running a while
        inst["source"].set_sync_pattern(99)
        link.step(1)
        inst["tagger"].start_stream()
        link.record_truth = True
        link.advance(0.08)
        sync, tracker = asyncio.run(
            acquire_lock(
                inst["tagger"], 99, params.source.slot_rate_hz, SyncConfig(confirm_blocks=0)
            )
        )
        assert sync.locked, sync.message
        assert sync.ppm == pytest.approx(ppm, abs=0.05)
        # tags acquisition left in the queue go through the tracker, as in operation
        _, status = tracker.update(drain(inst["tagger"]))
        assert status.locked
        # every detection of the last chunk maps to its true slot
        t_true = link.truth_time[-1]
        s_true = link.truth_slot[-1]
        n, res = _slot_residuals(t_true, tracker.model, 1e12 / params.source.slot_rate_hz)
        inw = np.abs(res) <= tracker.window_ps / 2
        assert inw.mean() > 0.99
        np.testing.assert_array_equal(n[inw], s_true[inw])
    finally:
        link.close()


def test_drift_tracking_lock_in_restores_the_error_rate(calibrated: Calibrated) -> None:
    """The lock-in of qkdnode.tracking against the simulated link: a step of the
    polarisation reference (0.12 rad: the error rate rises by about 1.4 %) is tracked back
    to the pre-drift rate by small dithered windows alone, with the windows' detections
    taken from slots chosen before their states were prepared."""
    from qkdnode.config.sections import TrackingSection
    from qkdnode.tracking import TrackingWindow, lock_in_step

    link, inst, tracker = calibrated.link, calibrated.inst, calibrated.tracker
    measure = make_measure_qber(link, inst, calibrated.tracker)
    seen: list[TrackingWindow] = []

    async def window(w: TrackingWindow) -> tuple[Any, Any]:
        seen.append(w)
        drain(inst["tagger"])  # detections before the window are not ours to disclose
        while inst["source"].next_slot() <= w.stop_slot:
            link.step(1)
        mapped, status = tracker.update(drain(inst["tagger"]))
        assert status.locked
        inside = (mapped.slot_index >= w.start_slot) & (mapped.slot_index < w.stop_slot)
        return mapped.slot_index[inside], mapped.channel[inside]

    async def track(n: int) -> int:
        steps = 0
        for _ in range(n):
            step = await lock_in_step(
                inst["encoder"],
                inst["source"],
                window,
                TrackingSection(window_detections=20_000),
                v_pi_v=calibrated.v_pi.bias_v_pi_v,
                amplitude=calibrated.v_pi.fit.amp,
                detections_per_slot=0.02,
            )
            steps += step is not None
        return steps

    async def scenario() -> tuple[float, float, float, int]:
        # Whatever the earlier tests left (a bias set for a drift now gone): capture first.
        await track(12)
        before = float(np.mean([await measure() for _ in range(3)]))
        link.tx.inject("encoding_drift", angle_rad=0.12)
        drifted = float(np.mean([await measure() for _ in range(3)]))
        steps = await track(12)
        after = float(np.mean([await measure() for _ in range(3)]))
        return before, drifted, after, steps

    try:
        before, drifted, after, steps = asyncio.run(scenario())
    finally:
        link.tx.clear("encoding_drift")
    assert drifted > before + 0.01
    assert steps >= 10
    assert after < before + 0.002, (before, drifted, after)
    assert before < 0.02
    assert all(w.start_slot < w.stop_slot for w in seen) and len(seen) == 48
