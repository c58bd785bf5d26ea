"""Detector timing: scan each detector's gate delay across the slot to find the pulse.

Receiver side. Needs the transmitter's light on (any pattern: key states or the sync
pattern) during the scan. The count rate against the gate delay is a box of the gate's
width centred on the pulse, blurred by the timing jitter, on top of the dark counts:

    R(d) = B + A * [Phi((d - p + w/2) / s) - Phi((d - p - w/2) / s)]

A coarse scan over one slot period (step about w/2) finds the plateau; a fine scan over
its two edges is fitted with the model above (``p``, ``w``, ``s``, ``A``, ``B`` free); the
delay is set to ``p``, the centre of the pulse.

Uncertainty: each reading stands for ``reading_time_s`` of counting, so its standard
deviation is ``sqrt(counts) / reading_time_s`` (Poisson). The fit is weighted by it, and
the standard uncertainty of ``p`` is the fit covariance's, scaled by the square root of the
reduced chi-square when the scan scatters more than counting explains (drift, a reading
that straddled a setting). Without ``reading_time_s`` the scale of the weights is unknown
and the scatter alone sets it (always scaled by the reduced chi-square). A detector's
delay is refused (kept at its previous value, the result not ok, the message naming the
detector and what was short) when the plateau holds fewer than ``min_peak_counts`` counts
per reading, when the peak stands less than ``min_contrast`` standard deviations above the
background, or when ``COVERAGE_FACTOR`` standard uncertainties of ``p`` exceed
``max_delay_uncertainty_ps``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import curve_fit
from scipy.special import erf

from drivers.interfaces import DetectorStatus, SinglePhotonDetector
from qkdnode.procedures.common import (
    COVERAGE_FACTOR,
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    data_and_residuals,
    finish,
    maybe_await,
    settle,
)

__all__ = [
    "DetectorTimingConfig",
    "DetectorTimingResult",
    "GateScanFit",
    "calibrate_detector_timing",
    "fit_gate_scan",
    "gate_model",
    "plot_detector_timing",
]


class DetectorTimingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate_width_ps: float = Field(1000.0, gt=0, description="nominal gate width (datasheet)")
    coarse_step_fraction: float = Field(0.8, gt=0, le=1, description="of the gate width")
    fine_step_ps: float = Field(40.0, gt=0)
    fine_half_span_ps: float = Field(250.0, gt=0, description="around each edge")
    settle_s: float = Field(0.0, ge=0, description="wait after setting the delay")
    min_contrast: float = Field(5.0, gt=0, description="peak over background, in sigmas")
    reading_time_s: float | None = Field(
        None,
        gt=0,
        description="counting time behind each count-rate reading (the detectors' "
        "integration period); None: unknown, the scan's scatter sets the weights",
    )
    min_peak_counts: int = Field(
        100, ge=1, description="counts per reading on the plateau needed for a delay"
    )
    max_delay_uncertainty_ps: float = Field(
        50.0, gt=0, description="refuse when COVERAGE_FACTOR standard uncertainties exceed it"
    )


def gate_model(  # noqa: PLR0917 (curve_fit passes parameters positionally)
    d: npt.NDArray[np.float64], p: float, w: float, s: float, a: float, b: float
) -> npt.NDArray[np.float64]:
    """Count rate of a gate of width ``w`` centred at delay ``d`` on a pulse at ``p``."""
    s = max(abs(s), 1e-3)
    r2 = math.sqrt(2.0) * s
    return np.asarray(b + a * 0.5 * (erf((d - p + w / 2) / r2) - erf((d - p - w / 2) / r2)))


class GateScanFit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pulse_delay_ps: float
    pulse_delay_err_ps: float = Field(
        description="standard uncertainty (fit covariance, scaled by sqrt(chi2/dof) when > 1)"
    )
    gate_width_ps: float
    jitter_ps: float
    signal_rate_hz: float
    background_rate_hz: float
    chi2_reduced: float = Field(1.0, description="of the fit (1 when the weights were unknown)")
    dof: int = 0
    coverage_factor: float = COVERAGE_FACTOR

    @property
    def pulse_delay_interval_ps(self) -> tuple[float, float]:
        """``(lower, upper)``: the delay +/- ``coverage_factor`` standard uncertainties."""
        half = self.coverage_factor * self.pulse_delay_err_ps
        return self.pulse_delay_ps - half, self.pulse_delay_ps + half


def _wrap(d: npt.NDArray[np.float64], center: float, period: float) -> npt.NDArray[np.float64]:
    return np.asarray((d - center + period / 2) % period - period / 2 + center)


def fit_gate_scan(
    delays_ps: Sequence[float] | npt.NDArray[np.float64],
    rates_hz: Sequence[float] | npt.NDArray[np.float64],
    gate_width_ps: float,
    period_ps: float | None = None,
    reading_time_s: float | None = None,
) -> GateScanFit:
    """Fit :func:`gate_model` to a delay scan (delays may wrap around ``period_ps``).

    ``reading_time_s``: the counting time behind each rate (Poisson weights, module
    docstring); None: weights of unknown scale, the uncertainty from the scatter."""
    d = np.asarray(delays_ps, dtype=np.float64)
    r = np.asarray(rates_hz, dtype=np.float64)
    if d.size < 5:
        raise CalibrationError("too few scan points to fit the gate")
    b0 = float(np.percentile(r, 10))
    a0 = float(r.max() - b0)
    if a0 <= 0:
        raise CalibrationError("flat delay scan: no optical pulse seen")
    above = r > b0 + a0 / 2
    p0 = float(np.mean(d[above])) if above.any() else float(d[np.argmax(r)])
    if period_ps is not None:
        # centre the data on the plateau so that the box does not wrap
        p0 = float(d[np.argmax(r)])
        d = _wrap(d, p0, period_ps)
        above = r > b0 + a0 / 2
        p0 = float(np.mean(d[above])) if above.any() else p0
    if reading_time_s is None:
        sigma = np.sqrt(np.maximum(r, 1.0))
    else:  # Poisson: sqrt(counts) / t, at least one count's worth
        sigma = np.sqrt(np.maximum(r * reading_time_s, 1.0)) / reading_time_s
    try:
        popt, pcov = curve_fit(
            gate_model,
            d,
            r,
            p0=[p0, gate_width_ps, gate_width_ps / 20, a0, b0],
            sigma=sigma,
            absolute_sigma=reading_time_s is not None,
            maxfev=20000,
        )
    except (RuntimeError, ValueError) as exc:
        raise CalibrationError(f"gate fit failed: {exc}") from exc
    if reading_time_s is not None:
        # Poisson weights from the fitted model, not the observed counts (those favour
        # the readings that fell low): refit once with them.
        t = reading_time_s
        sigma = np.sqrt(np.maximum(gate_model(d, *popt) * t, 1.0)) / t
        try:
            popt, pcov = curve_fit(
                gate_model, d, r, p0=list(popt), sigma=sigma, absolute_sigma=True, maxfev=20000
            )
        except (RuntimeError, ValueError) as exc:
            raise CalibrationError(f"gate fit failed: {exc}") from exc
    dof = max(d.size - 5, 1)
    chi2 = float(np.sum(((gate_model(d, *popt) - r) / sigma) ** 2)) / dof
    scale = math.sqrt(max(chi2, 1.0)) if reading_time_s is not None else 1.0
    perr = np.sqrt(np.maximum(np.diag(pcov), 0.0)) * scale
    p = float(popt[0])
    if period_ps is not None:
        p %= period_ps
    return GateScanFit(
        pulse_delay_ps=p,
        pulse_delay_err_ps=float(perr[0]),
        gate_width_ps=abs(float(popt[1])),
        jitter_ps=abs(float(popt[2])),
        signal_rate_hz=float(popt[3]),
        background_rate_hz=float(popt[4]),
        chi2_reduced=chi2 if reading_time_s is not None else 1.0,
        dof=dof,
    )


def _check_fit(fit: GateScanFit, cfg: DetectorTimingConfig) -> None:
    """Refuse a fit to noise or one less precise than allowed: a few stray dark counts can
    pass the coarse contrast test, and curve_fit then returns a gate of any width with an
    undefined pulse position."""
    nominal_gate_ps = cfg.gate_width_ps
    if cfg.reading_time_s is not None:
        peak = fit.signal_rate_hz * cfg.reading_time_s
        if peak < cfg.min_peak_counts:
            raise CalibrationError(
                f"{peak:.0f} counts per reading on the plateau, fewer than the "
                f"{cfg.min_peak_counts} needed: count longer or send more light"
            )
        background = max(fit.background_rate_hz * cfg.reading_time_s, 1.0)
        contrast = peak / math.sqrt(background + peak)
        if contrast < cfg.min_contrast:
            raise CalibrationError(
                f"pulse {contrast:.1f} standard deviations above the background, fewer "
                f"than the {cfg.min_contrast:g} needed"
            )
    err = fit.pulse_delay_err_ps
    if not math.isfinite(err) or err > nominal_gate_ps / 4:
        raise CalibrationError(
            f"pulse position undetermined (fit error {err:.3g} ps): too few counts?"
        )
    if COVERAGE_FACTOR * err > cfg.max_delay_uncertainty_ps:
        raise CalibrationError(
            f"delay known to +/-{COVERAGE_FACTOR * err:.0f} ps, worse than the "
            f"{cfg.max_delay_uncertainty_ps:g} ps allowed: too few counts"
        )
    if not 0.5 <= fit.gate_width_ps / nominal_gate_ps <= 2.0:
        raise CalibrationError(
            f"fitted gate width {fit.gate_width_ps:.0f} ps, nominal {nominal_gate_ps:.0f} ps:"
            " not a gate profile (too few counts?)"
        )


class DetectorScan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: str
    delays_ps: list[float]
    rates_hz: list[float]
    fit: GateScanFit | None
    delay_set_ps: float | None
    previous_delay_ps: float


class DetectorTimingResult(CalibrationResult):
    procedure: str = "detector_timing"
    period_ps: float
    scans: list[DetectorScan]
    #: counting time behind each reading (s); None: unknown, weights from the scatter
    reading_time_s: float | None = None


async def _scan(
    dets: Sequence[SinglePhotonDetector],
    grids: list[list[float]],
    settle_s: float,
    measure: Callable[[], object],
) -> npt.NDArray[np.float64]:
    """Step every detector through its own grid at once; rates[detector, point]."""
    n = max(len(g) for g in grids)
    rates = np.full((len(dets), n), np.nan)
    for i in range(n):
        for det, grid in zip(dets, grids, strict=True):
            if i < len(grid):
                await call(det.set_delay_ps, grid[i])
        await settle(settle_s)
        await maybe_await(measure())
        for k, (det, grid) in enumerate(zip(dets, grids, strict=True)):
            if i < len(grid):
                rates[k, i] = float(await call(det.count_rate_hz))
    return rates


def _delay_grid(det: SinglePhotonDetector, start: float, stop: float, step: float) -> list[float]:
    lo, hi = det.delay_range_ps
    grid = np.arange(start, stop + step / 2, step)
    return [float(x) for x in grid if lo <= x <= hi]


async def calibrate_detector_timing(
    detectors: Sequence[SinglePhotonDetector],
    slot_rate_hz: float,
    cfg: DetectorTimingConfig | None = None,
    *,
    wait_integration: Callable[[], object] | None = None,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> DetectorTimingResult:
    """Scan, fit and set the gate delay of every detector (the transmitter's light on).

    All detectors are scanned together (each its own grid). ``wait_integration`` is
    called (and awaited if it returns an awaitable) after each delay change and before
    reading ``count_rate_hz``: it must let one full integration period of the detectors
    elapse (on hardware a sleep; in simulation, advancing the link). A detector whose scan
    shows no pulse keeps its previous delay and the result is marked not ok.
    """
    cfg = cfg or DetectorTimingConfig()
    started = time.monotonic()
    period = 1e12 / slot_rate_hz
    measure = wait_integration or (lambda: None)
    dets = list(detectors)
    previous = [float(await call(d.delay_ps)) for d in dets]
    for det in dets:
        if await call(det.status) != DetectorStatus.ARMED:
            await call(det.arm)
    step = cfg.coarse_step_fraction * cfg.gate_width_ps
    coarse = [
        _delay_grid(
            d, max(d.delay_range_ps[0], 0.0), min(d.delay_range_ps[1], period - step / 2), step
        )
        for d in dets
    ]
    coarse_rates = await _scan(dets, coarse, cfg.settle_s, measure)
    centers: list[float | None] = []
    for k in range(len(dets)):
        r = coarse_rates[k, : len(coarse[k])]
        base = float(np.median(r))
        i = int(np.argmax(r))
        seen = r[i] - base >= cfg.min_contrast * math.sqrt(max(base, 1.0)) and r[i] > 0
        centers.append(coarse[k][i] if seen else None)
    fine: list[list[float]] = []
    for det, c in zip(dets, centers, strict=True):
        grid: list[float] = []
        if c is not None:
            for edge in (c - cfg.gate_width_ps / 2, c + cfg.gate_width_ps / 2):
                grid += _delay_grid(
                    det,
                    edge - cfg.fine_half_span_ps - step / 2,
                    edge + cfg.fine_half_span_ps + step / 2,
                    cfg.fine_step_ps,
                )
        fine.append(grid)
    fine_rates = await _scan(dets, fine, cfg.settle_s, measure) if any(fine) else None
    scans: list[DetectorScan] = []
    messages: list[str] = []
    for k, det in enumerate(dets):
        delays = list(coarse[k]) + fine[k]
        rate_list = [float(x) for x in coarse_rates[k, : len(coarse[k])]]
        if fine_rates is not None:
            rate_list += [float(x) for x in fine_rates[k, : len(fine[k])]]
        fit: GateScanFit | None = None
        delay_set: float | None = None
        try:
            c = centers[k]
            if c is None:
                raise CalibrationError("no optical pulse in the coarse scan")
            d_arr = np.array(delays)
            near = np.abs(_wrap(d_arr, c, period) - c) <= cfg.gate_width_ps + step
            fit = fit_gate_scan(
                d_arr[near],
                np.array(rate_list)[near],
                cfg.gate_width_ps,
                period,
                cfg.reading_time_s,
            )
            _check_fit(fit, cfg)
            target = fit.pulse_delay_ps
            lo, hi = det.delay_range_ps
            if not lo <= target <= hi:
                target = target - period if target - period >= lo else target + period
            await call(det.set_delay_ps, target)
            delay_set = float(await call(det.delay_ps))
        except CalibrationError as exc:
            messages.append(f"{det.name}: {exc}")
            await call(det.set_delay_ps, previous[k])
        scans.append(
            DetectorScan(
                detector=det.name,
                delays_ps=delays,
                rates_hz=rate_list,
                fit=fit,
                delay_set_ps=delay_set,
                previous_delay_ps=previous[k],
            )
        )
    result = DetectorTimingResult(
        period_ps=period,
        scans=scans,
        reading_time_s=cfg.reading_time_s,
        ok=not messages,
        message="; ".join(messages),
    )
    return finish(result, started, state_dir, plot_detector_timing, publish, instruments=detectors)


def plot_detector_timing(result: DetectorTimingResult, fig: Figure) -> None:
    """One column per detector: the scan around the fitted gate, linear (both edges,
    where the fit decides the delay), the fit over it and the delay set (dashed);
    residuals in percent of the plateau below; the whole scan as an inset (log)."""
    scans = result.scans
    outer = fig.add_gridspec(1, max(len(scans), 1), wspace=0.35)
    for i, scan in enumerate(scans):
        ax, res = data_and_residuals(
            fig, outer[i], residual_label="data - fit (% of plateau)" if i == 0 else ""
        )
        d = np.asarray(scan.delays_ps, dtype=np.float64)
        r = np.asarray(scan.rates_hz, dtype=np.float64)
        f = scan.fit
        ax.set_title(scan.detector, fontsize=9)
        if f is None:
            ax.plot(d / 1e3, r / 1e3, ".", ms=3)
            ax.text(0.5, 0.5, "no fit", transform=ax.transAxes, ha="center")
            res.set_xlabel("gate delay (ns)")
            continue
        w = _wrap(d, f.pulse_delay_ps, result.period_ps)
        order = np.argsort(w)
        w, r = w[order], r[order]
        half = f.gate_width_ps / 2 + max(6 * f.jitter_ps, 150.0)
        near = np.abs(w - f.pulse_delay_ps) <= half
        model = gate_model(
            w,
            f.pulse_delay_ps,
            f.gate_width_ps,
            f.jitter_ps,
            f.signal_rate_hz,
            f.background_rate_hz,
        )
        x = (w - f.pulse_delay_ps) / 1e3
        ax.plot(x[near], r[near] / 1e3, "o", ms=3)
        xf = np.linspace(-half, half, 600)
        ax.plot(
            xf / 1e3,
            gate_model(
                xf + f.pulse_delay_ps,
                f.pulse_delay_ps,
                f.gate_width_ps,
                f.jitter_ps,
                f.signal_rate_hz,
                f.background_rate_hz,
            )
            / 1e3,
            lw=1.2,
        )
        if scan.delay_set_ps is not None:
            off = _wrap(np.asarray([scan.delay_set_ps]), f.pulse_delay_ps, result.period_ps)
            ax.axvline(float(off[0] - f.pulse_delay_ps) / 1e3, ls="--", color="C3", lw=0.8)
        ax.set_xlim(-half / 1e3, half / 1e3)
        if i == 0:
            ax.set_ylabel("count rate (kHz)")
        ax.set_title(
            f"{scan.detector}: pulse at {f.pulse_delay_ps / 1e3:.4f} ns "
            f"+/- {f.pulse_delay_err_ps:.1f} ps\ngate {f.gate_width_ps:.0f} ps, "
            f"jitter {f.jitter_ps:.0f} ps",
            fontsize=8,
        )
        res.plot(x[near], (r[near] - model[near]) / f.signal_rate_hz * 100, "o", ms=3)
        res.set_xlabel("delay - pulse (ns)")
        inset = ax.inset_axes((0.3, 0.08, 0.4, 0.3))
        inset.plot(w / 1e3, np.maximum(r, 0.5), lw=0.6)
        inset.set_yscale("log")
        inset.tick_params(labelsize=5)
        inset.set_title("whole scan (ns, Hz)", fontsize=5)
