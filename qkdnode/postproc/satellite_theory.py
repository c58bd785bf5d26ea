"""Secret key per satellite pass for decoy-state BB84 (three intensities, biased bases).

Input: the link transmittance of each time slot of a pass (for instance
``drivers.satellite_pass.pass_profile(...).transmittance`` over the samples above the
minimum elevation); the source, detector and security settings. Output: the expected
counts of the pass, and the secret key length of one pass under a finite-key bound, with an
optimiser over the protocol settings.

**Detection model** (Sidhu et al., npj Quantum Information 8, 18 (2022), sec. Methods; as in
their SatQuMA code): per slot of transmittance ``eta_t`` and intensity ``mu_k``, a click
with probability ``D_k = (1 + p_ap) (1 - (1 - 2 p_ec) exp(-mu_k eta_t))`` and an error with
probability ``e_k = p_ec + p_ap D_k / 2 + e_int (1 - exp(-mu_k eta_t))`` (``p_ec``
extraneous counts per slot and detector, ``p_ap`` afterpulsing, ``e_int`` intrinsic error);
both parties choose the key basis with probability ``p_key``. Counts are expected values
(the usual forecast: observed counts equal their expectations). One difference from
SatQuMA v1.1: errors per intensity are ``sum_t e_k`` for each class, whereas SatQuMA shares
each slot's errors among the classes in proportion to their detections (with ``p_ec =
1e-8`` the two agree to far below 0.1 % of the key).

**Finite-key bounds**, :class:`Bound`:

* ``Bound.LIM_YIN`` (the reproduction of SatQuMA): Lim, Curty, Walenta, Xu, Zbinden, PRA
  89, 022307 (2014), eqs. (1)-(5), with each class's expected count bounded by the
  closed-form Chernoff terms of Yin et al., Sci. Rep. 10, 14312 (2020):
  ``n_k^- = e^mu_k / p_k (n_k - beta/2 - sqrt(2 n_k beta + beta^2/4))`` and
  ``n_k^+ = e^mu_k / p_k (n_k + beta + sqrt(2 n_k beta + beta^2))``, ``beta =
  ln(21 / eps_sec)``, and Lim et al.'s ``gamma`` for the phase error. This is what SatQuMA
  computes, so it is the bound to compare its published numbers with.
* ``Bound.QKDNODE``: qkdnode's own analysis (:mod:`qkdnode.postproc.finitekey`: one
  Chernoff event per decoy combination and a random-sampling phase-error bound) fed with the
  pass's expected counts. It is tighter, so it gives more key than SatQuMA for the same
  pass; it is the bound the node's pipeline applies to real blocks.

Error correction (both bounds): the finite-size estimate of Tomamichel, Martinez-Mateo,
Pacher, Elkouss, Quantum Inf. Process. 16, 280 (2017), eq. (6), in bits throughout
(:func:`leak_ec_bits`); SatQuMA v1.1 takes the logarithms of its correction terms in nats,
which changes the key by about 0.02 % at the reference's 27 dB point.

Failure modes: :class:`SatelliteKeyError` (a ``ValueError``) on inconsistent settings
(probabilities outside (0, 1), ``mu1 <= mu2 + mu3``, negative transmittance). A pass whose
bound is negative gives ``key_bits = 0`` (and the unclipped value in ``key_bits_raw``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize
from scipy.stats import binom

from qkdnode.postproc.cascade import binary_entropy
from qkdnode.postproc.finitekey import (
    EPS_TERMS,
    DecoyCounts,
    FiniteKeyError,
    Statistics,
    estimate,
    gamma,
    key_length_raw,
)

__all__ = [
    "Bound",
    "PassCounts",
    "PassKey",
    "PassOptimum",
    "ProtocolSettings",
    "SatelliteKeyError",
    "SatelliteLink",
    "SatelliteSecurity",
    "expected_pass_counts",
    "leak_ec_bits",
    "optimise_pass",
    "pass_key",
]

FloatArray = npt.NDArray[np.float64]
_NUM_ZERO = 1e-10  # floor of the vacuum/single-photon bounds, as in SatQuMA


class SatelliteKeyError(ValueError):
    """Inconsistent protocol, link or security settings."""


class Bound(enum.StrEnum):
    """Which finite-key analysis turns the pass's counts into a key length."""

    LIM_YIN = "lim_yin"
    QKDNODE = "qkdnode"


