"""Finite-key decoy-state analysis of Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014).

Three intensities mu1 > mu2 + mu3, mu2 > mu3 >= 0 (signal, decoy, vacuum). Counts per
intensity class k are corrected for statistical fluctuations with Hoeffding's bound
``delta(n, eps) = sqrt(n / 2 * ln(1 / eps))`` at ``eps = eps_sec / 21`` (the paper's
split of the secrecy parameter). Key is extracted from all Z-basis detections; the X basis
is disclosed entirely and bounds the phase error of the single-photon Z events.

    l = floor( s_Z0 + s_Z1 * (1 - h(phi_Z)) - lambda_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) )

Counts are numbers of detections (floats allowed), intensities mean photon numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from qkdnode.postproc.cascade import binary_entropy


class FiniteKeyError(ValueError):
    """Inconsistent input (negative counts, bad intensities or probabilities)."""


@dataclass(frozen=True)
class DecoyCounts:
    """Counts per intensity class (index 0 = signal mu1, 1 = decoy mu2, 2 = vacuum mu3)."""

    n_z: tuple[float, float, float]  # Z-basis detections (sifted)
    n_x: tuple[float, float, float]  # X-basis detections (sifted)
    m_x: tuple[float, float, float]  # X-basis errors


@dataclass(frozen=True)
class DecoyEstimates:
    s_z0_lower: float
    s_z1_lower: float
    s_x1_lower: float
    v_x1_upper: float
    phi_z_upper: float  # phase error rate of single-photon Z events, upper bound (<= 0.5)
    n_z: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _tau(n: int, mus: tuple[float, float, float], probs: tuple[float, float, float]) -> float:
    return sum(
        p * math.exp(-mu) * mu**n / math.factorial(n) for mu, p in zip(mus, probs, strict=True)
    )


def _bounds(
    counts: tuple[float, float, float],
    mus: tuple[float, float, float],
    probs: tuple[float, float, float],
    eps: float,
) -> tuple[list[float], list[float]]:
    total = sum(counts)
    delta = math.sqrt(total / 2.0 * math.log(1.0 / eps))
    minus = [math.exp(mu) / p * (c - delta) for c, mu, p in zip(counts, mus, probs, strict=True)]
    plus = [math.exp(mu) / p * (c + delta) for c, mu, p in zip(counts, mus, probs, strict=True)]
    return minus, plus


def _s0_s1(
    counts: tuple[float, float, float],
    mus: tuple[float, float, float],
    probs: tuple[float, float, float],
    eps: float,
) -> tuple[float, float]:
    mu1, mu2, mu3 = mus
    minus, plus = _bounds(counts, mus, probs, eps)
    tau0, tau1 = _tau(0, mus, probs), _tau(1, mus, probs)
    s0 = max(0.0, tau0 * (mu2 * minus[2] - mu3 * plus[1]) / (mu2 - mu3))
    s1 = (
        tau1
        * mu1
        * (minus[1] - plus[2] - (mu2**2 - mu3**2) / mu1**2 * (plus[0] - s0 / tau0))
        / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)
    )
    return s0, max(0.0, s1)


def gamma(a: float, b: float, c: float, d: float) -> float:
    """Random-sampling deviation gamma(a, b, c, d) of Lim et al. (phase error of Z from X)."""
    if c <= 0 or d <= 0 or b <= 0 or b >= 1:
        return 0.5
    arg = (c + d) / (c * d * (1 - b) * b) * (21.0**2 / a**2)
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(arg))


def estimate(
    counts: DecoyCounts,
    mus: tuple[float, float, float],
    probs: tuple[float, float, float],
    eps_sec: float,
) -> DecoyEstimates:
    """Decoy bounds from observed counts. ``mus`` = (mu1, mu2, mu3), ``probs`` their
    probabilities. Raises :class:`FiniteKeyError` on inconsistent parameters."""
    mu1, mu2, mu3 = mus
    if not (mu1 > mu2 + mu3 and mu2 > mu3 >= 0):
        raise FiniteKeyError(f"need mu1 > mu2 + mu3 and mu2 > mu3 >= 0, got {mus}")
    if any(p <= 0 for p in probs) or abs(sum(probs) - 1) > 1e-9:
        raise FiniteKeyError(f"intensity probabilities must be > 0 and sum to 1, got {probs}")
    for name in ("n_z", "n_x", "m_x"):
        if any(v < 0 for v in getattr(counts, name)):
            raise FiniteKeyError(f"{name} counts must be >= 0")
    eps = eps_sec / 21.0
    s_z0, s_z1 = _s0_s1(counts.n_z, mus, probs, eps)
    _, s_x1 = _s0_s1(counts.n_x, mus, probs, eps)
    m_minus, m_plus = _bounds(counts.m_x, mus, probs, eps)
    tau1 = _tau(1, mus, probs)
    v_x1 = max(0.0, tau1 * (m_plus[1] - m_minus[2]) / (mu2 - mu3))
    if s_x1 <= 0 or s_z1 <= 0:
        phi = 0.5
    else:
        ratio = min(v_x1 / s_x1, 0.5)
        phi = min(0.5, ratio + gamma(eps_sec, ratio, s_z1, s_x1))
    return DecoyEstimates(s_z0, s_z1, s_x1, v_x1, phi, float(sum(counts.n_z)))


def secret_key_length(
    est: DecoyEstimates, leak_ec_bits: float, eps_sec: float, eps_cor: float
) -> int:
    """Lim et al. eq. (1): extractable secret bits (0 if negative)."""
    ell = (
        est.s_z0_lower
        + est.s_z1_lower * (1.0 - binary_entropy(est.phi_z_upper))
        - leak_ec_bits
        - 6.0 * math.log2(21.0 / eps_sec)
        - math.log2(2.0 / eps_cor)
    )
    return max(0, math.floor(ell))
