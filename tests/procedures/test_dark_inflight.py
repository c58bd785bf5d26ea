"""The dark count rate from the vacuum decoy class, against the simulator's truth: the
whole link simulated (light on, every class sent), the transmitter's prepared classes
read for each detection's slot, and the estimate's interval compared with the dark
rate the simulated detectors really had in their gates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drivers.interfaces import IntensityClass
from drivers.simlink.params import LinkParams, ReceiverDriftParams, ReceiverParams
from qkdnode.procedures.common import CalibrationError, save_result
from qkdnode.procedures.dark_inflight import (
    DarkInflightResult,
    DarkTracker,
    LeakRatio,
    VacuumCounts,
    dark_rose,
    estimate_inflight_dark,
    plot_dark_inflight,
)
from qkdnode.procedures.simharness import SimLink

CHUNK = 1 << 18
SLOT_RATE_HZ = 25e6


def _link(seed: int, dark_hz: float, **drift: float) -> SimLink:
    return SimLink(
        LinkParams(
            transmitter_seed=seed,
            receiver_seed=1000 + seed,
            chunk_slots=CHUNK,
            start_calibrated=True,
            receiver=ReceiverParams(
                hardware_seed=seed,
                dark_count_rates_hz=dark_hz,
                drift=ReceiverDriftParams(**drift),
            ),
        )
    )


def _block(link: SimLink, chunks: int, block_id: int, t_s: float) -> tuple[VacuumCounts, float]:
    """``chunks`` batches as one block: the classes of the detections' slots and the
    class counts of every slot sent (exact here); and the true dark rate (Hz, in gates)."""
    link.truth_time.clear()
    link.truth_slot.clear()
    first = link.tx.chunk_index * CHUNK
    link.record_truth = True
    link.step(chunks)
    _, slots = link.truth()
    slots = np.unique(slots)  # a slot with two clicks is one detection, as sifting has it
    sent = link.tx.prepared(np.arange(first, first + chunks * CHUNK, dtype=np.int64)).intensity
    det = link.tx.prepared(slots).intensity
    counts = VacuumCounts(
        block_id=block_id,
        finished_unix_s=t_s,
        vacuum_slots=float(np.sum(sent == IntensityClass.VACUUM)),
        vacuum_detections=int(np.sum(det == IntensityClass.VACUUM)),
        signal_slots=float(np.sum(sent == IntensityClass.SIGNAL)),
        signal_detections=int(np.sum(det == IntensityClass.SIGNAL)),
    )
    return counts, link.rx.dark_rate_in_gates_hz(SLOT_RATE_HZ)


def _ratio(link: SimLink, rel: float = 0.1) -> LeakRatio:
    """mu3 / mu_s of the simulated modulator, within +/- ``rel``: what a calibration
    states (its own accuracy is tested with the intensity calibration)."""
    mu_s, _, mu_v = link.tx.mu_per_class()
    r = mu_v / mu_s
    return LeakRatio(lower=r * (1 - rel), point=r, upper=r * (1 + rel))


def _coverage(seeds: range) -> None:
    """Dark counts about as frequent as the vacuum class's light (the simulator's
    leakage is about 1.7e-5 per slot at 25 km): both parts of the vacuum clicks matter."""
    covered, widths = 0, []
    for seed in seeds:
        link = _link(seed, dark_hz=2000.0)
        try:
            counts, truth_hz = _block(link, 60, 0, 0.0)
            point = estimate_inflight_dark(
                [counts], _ratio(link), gate_rate_hz=SLOT_RATE_HZ, min_counts=40
            )
        finally:
            link.close()
        assert point.lower_hz <= point.rate_hz <= point.upper_hz
        assert point.leak_lower <= point.leak <= point.leak_upper
        covered += point.lower_hz <= truth_hz <= point.upper_hz
        widths.append((point.upper_hz - point.lower_hz) / truth_hz)
    assert covered == len(seeds)
    assert max(widths) < 4.0  # an interval, not a shrug


def test_interval_covers_the_true_dark_rate() -> None:
    _coverage(range(3))


@pytest.mark.system
def test_interval_covers_the_true_dark_rate_across_seeds() -> None:
    _coverage(range(3, 40))


def test_refuses_below_the_minimum_count() -> None:
    link = _link(3, dark_hz=100.0)
    try:
        counts, _ = _block(link, 1, 0, 0.0)
    finally:
        link.close()
    assert counts.vacuum_detections < 100
    with pytest.raises(CalibrationError, match="fewer than the 100"):
        estimate_inflight_dark([counts], LeakRatio(lower=0, point=0, upper=0), gate_rate_hz=25e6)
    with pytest.raises(CalibrationError, match="0 blocks"):
        DarkTracker(window_s=10, min_counts=1, gate_rate_hz=25e6).estimate(
            LeakRatio(lower=0, point=0, upper=0)
        )


def test_tracker_follows_a_drift_and_the_rise_is_seen(tmp_path: Path) -> None:
    """The simulator's detectors warm up (dark rates x100, time constant 0.5 s of simulated
    time): the tracker's window of the last blocks follows, its lower bound leaves the
    light-off interval by more than the alarm factor, and the result file and plot are
    written."""
    link = _link(5, dark_hz=200.0, dark_rate_factor=100.0, dark_rate_time_constant_s=0.5)
    tracker = DarkTracker(window_s=0.8, min_counts=50, gate_rate_hz=SLOT_RATE_HZ)
    chunk_s = CHUNK / SLOT_RATE_HZ
    try:
        base = link.rx.dark_rate_in_gates_hz(SLOT_RATE_HZ)  # before the rise
        truths = []
        t = 0.0
        for b in range(10):
            counts, truth = _block(link, 20, b, t)  # 0.21 s per block
            t += 20 * chunk_s
            truths.append(truth)
            tracker.add(counts)
        ratio = _ratio(link)
        last = tracker.estimate(ratio, now_unix_s=t)
    finally:
        link.close()
    # light-off at power-on: 4 x 200 Hz x 1 ns x 25 MHz = 20 Hz (the drawn truths spread)
    assert 10.0 < base < 40.0 and truths[-1] > 60 * base
    # the window holds the last blocks (late in the rise), the estimate covers their
    # mean truth
    assert 2 <= last.blocks <= 4
    truth_window = float(np.mean(truths[-last.blocks :]))
    assert last.lower_hz <= truth_window <= last.upper_hz
    assert dark_rose(last.lower_hz, calibrated_upper_hz=1.5 * base, factor=3.0)
    assert not dark_rose(last.lower_hz, calibrated_upper_hz=None, factor=3.0)
    result = DarkInflightResult(
        confidence=tracker.confidence,
        gate_rate_hz=SLOT_RATE_HZ,
        acceptance_window_ps=1000.0,  # every detection of the truth (no window here)
        gate_width_ps=1000.0,
        window_s=0.8,
        min_counts=50,
        leak_ratio=ratio,
        latest=last,
        history=list(tracker.history),
        calibrated_rate_hz=20.0,
        calibrated_lower_hz=12.0,
        calibrated_upper_hz=30.0,
        rise_factor=3.0,
        risen=True,
    )
    path = save_result(result, tmp_path, plot_dark_inflight)
    assert path.name == "dark_inflight.json"
    assert (tmp_path / "calibration" / "dark_inflight.png").stat().st_size > 10_000
