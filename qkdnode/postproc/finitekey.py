"""Finite-key decoy-state analysis: the bound of Lim, Curty, Walenta, Xu, Zbinden,
PRA 89, 022307 (2014), with Chernoff instead of Hoeffding fluctuation terms, one Chernoff
event per decoy combination instead of one per class, a random-sampling bound on the phase
error tighter than Lim et al.'s ``gamma``, and intensities known only within intervals.

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

and ``s_0 = tau_0 S_0``, ``s_1 = tau_1 S_1``, ``v_1 = tau_1 V_1``. Putting the bound on
``S_0`` into the one on ``S_1`` (``c >= 0``) makes each a linear combination of the expected
class counts with one positive weight (:class:`DecoyCombinations`):

    (mu2 - mu3)(1 - (mu2+mu3)/mu1) S_1 >= (1 - (mu2+mu3) mu3/mu1^2) A_2
                                          - (1 - (mu2+mu3) mu2/mu1^2) A_3 - c A_1
    (mu2 - mu3) S_0 >= mu2 A_3 - mu3 A_2
    (mu2 - mu3) V_1 <= -(B_3 - B_2)

**Fluctuations.** The expected counts are bounded from the observed ones by one of:

- :attr:`Statistics.CHERNOFF` (default): multiplicative Chernoff bounds, one event per
  combination (below, "Combinations"). For a single class this is the Chernoff bound for a
  sum of independent Bernoulli variables, ``P(X >= (1+d) m) <= (e^d / (1+d)^(1+d))^m`` and
  ``P(X <= (1-d) m) <= (e^-d / (1-d)^(1-d))^m``, inverted exactly for the unknown mean ``m``
  given the observed ``x``: ``m h(x/m) = ln(1/eps)`` with ``h(u) = u ln u - u + 1``, solved
  by Newton's method started on the safe side of each root (above the upper one at Yin et
  al.'s closed form, below the lower one); the function is convex and monotone on each side
  of ``x``, so every iterate stays on the safe side (:func:`expectation_upper`,
  :func:`expectation_lower`). This is the observed-value Chernoff estimate of Zhang, Zhao,
  Razavi, Ma, PRA 95, 012333 (2017); Yin, Zhou, Gu, Xie, Lu, Chen, Sci. Rep. 10, 14312
  (2020) give the closed forms ``x + b + sqrt(2bx + b^2)`` and ``x - b/2 - sqrt(2bx +
  b^2/4)`` (``b = ln(1/eps)``), looser relaxations of the same bound. The deviation of each
  class scales with the square root of that class's own count, not of the whole basis, which
  is what makes the decoy and vacuum classes cheap. The phase error uses the sampling bound
  below.
- :attr:`Statistics.HOEFFDING`: Lim et al. as published: ``n_k +- sqrt(n / 2 ln(1/eps))``
  per class with ``n`` the count of the whole basis, and their ``gamma`` for the phase error.
- :attr:`Statistics.NONE`: the asymptotic limit of the same analysis (``n*_k = n_k``, no
  sampling term in the phase error). For rates per pulse from expected counts only.

Both statistical modes use the independence of the intensity labels given the photon
numbers, the same assumption as Lim et al.'s Hoeffding step.

**Combinations** (:func:`combination_lower`). Given the photon numbers ``n_i`` of the
detected pulses (and everything else the eavesdropper controls), the class labels ``k_i`` are
independent with ``P(k_i = k) = q_k(n_i) = p_k e^-mu_k mu_k^n_i / (n_i! tau_n_i)``, and
``n*_k = sum_i q_k(n_i)``. For weights ``w`` and ``W = sum_k w_k n_k = sum_i w_(k_i)``,
``1 + x <= e^x`` gives, for every real ``lam``,

    E e^(lam W) = prod_i sum_k q_k(n_i) e^(lam w_k) <= exp( sum_k n*_k (e^(lam w_k) - 1) ).

Let ``j`` be the class with ``w_j > 0`` and ``a_k = -w_k > 0`` the nuisance classes. By
Markov's inequality ``P(W >= w) <= exp(-lam w + sum_k n*_k (e^(lam w_k) - 1))`` for every
``lam > 0``; the infimum over ``lam`` is non-increasing and continuous in ``w``, so the
event that it is ``<= ln eps`` at the observed ``W`` is ``{W >= w_c}`` for a threshold
``w_c`` and has probability at most ``eps``. Outside it, for every ``lam > 0``,

    n*_j (e^(lam w_j) - 1) > lam W - ln(1/eps) + sum_k n*_k (1 - e^(-lam a_k)),

so ``L = w_j n*_j - sum_k a_k n*_k`` exceeds ``w_j (lam W - ln(1/eps)) / (e^(lam w_j) - 1)``
plus ``sum_k n*_k [w_j (1 - e^(-lam a_k)) / (e^(lam w_j) - 1) - a_k]``. Each bracket is
``<= 0`` (``1 - e^-x <= x <= e^x - 1``), so upper bounds ``U_k >= n*_k`` (one single-class
event each) may replace the ``n*_k``:

    L >= w_j / (e^(lam w_j) - 1) * [lam W - ln(1/eps) + sum_k U_k (1 - e^(-lam a_k))]
         - sum_k a_k U_k,

and also ``L >= -sum_k a_k U_k`` (``n*_j >= 0``). Any ``lam`` is valid; the largest value
over ``lam`` is taken. One combination thus costs one event plus one per nuisance class,
and its deviation adds the classes' variances (``sqrt(sum_k w_k^2 n*_k)``) instead of their
standard deviations. The nuisance classes enter at their upper bounds, which inflates their
variance: for the errors the vacuum class, which may have almost no counts, is therefore
the free class (``B_3 - B_2``) and the decoy class the nuisance.

**Phase error** (:func:`phase_error_upper`). Lim et al.'s eq. (B2) uses random sampling
without replacement: given the ``c + d`` single-photon events (``c`` in the key basis,
``d`` in the test basis), the key events are a uniformly random subset, and ``E``, the number
of the events with a phase error (the bit error of the test basis), is fixed. The number
``x`` of key events among the ``E`` is then hypergeometric, and by Hoeffding, J. Am. Stat.
Assoc. 58, 13 (1963), Thm. 4, its moment generating function is at most that of
``Bin(E, c/(c+d))``, so ``P(x >= t) <= exp(-E D(t/E || c/(c+d)))`` (binary relative entropy,
Chernoff-Hoeffding). With ``k = E - x`` the test errors, ``lam = k/d``, ``phi = x/c`` and
``m = E/(c+d)`` the exponent is ``c phi ln(phi/m) + k ln(lam/m)``; the bound is its root
``phi > lam`` at ``ln(1/a1)`` (the exponent grows with ``phi`` for ``phi > m``, its slope
being ``c ln(phi/m)``). Its partial derivatives in ``c`` (``m h(phi/m)``) and in ``d`` at
fixed ``k`` (``m - lam``) are positive and in ``k`` (``ln(lam/m)``) negative, so the root
decreases with ``c`` and ``d`` and increases with ``k``: the lower bounds ``s_Z1``,
``s_X1`` and the upper bound ``v_X1`` give a valid bound. It is tighter than ``lam +
gamma`` (Lim et al.'s, from an approximation to the hypergeometric tail by Fung, Ma,
Chau, PRA 81, 012318 (2010)): on the default link at 227 km, 1-hour blocks, ``lam = 0.068``
and the bound 0.079 against 0.082.

**Epsilon split** (Lim et al. eq. (B4)): ``eps_sec = 2(2 a1 + a2 + a3) + nu + 10 e1 + 2 e2``
with every term set to ``eps = eps_sec / 21``; ``a1`` is the phase-error sampling, ``a2``,
``a3``, ``nu`` enter only through ``6 log2(21/eps_sec)``, and ``10 e1 + 2 e2`` are twelve
slots for tail events. :attr:`Statistics.CHERNOFF` uses at most ten, each at ``eps``: in Z
the signal and vacuum upper bounds, the decoy upper bound if ``mu3 > 0`` (else the vacuum
combination is a single-class bound), the vacuum and the single-photon combinations (five);
in X the signal and vacuum upper bounds and the single-photon combination (three); for the
X errors the decoy upper bound and the error combination (two). :attr:`Statistics.HOEFFDING`
uses all twelve (both bounds of decoy and vacuum and the signal's upper bound per basis, the
decoy upper / vacuum lower bound of the errors). Giving the unused slots and ``a2``, ``a3``,
``nu`` to the tail events adds about 0.1 km to the 1-hour reach (docs/finite-key.md).

**Intensity intervals.** Calibration gives each mean photon number only as an interval
``[lower, upper]``. Every bound above is evaluated term by term at the worst point of the box:
each weight of a combination takes its smallest value (a negative one its most negative:
``e^mu`` at the end that hurts, ``mu2`` at its lower end in ``mu2 A_3``, ...), the positive
denominators their largest values for the lower bounds and their smallest for the upper
bound ``V_1``, and ``tau_0``, ``tau_1`` their minima (maximum of ``tau_1`` for the error
bound) over the box, taken per class because ``tau_n`` is a sum of one term per class.
Since the counts are non-negative and each replaced term is individually no better than its
value at the true intensities, the result is a valid bound for every true point of the box.
The weights depend on the box only, not on the data, so the Chernoff events are fixed in
advance. The identities hold at the true point only if the box itself satisfies the
conditions, so :class:`DecoySource` requires ``mu1.lower > mu2.upper + mu3.upper`` and
``mu2.lower > mu3.upper``. The vacuum class may have ``mu3 > 0`` (finite extinction of the
modulator).

Counts are numbers of detections (floats allowed), intensities mean photon numbers.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from qkdnode.postproc.cascade import binary_entropy

if TYPE_CHECKING:
    from qkdnode.postproc.params import PostprocParams

EPS_TERMS = 21  # eps_sec = 21 eps (Lim et al. eq. (B4))
_NEWTON_STEPS = 100
_BISECTION_STEPS = 200


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
    """Lower and upper bounds on the expected count of each class (lower clipped at 0), for
    the per-class analysis of :attr:`Statistics.HOEFFDING` and :attr:`Statistics.NONE`
    (:attr:`Statistics.CHERNOFF` bounds combinations, not classes: a :class:`ValueError`)."""
    if statistics is Statistics.CHERNOFF:
        raise ValueError("Chernoff statistics bound decoy combinations, not single classes")
    if statistics is Statistics.HOEFFDING:
        delta = hoeffding_delta(sum(counts), eps)
        return [max(0.0, c - delta) for c in counts], [c + delta for c in counts]
    return [float(c) for c in counts], [float(c) for c in counts]


# --- decoy combinations: one Chernoff event each ------------------------------------------
@dataclass(frozen=True)
class Combination:
    """A linear combination ``sum_k weights[k] n*_k`` of the expected class counts of one set
    of detections (index 0 = signal, 1 = decoy, 2 = vacuum), to be bounded from below.

    Exactly one weight is positive: the free class. The classes with a negative weight are
    the nuisance classes; their expected counts enter through upper bounds. Zero weights
    are ignored.
    """

    weights: tuple[float, float, float]

    def __post_init__(self) -> None:
        w = self.weights
        if any(not math.isfinite(x) for x in w) or sum(1 for x in w if x > 0) != 1:
            raise FiniteKeyError(f"need finite weights with exactly one > 0, got {w}")

    @property
    def free(self) -> int:
        return next(k for k, x in enumerate(self.weights) if x > 0)

    @property
    def nuisance(self) -> tuple[int, ...]:
        return tuple(k for k, x in enumerate(self.weights) if x < 0)

    def observed(self, counts: tuple[float, float, float]) -> float:
        """The combination of ``counts`` (observed counts: the statistic ``W``)."""
        return sum(w * c for w, c in zip(self.weights, counts, strict=True))


def combination_lower(
    combination: Combination,
    counts: tuple[float, float, float],
    eps: float,
    nuisance_upper: tuple[float, float, float],
) -> float:
    """Lower bound on ``L = sum_k w_k n*_k`` (may be negative) from the observed ``counts``:
    one Chernoff event for the weighted sum ``W = sum_k w_k n_k``, failing with probability
    at most ``eps`` (module docstring, "Combinations").

    ``nuisance_upper[k]`` must be an upper bound ``U_k`` on ``n*_k`` for every nuisance class
    (entries of the other classes are not read); the failure of those bounds counts
    separately. With ``j`` the free class and ``a_k = |w_k|``, for every ``lam > 0``

        n*_j >= (lam W - ln(1/eps) + sum_k U_k (1 - e^(-lam a_k))) / (e^(lam w_j) - 1)

    and ``L >= w_j max(0, that) - sum_k a_k U_k``; ``lam`` is taken where the right-hand side
    is largest (any ``lam`` gives a valid bound, so the search can only cost tightness).
    With no nuisance class this is ``w_j`` times :func:`expectation_lower`. Raises
    :class:`FiniteKeyError` on negative or non-finite counts or ``eps`` outside (0, 1).
    """
    _check_tail_inputs(counts, eps)
    j, nuisance = combination.free, combination.nuisance
    wj = combination.weights[j]
    if not nuisance:
        return wj * expectation_lower(counts[j], eps)
    beta = math.log(1.0 / eps)
    w_obs = combination.observed(counts)
    terms = [(-combination.weights[k], float(nuisance_upper[k])) for k in nuisance]
    if any(not (math.isfinite(u) and u >= 0) for _, u in terms):
        raise FiniteKeyError(f"nuisance upper bounds must be finite and >= 0, got {terms}")

    def numerator(lam: float) -> float:
        return lam * w_obs - beta - sum(u * math.expm1(-lam * a) for a, u in terms)

    def slope(lam: float) -> float:  # the sign of d/dlam (numerator / (e^(lam w_j) - 1))
        d_num = w_obs + sum(u * a * math.exp(-lam * a) for a, u in terms)
        return d_num * math.expm1(lam * wj) - numerator(lam) * wj * math.exp(lam * wj)

    variance = wj * wj * max(counts[j], 1.0) + sum(a * a * max(u, 1.0) for a, u in terms)
    lam0 = math.sqrt(2.0 * beta / variance)  # where a Gaussian approximation puts the optimum
    cap = 60.0 / max([wj] + [a for a, _ in terms])  # no exponent above 60
    lam = _where_slope_turns_negative(slope, lam0, cap)
    free_lower = max(0.0, numerator(lam) / math.expm1(lam * wj))
    return wj * free_lower - sum(a * u for a, u in terms)


def _where_slope_turns_negative(slope: Callable[[float], float], lam0: float, cap: float) -> float:
    """The ``lam`` in ``(0, cap]`` where ``slope`` changes sign from positive to negative
    (it decreases wherever the objective is positive, so the objective has one maximum
    there): bracketed from ``lam0`` in factors of 4, then the Illinois variant of regula
    falsi on ``log lam``; ``cap`` if the slope is still positive there."""
    t_cap = math.log(cap)
    lo = hi = min(math.log(lam0), t_cap)
    s_lo = s_hi = slope(math.exp(lo))
    if s_lo > 0:  # the maximum lies above: move up
        while s_hi > 0:
            if hi >= t_cap:
                return cap
            lo, s_lo = hi, s_hi
            hi = min(hi + math.log(4.0), t_cap)
            s_hi = slope(math.exp(hi))
    else:  # it lies below: move down
        while s_lo <= 0:
            if lo < -460.0:  # lam < 1e-200: the objective only grows towards 0
                return math.exp(lo)
            hi, s_hi = lo, s_lo
            lo -= math.log(4.0)
            s_lo = slope(math.exp(lo))
    side = 0
    for _ in range(_BISECTION_STEPS):
        if hi - lo <= 1e-9:
            break
        t = (lo * s_hi - hi * s_lo) / (s_hi - s_lo)
        if not lo < t < hi:
            t = 0.5 * (lo + hi)
        s_t = slope(math.exp(t))
        if s_t > 0:
            lo, s_lo = t, s_t
            if side == -1:
                s_hi *= 0.5
            side = -1
        else:
            hi, s_hi = t, s_t
            if side == 1:
                s_lo *= 0.5
            side = 1
            if s_t == 0:
                break
    return math.exp(0.5 * (lo + hi))


def _check_tail_inputs(counts: tuple[float, ...], eps: float) -> None:
    if not 0 < eps < 1:
        raise FiniteKeyError(f"eps must be in (0, 1), got {eps}")
    if any(not (math.isfinite(c) and c >= 0) for c in counts):
        raise FiniteKeyError(f"counts must be finite and >= 0, got {counts}")


# --- phase error: random sampling of the single-photon events --------------------------------
def _sampling_exponent(phi: float, key: float, test: float, test_errors: float) -> float:
    """``E D(x/E || c/N)`` with ``x = c phi`` the key's phase errors, ``k`` the test's errors,
    ``E = x + k``, ``N = c + d``: equal to ``c phi ln(phi/m) + k ln(lam/m)`` with
    ``lam = k/d`` and ``m = E/N``."""
    m = (key * phi + test_errors) / (key + test)
    out = key * phi * math.log(phi / m) if phi > 0 else 0.0
    if test_errors > 0:
        out += test_errors * math.log(test_errors / test / m)
    return out


def phase_error_upper(key: float, test: float, test_errors: float, eps: float) -> float:
    """Upper bound on the phase error rate of the ``key`` single-photon key-basis events
    from ``test_errors`` bit errors among ``test`` single-photon test-basis events,
    failing with probability at most ``eps``: the root ``phi > test_errors / test`` of

        c phi ln(phi/m) + k ln(lam/m) = ln(1/eps),   lam = k/d,  m = (c phi + k)/(c + d)

    (``c = key``, ``d = test``, ``k = test_errors``), capped at 0.5; 0.5 when ``key`` or
    ``test`` is not positive or ``lam >= 0.5``. See the module docstring ("Phase error").

    The root decreases with ``key`` and ``test`` and increases with ``test_errors``, so
    lower bounds on the first two and an upper bound on the third give a valid bound.
    Newton's method from above on this convex increasing function: every iterate is an
    upper bound. Raises :class:`FiniteKeyError` on negative inputs or ``eps`` outside (0, 1).
    """
    _check_tail_inputs((key, test, test_errors), eps)
    if key <= 0 or test <= 0:
        return 0.5
    lam = test_errors / test
    if lam >= 0.5:
        return 0.5
    beta = math.log(1.0 / eps)
    phi = max(2.0 * lam, lam + 1e-9, 1e-9)
    while _sampling_exponent(phi, key, test, test_errors) < beta:
        if phi >= 0.5:
            return 0.5
        phi = min(0.5, 2.0 * phi)
    for _ in range(_NEWTON_STEPS):
        g = _sampling_exponent(phi, key, test, test_errors) - beta
        m = (key * phi + test_errors) / (key + test)
        slope = key * math.log(phi / m)
        if g <= 0.0 or slope <= 0.0:
            break
        step = g / slope
        phi -= step
        if step <= 1e-12 * phi:
            break
    return min(0.5, phi * (1.0 + 1e-12))


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
    """Random-sampling deviation gamma(a, b, c, d) of Lim et al. (phase error of Z from X),
    used by :attr:`Statistics.HOEFFDING`; :func:`phase_error_upper` is the tighter bound of
    :attr:`Statistics.CHERNOFF`."""
    if c <= 0 or d <= 0 or b <= 0 or b >= 1:
        return 0.5
    arg = (c + d) / (c * d * (1 - b) * b) * (EPS_TERMS**2 / a**2)
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(arg))


def _check_counts(counts: DecoyCounts) -> None:
    for name in ("n_z", "n_x", "m_x"):
        values = getattr(counts, name)
        if any(not (math.isfinite(v) and v >= 0) for v in values):
            raise FiniteKeyError(f"{name} counts must be finite and >= 0, got {values}")


@dataclass(frozen=True)
class DecoyCombinations:
    """Lim et al.'s decoy bounds (A4)-(A6) as combinations of the expected class counts,
    with each weight at its worst point of the intensity box (module docstring,
    "Combinations"). For every true intensity in the box and all expected counts n*, m*:

    - ``s_0 >= tau0_min * vacuum(n*) / vacuum_den`` (Z basis);
    - ``s_1 >= tau1_min * single(n*) / single_den`` (either basis);
    - ``v_1 <= -tau1_max * errors(m*) / errors_den`` (X errors; ``errors`` is the vacuum
      class minus the decoy class, so that the vacuum class is the free one: the decoy
      class, which always has many counts, is the nuisance).
    """

    vacuum: Combination
    vacuum_den: float
    single: Combination
    single_den: float
    errors: Combination
    errors_den: float

    @classmethod
    def of(cls, source: DecoySource) -> DecoyCombinations:
        (m1, m2, m3), (p1, p2, p3) = source.mu, source.probs
        vacuum = Combination(
            (0.0, -m3.upper * math.exp(m2.upper) / p2, m2.lower * math.exp(m3.lower) / p3)
        )
        c_max = (m2.upper**2 - m3.lower**2) / m1.lower**2
        single = Combination(
            (
                -c_max * math.exp(m1.upper) / p1,
                math.exp(m2.lower) * (1.0 - (m2.upper + m3.upper) * m3.upper / m1.lower**2) / p2,
                -math.exp(m3.upper) * (1.0 - (m2.lower + m3.lower) * m2.lower / m1.upper**2) / p3,
            )
        )
        errors = Combination((0.0, -math.exp(m2.upper) / p2, math.exp(m3.lower) / p3))
        return cls(
            vacuum=vacuum,
            vacuum_den=m2.upper - m3.lower,
            single=single,
            single_den=(m2.upper - m3.lower) * (1.0 - (m2.lower + m3.lower) / m1.upper),
            errors=errors,
            errors_den=m2.lower - m3.upper,
        )


def _nuisance_upper(
    counts: tuple[float, float, float], eps: float, *combinations: Combination
) -> tuple[float, float, float]:
    """:func:`expectation_upper` of every class that is a nuisance class of one of
    ``combinations`` (one tail event each), 0 for the others (never read)."""
    needed = {k for c in combinations for k in c.nuisance}
    up = [expectation_upper(x, eps) if k in needed else 0.0 for k, x in enumerate(counts)]
    return up[0], up[1], up[2]


def _decoy_bounds_combined(counts: DecoyCounts, source: DecoySource, eps: float) -> DecoyEstimates:
    """:attr:`Statistics.CHERNOFF`: each decoy bound as one Chernoff event on its
    combination, the nuisance classes through their own upper bounds, and the phase error
    from :func:`phase_error_upper`. Every event fails with probability at most ``eps``; at
    most ten are used (module docstring, "Epsilon split")."""
    comb = DecoyCombinations.of(source)
    upper_z = _nuisance_upper(counts.n_z, eps, comb.vacuum, comb.single)
    upper_x = _nuisance_upper(counts.n_x, eps, comb.single)
    upper_m = _nuisance_upper(counts.m_x, eps, comb.errors)
    vacuum = combination_lower(comb.vacuum, counts.n_z, eps, upper_z)
    s_z0 = source.tau0_min() * max(0.0, vacuum) / comb.vacuum_den
    single_z = combination_lower(comb.single, counts.n_z, eps, upper_z)
    s_z1 = source.tau1_min() * max(0.0, single_z) / comb.single_den
    single_x = combination_lower(comb.single, counts.n_x, eps, upper_x)
    s_x1 = source.tau1_min() * max(0.0, single_x) / comb.single_den
    errors = combination_lower(comb.errors, counts.m_x, eps, upper_m)
    v_x1 = source.tau1_max() * max(0.0, -errors) / comb.errors_den
    phi = phase_error_upper(s_z1, s_x1, v_x1, eps)
    return DecoyEstimates(s_z0, s_z1, s_x1, v_x1, phi, float(sum(counts.n_z)))


def decoy_bounds(
    counts: DecoyCounts,
    source: DecoySource,
    eps_sec: float,
    *,
    statistics: Statistics = Statistics.CHERNOFF,
) -> DecoyEstimates:
    """Vacuum and single-photon bounds and the phase error rate, valid for every intensity in
    ``source``'s intervals except with probability ``eps_sec`` (see the module docstring).
    Raises :class:`FiniteKeyError`."""
    _check_counts(counts)
    if not 0 < eps_sec < 1:
        raise FiniteKeyError(f"eps_sec must be in (0, 1), got {eps_sec}")
    eps = eps_sec / EPS_TERMS
    if statistics is Statistics.CHERNOFF:
        return _decoy_bounds_combined(counts, source, eps)
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
    failure probability is not multiplied: the cell that holds the true factor gives bounds
    that fail with probability at most ``eps_sec``, and the worst over the cells is no
    better than them, whatever the events of the other cells. Raises
    :class:`FiniteKeyError` when a cell violates ``mu1 > mu2 + mu3, mu2 > mu3`` (use more
    cells or a smaller ``scale``).
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