@dataclass(frozen=True)
class ProtocolSettings:
    """Decoy-state BB84 settings: key-basis probability (both parties), signal and decoy
    probabilities (the vacuum/weak class takes the rest) and mean photon numbers."""

    p_key_basis: float
    p_signal: float
    p_decoy: float
    mu_signal: float
    mu_decoy: float
    mu_vacuum: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.p_key_basis < 1.0:
            raise SatelliteKeyError(f"p_key_basis must be in (0, 1), got {self.p_key_basis}")
        if not (self.p_signal > 0 and self.p_decoy > 0 and self.p_signal + self.p_decoy < 1):
            raise SatelliteKeyError(
                f"need p_signal, p_decoy > 0 and p_signal + p_decoy < 1, got "
                f"{self.p_signal}, {self.p_decoy}"
            )
        if not (self.mu_signal > self.mu_decoy + self.mu_vacuum and self.mu_decoy > self.mu_vacuum):
            raise SatelliteKeyError(
                "need mu_signal > mu_decoy + mu_vacuum and mu_decoy > mu_vacuum >= 0, got "
                f"{self.mu_signal}, {self.mu_decoy}, {self.mu_vacuum}"
            )
        if self.mu_vacuum < 0:
            raise SatelliteKeyError(f"mu_vacuum must be >= 0, got {self.mu_vacuum}")

    @property
    def mus(self) -> tuple[float, float, float]:
        return (self.mu_signal, self.mu_decoy, self.mu_vacuum)

    @property
    def probs(self) -> tuple[float, float, float]:
        return (self.p_signal, self.p_decoy, 1.0 - self.p_signal - self.p_decoy)


