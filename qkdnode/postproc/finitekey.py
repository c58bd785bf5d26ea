"""Finite-key decoy-state analysis: the bound of Lim, Curty, Walenta, Xu, Zbinden,
PRA 89, 022307 (2014), with Chernoff instead of Hoeffding fluctuation terms and intensities
known only within intervals.

Three intensity classes k = signal, decoy, vacuum with mean photon numbers mu1 > mu2 + mu3,
mu2 > mu3 >= 0 and probabilities p_k. Key comes from all Z-basis detections; the X basis is
disclosed and bounds the phase error of the single-photon Z events. The secret key length is
Lim et al. eq. (1):

    l = floor( s_Z0 + s_Z1 * (1 - h(phi_Z)) - lambda_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) )

**Decoy bounds.** With ``A_k = e^mu_k n*_k / p_k`` (``n*_k`` the expected count of class k
given the photon numbers of the detected pulses) and ``S_n = s_n / (n! tau_n)`` one has the
exact power series ``A_k = sum_n mu_k^n S_n`` with ``S_n >= 0`` the same for every class.
Lim et al.'s eqs. (A4)-(A6) follow from it:

    S_0 >= (mu2 A_3 - mu3 A_2) / (mu2 - mu3)
    S_1 >= (A_2 - A_3 - c (A_1 - S_0)) / ((mu2 - mu3)(1 - (mu2 + mu3)/mu1)),
           c = (mu2^2 - mu3^2) / mu1^2
    V_1 <= (B_2 - B_3) / (mu2 - mu3)             (B_k the same for the X errors)

and ``s_0 = tau_0 S_0``, ``s_1 = tau_1 S_1``, ``v_1 = tau_1 V_1``.

**Fluctuations.** ``n*_k`` is bounded from the observed ``n_k`` by one of:

- :attr:`Statistics.CHERNOFF` (default): the multiplicative Chernoff bound for a sum of
  independent Bernoulli variables, ``P(X >= (1+d) m) <= (e^d / (1+d)^(1+d))^m`` and
  ``P(X <= (1-d) m) <= (e^-d / (1-d)^(1-d))^m``, inverted exactly for the unknown mean ``m``
  given the observed ``x``: ``m h(x/m) = ln(1/eps)`` with ``h(u) = u ln u - u + 1``, solved
  by Newton's method started on the safe side of each root (above the upper one at Yin et
  al.'s closed form, below the lower one); the function is convex and monotone on each side
  of ``x``, so every iterate stays on the safe side. This is the observed-value Chernoff
  estimate of Zhang, Zhao, Razavi, Ma, PRA 95, 012333 (2017); Yin, Zhou, Gu, Xie, Lu, Chen,
  Sci. Rep. 10, 14312 (2020) give the closed forms ``x + b + sqrt(2bx + b^2)`` and
  ``x - b/2 - sqrt(2bx + b^2/4)`` (``b = ln(1/eps)``), looser relaxations of the same bound
  that lie outside the exact limits. The deviation of each
  class scales with the square root of that class's own count, not of the whole basis, which
  is what makes the decoy and vacuum classes cheap.
- :attr:`Statistics.HOEFFDING`: Lim et al. as published, ``n_k +- sqrt(n / 2 ln(1/eps))``
  with ``n`` the count of the whole basis.
- :attr:`Statistics.NONE`: the asymptotic limit of the same analysis (``n*_k = n_k``, no
  sampling term in the phase error). For rates per pulse from expected counts only.

Both statistical modes use the independence of the intensity labels given the photon
numbers, the same assumption as Lim et al.'s Hoeffding step.

**Epsilon split** (Lim et al. eq. (B4)): ``eps_sec = 2(2 a1 + a2 + a3) + nu + 10 e1 + 2 e2``
with every term set to ``eps = eps_sec / 21``. The ``10 e1 + 2 e2`` are the twelve one-sided
tail events used: in each basis the upper bound of the signal count and both bounds of the
decoy and vacuum counts (5 + 5), and the upper decoy / lower vacuum bound of the X errors (2).

**Intensity intervals.** Calibration gives each mean photon number only as an interval
``[lower, upper]``. Every bound above is evaluated term by term at the worst point of the box:
a quantity entering with a positive sign takes its smallest value, one entering with a
negative sign its largest, a positive denominator its largest (``e^mu`` at the end that
hurts, ``mu2`` at its lower end in ``mu2 A_3`` and at its upper end in ``mu2 - mu3``, ...),
and ``tau_0``, ``tau_1`` their minima (maximum of ``tau_1`` for the error bound) over the box,
taken per class because ``tau_n`` is a sum of one term per class. Since each replaced term is
individually no better than its value at the true intensities, the result is a valid bound
for every true point of the box, on the same statistical event. The identities hold at the
true point only if the box itself satisfies the conditions, so :class:`DecoySource` requires
``mu1.lower > mu2.upper + mu3.upper`` and ``mu2.lower > mu3.upper``. The vacuum class may
have ``mu3 > 0`` (finite extinction of the modulator).

Counts are numbers of detections (floats allowed), intensities mean photon numbers.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from qkdnode.postproc.cascade import binary_entropy

if TYPE_CHECKING:
    from qkdnode.postproc.params import PostprocParams

EPS_TERMS = 21  # eps_sec = 21 eps (Lim et al. eq. (B4))
_NEWTON_STEPS = 100


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


# --- tail bounds ---------------------------------------------------------------------------
def _kl_poisson(x: float, m: float) -> float:
    """``m h(x/m)`` with ``h(u) = u ln u - u + 1``: the Chernoff exponent of mean ``m`` at ``x``."""
    if x <= 0.0:
        return m
    d = x / m - 1.0
    return m * ((1.0 + d) * math.log1p(d) - d)


def expectation_upper(observed: float, eps: float) -> float:
    """Largest mean compatible with ``observed``: the root ``m > x`` of ``m h(x/m) = ln(1/eps)``.

    Newton's method on this increasing convex function, started at Yin et al.'s closed form
    (which lies above the root), descends monotonically onto the root: every iterate is an
    upper bound.
    """
    beta = math.log(1.0 / eps)
    x = max(0.0, float(observed))
    if x == 0.0:
        return beta * (1.0 + 1e-12)
    m = x + beta + math.sqrt(2.0 * beta * x + beta * beta)
    for _ in range(_NEWTON_STEPS):
        g = _kl_poisson(x, m) - beta
        slope = 1.0 - x / m
        if g <= 0.0 or slope <= 0.0:
            break
        step = g / slope
        m -= step
        if step <= 1e-12 * m:
            break
    return m * (1.0 + 1e-12)


def expectation_lower(observed: float, eps: float) -> float:
    """Smallest mean compatible with ``observed``: the root ``m < x`` of ``m h(x/m) = ln(1/eps)``,
    0 if there is none. Newton's method from below the root (the larger of two points known to
    lie below it) ascends monotonically: every iterate is a lower bound."""
    beta = math.log(1.0 / eps)
    x = max(0.0, float(observed))
    if x == 0.0:
        return 0.0
    m = max(
        x + beta / 2.0 - math.sqrt(2.0 * beta * x + beta * beta / 4.0),
        x * math.exp(max(-700.0, -1.0 - beta / x)),
    )
    if m <= 1e-12 * x:  # the root is smaller still: 0 is the honest lower bound
        return 0.0
    for _ in range(_NEWTON_STEPS):
        g = _kl_poisson(x, m) - beta
        slope = 1.0 - x / m  # negative below x
        if g <= 0.0 or slope >= 0.0:
            break
        step = -g / slope
        m += step
        if step <= 1e-12 * m:
            break
    return max(0.0, m * (1.0 - 1e-12))


def hoeffding_delta(total: float, eps: float) -> float:
    """Lim et al.'s ``delta(n, eps) = sqrt(n / 2 ln(1/eps))``."""
    return math.sqrt(max(0.0, total) / 2.0 * math.log(1.0 / eps))


