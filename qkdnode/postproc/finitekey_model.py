"""Inputs and outputs of the finite-key analysis (:mod:`qkdnode.postproc.finitekey`).

The intensity classes as intervals with their probabilities (:class:`DecoySource`), the
counts per class (:class:`DecoyCounts`), the bounds the analysis derives from them
(:class:`DecoyEstimates`), how counts are turned into bounds (:class:`Statistics`), the
error raised on inconsistent input (:class:`FiniteKeyError`) and ``EPS_TERMS``, the number
of equal shares ``eps_sec`` is split into (Lim et al. eq. (B4)).

Index 0 is the signal class (mu1), 1 the decoy (mu2), 2 the vacuum (mu3). Counts are
numbers of detections (floats allowed), intensities mean photon numbers.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

EPS_TERMS = 21  # eps_sec = 21 eps (Lim et al. eq. (B4))


class FiniteKeyError(ValueError):
    """Inconsistent input (negative counts, bad intensities or probabilities)."""


class Statistics(enum.StrEnum):
    """How observed counts are turned into bounds on their expectations."""

    CHERNOFF = "chernoff"
    HOEFFDING = "hoeffding"
    NONE = "none"


@dataclass(frozen=True)
class Interval:
    """A mean photon number known to lie in ``[lower, upper]``."""

    lower: float
    upper: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)):
            raise FiniteKeyError(f"interval bounds must be finite, got {self}")
        if not 0.0 <= self.lower <= self.upper:
            raise FiniteKeyError(f"need 0 <= lower <= upper, got [{self.lower}, {self.upper}]")

    @classmethod
    def point(cls, value: float) -> Interval:
        return cls(value, value)

    @classmethod
    def around(cls, value: float, rel: float) -> Interval:
        """``value * (1 -+ rel)``: a relative calibration uncertainty."""
        if not 0.0 <= rel < 1.0:
            raise FiniteKeyError(f"relative uncertainty must be in [0, 1), got {rel}")
        return cls(value * (1.0 - rel), value * (1.0 + rel))


def _x_exp_minus_x(x: float) -> float:
    return x * math.exp(-x)


@dataclass(frozen=True)
class DecoySource:
    """Intensities (signal, decoy, vacuum) as intervals and their probabilities."""

    mu: tuple[Interval, Interval, Interval]
    probs: tuple[float, float, float]

    def __post_init__(self) -> None:
        m1, m2, m3 = self.mu
        if not (m1.lower > m2.upper + m3.upper and m2.lower > m3.upper):
            raise FiniteKeyError(
                "need mu1 > mu2 + mu3 and mu2 > mu3 >= 0 over the whole intensity box, got "
                f"mu1 in [{m1.lower}, {m1.upper}], mu2 in [{m2.lower}, {m2.upper}], "
                f"mu3 in [{m3.lower}, {m3.upper}]"
            )
        if any(not p > 0 for p in self.probs) or abs(sum(self.probs) - 1) > 1e-9:
            raise FiniteKeyError(
                f"intensity probabilities must be > 0 and sum to 1, got {self.probs}"
            )

    @classmethod
    def exact(
        cls, mus: tuple[float, float, float], probs: tuple[float, float, float]
    ) -> DecoySource:
        """Intensities known exactly (point intervals)."""
        mu1, mu2, mu3 = mus
        if not (mu1 > mu2 + mu3 and mu2 > mu3 >= 0):
            raise FiniteKeyError(f"need mu1 > mu2 + mu3 and mu2 > mu3 >= 0, got {mus}")
        return cls((Interval.point(mu1), Interval.point(mu2), Interval.point(mu3)), probs)

    def tau0_min(self) -> float:
        """Smallest probability of a vacuum pulse over the box (each e^-mu at mu.upper)."""
        return sum(p * math.exp(-m.upper) for m, p in zip(self.mu, self.probs, strict=True))

    def tau1_min(self) -> float:
        """Smallest single-photon probability over the box: mu e^-mu is unimodal, so each
        class's minimum sits at an end of its interval."""
        return sum(
            p * min(_x_exp_minus_x(m.lower), _x_exp_minus_x(m.upper))
            for m, p in zip(self.mu, self.probs, strict=True)
        )

    def tau1_max(self) -> float:
        """Largest single-photon probability over the box (mu e^-mu peaks at mu = 1)."""
        return sum(
            p * _x_exp_minus_x(min(max(1.0, m.lower), m.upper))
            for m, p in zip(self.mu, self.probs, strict=True)
        )


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
