"""Asymptotic rates and the PLOB bound: defined at every distance, JSON-safe in the demo."""

from __future__ import annotations

import json
import math

import pytest

from drivers.simlink.params import LinkParams
from qkdnode.config.sections import ProtocolSection
from qkdnode.demo.compare import TheoryInputs, link_at, link_theory
from qkdnode.postproc import optimize, theory

Y0 = -math.expm1(-4 * 100 * 1e-9)  # four detectors, 100 Hz, 1 ns gates
CLASSES = [(0.6, 0.5), (0.2, 0.1), (0.2, 0.0)]


def test_plob_bound_is_defined_on_the_closed_interval() -> None:
    assert theory.plob_bound(0.0) == 0.0
    assert theory.plob_bound(0.5) == pytest.approx(1.0)
    assert theory.plob_bound(1.0) == math.inf
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        theory.plob_bound(1.01)


def test_demo_theory_at_zero_km_without_insertion_loss_is_json_safe() -> None:
    """Transmittance 1: the PLOB bound is unbounded and reported as null with a note; the
    decoy rates are still there."""
    link = link_at(LinkParams(), 0.0)
    link = link.model_copy(
        update={"fiber": link.fiber.model_copy(update={"insertion_loss_db": 0.0})}
    )
    t = link_theory(link, ProtocolSection())
    assert t["transmittance"] == 1.0
    assert t["plob_bits_per_pulse"] is None and "unbounded" in t["note"]
    assert t["secret_bits_per_pulse"] > t["three_intensity_bits_per_pulse"] > 0
    json.dumps(t, allow_nan=False)


def test_demo_theory_is_defined_at_every_distance() -> None:
    for d in (0.0, 1.0, 25.0, 100.0, 250.0, 400.0):
        t = link_theory(link_at(LinkParams(), d), ProtocolSection())
        json.dumps(t, allow_nan=False)
        assert t["note"] is None
        assert t["secret_bits_per_pulse"] is not None and t["secret_bits_per_pulse"] >= 0
        assert t["plob_bits_per_pulse"] > t["secret_bits_per_pulse"]


@pytest.mark.parametrize("distance_km", [0.0, 25.0, 100.0, 200.0])
def test_three_intensity_rate_is_below_the_exact_decoy_rate(distance_km: float) -> None:
    eta = 10 ** (-(0.2 * distance_km + 1) / 10) * 0.6
    kw = {"p_z_tx": 0.8, "p_z_rx": 0.8, "f": 1.1}
    exact = theory.rate_decoy_biased(eta, Y0, 0.01, CLASSES, **kw)
    three = theory.rate_decoy_three_intensity(eta, Y0, 0.01, CLASSES, **kw)
    assert 0.9 * exact < three <= exact


def test_three_intensity_rate_is_the_finite_key_limit() -> None:
    """The optimiser's asymptotic forecast and theory's three-intensity rate are one thing;
    the finite-key rate of the expected counts tends to it."""
    inputs = TheoryInputs.from_link(link_at(LinkParams(), 50.0), ProtocolSection())
    link = inputs.link_model()
    st = optimize.Settings(0.5, 0.1, 0.6, 0.2, 0.8)
    asym = optimize.expected_key(link, st, None).bits_per_pulse
    three = theory.rate_decoy_three_intensity(
        inputs.transmittance, inputs.y0, inputs.e_d, CLASSES, p_z_tx=0.8, p_z_rx=0.8, f=1.1
    )
    assert asym == pytest.approx(three, rel=1e-12)
    huge = optimize.expected_key(link, st, optimize.Pulses(1e18)).bits_per_pulse
    assert 0.99 * three < huge <= three


def test_three_intensity_bound_with_true_vacuum_is_the_vacuum_weak_decoy_bound() -> None:
    """With mu3 = 0 and no fluctuations the single-photon bound is exactly the Y1 lower
    bound of Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005) (the vacuum + weak decoy estimate)."""
    from qkdnode.postproc import finitekey

    eta, mu, nu = 1e-3, 0.5, 0.1
    exp = theory.expected_block(eta, Y0, 0.01, CLASSES, p_z_tx=0.8, p_z_rx=0.8)
    est = finitekey.estimate(
        exp.counts, (mu, nu, 0.0), (0.6, 0.2, 0.2), 1e-10, statistics=finitekey.Statistics.NONE
    )
    q_mu, q_nu = theory.gain(mu, eta, Y0), theory.gain(nu, eta, Y0)
    y1_l = (
        mu
        / (mu * nu - nu**2)
        * (q_nu * math.exp(nu) - q_mu * math.exp(mu) * nu**2 / mu**2 - (mu**2 - nu**2) / mu**2 * Y0)
    )
    tau1 = sum(p * m * math.exp(-m) for p, m in CLASSES)
    assert est.s_z1_lower == pytest.approx(0.64 * tau1 * y1_l, rel=1e-9)
