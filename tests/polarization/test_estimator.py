"""The receiver's polarisation estimate and controller step, on windows drawn from the
exact detection probabilities (no photons: fast and exact where it matters)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from drivers.poincare import (
    retarder_rotation,
    rotation_about,
    rotation_angle_rad,
    rotation_matrix,
    stokes_of_angle,
)
from qkdnode.polarization import (
    CompensationSettings,
    PolarizationError,
    WindowCounts,
    compensation_step,
    estimate_fiber_rotation,
    measured_block,
    next_retardances,
    rotation_candidates,
    solve_retardances,
)

AXES = (0.0, 45.0, 0.0, 45.0)
LIMITS = (-4 * math.pi, 4 * math.pi)
D = np.diag([1.0, 1.0, -1.0])
STATES = [stokes_of_angle(a) for a in (0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4)]


def draw_window(
    total: np.ndarray, visibility: float, n: int, rng: np.random.Generator | None
) -> WindowCounts:
    """Counts of ``n`` detections (prepared Z 80 %, receiver Z 80 %) through the rotation
    ``total``; ``rng`` None: the expected counts (rounded)."""
    counts = np.zeros((4, 4), np.int64)
    p_state = (0.4, 0.4, 0.1, 0.1)
    for k, s in enumerate(STATES):
        t = visibility * (total @ s)
        probs = np.array(
            [0.8 * (1 + t[0]) / 2, 0.8 * (1 - t[0]) / 2, 0.2 * (1 + t[1]) / 2, 0.2 * (1 - t[1]) / 2]
        )
        nk = n * p_state[k]
        counts[k] = np.round(nk * probs) if rng is None else rng.multinomial(int(nk), probs)
    return WindowCounts(counts)


def test_window_counts_from_detections_and_qber() -> None:
    channels = np.array([0, 1, 2, 3, 0, 3, 1])
    basis = np.array([0, 0, 1, 1, 0, 1, 0])
    bit = np.array([0, 0, 0, 1, 1, 0, 1])
    mask = np.array([True, True, True, True, True, True, False])
    w = WindowCounts.from_detections(channels, basis, bit, mask)
    assert w.detections == 6
    assert w.counts[0].tolist() == [1, 1, 0, 0]  # prepared H: one right, one wrong
    assert w.counts[1].tolist() == [1, 0, 0, 0]  # prepared V seen as H: an error
    qz, qx = w.qber()
    assert qz == pytest.approx(2 / 3) and qx == pytest.approx(1 / 3)
    with pytest.raises(PolarizationError):
        WindowCounts(np.zeros((3, 4), np.int64))
    with pytest.raises(PolarizationError):
        WindowCounts(-np.ones((4, 4), np.int64))


def test_the_block_and_its_two_rotations_are_exact_for_exact_counts() -> None:
    """Any rotation: the expected counts give ``v E[:2, :2]``; the candidates are ``E``
    and ``D E D`` (which no Z/X measurement can tell apart)."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        e = rotation_matrix(rng.normal(size=3) * 1.2)
        v = rng.uniform(0.9, 0.99)
        block, fewest = measured_block(draw_window(e, v, 10**9, None))
        assert fewest > 10**7
        assert np.allclose(block, v * e[:2, :2], atol=1e-6)
        v_est, a, b = rotation_candidates(block)
        assert v_est == pytest.approx(v, abs=1e-6)
        found = [np.allclose(c, e, atol=1e-4) for c in (a, b)]
        mirrored = [np.allclose(c, D @ e @ D, atol=1e-4) for c in (a, b)]
        assert sorted(found) == [False, True] or np.allclose(e, D @ e @ D, atol=1e-4)
        assert any(mirrored)


@pytest.mark.parametrize("scale", [0.05, 1.5])
def test_two_dithered_windows_give_the_fiber_not_its_mirror_image(scale: float) -> None:
    """From two windows of 25 000 detections, the controller dithered by 0.15 rad about
    its last two retarders' axes, the fiber's rotation is found to a few hundredths of a
    radian, near the controller's target (scale 0.05: the error rate is quadratic there)
    as after a jump (scale 1.5), never the mirror image (off by up to pi)."""
    rng = np.random.default_rng(7)
    errors, visibility = [], []
    for _ in range(100):
        fiber = rotation_matrix(rng.normal(size=3) * scale)
        now = rng.uniform(-2.0, 2.0, size=4)
        controller = retarder_rotation(AXES, now)
        fiber = controller.T @ fiber  # the controller's target is near: C F = small
        windows = []
        for which in (-1, -2):
            dithered = now.copy()
            dithered[which] += 0.15
            c = retarder_rotation(AXES, dithered)
            windows.append((draw_window(c @ fiber, 0.98, 25_000, rng), c))
        est = estimate_fiber_rotation(windows, controller)
        errors.append(rotation_angle_rad(est.fiber @ fiber.T))
        visibility.append(est.visibility)
        mirror = rotation_angle_rad(controller.T @ D @ controller @ fiber @ D @ fiber.T)
        assert errors[-1] < 0.3 and (mirror < 0.6 or errors[-1] < mirror / 2)
    # near the target the error rates are quadratic in the rotation: a few hundredths
    # there cost about (0.05 / 2)**2, 0.06 % of error rate
    assert np.median(errors) < 0.06 and np.percentile(errors, 90) < 0.13, np.median(errors)
    assert np.median(visibility) == pytest.approx(0.98, abs=0.005)


