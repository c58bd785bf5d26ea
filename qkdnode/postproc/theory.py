"""Asymptotic key rates for comparison: decoy-state BB84 (GLLP with infinite decoys, and
vacuum + weak decoy; Lo, Ma, Chen PRL 94, 230504 (2005); Ma et al. PRA 72, 012326 (2005)),
the three-intensity protocol we run in the limit of infinite blocks, and the repeaterless
PLOB bound (Pirandola et al., Nat. Commun. 8, 15043 (2017)).

Rates are secret bits per sent pulse. ``eta`` is the overall transmittance (channel and
receiver), ``y0`` the background yield per pulse, ``e_d`` the optical error probability,
``f`` the error-correction inefficiency and ``q`` the sifting factor.

Two rates describe "the protocol we run" (key from the Z detections of all three classes,
both parties' Z probabilities, the run's intensities):

- :func:`rate_decoy_biased`: Y0, Y1 and e1 known exactly (infinitely many decoys), the usual
  asymptotic reference;
- :func:`rate_decoy_three_intensity`: the same three intensities, bounded as the finite-key
  analysis (:mod:`qkdnode.postproc.finitekey`) does, with expected counts and no statistical
  terms: the limit the finite-key rate reaches for very large blocks.

:func:`expected_block` gives the expected counts of a block, the input of both the
three-intensity rate and the optimiser (:mod:`qkdnode.postproc.optimize`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from qkdnode.postproc import finitekey_decoy, finitekey_model
from qkdnode.postproc.cascade import binary_entropy


def _check(eta: float, y0: float, e_d: float, mu: float) -> None:
    if not (0 < eta <= 1 and 0 <= y0 < 1 and 0 <= e_d <= 0.5 and mu > 0):
        raise ValueError(f"need 0<eta<=1, 0<=y0<1, 0<=e_d<=0.5, mu>0; got {eta}, {y0}, {e_d}, {mu}")


def gain(mu: float, eta: float, y0: float) -> float:
    """Q_mu = Y0 + 1 - exp(-eta mu)."""
    return y0 + 1.0 - math.exp(-eta * mu)


def qber(mu: float, eta: float, y0: float, e_d: float) -> float:
    """E_mu = (Y0/2 + e_d (1 - exp(-eta mu))) / Q_mu."""
    g = gain(mu, eta, y0)
    # No light and no background: no detections, hence no errors.
    return (y0 / 2 + e_d * (1.0 - math.exp(-eta * mu))) / g if g > 0 else 0.0


def rate_infinite_decoy(
    eta: float, y0: float, e_d: float, mu: float, *, f: float = 1.16, q: float = 0.5
) -> float:
    """GLLP rate with exactly known Y1, e1 (infinitely many decoys); 0 if negative."""
    _check(eta, y0, e_d, mu)
    y1 = y0 + eta - y0 * eta
    e1 = (y0 / 2 + e_d * eta) / y1
    q_mu, e_mu = gain(mu, eta, y0), qber(mu, eta, y0, e_d)
    q1 = y1 * mu * math.exp(-mu)
    return max(0.0, q * (-q_mu * f * binary_entropy(e_mu) + q1 * (1 - binary_entropy(e1))))


def rate_vacuum_weak_decoy(
    eta: float,
    y0: float,
    e_d: float,
    mu: float,
    nu: float,
    *,
    f: float = 1.16,
    q: float = 0.5,
) -> float:
    """GLLP rate with Y1, e1 bounded from a vacuum and a weak decoy ``nu`` (< mu)."""
    _check(eta, y0, e_d, mu)
    if not 0 < nu < mu:
        raise ValueError(f"need 0 < nu < mu, got nu={nu}, mu={mu}")
    q_mu, e_mu = gain(mu, eta, y0), qber(mu, eta, y0, e_d)
    q_nu, e_nu = gain(nu, eta, y0), qber(nu, eta, y0, e_d)
    y1_l = (
        mu
        / (mu * nu - nu**2)
        * (q_nu * math.exp(nu) - q_mu * math.exp(mu) * nu**2 / mu**2 - (mu**2 - nu**2) / mu**2 * y0)
    )
    if y1_l <= 0:
        return 0.0
    e1_u = min(0.5, (e_nu * q_nu * math.exp(nu) - y0 / 2) / (y1_l * nu))
    q1_l = y1_l * mu * math.exp(-mu)
    return max(0.0, q * (-q_mu * f * binary_entropy(e_mu) + q1_l * (1 - binary_entropy(e1_u))))


def plob_bound(eta_channel: float) -> float:
    """-log2(1 - eta): secret bits per channel use achievable at most without repeaters.

    Defined on ``[0, 1]``. At ``eta_channel = 1`` (no loss at all) the bound is unbounded and
    the function returns ``math.inf``; callers that serialise it to JSON must map it to a
    missing value (see :mod:`qkdnode.demo.compare`).
    """
    if not 0 <= eta_channel <= 1:
        raise ValueError(f"eta_channel must be in [0, 1], got {eta_channel}")
    if eta_channel == 1:
        return math.inf
    return -math.log2(1.0 - eta_channel)


def rate_decoy_biased(
    eta: float,
    y0: float,
    e_d: float,
    classes: list[tuple[float, float]],
    *,
    p_z_tx: float,
    p_z_rx: float,
    f: float = 1.1,
) -> float:
    """Asymptotic decoy-state rate per pulse of the protocol we run (GLLP, Lo-Ma-Chen 2005,
    with Y0, Y1 and e1 known exactly, i.e. infinitely many decoys).

    Key comes from Z-basis detections of every intensity class ``(probability, mu)``, as in
    the finite-key analysis of Lim et al. (2014) that the pipeline implements:
    ``R = pZ_tx pZ_rx [ sum_k p_k e^-mu_k (Y0 + mu_k Y1 (1 - H2(e1))) - f Q H2(E) ]``
    with ``Q`` and ``E`` the gain and error rate averaged over the classes. 0 if negative.
    """
    if not classes:
        raise ValueError("need at least one intensity class")
    for _, mu in classes:
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
    _check(eta, y0, e_d, max(mu for _, mu in classes) or 1.0)
    y1 = y0 + eta - y0 * eta
    e1 = (y0 / 2 + e_d * eta) / y1
    q_tot = sum(p * gain(mu, eta, y0) for p, mu in classes)
    err_tot = sum(p * gain(mu, eta, y0) * qber(mu, eta, y0, e_d) for p, mu in classes)
    e_tot = err_tot / q_tot if q_tot > 0 else 0.5
    privacy = sum(
        p * math.exp(-mu) * (y0 + mu * y1 * (1 - binary_entropy(e1))) for p, mu in classes
    )
    return max(0.0, p_z_tx * p_z_rx * (privacy - f * q_tot * binary_entropy(e_tot)))


@dataclass(frozen=True)
class ExpectedBlock:
    """Expected counts of a block of ``pulses`` pulses (floats; per pulse when pulses = 1)."""

    counts: finitekey_model.DecoyCounts
    z_errors: float
    pulses: float

    @property
    def detections(self) -> float:
        """Sifted detections of both bases."""
        return sum(self.counts.n_z) + sum(self.counts.n_x)

    @property
    def qber_z(self) -> float:
        n = sum(self.counts.n_z)
        return self.z_errors / n if n > 0 else 0.5


def expected_block(
    eta: float,
    y0: float,
    e_d: float,
    classes: Sequence[tuple[float, float]],
    *,
    p_z_tx: float,
    p_z_rx: float,
    pulses: float = 1.0,
) -> ExpectedBlock:
    """Expected sifted counts for (signal, decoy, vacuum) ``classes`` of ``(probability, mu)``:
    per class ``pulses p_k Q_k`` times the probability that both chose the basis, errors
    ``Q_k E_k`` (:func:`gain`, :func:`qber`)."""
    if len(classes) != 3:
        raise ValueError(f"need three intensity classes (signal, decoy, vacuum), got {classes}")
    if not (0 < eta <= 1 and 0 <= y0 < 1 and 0 <= e_d <= 0.5):
        raise ValueError(f"need 0<eta<=1, 0<=y0<1, 0<=e_d<=0.5; got {eta}, {y0}, {e_d}")
    q = [p * gain(mu, eta, y0) for p, mu in classes]
    err = [p * gain(mu, eta, y0) * qber(mu, eta, y0, e_d) for p, mu in classes]
    zz = pulses * p_z_tx * p_z_rx
    xx = pulses * (1.0 - p_z_tx) * (1.0 - p_z_rx)
    counts = finitekey_model.DecoyCounts(
        n_z=(zz * q[0], zz * q[1], zz * q[2]),
        n_x=(xx * q[0], xx * q[1], xx * q[2]),
        m_x=(xx * err[0], xx * err[1], xx * err[2]),
    )
    return ExpectedBlock(counts, zz * sum(err), pulses)


def rate_decoy_three_intensity(
    eta: float,
    y0: float,
    e_d: float,
    classes: Sequence[tuple[float, float]],
    *,
    p_z_tx: float,
    p_z_rx: float,
    f: float = 1.1,
) -> float:
    """Asymptotic rate per pulse of the three-intensity protocol as the finite-key analysis
    bounds it (Lim et al. 2014's decoy estimators with expected counts, no fluctuations):
    ``s_Z0 + s_Z1 (1 - H2(phi)) - f n_Z H2(E_Z)`` per pulse, 0 if negative. Never above
    :func:`rate_decoy_biased` (the decoy estimators are bounds on the exact Y0, Y1, e1)."""
    block = expected_block(eta, y0, e_d, classes, p_z_tx=p_z_tx, p_z_rx=p_z_rx)
    (p1, mu1), (p2, mu2), (p3, mu3) = classes
    source = finitekey_model.DecoySource.exact((mu1, mu2, mu3), (p1, p2, p3))
    est = finitekey_decoy.decoy_bounds(
        block.counts, source, 1e-10, statistics=finitekey_model.Statistics.NONE
    )
    n_z = sum(block.counts.n_z)
    rate = (
        est.s_z0_lower
        + est.s_z1_lower * (1.0 - binary_entropy(est.phi_z_upper))
        - f * n_z * binary_entropy(block.qber_z)
    )
    return max(0.0, rate)