class SatelliteLink(BaseModel):
    """Source and receiver figures of a downlink; losses belong to the transmittance.

    Defaults are the SatQuMA v1.1 example (Sidhu et al. 2022): 1 GHz source, 1 s slots,
    extraneous count probability 1e-8 per pulse, afterpulsing 0.1 %, intrinsic QBER 0.1 %.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_rate_hz: float = Field(1e9, gt=0.0)
    slot_duration_s: float = Field(1.0, gt=0.0)
    p_extraneous: float = Field(1e-8, ge=0.0, lt=0.5)
    p_afterpulse: float = Field(1e-3, ge=0.0, lt=1.0)
    qber_intrinsic: float = Field(1e-3, ge=0.0, lt=0.5)


class SatelliteSecurity(BaseModel):
    """Correctness and secrecy parameters (SatQuMA's defaults: 1e-15 and 1e-9)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    eps_cor: float = Field(1e-15, gt=0.0, lt=1.0)
    eps_sec: float = Field(1e-9, gt=0.0, lt=1.0)


@dataclass(frozen=True)
class PassCounts:
    """Expected counts of one pass per intensity class (signal, decoy, vacuum)."""

    n_key: tuple[float, float, float]  # detections, both in the key basis
    n_test: tuple[float, float, float]  # detections, both in the test basis
    m_key: tuple[float, float, float]  # errors among n_key
    m_test: tuple[float, float, float]  # errors among n_test

    @property
    def qber_key(self) -> float:
        return sum(self.m_key) / sum(self.n_key)


@dataclass(frozen=True)
class PassKey:
    """Secret key of one pass and the quantities behind it."""

    key_bits: int
    key_bits_raw: float
    counts: PassCounts
    s0_lower: float
    s1_lower: float
    phase_error_upper: float
    leak_ec_bits: float
    bound: Bound


@dataclass(frozen=True)
class PassOptimum:
    settings: ProtocolSettings
    key: PassKey
    evaluations: int


def _check_transmittance(transmittance: FloatArray) -> FloatArray:
    eta = np.asarray(transmittance, dtype=np.float64)
    if eta.ndim != 1 or eta.size == 0 or not np.all(np.isfinite(eta)):
        raise SatelliteKeyError("transmittance must be a non-empty 1-D array of finite values")
    if np.any(eta < 0) or np.any(eta > 1):
        raise SatelliteKeyError("transmittance must lie in [0, 1]")
    return eta


def expected_pass_counts(
    transmittance: FloatArray, settings: ProtocolSettings, link: SatelliteLink
) -> PassCounts:
    """Expected counts of a pass whose slots have the given transmittances (see the module
    docstring for the detection model)."""
    eta = _check_transmittance(transmittance)
    mus = np.asarray(settings.mus)[:, None]
    probs = np.asarray(settings.probs)
    no_click = np.exp(-mus * eta[None, :])  # (3, slots)
    clicks = (1 + link.p_afterpulse) * (1 - (1 - 2 * link.p_extraneous) * no_click)
    errors = (
        link.p_extraneous + 0.5 * link.p_afterpulse * clicks + link.qber_intrinsic * (1 - no_click)
    )
    pulses_per_slot = link.source_rate_hz * link.slot_duration_s
    per_class = probs * pulses_per_slot
    d_sum = per_class * clicks.sum(axis=1)
    e_sum = per_class * errors.sum(axis=1)
    pk = settings.p_key_basis**2
    pt = (1 - settings.p_key_basis) ** 2

    def tri(a: FloatArray) -> tuple[float, float, float]:
        return (float(a[0]), float(a[1]), float(a[2]))

    return PassCounts(tri(pk * d_sum), tri(pt * d_sum), tri(pk * e_sum), tri(pt * e_sum))


def leak_ec_bits(n_key: float, qber: float, eps_cor: float) -> float:
    """Bits disclosed by error correction of ``n_key`` bits at error rate ``qber``:
    Tomamichel et al. (2017) eq. (6), ``n h(Q) + (n (1 - Q) - F^-1(eps_cor (1 + 1/sqrt(n)))
    - 1) log2((1 - Q)/Q) - log2(n)/2 - log2(1/eps_cor)``, F the binomial(n, 1 - Q)
    distribution. Returns 0 for ``qber == 0`` or ``n_key < 1``."""
    if n_key < 1 or qber <= 0:
        return 0.0
    if qber >= 0.5:
        return float(n_key)
    n = math.floor(n_key)
    quantile = float(binom.ppf(eps_cor * (1.0 + 1.0 / math.sqrt(n)), n, 1.0 - qber))
    return (
        n * binary_entropy(qber)
        + (n * (1.0 - qber) - quantile - 1.0) * math.log2((1.0 - qber) / qber)
        - 0.5 * math.log2(n)
        - math.log2(1.0 / eps_cor)
    )


def _yin_bounds(
    counts: tuple[float, float, float], settings: ProtocolSettings, beta: float
) -> tuple[FloatArray, FloatArray]:
    """Yin et al. (2020) bounds on each class's expected count, rescaled by e^mu / p."""
    n = np.asarray(counts, dtype=np.float64)
    scale = np.exp(np.asarray(settings.mus)) / np.asarray(settings.probs)
    root_lo = np.sqrt(2 * n * beta + beta**2 / 4)
    root_hi = np.sqrt(2 * n * beta + beta**2)
    return scale * (n - beta / 2 - root_lo), scale * (n + beta + root_hi)


def _tau(n_photons: int, settings: ProtocolSettings) -> float:
    return sum(
        p * math.exp(-m) * m**n_photons for m, p in zip(settings.mus, settings.probs, strict=True)
    ) / math.factorial(n_photons)


def _s0_s1(lo: FloatArray, hi: FloatArray, settings: ProtocolSettings) -> tuple[float, float]:
    """Lim et al. (2014) eqs. (2)-(3): vacuum and single-photon event bounds."""
    mu1, mu2, mu3 = settings.mus
    tau0, tau1 = _tau(0, settings), _tau(1, settings)
    s0 = max(tau0 * (mu2 * lo[2] - mu3 * lo[1]) / (mu2 - mu3), _NUM_ZERO)
    s1 = (
        tau1
        * mu1
        * (lo[1] - hi[2] - (mu2**2 - mu3**2) / mu1**2 * (hi[0] - s0 / tau0))
        / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)
    )
    return s0, max(s1, _NUM_ZERO)


