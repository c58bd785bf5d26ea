"""Synchronization core on synthetic tags with known truth (no simulator)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdnode.procedures.sync import (
    AcquisitionError,
    ClockModel,
    SlotTracker,
    SyncConfig,
    acquire,
    check_pattern,
    estimate_slot_clock,
    map_tags_to_slots,
)
from qkdnode.procedures.synthetic import synthetic_tags

RATE = 25e6
PERIOD = 1e12 / RATE
DELAY = 12345.0


def true_model(offset_s: float, ppm: float) -> ClockModel:
    rate = 1 + ppm * 1e-6
    return ClockModel(offset_s * 1e12 + rate * DELAY, rate)


def assert_model_matches(model: ClockModel, truth: ClockModel, slots: np.ndarray) -> None:
    """The model predicts the detection time of every slot of the data within 1 % of a slot."""
    err = model.slot_rx_time_ps(slots, RATE) - truth.slot_rx_time_ps(slots, RATE)
    assert np.max(np.abs(err)) < 0.01 * PERIOD, np.max(np.abs(err))


@pytest.mark.parametrize(
    ("offset_s", "ppm"),
    [(0.3717, 12.5), (2.9, -100.0), (-1.3, 100.0), (0.0002, -0.001), (4.2, 64.0)],
)
def test_acquire_finds_offset_and_frequency(offset_s: float, ppm: float) -> None:
    start = 40_000_000
    tags = synthetic_tags(offset_s=offset_s, ppm=ppm, start_slot=start, seed=11, delay_ps=DELAY)
    res = acquire(tags["time_ps"], 7, RATE, SyncConfig())
    assert res.locked, res.message
    assert abs(res.ppm - ppm) < 1e-3
    assert_model_matches(res.model, true_model(offset_s, ppm), np.array([start, start + 1_250_000]))
    assert res.bright_fraction > 0.95


def test_mapping_gives_true_slots() -> None:
    start = 7_000_000
    tags = synthetic_tags(offset_s=1.1, ppm=-37.0, start_slot=start, seed=5, dark_rate_hz=0)
    res = acquire(tags["time_ps"], 7, RATE, SyncConfig())
    slots, channel, residual = map_tags_to_slots(tags, res.model, RATE, res.window_ps)
    assert slots.size == tags.size  # no dark counts: every tag is a detection
    expected = np.rint(((tags["time_ps"] - 1.1e12) / (1 - 37e-6) - DELAY) / PERIOD).astype(np.int64)
    np.testing.assert_array_equal(slots, expected)
    np.testing.assert_array_equal(channel, tags["channel"])
    assert np.std(residual) == pytest.approx(30.0, rel=0.1)


def test_wrong_seed_is_not_trusted() -> None:
    tags = synthetic_tags(seed=2)
    res = acquire(tags["time_ps"], 8, RATE, SyncConfig())  # transmitter used seed 7
    assert not res.locked


def test_no_light_raises() -> None:
    rng = np.random.default_rng(0)
    times = np.sort(rng.integers(0, 50_000_000_000, 20_000))
    with pytest.raises(AcquisitionError):
        estimate_slot_clock(times, RATE)


def test_gigahertz_slot_rate_with_offset_hint() -> None:
    rate = 1e9
    tags = synthetic_tags(
        slot_rate_hz=rate,
        offset_s=2.5,
        ppm=-80,
        duration_s=0.01,
        click_probability=0.003,
        start_slot=10**9,
        seed=3,
    )
    res = acquire(tags["time_ps"], 7, rate, SyncConfig(max_offset_s=0.01), offset_hint_ps=2.5e12)
    assert res.locked, res.message
    assert abs(res.ppm + 80) < 1e-3


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    offset_s=st.floats(-4.5, 4.5),
    ppm=st.floats(-100, 100),
    seed=st.integers(0, 2**31),
)
def test_acquire_property(offset_s: float, ppm: float, seed: int) -> None:
    start = int(5e6 + seed % 1_000_000)
    tags = synthetic_tags(offset_s=offset_s, ppm=ppm, start_slot=start, seed=seed, duration_s=0.03)
    res = acquire(tags["time_ps"], 7, RATE, SyncConfig())
    assert res.locked, res.message
    assert_model_matches(res.model, true_model(offset_s, ppm), np.array([start, start + 750_000]))


@pytest.mark.parametrize("max_offset_s", [5.0, 20e-6])
def test_acquire_first_tag_dark_count(max_offset_s: float) -> None:
    """Regression (found by test_acquire_property): the first tag is a dark count off the
    comb, so the first in-window tag is comb tooth 561; the slot index came out 2 * 561
    slots off while the pattern checks (made on shifted indices) still passed."""
    seed = 6652
    start = int(5e6 + seed % 1_000_000)
    tags = synthetic_tags(offset_s=0.0, ppm=0.0, start_slot=start, seed=seed, duration_s=0.03)
    res = acquire(tags["time_ps"], 7, RATE, SyncConfig(max_offset_s=max_offset_s))
    assert res.locked, res.message
    assert_model_matches(res.model, true_model(0.0, 0.0), np.array([start, start + 750_000]))
    assert res.bright_fraction > 0.95
    assert res.pattern_z >= SyncConfig().min_significance


def test_check_pattern_rejects_wrong_numbering() -> None:
    start = 5_006_652
    tags = synthetic_tags(offset_s=0.0, ppm=0.0, start_slot=start, seed=6652, duration_s=0.03)
    slots = np.rint((tags["time_ps"] - DELAY) / PERIOD).astype(np.int64)
    good = check_pattern(slots, 7)
    assert good.peak and good.z > 20 and good.bright_fraction > 0.99
    for shift in (1122, -1122, 256, 10**6):  # whole frames off: no correlation left
        wrong = check_pattern(slots + shift, 7)
        assert wrong.z < 8 and wrong.bright_fraction < 0.6, shift
    for shift in (1, -1, 5, -30, 128):  # part of a frame off: not at the peak
        assert not check_pattern(slots + shift, 7).peak, shift


def _blocks(tags: np.ndarray, n: int) -> list[np.ndarray]:
    return np.array_split(tags, n)


def test_tracker_follows_wander_and_stays_locked() -> None:
    start = 3_000_000
    acq = synthetic_tags(offset_s=0.5, ppm=40, start_slot=start, seed=1, duration_s=0.03)
    res = acquire(acq["time_ps"], 7, RATE, SyncConfig())
    # 2 s of key exchange with a strong frequency wander
    run = synthetic_tags(
        offset_s=0.5,
        ppm=40,
        start_slot=start,
        seed=1,
        duration_s=2.0,
        pattern_seed=None,
        click_probability=0.004,
        wander_ppm_per_sqrt_s=0.5,
    )
    tracker = SlotTracker(res.model, RATE, res.window_ps)
    for block in _blocks(run, 100):
        mapped, status = tracker.update(block)
        assert status.locked and not status.lost
        assert status.in_window_fraction > 0.95
    assert tracker.locked


def test_tracker_declares_loss_when_light_goes() -> None:
    acq = synthetic_tags(offset_s=0.5, ppm=40, seed=1, duration_s=0.03)
    res = acquire(acq["time_ps"], 7, RATE, SyncConfig())
    run = synthetic_tags(
        offset_s=0.5, ppm=40, seed=1, duration_s=0.1, pattern_seed=None, click_probability=0.004
    )
    tracker = SlotTracker(res.model, RATE, res.window_ps)
    tracker.update(run)
    assert tracker.locked
    # fiber cut: only dark counts on the receiver's clock from then on
    rng = np.random.default_rng(3)
    t_end = int(run["time_ps"][-1])
    dark = np.zeros(2000, dtype=run.dtype)
    dark["time_ps"] = np.sort(rng.integers(t_end, t_end + 20_000_000_000, 2000))
    _, status = tracker.update(dark)
    assert status.lost and not status.locked


def test_tracker_declares_loss_on_clock_jump() -> None:
    acq = synthetic_tags(offset_s=0.5, ppm=-10, seed=4, duration_s=0.03)
    res = acquire(acq["time_ps"], 7, RATE, SyncConfig())
    tracker = SlotTracker(res.model, RATE, res.window_ps)
    before = synthetic_tags(
        offset_s=0.5, ppm=-10, seed=4, duration_s=0.05, pattern_seed=None, click_probability=0.004
    )
    tracker.update(before)
    assert tracker.locked
    # the receiver clock jumps by a third of a slot (outside the capture of a good lock)
    after = synthetic_tags(
        offset_s=0.5 + PERIOD / 3 * 1e-12,
        ppm=-10,
        seed=5,
        duration_s=0.05,
        start_slot=int(0.05 * RATE),
        pattern_seed=None,
        click_probability=0.004,
    )
    _, status = tracker.update(after)
    assert status.lost
