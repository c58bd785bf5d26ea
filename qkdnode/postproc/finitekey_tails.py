"""Statistical bounds of the finite-key analysis (:mod:`qkdnode.postproc.finitekey`): from
observed counts to bounds on their expectations, for one class, for a linear combination of
classes, and for the phase error of the single-photon events by random sampling. Pure
functions of numbers; each bound fails with probability at most its ``eps``.

**Fluctuations.** The expected counts are bounded from the observed ones by one of the
modes of :class:`qkdnode.postproc.finitekey_model.Statistics`:

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
``phi > lam`` at ``ln(1/a1)`` (``a1`` the sampling share of ``eps_sec``: "Epsilon split" in
:mod:`qkdnode.postproc.finitekey`; the exponent grows with ``phi`` for ``phi > m``, its slope
being ``c ln(phi/m)``). Its partial derivatives in ``c`` (``m h(phi/m)``) and in ``d`` at
fixed ``k`` (``m - lam``) are positive and in ``k`` (``ln(lam/m)``) negative, so the root
decreases with ``c`` and ``d`` and increases with ``k``: the lower bounds ``s_Z1``,
``s_X1`` and the upper bound ``v_X1`` give a valid bound. It is tighter than ``lam +
gamma`` (Lim et al.'s, from an approximation to the hypergeometric tail by Fung, Ma,
Chau, PRA 81, 012318 (2010)): on the default link at 227 km, 1-hour blocks, ``lam = 0.068``
and the bound 0.079 against 0.082.

Counts are numbers of detections (floats allowed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from qkdnode.postproc.finitekey_model import EPS_TERMS, FiniteKeyError

_NEWTON_STEPS = 100
_BISECTION_STEPS = 200


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


def gamma(a: float, b: float, c: float, d: float) -> float:
    """Random-sampling deviation gamma(a, b, c, d) of Lim et al. (phase error of Z from X),
    used by :attr:`Statistics.HOEFFDING`; :func:`phase_error_upper` is the tighter bound of
    :attr:`Statistics.CHERNOFF`."""
    if c <= 0 or d <= 0 or b <= 0 or b >= 1:
        return 0.5
    arg = (c + d) / (c * d * (1 - b) * b) * (EPS_TERMS**2 / a**2)
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(arg))
