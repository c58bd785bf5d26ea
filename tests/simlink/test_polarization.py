"""The fiber's SU(2) rotation and the receiver's polarisation controller in the link
model: the Poincaré-sphere arithmetic, the drift and jumps, and what the detectors see."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.errors import OutOfRangeError
from drivers.poincare import (
    analysis_block,
    nearest_rotation,
    retarder_rotation,
    rotation_about,
    rotation_angle_rad,
    rotation_matrix,
    rotation_vector,
    stokes_of_angle,
)
from drivers.simlink.params import PolarizationDriftParams
from drivers.simlink.polarization import ControllerModel, FiberPolarization
from drivers.simlink.world import ReceiverWorld, TransmitterWorld
from tests.simlink.helpers import link

QUIET = {"drift_rad_per_sqrt_s": 0.0, "misalignment": 0.0}


def _qber(tx: TransmitterWorld, rx: ReceiverWorld, chunks: int) -> tuple[float, float, int]:
    """(QBER Z, QBER X, sifted) of ``chunks`` chunks stepped through both worlds."""
    err = [0, 0]
    tot = [0, 0]
    for _ in range(chunks):
        index = tx.chunk_index
        chunk = tx.step()
        rec = rx.process(tx.fiber_header(index, chunk), chunk.photons)
        prep = tx.prepared(rec.slot)
        rx_basis = rec.channel // 2
        for b in (0, 1):
            sel = (prep.basis == b) & (rx_basis == b) & (prep.intensity != 2)
            tot[b] += int(sel.sum())
            err[b] += int(((rec.channel[sel] % 2) != prep.bit[sel]).sum())
    return err[0] / tot[0], err[1] / tot[1], tot[0] + tot[1]


# --- the arithmetic ----------------------------------------------------------------------


def test_rotation_vector_inverts_rotation_matrix_up_to_pi() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = rng.uniform(0.0, math.pi - 1e-3)
        r = rotation_matrix(axis * angle)
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
        assert np.allclose(rotation_vector(r), axis * angle, atol=1e-9)
    near_pi = rotation_about([0.0, 1.0, 1.0], math.pi - 1e-6)
    assert np.allclose(rotation_matrix(rotation_vector(near_pi)), near_pi, atol=1e-6)


def test_a_retarder_at_0_and_45_degrees_turns_about_s1_and_s2() -> None:
    h, d = stokes_of_angle(0.0), stokes_of_angle(math.pi / 4)
    # a half-wave plate at 0 degrees leaves H and flips D to A
    hwp0 = retarder_rotation((0.0,), (math.pi,))
    assert np.allclose(hwp0 @ h, h) and np.allclose(hwp0 @ d, -d)
    # a quarter-wave plate at 45 degrees makes H circular (S3 = -1, right-handed about S2)
    qwp45 = retarder_rotation((45.0,), (math.pi / 2,))
    assert np.allclose(qwp45 @ h, [0.0, 0.0, -1.0])
    # light crosses the first retarder first
    row = retarder_rotation((0.0, 45.0), (0.3, 0.7))
    assert np.allclose(row, rotation_about([0, 1, 0], 0.7) @ rotation_about([1, 0, 0], 0.3))


def test_nearest_rotation_repairs_round_off_and_refuses_nothing() -> None:
    r = rotation_matrix([0.1, 0.2, 0.3])
    noisy = r + 1e-4 * np.random.default_rng(0).normal(size=(3, 3))
    fixed = nearest_rotation(noisy)
    assert np.allclose(fixed @ fixed.T, np.eye(3), atol=1e-12)
    assert np.allclose(fixed, r, atol=1e-3)


# --- the drift ----------------------------------------------------------------------------


def test_random_walk_spreads_as_its_rate_says() -> None:
    """Per axis the walk's rotation vector has variance rate**2 * t (small angles)."""
    rate, t_s, steps = 0.01, 100.0, 20
    finals = []
    for seed in range(400):
        pol = FiberPolarization(PolarizationDriftParams(drift_rad_per_sqrt_s=rate))
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            pol.advance(t_s / steps, rng)
        finals.append(rotation_vector(pol.matrix))
    var = np.var(np.asarray(finals), axis=0)
    expected = rate**2 * t_s
    # 400 samples: the variance is known to about 7 % (one sigma)
    assert np.all(np.abs(var / expected - 1.0) < 0.3), var / expected


