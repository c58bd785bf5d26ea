"""Encoding-reference compensation: bring the error rate back down after a drift.

Transmitter side (it owns the encoder), fed by the error rate that only the comparison of
both nodes' data gives: ``measure_qber()`` is supplied by the orchestration (e.g. the
error rate of the next key block, or of a disclosed sample). Key exchange continues
while this runs: every probe is just a few blocks at a slightly different bias.

A rotation of the polarisation reference by ``delta`` gives ``QBER = e0 + A sin^2(delta)``
in both bases, and the encoder bias rotates every state by ``pi/2 * dV / V_pi``. So

    QBER(b) = e0 + A * sin^2(pi/2 * (b - b*) / V_pi)

with the bias's ``V_pi`` measured by :mod:`qkdnode.procedures.encoder_v_pi` (the datasheet
value only until that measurement has run). The procedure measures at the current bias and at
``+/- probe``, fits ``e0``, ``A``, ``b*`` (all samples, least squares), moves to ``b*``,
measures again, and repeats until the error rate is within ``tolerance`` of the
reference (pre-drift) value. It ends on the best bias seen.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import OptimizeWarning, curve_fit

from drivers.interfaces import Encoder
from qkdnode.procedures.common import (
    CalibrationResult,
    Publisher,
    call,
    data_and_residuals,
    finish,
    maybe_await,
)

__all__ = [
    "EncodingCompensationConfig",
    "EncodingCompensationResult",
    "QberEstimate",
    "compensate_encoding",
    "fit_qber_curve",
    "plot_encoding_compensation",
    "qber_curve",
    "qber_from_detections",
]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class QberEstimate:
    qber: float
    qber_z: float
    qber_x: float
    n_sifted: int


def qber_from_detections(
    channel: npt.NDArray[np.integer],
    tx_basis: npt.NDArray[np.uint8],
    tx_bit: npt.NDArray[np.uint8],
    *,
    channel_basis: Sequence[int] = (0, 0, 1, 1),
    channel_bit: Sequence[int] = (0, 1, 0, 1),
    mask: npt.NDArray[np.bool_] | None = None,
) -> QberEstimate:
    """Error rate of sifted detections (``channel`` against the prepared basis and bit of
    the same slots). Detector ``c`` measures basis ``channel_basis[c]`` and reads bit
    ``channel_bit[c]``."""
    cb = np.asarray(channel_basis, dtype=np.int64)[np.asarray(channel, dtype=np.int64)]
    bits = np.asarray(channel_bit, dtype=np.int64)[np.asarray(channel, dtype=np.int64)]
    sifted = cb == tx_basis
    if mask is not None:
        sifted &= mask
    err = bits != tx_bit
    out = []
    for b in (0, 1):
        sel = sifted & (cb == b)
        n = int(sel.sum())
        out.append((float(err[sel].mean()) if n else math.nan, n))
    n_all = int(sifted.sum())
    q = float(err[sifted].mean()) if n_all else math.nan
    return QberEstimate(q, out[0][0], out[1][0], n_all)


def qber_curve(b: F64, e0: float, amp: float, b_star: float, v_pi: float) -> F64:
    return np.asarray(e0 + amp * np.sin(np.pi / 2 * (b - b_star) / v_pi) ** 2)


def fit_qber_curve(
    biases: Sequence[float] | F64, qbers: Sequence[float] | F64, v_pi: float
) -> tuple[float, float, float]:
    """Least-squares ``(e0, amp, b_star)`` with ``b_star`` nearest the best sample."""
    b = np.asarray(biases, dtype=np.float64)
    q = np.asarray(qbers, dtype=np.float64)
    i_best = int(np.argmin(q))

    def model(x: F64, e0: float, amp: float, bs: float) -> F64:
        return qber_curve(x, e0, amp, bs, v_pi)

    best: tuple[float, tuple[float, float, float]] | None = None
    for offset in np.linspace(-v_pi, v_pi, 9):
        p0 = [max(float(q.min()) * 0.5, 1e-4), 1.0, float(b[i_best] + offset)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                popt, _ = curve_fit(
                    model,
                    b,
                    q,
                    p0=p0,
                    bounds=([0.0, 0.3, -np.inf], [0.5, 1.5, np.inf]),
                    maxfev=5000,
                )
        except (RuntimeError, ValueError):
            continue
        cost = float(np.sum((model(b, *popt) - q) ** 2))
        bs = float(popt[2])
        # b* is defined modulo 2 V_pi: take the copy nearest the best sample
        bs += 2 * v_pi * round((float(b[i_best]) - bs) / (2 * v_pi))
        cand = (float(popt[0]), float(popt[1]), bs)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, cand)
    if best is None:
        return float(q.min()), 1.0, float(b[i_best])
    return best[1]


class EncodingCompensationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v_pi_v: float = Field(
        3.0, gt=0, description="encoder bias half-wave voltage (measured; datasheet before)"
    )
    probe_fraction: float = Field(0.12, gt=0, le=0.5, description="probe step / V_pi")
    max_step_fraction: float = Field(0.6, gt=0, le=2, description="largest move / V_pi")
    tolerance: float = Field(0.003, gt=0, lt=0.1, description="absolute QBER above reference")
    max_measurements: int = Field(10, ge=3)


class EncodingCompensationResult(CalibrationResult):
    procedure: str = "encoding_compensation"
    reference_qber: float | None
    initial_bias_v: float
    initial_qber: float
    final_bias_v: float
    final_qber: float
    samples: list[tuple[float, float]]  # (bias V, QBER)
    fit: tuple[float, float, float] | None  # (e0, amp, b*)
    v_pi_v: float


async def compensate_encoding(
    encoder: Encoder,
    measure_qber: Callable[[], Awaitable[float] | float],
    reference_qber: float | None = None,
    cfg: EncodingCompensationConfig | None = None,
    *,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> EncodingCompensationResult:
    """Move the encoder bias to the error-rate minimum (see the module docstring).

    ``measure_qber()`` must measure with the encoder's *current* setting (only data taken
    after the call started). Without ``reference_qber`` the loop stops when a fit-predicted
    minimum is reached (QBER within ``tolerance`` of the fitted floor ``e0``).
    """
    cfg = cfg or EncodingCompensationConfig()
    started = time.monotonic()
    b0 = float(await call(encoder.bias_v))
    lo, hi = encoder.bias_range_v
    samples: list[tuple[float, float]] = []

    async def at(bias: float) -> float:
        bias = float(np.clip(bias, lo, hi))
        await call(encoder.set_bias_v, bias)
        q = float(await maybe_await(measure_qber()))
        samples.append((bias, q))
        return q

    def good(q: float, floor: float | None) -> bool:
        ref = reference_qber if reference_qber is not None else floor
        return ref is not None and q <= ref + cfg.tolerance

    q0 = await at(b0)
    fit: tuple[float, float, float] | None = None
    if not good(q0, None):
        probe = cfg.probe_fraction * cfg.v_pi_v
        await at(b0 + probe)
        await at(b0 - probe)
        while len(samples) < cfg.max_measurements:
            bs, qs = zip(*samples, strict=True)
            fit = fit_qber_curve(bs, qs, cfg.v_pi_v)
            best_b = min(samples, key=lambda s: s[1])[0]
            step = float(
                np.clip(
                    fit[2] - best_b,
                    -cfg.max_step_fraction * cfg.v_pi_v,
                    cfg.max_step_fraction * cfg.v_pi_v,
                )
            )
            target = best_b + step
            if any(abs(target - s[0]) < 1e-4 * cfg.v_pi_v for s in samples):
                target += 0.25 * probe * (1 if len(samples) % 2 else -1)
            q = await at(target)
            if good(q, fit[0]):
                break
    best_b, best_q = min(samples, key=lambda s: s[1])
    if samples[-1][0] != best_b:
        await call(encoder.set_bias_v, best_b)
    result = EncodingCompensationResult(
        reference_qber=reference_qber,
        initial_bias_v=b0,
        initial_qber=q0,
        final_bias_v=best_b,
        final_qber=best_q,
        samples=samples,
        fit=fit,
        v_pi_v=cfg.v_pi_v,
        ok=good(best_q, fit[0] if fit else None) or good(q0, None),
    )
    return finish(
        result, started, state_dir, plot_encoding_compensation, publish, instruments=[encoder]
    )


def plot_encoding_compensation(result: EncodingCompensationResult, fig: Figure) -> None:
    """The error rate measured at each bias tried (numbered in order) with the fitted
    ``e0 + amp sin^2`` curve, zoomed on the samples; the residuals below (percentage
    points); the bias it started from and the one it set."""
    ax, res = data_and_residuals(fig, residual_label="data - fit (pp)")
    b = np.array([s[0] for s in result.samples])
    q = np.array([s[1] for s in result.samples])
    ax.plot(b, q * 100, "o", ms=6, label="measured (number: order)")
    for i, (x, y) in enumerate(zip(b, q, strict=True)):
        ax.annotate(str(i), (x, y * 100), xytext=(4, 4), textcoords="offset points", fontsize=7)
    span = float(b.max() - b.min()) if b.size > 1 else 0.2
    lo, hi = float(b.min()) - 0.15 * span - 0.02, float(b.max()) + 0.15 * span + 0.02
    if result.fit is not None:
        e0, amp, bs = result.fit
        xs = np.linspace(min(lo, bs), max(hi, bs), 300)
        ax.plot(xs, qber_curve(xs, e0, amp, bs, result.v_pi_v) * 100, lw=1.2, label="fit")
        ax.axvline(bs, ls=":", color="C1", lw=0.8)
        res.plot(b, (q - qber_curve(b, e0, amp, bs, result.v_pi_v)) * 100, "o", ms=6)
        title = f"fit: minimum {100 * e0:.2f} % at {bs:.3f} V (V_pi {result.v_pi_v:.3f} V)"
    else:
        title = "no fit (too few samples)"
    ax.axvline(result.initial_bias_v, ls=":", color="0.4", lw=0.9, label="bias before")
    ax.axvline(result.final_bias_v, ls="--", color="C3", lw=0.9, label="bias set")
    if result.reference_qber is not None:
        ax.axhline(result.reference_qber * 100, ls=":", color="k", lw=0.8, label="reference")
    ax.set_ylabel("QBER (%)")
    ax.set_title(
        f"{title}; QBER {100 * result.initial_qber:.2f} -> {100 * result.final_qber:.2f} %",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    res.set_xlabel("encoder bias (V)")
