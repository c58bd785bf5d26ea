"""Intensity modulator: transfer function, decoy-state levels and bias-drift tracking.

Transmitter side, with the laser on and the power meter tap after the modulator. All
three class drives are set equal during a sweep so that the meter (which averages over
the slots) reads a single transmission. The curve

    P(V) = P_min + (P_max - P_min) * cos^2(pi/2 * (V - V0) / V_pi)

is fitted (``scipy.optimize.curve_fit``) first against the bias (drives at 0), giving the
bias of maximal transmission and the DC half-wave voltage, then against the drive at that
bias, giving the RF half-wave voltage. Levels: SIGNAL at the maximum, VACUUM at the
minimum, DECOY where the curve gives ``mu_decoy / mu_signal`` of the maximum.

During key exchange :class:`BiasTracker` keeps the bias on the optimum from the meter's
mean power (a mixture of the three classes) with a small dither, without stopping.
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
from scipy.optimize import curve_fit, minimize_scalar

from drivers.interfaces import (
    IntensityClass,
    IntensityModulator,
    OpticalPowerMeter,
    VariableAttenuator,
)
from qkdnode.procedures.common import (
    COVERAGE_FACTOR,
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    data_and_residuals,
    finish,
    settle,
)

__all__ = [
    "BiasTracker",
    "ModulatorConfig",
    "ModulatorResult",
    "TransferFit",
    "calibrate_modulator",
    "decoy_drive_v",
    "fit_transfer",
    "plot_modulator",
    "set_all_levels",
    "transfer",
]

F64 = npt.NDArray[np.float64]
CLASSES = (IntensityClass.SIGNAL, IntensityClass.DECOY, IntensityClass.VACUUM)


def transfer(v: F64, p_min: float, p_max: float, v0: float, v_pi: float) -> F64:
    return np.asarray(p_min + (p_max - p_min) * np.cos(np.pi / 2 * (v - v0) / v_pi) ** 2)


class TransferFit(BaseModel):
    """A fitted ``cos^2`` transfer function (powers in W, voltages in V)."""

    model_config = ConfigDict(extra="forbid")

    p_min_w: float
    p_max_w: float
    v0_v: float  # voltage of maximal transmission (nearest the sweep centre)
    v_pi_v: float
    v0_err_v: float = Field(description="standard uncertainty of v0_v")
    v_pi_err_v: float = Field(description="standard uncertainty of v_pi_v")
    coverage_factor: float = COVERAGE_FACTOR

    @property
    def v_pi_interval_v(self) -> tuple[float, float]:
        """``(lower, upper)`` of V_pi: +/- ``coverage_factor`` standard uncertainties."""
        half = self.coverage_factor * self.v_pi_err_v
        return self.v_pi_v - half, self.v_pi_v + half

    @property
    def v0_interval_v(self) -> tuple[float, float]:
        half = self.coverage_factor * self.v0_err_v
        return self.v0_v - half, self.v0_v + half

    @property
    def extinction_db(self) -> float:
        return 10 * math.log10(self.p_max_w / max(self.p_min_w, self.p_max_w * 1e-12))

    def power(self, v: F64 | float) -> F64:
        return transfer(
            np.asarray(v, dtype=np.float64), self.p_min_w, self.p_max_w, self.v0_v, self.v_pi_v
        )

    def relative(self, v: F64 | float) -> F64:
        """Transmission relative to the maximum."""
        return np.asarray(self.power(v) / self.p_max_w)


def _best_fit(
    v: F64, p: F64, sigma: F64 | None, starts: Sequence[Sequence[float]]
) -> tuple[float, F64, F64] | None:
    """The lowest-cost :func:`transfer` fit of ``p(v)`` over the starting points, or None."""
    best: tuple[float, F64, F64] | None = None
    w = np.ones_like(p) if sigma is None else sigma
    for p0 in starts:
        try:
            popt, pcov = curve_fit(transfer, v, p, p0=list(p0), sigma=sigma, maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        cost = float(np.sum(((transfer(v, *popt) - p) / w) ** 2))
        if best is None or cost < best[0]:
            best = (cost, popt, pcov)
    return best


def fit_transfer(volts: Sequence[float] | F64, power_w: Sequence[float] | F64) -> TransferFit:
    """Fit :func:`transfer` to a sweep; the sweep should cover at least one V_pi."""
    v = np.asarray(volts, dtype=np.float64)
    p = np.asarray(power_w, dtype=np.float64)
    if v.size < 8:
        raise CalibrationError("too few sweep points for the transfer fit")
    p_lo, p_hi = float(p.min()), float(p.max())
    if p_hi <= 0 or p_hi - p_lo < 0.1 * p_hi:
        raise CalibrationError("no modulation visible in the sweep (is the laser on?)")
    # starting V_pi from the dominant period of the (resampled) sweep
    grid = np.linspace(v.min(), v.max(), 512)
    order = np.argsort(v)
    pg = np.interp(grid, v[order], p[order])
    spec = np.abs(np.fft.rfft((pg - pg.mean()) * np.hanning(grid.size), 8192))
    freqs = np.fft.rfftfreq(8192, d=float(grid[1] - grid[0]))
    spec[0] = 0
    f_peak = float(freqs[int(np.argmax(spec))])
    span = float(v.max() - v.min())
    guesses = {span / 2}
    if f_peak > 0:
        guesses.add(1.0 / (2 * f_peak))  # period of cos^2 is 2 V_pi
    v_max = float(v[int(np.argmax(p))])
    starts = [
        [p_lo, p_hi, v00, v_pi0]
        for v_pi0 in guesses
        for v00 in (v_max, v_max - v_pi0 / 4, v_max + v_pi0 / 4, v_max + v_pi0 / 2)
    ]
    # First with equal weights, which noise cannot mislead; its residual rms over the
    # dimmest quarter of the sweep is the floor of the relative weights that follow (1 %,
    # so the minimum weighs as much as the maximum, but never below the meter's own noise:
    # a weak sweep of pW powers with pW noise otherwise fits the noise around the minimum).
    first = _best_fit(v, p, None, starts)
    if first is None:
        raise CalibrationError("transfer-function fit did not converge")
    model = transfer(v, *first[1])
    dim = model <= np.quantile(model, 0.25)
    floor = math.sqrt(float(np.mean((model[dim] - p[dim]) ** 2)))
    sigma = 0.01 * np.abs(p) + max(1e-6 * p_hi, floor)
    best = _best_fit(v, p, sigma, [list(first[1])]) or first
    cost, popt, _ = best
    # Position and period (V0, V_pi) and their uncertainties from a last fit with equal
    # weights, started on the weighted one: the meter's noise is additive (it does not
    # grow with the power), so the relative weights above, right for the extinction,
    # would misstate them (by a factor 10 on simulated sweeps). The scatter of the
    # residuals sets the scale of the covariance.
    try:
        popt_eq, pcov = curve_fit(
            transfer, v, p, p0=list(popt), maxfev=20000, xtol=1e-14, ftol=1e-14, gtol=1e-14
        )
    except (RuntimeError, ValueError):
        raise CalibrationError("transfer-function fit did not converge") from None
    if np.sign(popt_eq[1] - popt_eq[0]) == np.sign(popt[1] - popt[0]):
        popt = np.array([popt[0], popt_eq[1], popt_eq[2], popt_eq[3]])
    p_min, p_max, v0, v_pi = (float(x) for x in popt)
    rms = math.sqrt(float(np.mean((transfer(v, *popt) - p) ** 2)))
    if p_max < p_min:
        # The same curve with the roles swapped: A + (B - A) cos^2(x) = B + (A - B) cos^2(x -
        # pi/2), so the maximum sits half a period (V_pi) further on.
        p_min, p_max, v0 = p_max, p_min, v0 + v_pi
    if rms > 0.05 * abs(p_max):
        raise CalibrationError(f"poor transfer fit: rms {rms:.3g} W vs max {p_max:.3g} W")
    v_pi = abs(v_pi)
    perr = np.sqrt(np.maximum(np.diag(pcov), 0.0))
    # V0 is defined modulo 2 V_pi: report the maximum nearest the sweep centre
    centre = float((v.min() + v.max()) / 2)
    v0 = v0 + 2 * v_pi * round((centre - v0) / (2 * v_pi))
    return TransferFit(
        p_min_w=p_min,
        p_max_w=p_max,
        v0_v=v0,
        v_pi_v=v_pi,
        v0_err_v=float(perr[2]),
        v_pi_err_v=float(perr[3]),
    )


def _check_precision(sweep: str, fit: TransferFit, cfg: ModulatorConfig) -> None:
    """Refuse a sweep that leaves V_pi or the transmission maximum less precise than
    allowed (too little light at the meter, or a sweep too short for a period)."""
    k = fit.coverage_factor
    if k * fit.v_pi_err_v > cfg.max_v_pi_relative_uncertainty * fit.v_pi_v:
        raise CalibrationError(
            f"{sweep}: V_pi {fit.v_pi_v:.4f} +/- {k * fit.v_pi_err_v:.2g} V, less precise "
            f"than the {cfg.max_v_pi_relative_uncertainty:.1%} allowed: more light or "
            "more readings"
        )
    if k * fit.v0_err_v > cfg.max_bias_uncertainty_v:
        raise CalibrationError(
            f"{sweep}: transmission maximum at {fit.v0_v:.4f} +/- {k * fit.v0_err_v:.2g} V, "
            f"less precise than the {cfg.max_bias_uncertainty_v:g} V allowed"
        )


def decoy_drive_v(fit: TransferFit, ratio: float, signal_v: float, vacuum_v: float) -> float:
    """Drive between ``signal_v`` (max) and ``vacuum_v`` (min) giving ``ratio`` of the max."""
    lo_rel = float(fit.relative(vacuum_v))
    if not lo_rel < ratio < 1.0:
        raise CalibrationError(f"decoy ratio {ratio:.4g} outside the modulator's reach")
    res = minimize_scalar(
        lambda x: (float(fit.relative(x)) - ratio) ** 2,
        bounds=(min(signal_v, vacuum_v), max(signal_v, vacuum_v)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(res.x)


class ModulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sweep_points: int = Field(61, ge=12)
    bias_sweep_v: tuple[float, float] | None = Field(
        None, description="bias sweep range; None = the modulator's whole bias range"
    )
    drive_sweep_v: tuple[float, float] | None = None
    settle_s: float = Field(0.0, ge=0)
    averages: int = Field(3, ge=1, description="power readings averaged per point")
    decoy_ratio: float = Field(0.2, gt=0, lt=1, description="mu_decoy / mu_signal")
    sweep_attenuation_db: float = Field(
        30.0, ge=0, description="VOA setting during the sweeps (power at the tap vs output)"
    )
    max_v_pi_relative_uncertainty: float = Field(
        0.01, gt=0, lt=1, description="refuse when COVERAGE_FACTOR sigma / V_pi is larger"
    )
    max_bias_uncertainty_v: float = Field(
        0.05, gt=0, description="refuse when COVERAGE_FACTOR sigma of the bias is larger"
    )


class ModulatorResult(CalibrationResult):
    procedure: str = "modulator"
    bias_sweep_v: list[float]
    bias_sweep_w: list[float]
    drive_sweep_v: list[float]
    drive_sweep_w: list[float]
    bias_fit: TransferFit
    drive_fit: TransferFit
    bias_set_v: float
    signal_v: float
    decoy_v: float
    vacuum_v: float
    extinction_db: float
    decoy_ratio: float


async def set_all_levels(im: IntensityModulator, drive_v: float) -> None:
    for c in CLASSES:
        await call(im.set_level_v, c, drive_v)


async def read_power(meter: OpticalPowerMeter, averages: int, settle_s: float) -> float:
    await settle(settle_s)
    return float(np.mean([await call(meter.power_w) for _ in range(averages)]))


async def calibrate_modulator(
    im: IntensityModulator,
    meter: OpticalPowerMeter,
    cfg: ModulatorConfig | None = None,
    *,
    voa: VariableAttenuator | None = None,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> ModulatorResult:
    """Sweep bias then drive, fit both, set bias and the three class levels.

    Needs: the laser on and light reaching the power-meter tap: with ``voa`` given, its
    shutter is opened and it is set to ``cfg.sweep_attenuation_db`` for the sweeps and
    left there (mean photon number calibration sets it next). The output is then far
    brighter than single photons: the receiver's detectors should be disarmed meanwhile
    (ask the peer). No other input from the peer.
    """
    cfg = cfg or ModulatorConfig()
    started = time.monotonic()
    if voa is not None:
        await call(voa.set_attenuation_db, cfg.sweep_attenuation_db)
        await call(voa.set_shutter, True)
    await call(im.set_output, True)
    await set_all_levels(im, 0.0)
    b_lo, b_hi = cfg.bias_sweep_v or im.bias_range_v
    biases = np.linspace(b_lo, b_hi, cfg.sweep_points)
    p_bias = []
    for b in biases:
        await call(im.set_bias_v, float(b))
        p_bias.append(await read_power(meter, cfg.averages, cfg.settle_s))
    bias_fit = fit_transfer(biases, p_bias)
    _check_precision("bias sweep", bias_fit, cfg)
    bias_opt = bias_fit.v0_v
    if not b_lo <= bias_opt <= b_hi:
        bias_opt += -2 * bias_fit.v_pi_v if bias_opt > b_hi else 2 * bias_fit.v_pi_v
    if not b_lo <= bias_opt <= b_hi:
        raise CalibrationError(f"optimal bias {bias_opt:.3f} V outside the bias range")
    await call(im.set_bias_v, bias_opt)
    d_lo, d_hi = cfg.drive_sweep_v or im.drive_range_v
    drives = np.linspace(d_lo, d_hi, cfg.sweep_points)
    p_drive = []
    for d in drives:
        await set_all_levels(im, float(d))
        p_drive.append(await read_power(meter, cfg.averages, cfg.settle_s))
    drive_fit = fit_transfer(drives, p_drive)
    _check_precision("drive sweep", drive_fit, cfg)
    # signal at the maximum nearest 0 V drive, vacuum at the adjacent minimum in range
    sig_v = drive_fit.v0_v + 2 * drive_fit.v_pi_v * round(-drive_fit.v0_v / (2 * drive_fit.v_pi_v))
    if not d_lo <= sig_v <= d_hi:
        sig_v = float(np.clip(sig_v, d_lo, d_hi))
    candidates = [sig_v + drive_fit.v_pi_v, sig_v - drive_fit.v_pi_v]
    in_range = [c for c in candidates if d_lo <= c <= d_hi]
    if not in_range:
        raise CalibrationError("no transmission minimum within the drive range")
    vac_v = min(in_range, key=abs)
    dec_v = decoy_drive_v(drive_fit, cfg.decoy_ratio, sig_v, vac_v)
    await call(im.set_level_v, IntensityClass.SIGNAL, sig_v)
    await call(im.set_level_v, IntensityClass.DECOY, dec_v)
    await call(im.set_level_v, IntensityClass.VACUUM, vac_v)
    result = ModulatorResult(
        bias_sweep_v=[float(x) for x in biases],
        bias_sweep_w=p_bias,
        drive_sweep_v=[float(x) for x in drives],
        drive_sweep_w=p_drive,
        bias_fit=bias_fit,
        drive_fit=drive_fit,
        bias_set_v=bias_opt,
        signal_v=sig_v,
        decoy_v=dec_v,
        vacuum_v=vac_v,
        extinction_db=drive_fit.extinction_db,
        decoy_ratio=cfg.decoy_ratio,
    )
    return finish(
        result,
        started,
        state_dir,
        plot_modulator,
        publish,
        instruments=[im, meter] if voa is None else [im, meter, voa],
    )


def plot_modulator(result: ModulatorResult, fig: Figure) -> None:
    """The bias sweep (left) and the drive sweep (right): tap power on a log axis, so
    that the extinction floor shows, with the fitted cos^2 over it and the settings
    made (bias; signal, decoy, vacuum drives); relative residuals below."""
    outer = fig.add_gridspec(1, 2, wspace=0.3)
    panels = [
        (
            "IM bias (V)",
            result.bias_sweep_v,
            result.bias_sweep_w,
            result.bias_fit,
            [("bias set", result.bias_set_v)],
        ),
        (
            "IM drive, all classes (V)",
            result.drive_sweep_v,
            result.drive_sweep_w,
            result.drive_fit,
            [("signal", result.signal_v), ("decoy", result.decoy_v), ("vacuum", result.vacuum_v)],
        ),
    ]
    for i, (xlabel, xs, ys, fit, marks) in enumerate(panels):
        ax, res = data_and_residuals(
            fig, outer[i], residual_label="(data - fit) / fit (%)" if i == 0 else ""
        )
        x = np.asarray(xs)
        y = np.asarray(ys)
        floor = max(fit.p_min_w, fit.p_max_w * 1e-9)
        ax.semilogy(x, np.maximum(y, floor / 10) * 1e6, "o", ms=3, label="tap power")
        xf = np.linspace(x.min(), x.max(), 800)
        ax.semilogy(xf, np.maximum(fit.power(xf), floor / 10) * 1e6, lw=1.1, label="cos^2 fit")
        ax.axhline(fit.p_min_w * 1e6, ls=":", color="0.4", lw=0.8, label="fitted floor")
        for k, (name, v) in enumerate(marks):
            ax.axvline(v, ls="--", lw=0.8, color=f"C{k + 2}", label=f"{name} {v:.3f} V")
        ax.set_ylim(floor / 3 * 1e6, fit.p_max_w * 2 * 1e6)
        if i == 0:
            ax.set_ylabel("power at the tap (uW)")
        ax.set_title(
            f"V_pi {fit.v_pi_v:.4f} +/- {fit.v_pi_err_v:.1g} V, V0 {fit.v0_v:.3f} V, "
            f"extinction {fit.extinction_db:.1f} dB",
            fontsize=8,
        )
        ax.legend(fontsize=6, loc="lower left")
        model = fit.power(x)
        res.plot(x, (y - model) / np.maximum(model, floor) * 100, "o", ms=3)
        res.set_xlabel(xlabel)


class BiasTracker:
    """Keeps the modulator bias on its optimum during key exchange.

    Model of the meter's mean power at bias ``b`` when the optimum has moved to
    ``b* = b_cal + delta``: ``P(b) = k * sum_c p_c T(b - delta + drive_c)`` with the
    calibrated drive curve ``T``, class probabilities ``p_c`` and an unknown scale ``k``
    (laser power drifts too). Each :meth:`step` reads the power at ``b - dither``, ``b``
    and ``b + dither``, fits ``delta`` and ``k``, and moves the bias by ``gain * delta``.
    """

    def __init__(
        self,
        im: IntensityModulator,
        meter: OpticalPowerMeter,
        calibration: ModulatorResult,
        class_probabilities: tuple[float, float, float],
        *,
        dither_v: float | None = None,
        gain: float = 0.8,
        settle_s: float = 0.0,
        averages: int = 3,
    ) -> None:
        self.im = im
        self.meter = meter
        self.cal = calibration
        self.p = np.asarray(class_probabilities, dtype=np.float64)
        self.dither_v = dither_v if dither_v is not None else 0.05 * calibration.bias_fit.v_pi_v
        self.gain = gain
        self.settle_s = settle_s
        self.averages = averages
        self.history: list[tuple[float, float]] = []  # (monotonic time, bias)
        #: the last step's readings: biases (V), tap powers (W) and the fitted offset (V)
        self.last_readings: tuple[F64, F64, float] | None = None
        #: the signal, decoy and vacuum drives (V) the model uses: read from the modulator
        #: at every step (the mean-photon-number calibration and its re-measurements set
        #: the decoy drive again after the modulator's calibration chose one)
        self.drives_v = np.array(
            [calibration.signal_v, calibration.decoy_v, calibration.vacuum_v], dtype=np.float64
        )

    def _mean_rel(self, bias_offsets: F64) -> F64:
        """Relative mean transmission for bias offsets from the calibrated optimum."""
        fit = self.cal.drive_fit
        drives = self.drives_v
        # a bias offset shifts the curve like a drive offset, scaled by the V_pi ratio
        scale = fit.v_pi_v / self.cal.bias_fit.v_pi_v
        x = drives[None, :] + bias_offsets[:, None] * scale
        return np.asarray((fit.relative(x) * self.p[None, :]).sum(axis=1))

    def model_w(self, biases: F64, delta: float, powers: F64) -> F64:
        """The model of the tap power at ``biases`` with the optimum moved by ``delta``,
        scaled (least squares) to ``powers`` read at the same biases, in W."""
        m = self._mean_rel(np.asarray(biases, dtype=np.float64) - self.cal.bias_set_v - delta)
        k = float(np.dot(m, powers) / max(float(np.dot(m, m)), 1e-300))
        return np.asarray(k * m)

    def relative_mean(self, biases: F64, delta: float) -> F64:
        """The model's tap power at ``biases`` relative to its maximum (optimum moved by
        ``delta``; dimensionless)."""
        return self._mean_rel(np.asarray(biases, dtype=np.float64) - self.cal.bias_set_v - delta)

    def estimate_offset(self, biases: F64, powers: F64) -> float:
        """Offset ``delta`` (V) of the optimum from the calibrated bias, from readings."""
        rel_b = biases - self.cal.bias_set_v
        half = self.cal.bias_fit.v_pi_v / 2

        def cost(delta: float) -> float:
            m = self._mean_rel(rel_b - delta)
            k = float(np.dot(m, powers) / max(float(np.dot(m, m)), 1e-300))
            return float(np.sum((k * m - powers) ** 2))

        grid = np.linspace(-half, half, 81)
        costs = [cost(float(g)) for g in grid]
        g0 = float(grid[int(np.argmin(costs))])
        step = float(grid[1] - grid[0])
        res = minimize_scalar(cost, bounds=(g0 - step, g0 + step), method="bounded")
        return float(res.x)

    async def step(self) -> float:
        """One dithered measurement and correction; returns the new bias."""
        b = float(await call(self.im.bias_v))
        self.drives_v = np.array(
            [float(await call(self.im.level_v, c)) for c in CLASSES], dtype=np.float64
        )
        biases = np.array([b - self.dither_v, b + self.dither_v, b])
        powers = []
        for x in biases:
            await call(self.im.set_bias_v, float(x))
            powers.append(await read_power(self.meter, self.averages, self.settle_s))
        delta = self.estimate_offset(biases, np.asarray(powers))
        self.last_readings = (biases, np.asarray(powers, dtype=np.float64), delta)
        target = self.cal.bias_set_v + delta
        new = b + self.gain * (target - b)
        lo, hi = self.im.bias_range_v
        new = float(np.clip(new, lo, hi))
        await call(self.im.set_bias_v, new)
        self.history.append((time.monotonic(), new))
        return new


ReadFn = Callable[[], float]
