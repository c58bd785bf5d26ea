"""The compiled tracking loop: precision after days of running, and one compile."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.interfaces import TAG_DTYPE
from qkdnode.jit import JIT
from qkdnode.procedures import track_kernel
from qkdnode.procedures.sync import ClockModel, SlotTracker, SyncConfig, slot_period_ps
from tests.numba_rerun import run_under_numba

RATE = 25e6


def _tags(start_slot: int, ppm: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    period = slot_period_ps(RATE)
    slots = start_slot + np.sort(rng.choice(50_000_000, n, replace=False))
    # integer part and fraction separately: float64 alone cannot hold 1e17 ps to 1 ps
    t = slots * 40_000 + np.rint(slots * (period - 40_000) + slots * period * ppm * 1e-6)
    tags = np.empty(n, TAG_DTYPE)
    tags["time_ps"] = t.astype(np.int64) + np.rint(rng.normal(0, 25, n)).astype(np.int64)
    tags["channel"] = rng.integers(1, 5, n)
    return tags


def test_tracking_keeps_picosecond_precision_after_a_day() -> None:
    """Slots past 2e12 (a day at 25 MHz): residuals are the 25 ps jitter, not rounding."""
    start = 2_160_000_000_000
    ppm = 3.0
    period = slot_period_ps(RATE)
    model = ClockModel(offset_ps=0.0, rate=1.0 + ppm * 1e-6)
    tracker = SlotTracker(model, RATE, 200.0, SyncConfig())
    mapped, status = tracker.update(_tags(start, ppm, 200_000, 1))
    assert status.locked and not status.lost
    assert status.in_window_fraction > 0.99
    assert mapped.slot_index.min() >= start
    assert abs(float(np.median(mapped.residual_ps))) < 5.0
    assert 15.0 < float(np.std(mapped.residual_ps)) < 40.0
    assert abs(tracker.model.rate - 1.0 - ppm * 1e-6) * period * 1e6 < 5.0  # < 5 ps per 1e6 slots


def test_warm_up_compiles_what_a_session_uses() -> None:
    if not run_under_numba(__file__, "test_warm_up_compiles_what_a_session_uses"):
        return
    track_kernel.warm_up()
    before = len(track_kernel._track.signatures)
    tracker = SlotTracker(ClockModel(0.0, 1.0), RATE, 200.0, SyncConfig())
    tracker.update(_tags(0, 0.0, 50_000, 2))
    tracker.update(_tags(0, 0.0, 0, 3))
    assert len(track_kernel._track.signatures) == before == 1


@pytest.mark.skipif(not JIT, reason="numba unavailable: nothing to compare")
def test_numpy_twin_tracks_like_the_compiled_loop() -> None:
    """The fallback for nodes without JIT (qkdnode.jit) gives the same model, slots,
    window decisions and per-segment figures."""
    tags = _tags(10_000_000, 2.0, 300_000, 4)
    times = tags["time_ps"].astype(np.int64)
    args = (np.int64(2_000_000_000), 1234.5, 1.0 + 1.9e-6, 40_000.0, 10_000.0, 100.0, 30)
    outs = []
    for run in (track_kernel._track, track_kernel._track_np):
        n_out = np.empty(times.shape[0], np.int64)
        r_out = np.empty(times.shape[0], np.float64)
        inw = np.empty(times.shape[0], np.bool_)
        seg, k, offset, rate = run(times, *args, 0.3, 0.05, n_out, r_out, inw)
        outs.append((seg[:k], offset, rate, n_out, r_out, inw))
    (s1, o1, q1, n1, r1, w1), (s2, o2, q2, n2, r2, w2) = outs
    assert s1.shape == s2.shape and s1.shape[0] > 50
    np.testing.assert_allclose(s1, s2, rtol=1e-9, atol=1e-6)
    assert o1 == pytest.approx(o2, abs=1e-6) and q1 == pytest.approx(q2, abs=1e-15)
    assert np.array_equal(n1, n2) and np.array_equal(w1, w2)
    np.testing.assert_allclose(r1, r2, atol=1e-6)
