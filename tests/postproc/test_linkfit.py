"""The link fit recovers a known link from the counts one block of it would give."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdnode.postproc.linkfit import BlockObservation, LinkFitError, fit_link


def _observe(eta: float, y0: float, e_d: float, pulses: int, rng: np.random.Generator):
    mu = (0.5, 0.1, 2e-4)
    p = (0.6, 0.2, 0.2)
    gains = [1 - (1 - y0) * math.exp(-eta * m) for m in mu]
    det = tuple(int(rng.poisson(pulses * pk * q)) for pk, q in zip(p, gains, strict=True))
    q_mix = sum(pk * q for pk, q in zip(p, gains, strict=True))
    qber = (y0 / 2 + e_d * (q_mix - y0)) / q_mix
    return BlockObservation(
        pulses=pulses,
        detections_per_class=det,  # type: ignore[arg-type]
        mu=mu,
        p_class=p,
        qber_z=qber,
        rx_basis_z_fraction=0.8,
        slot_rate_hz=25e6,
        ec_inefficiency=1.07,
    )


@pytest.mark.parametrize(
    ("eta", "y0", "e_d"), [(0.15, 1.6e-6, 0.01), (6e-3, 4e-6, 0.03), (6e-4, 1e-6, 0.01)]
)
def test_fit_recovers_the_link(eta: float, y0: float, e_d: float) -> None:
    rng = np.random.default_rng(7)
    link = fit_link(_observe(eta, y0, e_d, 2_000_000_000, rng))
    assert link.transmittance == pytest.approx(eta, rel=0.01)
    assert link.optical_error == pytest.approx(e_d, rel=0.05)
    assert link.background_per_pulse == pytest.approx(y0, rel=0.25)
    assert link.p_basis_z_rx == pytest.approx(0.8)
    assert link.f_ec(0.01) == pytest.approx(1.07)


def test_impossible_blocks_are_refused() -> None:
    rng = np.random.default_rng(1)
    good = _observe(0.1, 1e-6, 0.01, 10_000_000, rng)
    with pytest.raises(LinkFitError):
        fit_link(BlockObservation(**{**good.__dict__, "pulses": 0}))
    with pytest.raises(LinkFitError):
        fit_link(BlockObservation(**{**good.__dict__, "detections_per_class": (0, 5, 1)}))


def test_a_link_without_background_can_be_advised() -> None:
    """A vacuum class whose clicks the residual light explains fits to Y0 = 0; the
    optimiser must still work there (no division by a zero gain)."""
    from qkdnode.postproc.optimize import Detections, optimize_settings

    obs = BlockObservation(
        pulses=10**9,
        detections_per_class=(40_000_000, 2_000_000, 0),
        mu=(0.5, 0.1, 1e-4),
        p_class=(0.6, 0.2, 0.2),
        qber_z=0.013,
        rx_basis_z_fraction=0.8,
        slot_rate_hz=25e6,
    )
    link = fit_link(obs)
    assert link.background_per_pulse == 0.0
    opt = optimize_settings(link, Detections(1.6e7), max_evaluations=200)
    assert opt.bits_per_pulse > 0
