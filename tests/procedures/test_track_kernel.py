"""The compiled tracking loop: precision after days of running, and one compile."""

from __future__ import annotations

import numpy as np

from drivers.interfaces import TAG_DTYPE
from qkdnode.procedures import track_kernel
from qkdnode.procedures.sync import ClockModel, SlotTracker, SyncConfig, slot_period_ps

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
    track_kernel.warm_up()
    before = len(track_kernel._track.signatures)
    tracker = SlotTracker(ClockModel(0.0, 1.0), RATE, 200.0, SyncConfig())
    tracker.update(_tags(0, 0.0, 50_000, 2))
    tracker.update(_tags(0, 0.0, 0, 3))
    assert len(track_kernel._track.signatures) == before == 1