def _expectation_bounds(
    counts: tuple[float, float, float], eps: float, statistics: Statistics
) -> tuple[list[float], list[float]]:
    """Lower and upper bounds on the expected count of each class (lower clipped at 0)."""
    if statistics is Statistics.CHERNOFF:
        return (
            [expectation_lower(c, eps) for c in counts],
            [expectation_upper(c, eps) for c in counts],
        )
    if statistics is Statistics.HOEFFDING:
        delta = hoeffding_delta(sum(counts), eps)
        return [max(0.0, c - delta) for c in counts], [c + delta for c in counts]
    return [float(c) for c in counts], [float(c) for c in counts]


# --- decoy bounds ----------------------------------------------------------------------------
def _scaled(
    counts: tuple[float, float, float], source: DecoySource, eps: float, statistics: Statistics
) -> tuple[list[float], list[float]]:
    """Bounds on ``A_k = e^mu_k n*_k / p_k`` over the statistics and the intensity box."""
    low, high = _expectation_bounds(counts, eps, statistics)
    a_low = [
        math.exp(m.lower) * n / p for n, m, p in zip(low, source.mu, source.probs, strict=True)
    ]
    a_high = [
        math.exp(m.upper) * n / p for n, m, p in zip(high, source.mu, source.probs, strict=True)
    ]
    return a_low, a_high