def _key_lim_yin(
    counts: PassCounts, settings: ProtocolSettings, security: SatelliteSecurity
) -> tuple[float, float, float, float, float]:
    beta = math.log(EPS_TERMS / security.eps_sec)
    lo_k, hi_k = _yin_bounds(counts.n_key, settings, beta)
    lo_t, hi_t = _yin_bounds(counts.n_test, settings, beta)
    mlo_t, mhi_t = _yin_bounds(counts.m_test, settings, beta)
    s0_k, s1_k = _s0_s1(lo_k, hi_k, settings)
    _, s1_t = _s0_s1(lo_t, hi_t, settings)
    _, mu2, mu3 = settings.mus
    v1_t = _tau(1, settings) * (mhi_t[1] - mlo_t[2]) / (mu2 - mu3)
    v1_t = min(max(v1_t, _NUM_ZERO), sum(counts.m_test))
    ratio = min(v1_t / s1_t, 1.0 - 1e-16)
    phi = min(ratio + gamma(security.eps_sec, ratio, s1_t, s1_k), 0.5)
    leak = leak_ec_bits(sum(counts.n_key), counts.qber_key, security.eps_cor)
    raw = (
        s0_k
        + s1_k * (1.0 - binary_entropy(phi))
        - leak
        - 6.0 * math.log2(EPS_TERMS / security.eps_sec)
        - math.log2(2.0 / security.eps_cor)
    )
    return raw, s0_k, s1_k, phi, leak


def _key_qkdnode(
    counts: PassCounts, settings: ProtocolSettings, security: SatelliteSecurity
) -> tuple[float, float, float, float, float]:
    # qkdnode's analysis takes key from Z and tests in X: map key basis -> Z, test -> X.
    decoy = DecoyCounts(n_z=counts.n_key, n_x=counts.n_test, m_x=counts.m_test)
    try:
        est = estimate(
            decoy, settings.mus, settings.probs, security.eps_sec, statistics=Statistics.CHERNOFF
        )
    except FiniteKeyError as exc:
        raise SatelliteKeyError(str(exc)) from exc
    leak = leak_ec_bits(sum(counts.n_key), counts.qber_key, security.eps_cor)
    raw = key_length_raw(est, leak, security.eps_sec, security.eps_cor)
    return raw, est.s_z0_lower, est.s_z1_lower, est.phi_z_upper, leak


def pass_key(
    transmittance: FloatArray,
    settings: ProtocolSettings,
    link: SatelliteLink | None = None,
    security: SatelliteSecurity | None = None,
    *,
    bound: Bound = Bound.LIM_YIN,
) -> PassKey:
    """Secret key (bits) of one pass whose slots have the given transmittances."""
    link = link or SatelliteLink()
    security = security or SatelliteSecurity()
    counts = expected_pass_counts(transmittance, settings, link)
    compute = _key_lim_yin if bound is Bound.LIM_YIN else _key_qkdnode
    raw, s0, s1, phi, leak = compute(counts, settings, security)
    return PassKey(max(0, math.floor(raw)), raw, counts, s0, s1, phi, leak, bound)


