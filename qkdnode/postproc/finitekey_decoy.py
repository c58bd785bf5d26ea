"""Decoy-state bounds of the finite-key analysis (:mod:`qkdnode.postproc.finitekey`):
lower bounds on the vacuum and single-photon detections and upper bounds on the
single-photon errors and their phase error rate, from the counts per intensity class, for
intensities known only within intervals (:func:`decoy_bounds`,
:func:`decoy_bounds_common_scale`). The fluctuation terms come from
:mod:`qkdnode.postproc.finitekey_tails`.

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

import itertools
import math
from dataclasses import dataclass

from qkdnode.postproc.finitekey_model import (
    EPS_TERMS,
    DecoyCounts,
    DecoyEstimates,
    DecoySource,
    FiniteKeyError,
    Interval,
    Statistics,
)
from qkdnode.postproc.finitekey_tails import (
    Combination,
    combination_lower,
    expectation_upper,
    gamma,
    hoeffding_delta,
    phase_error_upper,
)


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


def _check_counts(counts: DecoyCounts) -> None:
    for name in ("n_z", "n_x", "m_x"):
        values = getattr(counts, name)
        if any(not (math.isfinite(v) and v >= 0) for v in values):
            raise FiniteKeyError(f"{name} counts must be finite and >= 0, got {values}")


@dataclass(frozen=True)
class DecoyCombinations:
    """Lim et al.'s decoy bounds (A4)-(A6) as combinations of the expected class counts,
    with each weight at its worst point of the intensity box (module docstring of
    :mod:`qkdnode.postproc.finitekey_tails`, "Combinations"). For every true intensity in
    the box and all expected counts n*, m*:

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
    most ten are used (:mod:`qkdnode.postproc.finitekey`, "Epsilon split")."""
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
    ``source``'s intervals except with probability ``eps_sec`` (see the module docstring, and
    :mod:`qkdnode.postproc.finitekey_tails` for the fluctuation terms). Raises
    :class:`FiniteKeyError`."""
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