def _s0_s1(
    counts: tuple[float, float, float], source: DecoySource, eps: float, statistics: Statistics
) -> tuple[float, float]:
    m1, m2, m3 = source.mu
    a_low, a_high = _scaled(counts, source, eps, statistics)
    num0 = m2.lower * a_low[2] - m3.upper * a_high[1]
    big_s0 = max(0.0, num0 / (m2.upper - m3.lower))
    c_max = (m2.upper**2 - m3.lower**2) / m1.lower**2
    num1 = a_low[1] - a_high[2] - c_max * max(0.0, a_high[0] - big_s0)
    den1 = (m2.upper - m3.lower) * (1.0 - (m2.lower + m3.lower) / m1.upper)
    big_s1 = max(0.0, num1 / den1)
    return source.tau0_min() * big_s0, source.tau1_min() * big_s1


def gamma(a: float, b: float, c: float, d: float) -> float:
    """Random-sampling deviation gamma(a, b, c, d) of Lim et al. (phase error of Z from X)."""
    if c <= 0 or d <= 0 or b <= 0 or b >= 1:
        return 0.5
    arg = (c + d) / (c * d * (1 - b) * b) * (EPS_TERMS**2 / a**2)
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(arg))


def _check_counts(counts: DecoyCounts) -> None:
    for name in ("n_z", "n_x", "m_x"):
        values = getattr(counts, name)
        if any(not (math.isfinite(v) and v >= 0) for v in values):
            raise FiniteKeyError(f"{name} counts must be finite and >= 0, got {values}")


def decoy_bounds(
    counts: DecoyCounts,
    source: DecoySource,
    eps_sec: float,
    *,
    statistics: Statistics = Statistics.CHERNOFF,
) -> DecoyEstimates:
    """Vacuum and single-photon bounds and the phase error rate, valid for every intensity in
    ``source``'s intervals (see the module docstring). Raises :class:`FiniteKeyError`."""
    _check_counts(counts)
    if not 0 < eps_sec < 1:
        raise FiniteKeyError(f"eps_sec must be in (0, 1), got {eps_sec}")
    eps = eps_sec / EPS_TERMS
    s_z0, s_z1 = _s0_s1(counts.n_z, source, eps, statistics)
    _, s_x1 = _s0_s1(counts.n_x, source, eps, statistics)
    _, m2, m3 = source.mu
    b_low, b_high = _scaled(counts.m_x, source, eps, statistics)
    v_x1 = source.tau1_max() * max(0.0, b_high[1] - b_low[2]) / (m2.lower - m3.upper)
    if s_x1 <= 0 or s_z1 <= 0:
        phi = 0.5
    else:
        ratio = min(v_x1 / s_x1, 0.5)
        sampling = 0.0 if statistics is Statistics.NONE else gamma(eps_sec, ratio, s_z1, s_x1)
        phi = min(0.5, ratio + sampling)
    return DecoyEstimates(s_z0, s_z1, s_x1, v_x1, phi, float(sum(counts.n_z)))


def estimate(
    counts: DecoyCounts,
    mus: tuple[float, float, float],
    probs: tuple[float, float, float],
    eps_sec: float,
    *,
    statistics: Statistics = Statistics.CHERNOFF,
) -> DecoyEstimates:
    """:func:`decoy_bounds` for exactly known intensities ``mus`` = (mu1, mu2, mu3) with
    probabilities ``probs``. Raises :class:`FiniteKeyError` on inconsistent parameters."""
    return decoy_bounds(counts, DecoySource.exact(mus, probs), eps_sec, statistics=statistics)


