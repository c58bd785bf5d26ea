"""Choose the source settings and the block size for a measured link.

Given the link as calibration measures it (:class:`LinkModel`: overall transmittance
including the receiver's efficiency, background click probability per pulse, optical error,
slot rate, error-correction inefficiency) and a block size (:class:`Pulses` or
:class:`Detections`), :func:`optimize_settings` picks the signal and decoy mean photon
numbers, their probabilities and the Z-basis probability that maximise the *expected*
secret bits per pulse of the finite-key analysis of :mod:`qkdnode.postproc.finitekey`:
the bound is evaluated on the expected counts of the block (:func:`expected_key`), with the
intensities widened to their calibration intervals exactly as the pipeline will do.

:func:`required_block` gives the smallest block (in detections) whose rate reaches a
fraction (default 0.9) of the rate for infinitely large blocks of the same protocol
(:func:`optimize_asymptotic`), and :func:`reach_km` the largest distance with a positive
key. Everything is numpy/scipy and pure: a call of :func:`optimize_settings` takes about
0.15 s (:attr:`Optimum.seconds`; about 1500 evaluations of the bound), so the node can
re-optimise at each block start.

Search: Nelder-Mead over an unconstrained reparametrisation (logistic maps onto the allowed
ranges, a softmax onto the three probabilities) so that every point it tries satisfies
``mu1 > mu2 + mu3`` and ``mu2 > mu3`` over the whole intensity box; a few fixed starting
points; the objective is the key length before clipping at zero, so the search still has a
slope where no key is possible yet.

Run ``python -m qkdnode.demo.compare --plot docs/img/finite-key-rate.png`` for the figure of
docs/finite-key.md (the default simulated link translated by :mod:`qkdnode.demo.compare`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize
from scipy.stats import qmc

from qkdnode.postproc import finitekey, finitekey_decoy, theory
from qkdnode.postproc.cascade import binary_entropy
from qkdnode.postproc.finitekey_model import DecoyEstimates, DecoySource, Interval, Statistics


class OptimizeError(ValueError):
    """Inconsistent link, source or block description."""


@dataclass(frozen=True)
class LinkModel:
    """The link as measured. Probabilities are per pulse (slot)."""

    transmittance: float  # channel x receiver optics x detector efficiency
    background_per_pulse: float  # Y0: background click probability of the receiver
    optical_error: float  # e_d
    slot_rate_hz: float
    ec_inefficiency: float | Callable[[float], float] = 1.1  # f, or f(QBER)
    p_basis_z_rx: float | None = None  # receiver's Z probability if fixed (passive splitter)

    def __post_init__(self) -> None:
        if not 0 < self.transmittance <= 1:
            raise OptimizeError(f"transmittance must be in (0, 1], got {self.transmittance}")
        if not 0 <= self.background_per_pulse < 1:
            raise OptimizeError(f"background must be in [0, 1), got {self.background_per_pulse}")
        if not 0 <= self.optical_error <= 0.5:
            raise OptimizeError(f"optical error must be in [0, 0.5], got {self.optical_error}")
        if not self.slot_rate_hz > 0:
            raise OptimizeError(f"slot rate must be > 0, got {self.slot_rate_hz}")
        if self.p_basis_z_rx is not None and not 0 < self.p_basis_z_rx < 1:
            raise OptimizeError(f"p_basis_z_rx must be in (0, 1), got {self.p_basis_z_rx}")

    def f_ec(self, qber: float) -> float:
        f = self.ec_inefficiency
        return float(f(qber)) if callable(f) else float(f)

    def with_transmittance(self, transmittance: float) -> LinkModel:
        return replace(self, transmittance=transmittance)


@dataclass(frozen=True)
class SourceModel:
    """What the transmitter can set and how well it knows it."""

    mu_vacuum: Interval = field(default_factory=lambda: Interval.point(0.0))
    mu_rel_uncertainty: float = 0.0  # true signal/decoy mu within mu * (1 -+ this)
    mu_signal_max: float = 1.0
    p_min: float = 0.01  # smallest probability of any intensity class
    p_basis_z_range: tuple[float, float] = (0.5, 0.98)

    def __post_init__(self) -> None:
        if not 0 <= self.mu_rel_uncertainty < 0.5:
            raise OptimizeError(
                f"mu_rel_uncertainty must be in [0, 0.5), got {self.mu_rel_uncertainty}"
            )
        if not 0 < self.p_min < 1 / 3:
            raise OptimizeError(f"p_min must be in (0, 1/3), got {self.p_min}")
        lo, hi = self.p_basis_z_range
        if not 0 < lo < hi < 1:
            raise OptimizeError(f"p_basis_z_range must satisfy 0 < lo < hi < 1, got {lo, hi}")
        if self.mu_signal_max <= self.mu_signal_min():
            raise OptimizeError("mu_signal_max leaves no room above the decoy and vacuum")

    def decoy_min(self) -> float:
        """Smallest decoy with ``mu2.lower > mu3.upper`` (plus a margin)."""
        u = self.mu_rel_uncertainty
        return max(1e-4, 1.02 * self.mu_vacuum.upper / (1.0 - u))

    def decoy_max(self, mu_signal: float) -> float:
        """Largest decoy with ``mu1.lower > mu2.upper + mu3.upper`` (plus a margin)."""
        u = self.mu_rel_uncertainty
        return (mu_signal * (1.0 - u) - self.mu_vacuum.upper) / (1.0 + u) / 1.02

    def mu_signal_min(self) -> float:
        return (
            1.05
            * (self.decoy_min() * 1.02 * (1 + self.mu_rel_uncertainty) + self.mu_vacuum.upper)
            / (1 - self.mu_rel_uncertainty)
        )

    def intervals(self, mu_signal: float, mu_decoy: float) -> tuple[Interval, Interval, Interval]:
        u = self.mu_rel_uncertainty
        return (Interval.around(mu_signal, u), Interval.around(mu_decoy, u), self.mu_vacuum)

    def nominal_vacuum(self) -> float:
        """Mean photon number of the vacuum class used for the expected counts."""
        return 0.5 * (self.mu_vacuum.lower + self.mu_vacuum.upper)


@dataclass(frozen=True)
class Security:
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15
    statistics: Statistics = Statistics.CHERNOFF
    extra_leak_bits: float = 0.0  # e.g. the verification hash


@dataclass(frozen=True)
class Pulses:
    """A block of this many sent pulses."""

    count: float


@dataclass(frozen=True)
class Detections:
    """A block of this many receiver detections (both bases, before sifting)."""

    count: float


Block = Pulses | Detections


@dataclass(frozen=True)
class Settings:
    """What the transmitter sets (and the receiver's Z probability if it is free)."""

    mu_signal: float
    mu_decoy: float
    p_signal: float
    p_decoy: float
    p_basis_z: float

    @property
    def p_vacuum(self) -> float:
        return 1.0 - self.p_signal - self.p_decoy


DEFAULT_SETTINGS = Settings(0.5, 0.1, 0.6, 0.2, 0.8)


@dataclass(frozen=True)
class KeyForecast:
    """Expected outcome of one block with given settings."""

    settings: Settings
    pulses: float
    detections: float
    qber: float
    estimates: DecoyEstimates
    key_length_raw: float  # Lim et al. eq. (1) before rounding and clipping
    secret_bits: int
    asymptotic: bool = False  # per pulse, no statistics: key_length_raw is the rate

    @property
    def bits_per_pulse(self) -> float:
        if self.asymptotic:
            return max(0.0, self.key_length_raw)
        return self.secret_bits / self.pulses if self.pulses > 0 else 0.0


@dataclass(frozen=True)
class Optimum:
    forecast: KeyForecast
    evaluations: int
    seconds: float

    @property
    def settings(self) -> Settings:
        return self.forecast.settings

    @property
    def bits_per_pulse(self) -> float:
        return self.forecast.bits_per_pulse


@dataclass(frozen=True)
class BlockAdvice:
    detections: float
    pulses: float
    acquisition_s: float
    optimum: Optimum
    asymptotic_bits_per_pulse: float
    seconds: float


# --- evaluation -----------------------------------------------------------------------------
def _p_rx(link: LinkModel, settings: Settings) -> float:
    return settings.p_basis_z if link.p_basis_z_rx is None else link.p_basis_z_rx


def _classes(settings: Settings, source: SourceModel) -> list[tuple[float, float]]:
    return [
        (settings.p_signal, settings.mu_signal),
        (settings.p_decoy, settings.mu_decoy),
        (settings.p_vacuum, source.nominal_vacuum()),
    ]


def detection_probability(link: LinkModel, settings: Settings, source: SourceModel) -> float:
    """Expected receiver detections per pulse (both bases)."""
    return sum(
        p * theory.gain(mu, link.transmittance, link.background_per_pulse)
        for p, mu in _classes(settings, source)
    )


def _pulses(block: Block, link: LinkModel, settings: Settings, source: SourceModel) -> float:
    if isinstance(block, Pulses):
        return float(block.count)
    return float(block.count) / detection_probability(link, settings, source)


def expected_key(
    link: LinkModel,
    settings: Settings,
    block: Block | None,
    *,
    source: SourceModel | None = None,
    security: Security | None = None,
) -> KeyForecast:
    """The finite-key analysis applied to the expected counts of ``block``. ``block=None``
    (or :attr:`Statistics.NONE`) gives the asymptotic rate of the same protocol: counts per
    pulse, no statistical or epsilon terms."""
    source = source or SourceModel()
    security = security or Security()
    asymptotic = block is None or security.statistics is Statistics.NONE
    pulses = 1.0 if block is None else _pulses(block, link, settings, source)
    exp = theory.expected_block(
        link.transmittance,
        link.background_per_pulse,
        link.optical_error,
        _classes(settings, source),
        p_z_tx=settings.p_basis_z,
        p_z_rx=_p_rx(link, settings),
        pulses=pulses,
    )
    decoy_source = DecoySource(
        source.intervals(settings.mu_signal, settings.mu_decoy),
        (settings.p_signal, settings.p_decoy, settings.p_vacuum),
    )
    statistics = Statistics.NONE if asymptotic else security.statistics
    est = finitekey_decoy.decoy_bounds(
        exp.counts, decoy_source, security.eps_sec, statistics=statistics
    )
    qber = exp.qber_z
    leak = link.f_ec(qber) * sum(exp.counts.n_z) * binary_entropy(qber)
    if asymptotic:
        raw = est.s_z0_lower + est.s_z1_lower * (1.0 - binary_entropy(est.phi_z_upper)) - leak
    else:
        leak += security.extra_leak_bits
        raw = finitekey.key_length_raw(est, leak, security.eps_sec, security.eps_cor)
    detections = pulses * detection_probability(link, settings, source)
    bits = 0 if block is None else max(0, math.floor(raw))
    return KeyForecast(settings, pulses, detections, qber, est, raw, bits, block is None)


# --- search ---------------------------------------------------------------------------------
def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def _logit(y: float) -> float:
    y = min(1 - 1e-9, max(1e-9, y))
    return math.log(y / (1 - y))


class _Coordinates:
    """Unconstrained vector <-> feasible :class:`Settings`."""

    def __init__(self, source: SourceModel) -> None:
        self.source = source
        self.mu1_lo = source.mu_signal_min()
        self.mu1_hi = source.mu_signal_max
        self.pz_lo, self.pz_hi = source.p_basis_z_range

    def settings(self, z: npt.NDArray[np.float64]) -> Settings:
        s = self.source
        mu1 = self.mu1_lo + (self.mu1_hi - self.mu1_lo) * _sigmoid(float(z[0]))
        lo, hi = s.decoy_min(), s.decoy_max(mu1)
        mu2 = lo + (hi - lo) * _sigmoid(float(z[1]))
        e = np.exp(np.clip([z[2], z[3], 0.0], -40.0, 40.0))
        w = e / e.sum()
        free = 1.0 - 3.0 * s.p_min
        p1, p2 = s.p_min + free * float(w[0]), s.p_min + free * float(w[1])
        pz = self.pz_lo + (self.pz_hi - self.pz_lo) * _sigmoid(float(z[4]))
        return Settings(mu1, mu2, p1, p2, pz)

    def vector(self, st: Settings) -> npt.NDArray[np.float64]:
        s = self.source
        mu1 = min(max(st.mu_signal, self.mu1_lo * 1.001), self.mu1_hi * 0.999)
        lo, hi = s.decoy_min(), s.decoy_max(mu1)
        mu2 = min(max(st.mu_decoy, lo + 1e-6 * (hi - lo)), hi - 1e-6 * (hi - lo))
        free = 1.0 - 3.0 * s.p_min
        w = [max(1e-9, (p - s.p_min) / free) for p in (st.p_signal, st.p_decoy, st.p_vacuum)]
        pz = min(max(st.p_basis_z, self.pz_lo), self.pz_hi)
        return np.array(
            [
                _logit((mu1 - self.mu1_lo) / (self.mu1_hi - self.mu1_lo)),
                _logit((mu2 - lo) / (hi - lo)),
                math.log(w[0] / w[2]),
                math.log(w[1] / w[2]),
                _logit((pz - self.pz_lo) / (self.pz_hi - self.pz_lo)),
            ]
        )


_STARTS = (
    DEFAULT_SETTINGS,
    Settings(0.45, 0.15, 0.5, 0.3, 0.7),
    Settings(0.6, 0.08, 0.8, 0.1, 0.9),
)


def _presample(coords: _Coordinates, count: int) -> list[npt.NDArray[np.float64]]:
    """``count`` scrambled-Sobol points spread evenly over the feasible settings (uniform in
    mu1, in mu2 within its allowed range, over the probability simplex and in p_Z)."""
    sample = qmc.Sobol(d=5, scramble=True, seed=12345).random(count)
    out = []
    for u in np.clip(sample, 1e-6, 1 - 1e-6):
        a, b = min(u[2], u[3]), max(u[2], u[3])
        w = (max(a, 1e-6), max(b - a, 1e-6), max(1.0 - b, 1e-6))
        out.append(
            np.array(
                [
                    _logit(u[0]),
                    _logit(u[1]),
                    math.log(w[0] / w[2]),
                    math.log(w[1] / w[2]),
                    _logit(u[4]),
                ]
            )
        )
    return out


def _search(
    score: Callable[[Settings], float],
    source: SourceModel,
    starts: Sequence[Settings],
    max_evaluations: int,
    presample: int = 512,
) -> tuple[Settings, int]:
    """Nelder-Mead from the given starting points and from the best two of a quasi-random
    sample of the feasible region (narrow optima, e.g. weak intensities for tiny blocks,
    are missed by local searches from the usual settings alone)."""
    coords = _Coordinates(source)
    evaluations = 0

    def objective(z: npt.NDArray[np.float64]) -> float:
        nonlocal evaluations
        evaluations += 1
        value = -score(coords.settings(z))
        return value if math.isfinite(value) else 1e30

    x0s = [coords.vector(st) for st in starts]
    if presample > 0:
        sampled = sorted(_presample(coords, presample), key=objective)
        x0s += sampled[:2]
    best_z, best_f = x0s[0], objective(x0s[0])
    budget = max(50, (max_evaluations - evaluations) // len(x0s))
    for x0 in x0s:
        res = minimize(
            objective,
            x0,
            method="Nelder-Mead",
            options={
                "maxfev": budget,
                "xatol": 1e-3,
                "fatol": 1e-12,
                "initial_simplex": x0 + np.vstack([np.zeros(5), 0.8 * np.eye(5)]),
            },
        )
        if res.fun < best_f:
            best_z, best_f = res.x, float(res.fun)
    return coords.settings(best_z), evaluations


def per_pulse_score(key_length_raw: float, pulses: float, scale: float) -> float:
    """Search objective: bits per pulse where a key exists; where none does, the (negative)
    key length over a fixed ``scale``, so that the search climbs towards a key instead of
    towards ever longer blocks that only dilute the deficit."""
    return key_length_raw / (pulses if key_length_raw > 0 else scale)


def best_settings(
    score: Callable[[Settings], float],
    *,
    source: SourceModel | None = None,
    starts: Sequence[Settings] = _STARTS,
    max_evaluations: int = 1500,
) -> tuple[Settings, int]:
    """Maximise ``score`` over the feasible settings of ``source`` (generic search, used by
    :func:`optimize_settings` and usable with another link model)."""
    return _search(score, source or SourceModel(), starts, max_evaluations)


def optimize_settings(
    link: LinkModel,
    block: Block,
    *,
    source: SourceModel | None = None,
    security: Security | None = None,
    start: Settings | None = None,
    max_evaluations: int = 1500,
) -> Optimum:
    """Settings maximising the expected finite-key secret bits per pulse of ``block``."""
    t0 = time.perf_counter()
    source = source or SourceModel()
    security = security or Security()

    starts = _STARTS if start is None else (start, *_STARTS)
    scale = _pulses(block, link, starts[0], source)

    def score(st: Settings) -> float:
        fc = expected_key(link, st, block, source=source, security=security)
        return per_pulse_score(fc.key_length_raw, fc.pulses, scale)

    best, n = _search(score, source, starts, max_evaluations)
    forecast = expected_key(link, best, block, source=source, security=security)
    return Optimum(forecast, n, time.perf_counter() - t0)


def optimize_asymptotic(
    link: LinkModel,
    *,
    source: SourceModel | None = None,
    start: Settings | None = None,
    max_evaluations: int = 1500,
) -> Optimum:
    """Settings maximising the rate of the same protocol for infinitely large blocks
    (``forecast.asymptotic`` is set; ``bits_per_pulse`` is the rate)."""
    t0 = time.perf_counter()
    source = source or SourceModel()

    def score(st: Settings) -> float:
        return expected_key(link, st, None, source=source).key_length_raw

    starts = _STARTS if start is None else (start, *_STARTS)
    best, n = _search(score, source, starts, max_evaluations)
    forecast = expected_key(link, best, None, source=source)
    return Optimum(forecast, n, time.perf_counter() - t0)


def required_block(
    link: LinkModel,
    *,
    fraction: float = 0.9,
    source: SourceModel | None = None,
    security: Security | None = None,
    max_detections: float = 1e13,
) -> BlockAdvice:
    """Smallest block (detections, to about 5 %) whose optimised expected rate reaches
    ``fraction`` of the optimised asymptotic rate of the same protocol. The returned advice
    holds the optimum at that size; if even ``max_detections`` does not reach it, that."""
    if not 0 < fraction < 1:
        raise OptimizeError(f"fraction must be in (0, 1), got {fraction}")
    t0 = time.perf_counter()
    asym = optimize_asymptotic(link, source=source)
    target = fraction * asym.bits_per_pulse
    if target <= 0:
        raise OptimizeError("no key even for infinitely large blocks on this link")
    start = asym.settings

    def at(n: float) -> Optimum:
        return optimize_settings(
            link,
            Detections(n),
            source=source,
            security=security,
            start=start,
            max_evaluations=600,
        )

    lo, hi = 3.0, math.log10(max_detections)
    best = at(10**hi)
    if best.bits_per_pulse < target:
        return _advice(link, best, source, asym.bits_per_pulse, t0)
    while hi - lo > 0.02:  # 10^0.02: 5 %
        mid = 0.5 * (lo + hi)
        opt = at(10**mid)
        if opt.bits_per_pulse >= target:
            hi, best, start = mid, opt, opt.settings
        else:
            lo = mid
    return _advice(link, best, source, asym.bits_per_pulse, t0)


def _advice(
    link: LinkModel, opt: Optimum, source: SourceModel | None, asym: float, t0: float
) -> BlockAdvice:
    fc = opt.forecast
    return BlockAdvice(
        detections=fc.pulses * detection_probability(link, fc.settings, source or SourceModel()),
        pulses=fc.pulses,
        acquisition_s=fc.pulses / link.slot_rate_hz,
        optimum=opt,
        asymptotic_bits_per_pulse=asym,
        seconds=time.perf_counter() - t0,
    )


def block_for_seconds(link: LinkModel, seconds: float) -> Pulses:
    """The block that ``seconds`` of acquisition at the link's slot rate gives."""
    return Pulses(link.slot_rate_hz * seconds)


def reach_km(
    link_at: Callable[[float], LinkModel],
    block: Block | None,
    *,
    source: SourceModel | None = None,
    security: Security | None = None,
    tolerance_km: float = 0.5,
    max_km: float = 1000.0,
) -> float:
    """Largest distance with a positive optimised key (``block=None``: asymptotic), found by
    bisection; ``link_at(d)`` is the link at ``d`` km."""
    start: Settings | None = None

    def positive(d: float) -> bool:
        nonlocal start
        link = link_at(d)
        if block is None:
            opt = optimize_asymptotic(link, source=source, start=start, max_evaluations=900)
        else:
            opt = optimize_settings(
                link,
                block,
                source=source,
                security=security,
                start=start,
                max_evaluations=900,
            )
        ok = opt.forecast.key_length_raw > 0
        if ok:
            start = opt.settings
        return ok

    lo, hi = 0.0, 50.0
    if not positive(lo):
        return 0.0
    while positive(hi):
        lo, hi = hi, 2 * hi
        if hi > max_km:
            return max_km
    while hi - lo > tolerance_km:
        mid = 0.5 * (lo + hi)
        if positive(mid):
            lo = mid
        else:
            hi = mid
    return lo
