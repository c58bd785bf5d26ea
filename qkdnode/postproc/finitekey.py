"""Finite-key decoy-state analysis: the bound of Lim, Curty, Walenta, Xu, Zbinden,
PRA 89, 022307 (2014), with Chernoff instead of Hoeffding fluctuation terms, one Chernoff
event per decoy combination instead of one per class, a random-sampling bound on the phase
error tighter than Lim et al.'s ``gamma``, and intensities known only within intervals.

Three intensity classes k = signal, decoy, vacuum with mean photon numbers mu1 > mu2 + mu3,
mu2 > mu3 >= 0 and probabilities p_k. Key comes from all Z-basis detections; the X basis is
disclosed and bounds the phase error of the single-photon Z events. The secret key length is
Lim et al. eq. (1):

    l = floor( s_Z0 + s_Z1 * (1 - h(phi_Z)) - lambda_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) )

This module holds that formula (:func:`secret_key_length`, :func:`key_length_raw`) and
what the pipeline calls for each block (:func:`estimate_from_params`), and is the public
face of the analysis: it re-exports the parts, each in a module of its own,

- :mod:`qkdnode.postproc.finitekey_model` — intensity intervals, the decoy source, counts
  per class, the estimates, the statistics modes and :class:`FiniteKeyError`;
- :mod:`qkdnode.postproc.finitekey_tails` — the statistical bounds: Chernoff and Hoeffding
  bounds on expected counts, one Chernoff event per decoy combination, and the
  random-sampling bound on the phase error;
- :mod:`qkdnode.postproc.finitekey_decoy` — the decoy-state bounds on the vacuum and
  single-photon yields and errors (Lim et al.'s eqs. (A4)-(A6)) over the intensity box.

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

Counts are numbers of detections (floats allowed), intensities mean photon numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qkdnode.postproc.cascade import binary_entropy
from qkdnode.postproc.finitekey_decoy import (
    DecoyCombinations,
    decoy_bounds,
    decoy_bounds_common_scale,
    estimate,
)
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
    expectation_lower,
    expectation_upper,
    gamma,
    hoeffding_delta,
    phase_error_upper,
)

if TYPE_CHECKING:
    from qkdnode.postproc.params import PostprocParams

__all__ = [
    "EPS_TERMS",
    "Combination",
    "DecoyCombinations",
    "DecoyCounts",
    "DecoyEstimates",
    "DecoySource",
    "FiniteKeyError",
    "Interval",
    "Statistics",
    "combination_lower",
    "decoy_bounds",
    "decoy_bounds_common_scale",
    "estimate",
    "estimate_from_params",
    "expectation_lower",
    "expectation_upper",
    "gamma",
    "hoeffding_delta",
    "key_length_raw",
    "phase_error_upper",
    "secret_key_length",
    "source_from_params",
]


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