def test_jumps_come_at_their_times_with_their_angle() -> None:
    params = PolarizationDriftParams(drift_rad_per_sqrt_s=0.0, jump_times_s=(1.0, 2.5))
    pol = FiberPolarization(params)
    rng = np.random.default_rng(1)
    angles = []
    for _ in range(32):  # 4 s in 0.125 s steps
        before = pol.matrix.copy()
        pol.advance(0.125, rng)
        angles.append(rotation_angle_rad(pol.matrix @ before.T))
    jumped = [i for i, a in enumerate(angles) if a > 1e-9]
    assert jumped == [7, 19]  # the steps ending at 1.0 s and 2.5 s
    assert angles[7] == pytest.approx(1.0) and angles[19] == pytest.approx(1.0)
    assert pol.jumps == 2


def test_jump_rate_is_a_poisson_rate() -> None:
    params = PolarizationDriftParams(drift_rad_per_sqrt_s=0.0, jump_rate_per_hour=3600.0)
    pol = FiberPolarization(params)
    rng = np.random.default_rng(2)
    for _ in range(1000):
        pol.advance(1.0, rng)
    assert abs(pol.jumps - 1000) < 5 * math.sqrt(1000)


def test_bad_drift_parameters_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="jump_times_s"):
        PolarizationDriftParams(jump_times_s=(1.0, -2.0))
    with pytest.raises(ValueError, match="drift_rad_per_sqrt_s"):
        PolarizationDriftParams(drift_rad_per_sqrt_s=-1.0)
    with pytest.raises(ValueError, match="back in time"):
        FiberPolarization(PolarizationDriftParams()).advance(-1.0, np.random.default_rng())
    with pytest.raises(ValueError, match="retardances"):
        ControllerModel(retardances_rad=[0.0])


# --- what the detectors see ---------------------------------------------------------------


def test_identity_rotation_reproduces_the_old_angle_formula() -> None:
    """With no SU(2) rotation the analysis block is the identity and a receiver-side
    reference step of ``a`` gives sin(a)**2 in both bases, as before."""
    params = link(chunk_slots=1 << 18, fiber=QUIET)
    tx = TransmitterWorld(params.transmitter_side())
    rx = ReceiverWorld(params.receiver_side())
    try:
        rx.inject("encoding_drift", angle_rad=0.3)
        qz, qx, n = _qber(tx, rx, 4)
        expected = math.sin(0.3) ** 2
        sigma = math.sqrt(expected * (1 - expected) / (n / 2))
        assert abs(qz - expected) < 5 * sigma * 1.5 and abs(qx - expected) < 5 * sigma * 3
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize(
    ("axis", "z_rises", "x_rises"),
    [((1.0, 0.0, 0.0), False, True), ((0.0, 1.0, 0.0), True, False), ((0, 0, 1.0), True, True)],
)
def test_a_fiber_rotation_raises_the_error_of_the_bases_it_mixes(
    axis: tuple[float, float, float], z_rises: bool, x_rises: bool
) -> None:
    """A rotation by phi about S1 leaves H/V alone and gives sin^2(phi/2) in X; about S2
    the converse; about S3 both (the old reference angle phi/2)."""
    phi = 0.8
    vec = tuple(phi * a for a in axis)
    params = link(
        chunk_slots=1 << 18,
        fiber={
            **QUIET,
            "polarization": {"drift_rad_per_sqrt_s": 0.0, "initial_rotation_rad": vec},
        },
    )
    tx = TransmitterWorld(params.transmitter_side())
    rx = ReceiverWorld(params.receiver_side())
    try:
        qz, qx, _ = _qber(tx, rx, 4)
        expected = math.sin(phi / 2) ** 2  # 0.151
        for q, rises in ((qz, z_rises), (qx, x_rises)):
            if rises:
                assert q == pytest.approx(expected, abs=0.02)
            else:
                assert q < 0.005
    finally:
        tx.close()
        rx.close()