# --- optimiser -----------------------------------------------------------------------------
# SatQuMA's search box: p_key in [0.3, 1), p_signal in [0.6, 0.9999], p_decoy in (0, 0.4],
# mu_signal in [0.3, 1], mu_decoy in [0.1, 0.5], with mu_signal > mu_decoy + mu_vacuum.
_BOX = ((0.3, 0.999), (0.6, 0.9999), (1e-4, 0.4), (0.1, 0.5))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def _logit(y: float) -> float:
    y = min(max(y, 1e-9), 1 - 1e-9)
    return math.log(y / (1 - y))


def _decode(z: FloatArray, mu_vacuum: float) -> ProtocolSettings:
    (k_lo, k_hi), (s_lo, s_hi), (d_lo, d_hi), (m2_lo, m2_hi) = _BOX
    p_key = k_lo + (k_hi - k_lo) * _sigmoid(float(z[0]))
    p_signal = s_lo + (s_hi - s_lo) * _sigmoid(float(z[1]))
    p_decoy = min(d_lo + (d_hi - d_lo) * _sigmoid(float(z[2])), (1 - p_signal) * (1 - 1e-6))
    mu_decoy = max(m2_lo, mu_vacuum * (1 + 1e-6) + 1e-6) + (m2_hi - m2_lo) * _sigmoid(float(z[3]))
    mu1_lo = max(0.3, mu_decoy + mu_vacuum + 1e-6)
    mu_signal = mu1_lo + (1.0 - mu1_lo) * _sigmoid(float(z[4]))
    return ProtocolSettings(p_key, p_signal, p_decoy, mu_signal, mu_decoy, mu_vacuum)


def _encode(s: ProtocolSettings) -> FloatArray:
    (k_lo, k_hi), (s_lo, s_hi), (d_lo, d_hi), (m2_lo, m2_hi) = _BOX
    mu1_lo = max(0.3, s.mu_decoy + s.mu_vacuum + 1e-6)
    return np.array(
        [
            _logit((s.p_key_basis - k_lo) / (k_hi - k_lo)),
            _logit((s.p_signal - s_lo) / (s_hi - s_lo)),
            _logit((s.p_decoy - d_lo) / (d_hi - d_lo)),
            _logit((s.mu_decoy - m2_lo) / (m2_hi - m2_lo)),
            _logit((s.mu_signal - mu1_lo) / (1.0 - mu1_lo)),
        ]
    )


def optimise_pass(
    transmittance: FloatArray,
    link: SatelliteLink | None = None,
    security: SatelliteSecurity | None = None,
    *,
    bound: Bound = Bound.LIM_YIN,
    start: ProtocolSettings | None = None,
    mu_vacuum: float = 0.0,
    max_evaluations: int = 2000,
) -> PassOptimum:
    """Settings that maximise the key of one pass (Nelder-Mead over a logistic map of
    SatQuMA's search box, from ``start`` and from a generic point; the objective is the
    unclipped key so the search has a slope where no key is possible yet)."""
    eta = _check_transmittance(transmittance)
    link = link or SatelliteLink()
    security = security or SatelliteSecurity()
    evaluations = 0

    def objective(z: FloatArray) -> float:
        nonlocal evaluations
        evaluations += 1
        try:
            return -pass_key(eta, _decode(z, mu_vacuum), link, security, bound=bound).key_bits_raw
        except (SatelliteKeyError, ValueError, ZeroDivisionError):
            return math.inf

    starts = [ProtocolSettings(0.7, 0.7, 0.2, 0.7, 0.2, mu_vacuum)]
    if start is not None:
        starts.insert(0, start)
    best: tuple[float, FloatArray] | None = None
    for s in starts:
        res = minimize(
            objective,
            _encode(s),
            method="Nelder-Mead",
            options={"maxfev": max_evaluations // len(starts), "xatol": 1e-4, "fatol": 1e-3},
        )
        if best is None or res.fun < best[0]:
            best = (float(res.fun), np.asarray(res.x, dtype=np.float64))
    assert best is not None
    settings = _decode(best[1], mu_vacuum)
    return PassOptimum(settings, pass_key(eta, settings, link, security, bound=bound), evaluations)
