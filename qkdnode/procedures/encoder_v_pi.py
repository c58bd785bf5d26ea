"""Encoder half-wave voltage from the receiver's error rate of each prepared state.

Transmitter side, after synchronization (it needs the error rates that only the comparison
of both nodes' data gives: ``measure_state_errors()`` is supplied by the orchestration,
e.g. a disclosed probe of fresh detections). A polarisation power meter would see nothing
here: the encoder changes the polarisation, not the power, so the box's own tap cannot
measure it.

The encoder rotates the polarisation by ``pi/2 * V / V_pi``. State ``s`` (H, V, D, A) is
prepared with drive ``d_s`` and must sit at ``k_s * pi/2`` with ``k = (0, 1, 1/2, 3/2)``,
so with the bias ``b`` its error rate in its own basis is

    e_s(b) = e0 + A * sin^2( pi/2 * (d_s / V_pi + (b - b*) / V_pi_bias - k_s) )

(``e0`` the optical misalignment, ``A`` close to ``1 - 2 e0``). The drives are set from the
starting guess ``g`` (``d_s = k_s g``) and the bias is swept over one period around its
current value. Each state's error curve then has its minimum at
``b* + k_s * V_pi_bias * (1 - g / V_pi)``: the spacing of the four minima gives the drive's
V_pi, the curvature gives the bias's (the same V_pi unless the encoder has a separate bias
electrode, ``separate_bias_v_pi``). A drift of the polarisation reference moves all four
states together and cancels from the spacing. One weighted least-squares fit of all states
and bias points (binomial weights) gives V_pi and its standard uncertainty; the result is
refused when ``coverage_factor`` standard uncertainties exceed ``max_relative_uncertainty``.
The drives are then set to ``k_s * V_pi`` and the bias to ``b*``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import curve_fit

from drivers.interfaces import BB84State, Encoder
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
    "STATE_PHASE",
    "EncoderVPiConfig",
    "EncoderVPiFit",
    "EncoderVPiResult",
    "StateErrors",
    "calibrate_encoder_v_pi",
    "count_state_errors",
    "fit_encoder_v_pi",
    "plot_encoder_v_pi",
    "state_error_model",
]

F64 = npt.NDArray[np.float64]

#: Rotation of H, V, D, A in units of a half-wave (pi/2 of polarisation angle).
STATE_PHASE = np.array([0.0, 1.0, 0.5, 1.5])
_STATES = (BB84State.H, BB84State.V, BB84State.D, BB84State.A)


@dataclass(frozen=True)
class StateErrors:
    """Sifted detections and errors per prepared state, in the order H, V, D, A."""

    errors: tuple[int, int, int, int]
    sifted: tuple[int, int, int, int]


def count_state_errors(
    channel: npt.NDArray[np.integer],
    tx_basis: npt.NDArray[np.uint8],
    tx_bit: npt.NDArray[np.uint8],
    *,
    channel_basis: Sequence[int] = (0, 0, 1, 1),
    channel_bit: Sequence[int] = (0, 1, 0, 1),
    mask: npt.NDArray[np.bool_] | None = None,
) -> StateErrors:
    """Errors of sifted detections per prepared state (state = 2 * basis + bit).

    ``channel`` holds the detector of each detection, ``tx_basis``/``tx_bit`` what was
    prepared in its slot; ``mask`` selects detections (e.g. not the vacuum class)."""
    ch = np.asarray(channel, dtype=np.int64)
    cb = np.asarray(channel_basis, dtype=np.int64)[ch]
    bits = np.asarray(channel_bit, dtype=np.int64)[ch]
    basis = np.asarray(tx_basis, dtype=np.int64)
    bit = np.asarray(tx_bit, dtype=np.int64)
    sifted = cb == basis
    if mask is not None:
        sifted &= mask
    state = 2 * basis + bit
    n = np.bincount(state[sifted], minlength=4)[:4]
    e = np.bincount(state[sifted & (bits != bit)], minlength=4)[:4]
    return StateErrors(
        (int(e[0]), int(e[1]), int(e[2]), int(e[3])),
        (int(n[0]), int(n[1]), int(n[2]), int(n[3])),
    )


def state_error_model(
    bias_v: F64 | Sequence[float],
    drives_v: F64 | Sequence[float],
    *,
    bias_opt_v: float,
    v_pi_v: float,
    e0: float,
    amp: float,
    bias_v_pi_v: float | None = None,
    ratio_z: float = 1.0,
    ratio_x: float = 1.0,
) -> F64:
    """Error rate of each state (columns H, V, D, A) at each bias (rows).

    ``ratio_z`` and ``ratio_x``: efficiency of each basis's bit-1 detector over its bit-0
    detector. A state's error is a click of the wrong detector, so with unequal detectors
    the share ``sin^2 x`` becomes ``r sin^2 x / (cos^2 x + r sin^2 x)`` (``r`` the ratio
    for H and D, its inverse for V and A): the four curves differ in shape, and a model
    blind to it pulls the fitted bias (by up to 3 of its standard uncertainties on
    simulated boxes with 10 % detector spread)."""
    b = np.asarray(bias_v, dtype=np.float64)[:, None]
    d = np.asarray(drives_v, dtype=np.float64)[None, :]
    vb = v_pi_v if bias_v_pi_v is None else bias_v_pi_v
    x = np.pi / 2 * (d / v_pi_v + (b - bias_opt_v) / vb - STATE_PHASE[None, :])
    s2 = np.sin(x) ** 2
    r = np.array([ratio_z, 1.0 / ratio_z, ratio_x, 1.0 / ratio_x])[None, :]
    share = r * s2 / (1.0 - s2 + r * s2)
    return np.asarray(e0 + amp * share)


class EncoderVPiFit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v_pi_v: float = Field(description="drive half-wave voltage")
    v_pi_sigma_v: float = Field(description="its standard uncertainty")
    bias_v_pi_v: float = Field(description="bias half-wave voltage (= v_pi_v when tied)")
    bias_v_pi_sigma_v: float
    bias_opt_v: float = Field(description="bias where H (0 V drive) sits at 0 degrees")
    bias_opt_sigma_v: float
    e0: float
    amp: float
    ratio_z: float = Field(1.0, description="Z pair's bit-1 over bit-0 detector efficiency")
    ratio_x: float = Field(1.0, description="X pair's bit-1 over bit-0 detector efficiency")
    chi2_reduced: float
    dof: int


def fit_encoder_v_pi(
    biases_v: Sequence[float] | F64,
    drives_v: Sequence[float] | F64,
    errors: Sequence[Sequence[int]] | npt.NDArray[np.integer],
    sifted: Sequence[Sequence[int]] | npt.NDArray[np.integer],
    v_pi_guess_v: float,
    *,
    separate_bias_v_pi: bool = False,
) -> EncoderVPiFit:
    """Fit :func:`state_error_model` to a bias sweep (rows: biases, columns: H, V, D, A).

    Uncertainties come from the binomial weights, scaled up by the square root of the
    reduced chi-square when the data scatter more than counting explains (drift)."""
    b = np.asarray(biases_v, dtype=np.float64)
    d = np.asarray(drives_v, dtype=np.float64)
    k = np.asarray(errors, dtype=np.float64)
    n = np.asarray(sifted, dtype=np.float64)
    if k.shape != (b.size, 4) or n.shape != (b.size, 4) or d.shape != (4,):
        raise ValueError("errors and sifted need one row of 4 states per bias")
    use = n > 0
    n_cells = int(use.sum())
    n_base = 5 if separate_bias_v_pi else 4
    n_par = n_base + 2  # and the log efficiency ratios of the two detector pairs
    if b.size < 5 or n_cells < n_par + 3:
        raise CalibrationError("too few bias points with detections for the V_pi fit")
    rows, cols = np.nonzero(use)
    obs = k[use] / n[use]
    weight_n = n[use]
    g = float(v_pi_guess_v)
    centre = float((b.min() + b.max()) / 2)

    def model(params: Sequence[float]) -> F64:
        bo, v, e0, amp = params[:4]
        vb = params[4] if separate_bias_v_pi else None
        lz, lx = (params[n_base], params[n_base + 1]) if len(params) > n_base else (0.0, 0.0)
        curves = state_error_model(
            b,
            d,
            bias_opt_v=bo,
            v_pi_v=v,
            e0=e0,
            amp=amp,
            bias_v_pi_v=vb,
            ratio_z=math.exp(lz),
            ratio_x=math.exp(lx),
        )
        return curves[rows, cols]

    # start: the grid point of least binomial deviance (V_pi within +/-30 % of the guess)
    best: tuple[float, list[float]] | None = None
    for v in g * np.linspace(0.7, 1.3, 25):
        for bo in centre + v * np.linspace(-1, 1, 41)[:-1]:
            start = [bo, v, 0.02, 0.96] + ([v] if separate_bias_v_pi else [])
            p = np.clip(model(start), 1e-4, 1 - 1e-4)
            dev = -float(np.sum(k[use] * np.log(p) + (weight_n - k[use]) * np.log1p(-p)))
            if best is None or dev < best[0]:
                best = (dev, [float(bo), float(v), 0.02, 0.96])
    assert best is not None
    p0 = best[1] + ([best[1][1]] if separate_bias_v_pi else []) + [0.0, 0.0]
    lo = [centre - 3 * g, 0.5 * g, 0.0, 0.1] + ([0.3 * g] if separate_bias_v_pi else [])
    hi = [centre + 3 * g, 2.0 * g, 0.5, 1.0] + ([3.0 * g] if separate_bias_v_pi else [])
    lo += [-0.7, -0.7]  # detector efficiency ratios within 1/2 and 2
    hi += [0.7, 0.7]

    def f(_x: F64, *params: float) -> F64:
        return model(params)

    popt = np.asarray(p0, dtype=np.float64)
    pcov = np.full((n_par, n_par), np.inf)
    sigma = np.ones_like(obs)
    for _ in range(3):  # weights from the current model (iteratively reweighted)
        p_model = np.clip(model(list(popt)), 0.5 / weight_n, 1 - 0.5 / weight_n)
        sigma = np.sqrt(p_model * (1 - p_model) / weight_n)
        try:
            popt, pcov = curve_fit(
                f,
                np.zeros_like(obs),
                obs,
                p0=list(popt),
                sigma=sigma,
                absolute_sigma=True,
                bounds=(lo, hi),
                maxfev=20000,
            )
        except (RuntimeError, ValueError) as exc:
            raise CalibrationError(f"V_pi fit did not converge: {exc}") from None
    dof = max(n_cells - n_par, 1)
    chi2 = float(np.sum(((model(list(popt)) - obs) / sigma) ** 2))
    scale = math.sqrt(max(1.0, chi2 / dof))
    perr = np.sqrt(np.maximum(np.diag(pcov), 0.0)) * scale
    bo, v = float(popt[0]), float(popt[1])
    vb = float(popt[4]) if separate_bias_v_pi else v
    vb_err = float(perr[4]) if separate_bias_v_pi else float(perr[1])
    # b* is defined modulo 2 V_pi_bias: report the copy nearest the sweep centre
    bo += 2 * vb * round((centre - bo) / (2 * vb))
    return EncoderVPiFit(
        v_pi_v=v,
        v_pi_sigma_v=float(perr[1]),
        bias_v_pi_v=vb,
        bias_v_pi_sigma_v=vb_err,
        bias_opt_v=bo,
        bias_opt_sigma_v=float(perr[0]),
        e0=float(popt[2]),
        amp=float(popt[3]),
        ratio_z=math.exp(float(popt[n_base])),
        ratio_x=math.exp(float(popt[n_base + 1])),
        chi2_reduced=chi2 / dof,
        dof=dof,
    )


class EncoderVPiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v_pi_guess_v: float = Field(3.0, gt=0, description="starting guess (datasheet value)")
    sweep_points: int = Field(13, ge=7, le=101, description="bias points (one probe each)")
    sweep_half_span: float = Field(
        1.0, gt=0.2, le=2.0, description="bias sweep half-width in units of the guess"
    )
    separate_bias_v_pi: bool = Field(
        False, description="the bias electrode has its own half-wave voltage (fit it apart)"
    )
    coverage_factor: float = Field(COVERAGE_FACTOR, gt=0)
    max_relative_uncertainty: float = Field(
        0.02, gt=0, lt=0.5, description="refuse when coverage * sigma / V_pi is larger"
    )
    min_sifted_per_point: int = Field(
        1000, ge=10, description="refuse a probe with fewer sifted detections"
    )
    settle_s: float = Field(0.0, ge=0)


class EncoderVPiResult(CalibrationResult):
    procedure: str = "encoder_v_pi"
    v_pi_guess_v: float
    v_pi_v: float = Field(description="measured drive half-wave voltage")
    v_pi_sigma_v: float = Field(description="standard uncertainty")
    v_pi_lower_v: float = Field(description="v_pi_v - coverage_factor * sigma")
    v_pi_upper_v: float
    bias_v_pi_v: float = Field(description="bias half-wave voltage (= v_pi_v when tied)")
    coverage_factor: float
    bias_set_v: float
    drives_v: list[float] = Field(description="H, V, D, A drives set at the end")
    sweep_drives_v: list[float] = Field(description="H, V, D, A drives during the sweep")
    sweep_bias_v: list[float]
    sweep_errors: list[list[int]] = Field(description="per bias: errors of H, V, D, A")
    sweep_sifted: list[list[int]] = Field(description="per bias: sifted of H, V, D, A")
    fit: EncoderVPiFit


async def calibrate_encoder_v_pi(
    encoder: Encoder,
    measure_state_errors: Callable[[], Awaitable[StateErrors] | StateErrors],
    cfg: EncoderVPiConfig | None = None,
    *,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> EncoderVPiResult:
    """Measure the encoder's V_pi and set the four drives and the bias from it.

    ``measure_state_errors()`` must count only detections of slots sent after the call
    started (the encoder's current setting). Raises CalibrationError when a probe has too
    few detections or the result is less precise than ``max_relative_uncertainty``; the
    encoder is then left at the starting bias with the drives of the guess.
    """
    cfg = cfg or EncoderVPiConfig()
    started = time.monotonic()
    g = cfg.v_pi_guess_v
    b0 = float(await call(encoder.bias_v))
    b_lo, b_hi = encoder.bias_range_v
    d_lo, d_hi = encoder.drive_range_v
    guess_drives = [float(k * g) for k in STATE_PHASE]
    if not all(d_lo <= x <= d_hi for x in guess_drives):
        raise CalibrationError(f"drives of V_pi {g} V exceed the encoder's range {d_lo, d_hi}")
    for s, x in zip(_STATES, guess_drives, strict=True):
        await call(encoder.set_drive_v, s, x)
    await call(encoder.set_output, True)
    half = cfg.sweep_half_span * g
    if 2 * half > b_hi - b_lo:
        raise CalibrationError("the bias range is narrower than the V_pi sweep")
    centre = float(np.clip(b0, b_lo + half, b_hi - half))
    biases = np.linspace(centre - half, centre + half, cfg.sweep_points)
    errors: list[list[int]] = []
    sifted: list[list[int]] = []
    try:
        for b in biases:
            await call(encoder.set_bias_v, float(b))
            await settle(cfg.settle_s)
            se = await maybe_await(measure_state_errors())
            if sum(se.sifted) < cfg.min_sifted_per_point:
                raise CalibrationError(
                    f"only {sum(se.sifted)} sifted detections at bias {b:.3f} V "
                    f"(need {cfg.min_sifted_per_point}): is the link synchronized?"
                )
            errors.append(list(se.errors))
            sifted.append(list(se.sifted))
        fit = fit_encoder_v_pi(
            biases, guess_drives, errors, sifted, g, separate_bias_v_pi=cfg.separate_bias_v_pi
        )
        half_width = cfg.coverage_factor * fit.v_pi_sigma_v
        if half_width > cfg.max_relative_uncertainty * fit.v_pi_v:
            raise CalibrationError(
                f"encoder V_pi {fit.v_pi_v:.3f} +/- {half_width:.3f} V "
                f"({cfg.coverage_factor:g} sigma) is less precise than the "
                f"{cfg.max_relative_uncertainty:.1%} required: probe more detections per point"
            )
        if not 0.55 * g < fit.v_pi_v < 1.9 * g:
            raise CalibrationError(
                f"encoder V_pi fit {fit.v_pi_v:.3f} V at the edge of its search range"
            )
    except CalibrationError:
        await call(encoder.set_bias_v, b0)
        raise
    drives = [float(k * fit.v_pi_v) for k in STATE_PHASE]
    if not all(d_lo <= x <= d_hi for x in drives):
        await call(encoder.set_bias_v, b0)
        raise CalibrationError(f"drives of V_pi {fit.v_pi_v:.3f} V exceed the encoder's range")
    for s, x in zip(_STATES, drives, strict=True):
        await call(encoder.set_drive_v, s, x)
    # the optimum modulo one period, nearest the starting bias and within range
    period = 2 * fit.bias_v_pi_v
    bias = fit.bias_opt_v + period * round((b0 - fit.bias_opt_v) / period)
    while bias > b_hi:
        bias -= period
    while bias < b_lo:
        bias += period
    await call(encoder.set_bias_v, float(bias))
    result = EncoderVPiResult(
        v_pi_guess_v=g,
        v_pi_v=fit.v_pi_v,
        v_pi_sigma_v=fit.v_pi_sigma_v,
        v_pi_lower_v=fit.v_pi_v - cfg.coverage_factor * fit.v_pi_sigma_v,
        v_pi_upper_v=fit.v_pi_v + cfg.coverage_factor * fit.v_pi_sigma_v,
        bias_v_pi_v=fit.bias_v_pi_v,
        coverage_factor=cfg.coverage_factor,
        bias_set_v=float(bias),
        drives_v=drives,
        sweep_drives_v=guess_drives,
        sweep_bias_v=[float(x) for x in biases],
        sweep_errors=errors,
        sweep_sifted=sifted,
        fit=fit,
    )
    return finish(result, started, state_dir, plot_encoder_v_pi, publish, instruments=[encoder])


def plot_encoder_v_pi(result: EncoderVPiResult, fig: Figure) -> None:
    """Left: each state's error rate over the bias sweep (binomial error bars) with the
    fitted model, pulls below. Right: the minimum zoomed (the error floor ``e0`` and
    where each state's minimum sits), with the bias set."""
    b = np.asarray(result.sweep_bias_v)
    k = np.asarray(result.sweep_errors, dtype=np.float64)
    n = np.asarray(result.sweep_sifted, dtype=np.float64)
    f = result.fit

    def model(x: F64) -> F64:
        return state_error_model(
            x,
            result.sweep_drives_v,
            bias_opt_v=f.bias_opt_v,
            v_pi_v=f.v_pi_v,
            e0=f.e0,
            amp=f.amp,
            bias_v_pi_v=f.bias_v_pi_v,
        )

    outer = fig.add_gridspec(1, 2, width_ratios=(1.4, 1))
    ax, res = data_and_residuals(fig, outer[0], residual_label="pull (sigma)")
    zoom = fig.add_subplot(outer[1])
    xs = np.linspace(b.min(), b.max(), 400)
    curves = model(xs)
    at_data = model(b)
    for s in range(4):
        ok = n[:, s] > 0
        p = k[ok, s] / n[ok, s]
        # binomial standard error, with the model's rate (never 0 for an empty count)
        sig = np.sqrt(np.clip(at_data[ok, s], 1e-4, 1) * (1 - at_data[ok, s]) / n[ok, s])
        color = f"C{s}"
        ax.errorbar(b[ok], p * 100, sig * 100, fmt="o", ms=3, color=color, label=_STATES[s].name)
        ax.plot(xs, curves[:, s] * 100, lw=1, color=color)
        res.plot(b[ok], (p - at_data[ok, s]) / sig, "o", ms=3, color=color)
        zoom.errorbar(b[ok], p * 100, sig * 100, fmt="o", ms=4, color=color, capsize=2)
        zoom.plot(xs, curves[:, s] * 100, lw=1, color=color)
    ax.set_ylabel("error rate of the state (%)")
    ax.set_title(
        f"V_pi {result.v_pi_v:.3f} +/- {result.v_pi_sigma_v:.3f} V (guess "
        f"{result.v_pi_guess_v:g} V), chi2/dof {f.chi2_reduced:.2f} ({f.dof} dof)",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=4)
    res.set_xlabel("encoder bias (V), drives of the guess")
    half = max(0.25 * result.bias_v_pi_v, 2 * float(np.min(np.diff(np.sort(b)))))
    zoom.set_xlim(result.bias_set_v - half, result.bias_set_v + half)
    near = (xs >= result.bias_set_v - half) & (xs <= result.bias_set_v + half)
    top = float(curves[near].max()) * 100 if near.any() else 100.0
    zoom.set_ylim(0, min(100.0, 1.1 * top))
    zoom.axvline(result.bias_set_v, ls="--", color="k", lw=0.8, label="bias set")
    zoom.axhline(f.e0 * 100, ls=":", color="0.4", lw=0.8, label=f"floor e0 {100 * f.e0:.2f} %")
    zoom.set_xlabel("encoder bias (V)")
    zoom.set_ylabel("error rate (%)")
    zoom.set_title("the minimum", fontsize=9)
    zoom.legend(fontsize=7)
    zoom.grid(True, alpha=0.3, lw=0.5)