def test_the_controller_undoes_the_fiber_and_its_inverse_setting_restores_the_error() -> None:
    """The controller's own rotation composes after the fiber's: set to the fiber's
    inverse the error rates fall to the floor (no misalignment here: zero)."""
    vec = (0.5, -0.9, 0.4)
    params = link(
        chunk_slots=1 << 18,
        fiber={
            **QUIET,
            "polarization": {"drift_rad_per_sqrt_s": 0.0, "initial_rotation_rad": vec},
        },
    )
    tx = TransmitterWorld(params.transmitter_side())
    rx = ReceiverWorld(params.receiver_side())
    try:
        qz, qx, _ = _qber(tx, rx, 2)
        assert qz > 0.05 and qx > 0.05
        # solve the retardances of an X-Y-X-Y controller for F^T (a numeric search)
        target = rotation_matrix(vec).T
        from qkdnode.polarization import solve_retardances

        values = solve_retardances(target, (0.0, 45.0, 0.0, 45.0), (0.0,) * 4, (-10.0, 10.0))
        assert np.allclose(retarder_rotation((0.0, 45.0, 0.0, 45.0), values), target)
        rx.polarization_controller.retardances_rad = list(values)
        qz, qx, _ = _qber(tx, rx, 2)
        assert qz < 0.003 and qx < 0.003
        assert np.allclose(analysis_block(rx.last_fiber_rotation), analysis_block(target.T))
    finally:
        tx.close()
        rx.close()


def test_an_injected_jump_turns_the_fiber_once() -> None:
    params = link(chunk_slots=1 << 16, fiber=QUIET)  # no drift model: a jump creates one
    tx = TransmitterWorld(params.transmitter_side())
    try:
        tx.step()
        assert tx.fiber_header(0, tx.step())["rotation"] == [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
        tx.inject("polarization_jump", angle_rad=0.7)
        index = tx.chunk_index
        first = tx.fiber_header(index, tx.step())["rotation"]  # the chunk it started in
        after = tx.fiber_header(index + 1, tx.step())["rotation"]
        assert rotation_angle_rad(np.reshape(first, (3, 3))) == pytest.approx(0.0)
        assert rotation_angle_rad(np.reshape(after, (3, 3))) == pytest.approx(0.7)
        later = tx.fiber_header(index + 2, tx.step())["rotation"]
        assert np.allclose(later, after, atol=1e-12)  # one-shot, and no drift on this fiber
    finally:
        tx.close()
    rx = ReceiverWorld(params.receiver_side())
    try:
        with pytest.raises(ValueError, match="transmitter"):
            rx.inject("polarization_jump")
    finally:
        rx.close()


def test_the_same_seed_gives_the_same_drift_however_paced() -> None:
    params = link(chunk_slots=1 << 12, fiber={"polarization": {"jump_times_s": (0.002,)}})
    runs = []
    for _ in range(2):
        tx = TransmitterWorld(params.transmitter_side())
        try:
            rotations = []
            for _ in range(30):
                index = tx.chunk_index
                rotations.append(tx.fiber_header(index, tx.step())["rotation"])
            runs.append(rotations)
        finally:
            tx.close()
    assert runs[0] == runs[1]
    first, last = (np.reshape(runs[0][i], (3, 3)) for i in (0, -1))
    assert rotation_angle_rad(last @ first.T) > 0.9  # drift and the jump at 2 ms


def test_simulated_controller_checks_its_input_before_the_light_sees_it() -> None:
    from drivers.simlink import instruments as sim
    from qkdnode.procedures.simharness import SimLink

    simlink = SimLink(link(chunk_slots=1 << 12))
    try:
        ctl = simlink.connect()["polarization"]
        assert isinstance(ctl, sim.SimPolarizationController)
        ctl.set_retardances_rad((0.1, 0.2, 0.3, 0.4))
        assert ctl.retardances_rad() == (0.1, 0.2, 0.3, 0.4)
        for bad in ((0.1, 0.2, 0.3), (0.0, 0.0, 0.0, math.nan), (0.0, 0.0, 0.0, 100.0)):
            with pytest.raises(OutOfRangeError):
                ctl.set_retardances_rad(bad)
        assert ctl.retardances_rad() == (0.1, 0.2, 0.3, 0.4)
        ctl.safe_state()  # leaves the compensation in place
        assert ctl.retardances_rad() == (0.1, 0.2, 0.3, 0.4)
        assert np.allclose(
            simlink.rx.polarization_controller.matrix(),
            retarder_rotation(ctl.axes_deg, (0.1, 0.2, 0.3, 0.4)),
        )
    finally:
        simlink.close()