def test_continuity_marks_drift_and_a_jump_is_not_continuous() -> None:
    rng = np.random.default_rng(3)
    fiber = rotation_matrix([0.3, -0.2, 0.5])
    windows = []
    for which in (-1, -2):
        dithered = np.zeros(4)
        dithered[which] = 0.15
        c = retarder_rotation(AXES, dithered)
        windows.append((draw_window(c @ fiber, 0.98, 25_000, rng), c))
    near = rotation_matrix([0.01, 0.0, 0.0]) @ fiber
    far = rotation_matrix([1.0, 0.5, 0.0]) @ fiber
    assert estimate_fiber_rotation(windows, np.eye(3), previous=near).continuous
    est = estimate_fiber_rotation(windows, np.eye(3), previous=far)
    assert not est.continuous  # the fiber moved: a jump, found all the same
    assert rotation_angle_rad(est.fiber @ fiber.T) < 0.15


def test_a_thin_or_dark_window_is_refused() -> None:
    one = np.eye(3)
    thin = draw_window(one, 0.98, 300, None)
    with pytest.raises(PolarizationError, match="fewer than"):
        estimate_fiber_rotation([(thin, one), (thin, one)], one)
    dark = WindowCounts(np.full((4, 4), 1000, np.int64))  # no correlation at all
    with pytest.raises(PolarizationError, match="no correlation"):
        estimate_fiber_rotation([(dark, one), (dark, one)], one)


def test_solve_retardances_reaches_every_rotation_nearest_the_present_setting() -> None:
    rng = np.random.default_rng(11)
    for axes in (AXES, AXES[:3]):
        for _ in range(100):
            target = rotation_matrix(rng.normal(size=3) * 2.0)
            now = tuple(rng.uniform(-6.0, 6.0, size=len(axes)))
            values = solve_retardances(target, axes, now, LIMITS)
            assert np.allclose(retarder_rotation(axes, values), target, atol=1e-9)
            assert all(LIMITS[0] <= v <= LIMITS[1] for v in values)
            # each moved by at most half a turn from where it was (the nearest equivalent)
            assert all(abs(v - w) <= math.pi + 1e-9 for v, w in zip(values, now, strict=True))
    # the present setting asked again: nothing moves
    now = (0.3, -1.2, 2.0, 0.5)
    assert np.allclose(solve_retardances(retarder_rotation(AXES, now), AXES, now, LIMITS), now)
    with pytest.raises(PolarizationError, match="layout"):
        solve_retardances(np.eye(3), (0.0, 22.5, 0.0), (0.0,) * 3, LIMITS)
    with pytest.raises(PolarizationError, match="range"):
        solve_retardances(rotation_about([1, 0, 0], 2.0), AXES, (0.0,) * 4, (-0.5, 0.5))


def test_the_step_closes_the_gap_by_its_gain() -> None:
    fiber = rotation_matrix([0.4, -0.7, 0.2])
    now = (0.1, 0.2, 0.3, 0.4)
    before = rotation_angle_rad(retarder_rotation(AXES, now) @ fiber)
    for gain in (0.5, 0.7, 1.0):
        new = next_retardances(now, fiber, AXES, LIMITS, gain)
        after = rotation_angle_rad(retarder_rotation(AXES, new) @ fiber)
        assert after == pytest.approx((1 - gain) * before, abs=1e-9)
    with pytest.raises(PolarizationError, match="gain"):
        next_retardances(now, fiber, AXES, LIMITS, 1.5)


def test_a_failed_window_leaves_the_controller_where_it_was() -> None:
    from qkdnode.procedures.simharness import SimLink
    from tests.simlink.helpers import link

    simlink = SimLink(link(chunk_slots=1 << 12))
    try:
        ctl = simlink.connect()["polarization"]
        ctl.set_retardances_rad((0.1, 0.2, 0.3, 0.4))
        calls = []

        async def failing_window() -> WindowCounts:
            calls.append(ctl.retardances_rad())
            if len(calls) == 2:
                raise TimeoutError("the peer did not answer")
            return draw_window(np.eye(3), 0.98, 20_000, None)

        with pytest.raises(TimeoutError):
            asyncio.run(compensation_step(ctl, failing_window, CompensationSettings()))
        # one window each with the last and the second-last retarder moved by the dither
        assert calls[0] == pytest.approx((0.1, 0.2, 0.3, 0.55))
        assert calls[1] == pytest.approx((0.1, 0.2, 0.45, 0.4))
        assert ctl.retardances_rad() == (0.1, 0.2, 0.3, 0.4)

        async def thin_window() -> WindowCounts:
            return draw_window(np.eye(3), 0.98, 100, None)

        with pytest.raises(PolarizationError):
            asyncio.run(compensation_step(ctl, thin_window, CompensationSettings()))
        assert ctl.retardances_rad() == (0.1, 0.2, 0.3, 0.4)
    finally:
        simlink.close()