def decoy_bounds_common_scale(
    counts: DecoyCounts,
    source: DecoySource,
    scale: Interval,
    eps_sec: float,
    *,
    statistics: Statistics = Statistics.CHERNOFF,
    cells: int = 24,
) -> DecoyEstimates:
    """:func:`decoy_bounds` when every true intensity is ``c * mu_k`` with ``mu_k`` in its
    class interval of ``source`` and one unknown factor ``c`` in ``scale``, common to the
    three classes (the power meter's calibration, the tap-to-output attenuation and the
    laser's drift scale every class alike).

    Treating ``c`` as an independent error of each class (the corners of a box) would ask
    the bound to survive a decoy scaled up while the signal is scaled down, which one common
    factor cannot do, and costs a large part of the key. Instead ``scale`` is cut into
    ``cells`` geometric cells ``[a, b]``; in each, every class interval becomes
    ``[a * lower_k, b * upper_k]`` and :func:`decoy_bounds` gives bounds valid for every
    truth in that cell. The true factor lies in one cell, so the component-wise worst over
    the cells (smallest yields, largest error and phase error) is valid for every truth. The
    concentration events are those of the observed counts, the same in every cell, so the
    failure probability is not multiplied. Raises :class:`FiniteKeyError` when a cell
    violates ``mu1 > mu2 + mu3, mu2 > mu3`` (use more cells or a smaller ``scale``).
    """
    if cells < 1:
        raise FiniteKeyError(f"cells must be >= 1, got {cells}")
    if scale.lower <= 0:
        raise FiniteKeyError(f"the common scale must be > 0, got [{scale.lower}, {scale.upper}]")
    if scale.upper == scale.lower == 1.0:
        return decoy_bounds(counts, source, eps_sec, statistics=statistics)
    edges = [scale.lower * (scale.upper / scale.lower) ** (i / cells) for i in range(cells + 1)]
    worst: DecoyEstimates | None = None
    for a, b in itertools.pairwise(edges):
        cell = DecoySource(
            tuple(Interval(a * m.lower, b * m.upper) for m in source.mu),  # type: ignore[arg-type]
            source.probs,
        )
        est = decoy_bounds(counts, cell, eps_sec, statistics=statistics)
        if worst is None:
            worst = est
        else:
            worst = DecoyEstimates(
                s_z0_lower=min(worst.s_z0_lower, est.s_z0_lower),
                s_z1_lower=min(worst.s_z1_lower, est.s_z1_lower),
                s_x1_lower=min(worst.s_x1_lower, est.s_x1_lower),
                v_x1_upper=max(worst.v_x1_upper, est.v_x1_upper),
                phi_z_upper=max(worst.phi_z_upper, est.phi_z_upper),
                n_z=est.n_z,
            )
    assert worst is not None
    return worst


def source_from_params(params: PostprocParams) -> DecoySource:
    """The intensity box and probabilities a block's :class:`PostprocParams` describe."""
    lo, hi = params.mu_bounds()
    return DecoySource(
        (Interval(lo[0], hi[0]), Interval(lo[1], hi[1]), Interval(lo[2], hi[2])),
        (params.p_signal, params.p_decoy, params.p_vacuum),
    )


def estimate_from_params(counts: DecoyCounts, params: PostprocParams) -> DecoyEstimates:
    """:func:`decoy_bounds` with the intensity intervals, statistics and ``eps_sec`` of
    ``params`` (what the pipeline calls for each block)."""
    return decoy_bounds_common_scale(
        counts,
        source_from_params(params),
        Interval(params.mu_scale_lower, params.mu_scale_upper),
        params.eps_sec,
        statistics=Statistics(params.decoy_statistics),
    )


def key_length_raw(
    est: DecoyEstimates, leak_ec_bits: float, eps_sec: float, eps_cor: float
) -> float:
    """Lim et al. eq. (1) before rounding and clipping (may be negative)."""
    return (
        est.s_z0_lower
        + est.s_z1_lower * (1.0 - binary_entropy(est.phi_z_upper))
        - leak_ec_bits
        - 6.0 * math.log2(EPS_TERMS / eps_sec)
        - math.log2(2.0 / eps_cor)
    )


def secret_key_length(
    est: DecoyEstimates, leak_ec_bits: float, eps_sec: float, eps_cor: float
) -> int:
    """Lim et al. eq. (1): extractable secret bits (0 if negative)."""
    return max(0, math.floor(key_length_raw(est, leak_ec_bits, eps_sec, eps_cor)))
