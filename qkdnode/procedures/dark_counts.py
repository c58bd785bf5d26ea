"""Dark counts and detection efficiency, with the transmitter's light off then on.

Receiver side; the transmitter switches its light (``set_light`` is supplied by the
orchestration, which asks the peer). With the light off each detector's count rate is its
dark-count rate (per gate: divided by the slot rate). With the light on, the count rate
corrected for dead time and dark counts gives the click probability per slot, and

    p_click = sum_k p_k * E_states[ 1 - exp(-mu_k * x * a_c * f_state) ]

is solved for ``x`` = channel transmittance * detector efficiency, where ``a_c`` is the
share of the receiver's light sent to detector ``c``'s basis arm, and ``f_state`` the
share of that arm's light that leaves by ``c``'s port for each prepared state (1 or
``e_d`` in the detector's basis, 1/2 in the other). Given the channel transmittance (link
budget), the detector efficiency follows.

Counts, not rates, set what can be claimed. Each count-rate reading stands for
``reading_time_s`` of counting, so a detector's readings add up to a number of counts:

* dark counts: an exact Poisson interval at ``confidence`` (one-sided bounds) is always
  reported; the point value only from ``min_dark_counts`` counts on. Zero counts give an
  upper bound (``-ln(1 - confidence)`` counts over the counting time), never a rate of 0;
* efficiency: the interval combines the counting bounds of the light and dark counts with
  the intervals of the intensities (``mu_bounds``) and of the link budget. When the counts
  alone leave the efficiency less precise than ``max_efficiency_uncertainty`` (relative
  half-width), the procedure refuses: count longer.

The efficiency needs the encoding compensated. The shares ``f_state`` above hold for
states where they belong; with the encoder off its optimum (the bias at power-on, the
drives of a datasheet V_pi) a detector's share of its arm's light is off by up to tens
of percent, one detector of a pair up and the other down, and so is its efficiency (16 %
was seen with the encoder at power-on). So the procedure takes the error rate measured
with the encoding as it is (``encoding_qber``, after :mod:`encoder_v_pi` and
:mod:`encoding_compensation`) and refuses without it or above ``max_encoding_qber``. That
error rate is the misalignment of the model, and a relative ``encoding_qber`` widens the
interval: a residual rotation common to all states cancels between the two states of a
basis, one that differs between them (what is left of a V_pi error) shifts a detector's
share by at most that much.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import brentq

from drivers.interfaces import DetectorStatus, SinglePhotonDetector
from qkdnode.procedures.common import (
    COVERAGE_FACTOR,
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    finish,
    maybe_await,
    one_sided_confidence,
    poisson_lower,
    poisson_upper,
)

__all__ = [
    "DarkCountConfig",
    "DarkCountResult",
    "DetectorCounts",
    "click_probability",
    "dead_time_corrected",
    "efficiency_bounds",
    "measure_dark_counts_and_efficiency",
    "plot_dark_counts",
    "solve_system_efficiency",
]


def dead_time_corrected(rate_hz: float, dead_time_ns: float) -> float:
    """True event rate from an observed one (non-paralysable dead time)."""
    tau = dead_time_ns * 1e-9
    frac = rate_hz * tau
    if frac >= 1:
        raise CalibrationError(f"count rate {rate_hz:.3g} Hz saturates dead time {dead_time_ns} ns")
    return rate_hz / (1.0 - frac)


def click_probability(
    x: float,
    class_mix: Sequence[tuple[float, float]],
    arm_fraction: float,
    tx_same_basis_probability: float,
    misalignment: float = 0.0,
) -> float:
    """Expected click probability per slot of one detector for system efficiency ``x``."""
    p = 0.0
    ps = tx_same_basis_probability
    for p_k, mu in class_mix:
        lam = mu * x * arm_fraction
        same = 0.5 * (-math.expm1(-lam * (1 - misalignment))) + 0.5 * (
            -math.expm1(-lam * misalignment)
        )
        other = -math.expm1(-lam * 0.5)
        p += p_k * (ps * same + (1 - ps) * other)
    return p


def solve_system_efficiency(
    p_click: float,
    class_mix: Sequence[tuple[float, float]],
    arm_fraction: float,
    tx_same_basis_probability: float,
    misalignment: float = 0.0,
) -> float:
    """Invert :func:`click_probability` for ``x`` in (0, 1]."""
    if p_click <= 0:
        return 0.0
    top = click_probability(1.0, class_mix, arm_fraction, tx_same_basis_probability, misalignment)
    if p_click >= top:
        raise CalibrationError("click probability above what an ideal detector would give")
    return float(
        brentq(
            lambda x: (
                click_probability(
                    x, class_mix, arm_fraction, tx_same_basis_probability, misalignment
                )
                - p_click
            ),
            0.0,
            1.0,
            xtol=1e-12,
        )
    )


def efficiency_bounds(
    p_click_bounds: tuple[float, float],
    class_mix_bounds: tuple[Sequence[tuple[float, float]], Sequence[tuple[float, float]]],
    arm_fraction: float,
    tx_same_basis_probability: float,
    misalignment: float = 0.0,
) -> tuple[float, float]:
    """``(lower, upper)`` system efficiency from click-probability bounds.

    ``class_mix_bounds`` is the class mix at its upper intensities, then at its lower ones:
    the lowest efficiency explains the fewest clicks with the most light, and conversely.
    An upper bound above what an ideal detector gives is capped at 1."""
    mix_hi, mix_lo = class_mix_bounds
    args = (arm_fraction, tx_same_basis_probability, misalignment)
    lower = solve_system_efficiency(max(p_click_bounds[0], 0.0), mix_hi, *args)
    if p_click_bounds[1] >= click_probability(1.0, mix_lo, *args):
        return lower, 1.0
    return lower, solve_system_efficiency(p_click_bounds[1], mix_lo, *args)


class DarkCountConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reading_time_s: float = Field(
        gt=0, description="counting time behind each count-rate reading (integration period)"
    )
    readings: int = Field(5, ge=1, description="count-rate readings per condition")
    rx_p_basis_z: float = Field(0.9, gt=0, lt=1, description="receiver's passive Z share")
    tx_p_basis_z: float = Field(0.9, gt=0, lt=1)
    misalignment: float = Field(0.0, ge=0, lt=0.5)
    basis_of_detector: list[int] = Field(
        default_factory=lambda: [0, 0, 1, 1], description="0 = Z arm, 1 = X arm"
    )
    confidence: float = Field(
        one_sided_confidence(COVERAGE_FACTOR),
        gt=0.5,
        lt=1,
        description="of each one-sided bound (default: 3 standard deviations, 99.865 %)",
    )
    min_dark_counts: int = Field(
        100, ge=1, description="dark counts needed for a point value (1/sqrt(100): 10 %)"
    )
    max_efficiency_uncertainty: float = Field(
        0.05, gt=0, lt=1, description="refuse when counting leaves a wider relative half-width"
    )
    max_encoding_qber: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="refuse the efficiency when the encoding's measured error rate is higher "
        "(not compensated)",
    )


class DetectorCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: str
    counting_time_s: float = Field(description="per condition (light off, light on)")
    dark_counts: int
    dark_rate_hz: float | None = Field(
        description="dead-time corrected; None when fewer than min_dark_counts were seen"
    )
    dark_rate_lower_hz: float
    dark_rate_upper_hz: float
    dark_probability_per_slot: float | None
    dark_probability_upper_per_slot: float
    light_counts: int
    light_rate_hz: float
    click_probability_per_slot: float
    system_efficiency: float
    system_efficiency_lower: float
    system_efficiency_upper: float
    detector_efficiency: float | None
    detector_efficiency_lower: float | None
    detector_efficiency_upper: float | None


class DarkCountResult(CalibrationResult):
    procedure: str = "dark_counts"
    slot_rate_hz: float
    confidence: float
    channel_transmittance: float | None
    channel_transmittance_uncertainty_db: float
    encoding_qber: float = Field(description="error rate of the encoding during the light")
    class_mix: list[tuple[float, float]]
    mu_bounds: list[tuple[float, float]] | None
    detectors: list[DetectorCounts]


async def _counts(
    dets: Sequence[SinglePhotonDetector],
    readings: int,
    reading_time_s: float,
    wait: Callable[[], object],
) -> list[int]:
    acc = [0] * len(dets)
    for _ in range(readings):
        await maybe_await(wait())
        for i, d in enumerate(dets):
            acc[i] += round(float(await call(d.count_rate_hz)) * reading_time_s)
    return acc


async def measure_dark_counts_and_efficiency(
    detectors: Sequence[SinglePhotonDetector],
    set_light: Callable[[bool], Awaitable[None]],
    slot_rate_hz: float,
    class_mix: Sequence[tuple[float, float]],
    cfg: DarkCountConfig,
    *,
    mu_bounds: Sequence[tuple[float, float]] | None = None,
    channel_transmittance: float | None = None,
    channel_transmittance_uncertainty_db: float = 0.5,
    encoding_qber: float | None = None,
    wait_integration: Callable[[], object] | None = None,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> DarkCountResult:
    """Dark rates (light off), then efficiencies (light on), with their intervals.

    ``set_light(on)`` asks the transmitter to switch its light; ``class_mix`` lists
    ``(probability, mu)`` of what it sends while on (e.g. the key mix, or
    ``[(0.5, mu_signal), (0.5, 0)]`` during the sync pattern) and ``mu_bounds`` the
    ``(lower, upper)`` of each mu (without them the intervals cover counting only).
    ``channel_transmittance`` is the link budget and its uncertainty (0.5 dB: connector
    and splice losses of a measured link). ``encoding_qber`` is the error rate measured with
    the encoding as it stands, after its compensation (module docstring). The light is
    left on. Raises CalibrationError without ``encoding_qber`` or above
    ``cfg.max_encoding_qber`` (before switching anything), and when the counts do not give
    the efficiency to ``cfg.max_efficiency_uncertainty``.
    """
    started = time.monotonic()
    if encoding_qber is None:
        raise CalibrationError(
            "detector efficiency needs the encoding compensated: give encoding_qber, the "
            "error rate measured after the encoder V_pi and encoding compensation"
        )
    if not 0 <= encoding_qber <= cfg.max_encoding_qber:
        raise CalibrationError(
            f"encoding error rate {encoding_qber:.2%} outside [0, {cfg.max_encoding_qber:.1%}]:"
            " compensate the encoding before measuring the detector efficiency"
        )
    misalignment = max(cfg.misalignment, encoding_qber)
    wait = wait_integration or (lambda: None)
    if mu_bounds is not None and len(mu_bounds) != len(class_mix):
        raise ValueError("mu_bounds needs one (lower, upper) per class_mix entry")
    for d in detectors:
        if await call(d.status) != DetectorStatus.ARMED:
            await call(d.arm)
    await set_light(False)
    await maybe_await(wait())  # flush an integration period that saw the light
    dark = await _counts(detectors, cfg.readings, cfg.reading_time_s, wait)
    await set_light(True)
    await maybe_await(wait())
    light = await _counts(detectors, cfg.readings, cfg.reading_time_s, wait)
    t = cfg.readings * cfg.reading_time_s
    conf = cfg.confidence
    mix_point = [(float(p), float(m)) for p, m in class_mix]
    if mu_bounds is None:
        mix_hi = mix_lo = mix_point
    else:
        mix_hi = [(p, float(hi)) for (p, _), (_, hi) in zip(mix_point, mu_bounds, strict=True)]
        mix_lo = [(p, float(lo)) for (p, _), (lo, _) in zip(mix_point, mu_bounds, strict=True)]
    budget = 10 ** (channel_transmittance_uncertainty_db / 10)
    out = []
    for i, det in enumerate(detectors):
        tau = float(await call(det.dead_time_ns))

        def rate(counts: float, tau: float = tau) -> float:
            return dead_time_corrected(counts / t, tau)

        n_d, n_l = dark[i], light[i]
        dark_lo, dark_hi = rate(poisson_lower(n_d, conf)), rate(poisson_upper(n_d, conf))
        light_lo, light_hi = rate(poisson_lower(n_l, conf)), rate(poisson_upper(n_l, conf))
        p_click = max(rate(n_l) - rate(n_d), 0.0) / slot_rate_hz
        p_bounds = ((light_lo - dark_hi) / slot_rate_hz, (light_hi - dark_lo) / slot_rate_hz)
        if p_bounds[0] <= 0:
            raise CalibrationError(
                f"{det.name}: {n_l} counts with the light on, {n_d} with it off in {t:.3g} s: "
                "no light detected above the dark counts"
            )
        basis = cfg.basis_of_detector[i] if i < len(cfg.basis_of_detector) else 0
        arm = cfg.rx_p_basis_z if basis == 0 else 1 - cfg.rx_p_basis_z
        same = cfg.tx_p_basis_z if basis == 0 else 1 - cfg.tx_p_basis_z
        x = solve_system_efficiency(p_click, mix_point, arm, same, misalignment)
        counting = efficiency_bounds(p_bounds, (mix_point, mix_point), arm, same, misalignment)
        precision = (counting[1] - counting[0]) / 2 / x
        if precision > cfg.max_efficiency_uncertainty:
            raise CalibrationError(
                f"{det.name}: {n_l} counts in {t:.3g} s give the efficiency to "
                f"+/-{precision:.1%} at {conf:.3%} confidence, worse than the "
                f"{cfg.max_efficiency_uncertainty:.1%} required: count longer"
            )
        x_lo, x_hi = efficiency_bounds(p_bounds, (mix_hi, mix_lo), arm, same, misalignment)
        x_lo, x_hi = x_lo * (1 - encoding_qber), min(x_hi * (1 + encoding_qber), 1.0)
        resolved = n_d >= cfg.min_dark_counts
        eta = channel_transmittance
        out.append(
            DetectorCounts(
                detector=det.name,
                counting_time_s=t,
                dark_counts=n_d,
                dark_rate_hz=rate(n_d) if resolved else None,
                dark_rate_lower_hz=dark_lo,
                dark_rate_upper_hz=dark_hi,
                dark_probability_per_slot=rate(n_d) / slot_rate_hz if resolved else None,
                dark_probability_upper_per_slot=dark_hi / slot_rate_hz,
                light_counts=n_l,
                light_rate_hz=n_l / t,
                click_probability_per_slot=p_click,
                system_efficiency=x,
                system_efficiency_lower=x_lo,
                system_efficiency_upper=x_hi,
                detector_efficiency=x / eta if eta else None,
                detector_efficiency_lower=x_lo / (eta * budget) if eta else None,
                detector_efficiency_upper=min(x_hi * budget / eta, 1.0) if eta else None,
            )
        )
    result = DarkCountResult(
        slot_rate_hz=slot_rate_hz,
        confidence=conf,
        channel_transmittance=channel_transmittance,
        channel_transmittance_uncertainty_db=channel_transmittance_uncertainty_db,
        encoding_qber=encoding_qber,
        class_mix=mix_point,
        mu_bounds=None if mu_bounds is None else [(float(a), float(b)) for a, b in mu_bounds],
        detectors=out,
    )
    return finish(result, started, state_dir, plot_dark_counts, publish, instruments=detectors)


def plot_dark_counts(result: DarkCountResult, fig: Figure) -> None:
    """Left: each detector's dark-count rate (dead-time corrected) with its one-sided
    bounds, the counts behind it annotated (a rate from too few counts shows its upper
    bound only, an arrow down). Right: each detector's efficiency (or the system's,
    without the channel's transmittance) with its interval. Log scale for the rates."""
    dets = result.detectors
    names = [d.detector for d in dets]
    x = np.arange(len(names))
    ax1 = fig.add_subplot(1, 2, 1)
    # a lower bound of 0 runs to the bottom of the (log) axis
    positive = [d.dark_rate_lower_hz for d in dets if d.dark_rate_lower_hz > 0]
    bottom = min([*positive, *(d.dark_rate_upper_hz for d in dets)]) / 30
    for i, d in enumerate(dets):
        lo = max(d.dark_rate_lower_hz, bottom)
        ax1.vlines(i, lo, d.dark_rate_upper_hz, color="C0", lw=2, alpha=0.5)
        if d.dark_rate_hz is not None:
            ax1.plot([i], [d.dark_rate_hz], "o", color="C0")
        else:  # too few counts: the upper bound only
            ax1.plot([i], [d.dark_rate_upper_hz], "v", color="C3", ms=8)
        ax1.annotate(
            f"{d.dark_counts} counts\nin {d.counting_time_s:.2g} s",
            (i, d.dark_rate_upper_hz),
            xytext=(0, 6),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax1.set_yscale("log")
    ax1.set_ylim(bottom, 5 * max(d.dark_rate_upper_hz for d in dets))
    ax1.set_xticks(x, names)
    ax1.set_xlim(-0.6, len(names) - 0.4)
    ax1.set_ylabel("dark count rate (Hz), dead-time corrected")
    ax1.set_title(
        f"bars: {result.confidence:.3%} one-sided bounds; v: upper bound only", fontsize=8
    )
    ax1.grid(True, alpha=0.3, lw=0.5, which="both")
    ax2 = fig.add_subplot(1, 2, 2)
    det_eff = result.channel_transmittance is not None
    for i, d in enumerate(dets):
        if det_eff and d.detector_efficiency is not None:
            mid, lo2, hi2 = (
                d.detector_efficiency,
                d.detector_efficiency_lower,
                d.detector_efficiency_upper,
            )
        else:
            mid, lo2, hi2 = (
                d.system_efficiency,
                d.system_efficiency_lower,
                d.system_efficiency_upper,
            )
        assert lo2 is not None and hi2 is not None
        ax2.errorbar([i], [mid], yerr=[[mid - lo2], [hi2 - mid]], fmt="o", color="C1", capsize=5)
        ax2.annotate(
            f"{mid:.3f}\n[{lo2:.3f}, {hi2:.3f}]",
            (i, hi2),
            xytext=(0, 6),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax2.set_xticks(x, names)
    ax2.set_xlim(-0.6, len(names) - 0.4)
    ax2.set_ylabel("detector efficiency" if det_eff else "system efficiency (channel included)")
    ax2.set_title("light-on minus light-off clicks over the photons sent", fontsize=8)
    ax2.margins(y=0.15)
    ax2.grid(True, alpha=0.3, lw=0.5)
