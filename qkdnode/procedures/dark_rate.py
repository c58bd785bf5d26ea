"""The receiver's dark-count rates with exact Poisson intervals, light off.

Receiver side; the caller has the transmitter's light off (its shutter closed) and has
waited for the light in flight to pass. Each detector's count rate is read ``readings``
times, one integration period ``integration_s`` apart; each reading stands for the
detectors' counting time ``T`` (their counter period, ``reading_time_s``, at most
``integration_s``), so the counts (rate times ``T``, summed) give the rate ``N / (n T)``
and its one-sided Garwood bounds at
``confidence`` (zero counts bound the rate by ``-ln(1 - confidence) / (n T)``, never by
0). Used at calibration and, on the node's schedule, during key exchange.

Failure modes: instrument errors propagate; a negative or non-finite reading raises
:class:`~qkdnode.procedures.common.CalibrationError` naming the detector.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from drivers.interfaces import SinglePhotonDetector
from qkdnode.procedures.common import (
    COVERAGE_FACTOR,
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    data_and_residuals,
    finish,
    maybe_await,
    one_sided_confidence,
    poisson_lower,
    poisson_upper,
)

__all__ = ["DarkRate", "DarkRateResult", "measure_dark_rate", "plot_dark_rate"]


class DarkRate(BaseModel):
    """One detector's dark counts: readings (Hz), total counts, rate and bounds (Hz)."""

    model_config = ConfigDict(extra="forbid")

    detector: str
    readings_hz: list[float]
    counts: int
    rate_hz: float
    lower_hz: float
    upper_hz: float


class DarkRateResult(CalibrationResult):
    procedure: str = "dark_rate"
    integration_s: float
    #: counting time behind each reading (s); the exposure is readings x this
    reading_time_s: float
    confidence: float
    detectors: list[DarkRate]
    #: the sum over detectors (the floor of the light-loss test), Hz
    total_rate_hz: float
    total_lower_hz: float
    total_upper_hz: float


async def measure_dark_rate(
    detectors: Sequence[SinglePhotonDetector],
    *,
    integration_s: float,
    reading_time_s: float | None = None,
    readings: int = 5,
    confidence: float | None = None,
    wait_integration: Callable[[], object] | None = None,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> DarkRateResult:
    """Read every detector ``readings`` times, one integration period apart (module
    docstring); ``wait_integration()`` (may be a coroutine) waits for the next period
    (default: sleeps ``integration_s``). ``reading_time_s`` is the counting time behind
    one reading (the detectors' counter period, see
    :meth:`~drivers.interfaces.SinglePhotonDetector.count_integration_s`); None: the
    readings are taken to count for ``integration_s``. It may not exceed
    ``integration_s``: overlapping readings would count the same clicks twice
    (``ValueError``). Saved and published as ``dark_rate``."""
    if integration_s <= 0 or readings < 1:
        raise ValueError("need integration_s > 0 and readings >= 1")
    counting_s = integration_s if reading_time_s is None else reading_time_s
    if not 0 < counting_s <= integration_s * (1 + 1e-9):
        raise ValueError(
            f"reading_time_s={reading_time_s} must be > 0 and at most integration_s="
            f"{integration_s} (readings one integration period apart must not overlap)"
        )
    conf = confidence if confidence is not None else one_sided_confidence(COVERAGE_FACTOR)
    started = time.monotonic()
    per_det: list[list[float]] = [[] for _ in detectors]
    for _ in range(readings):
        if wait_integration is None:
            await asyncio.sleep(integration_s)
        else:
            await maybe_await(wait_integration())
        for i, d in enumerate(detectors):
            rate = float(await call(d.count_rate_hz))
            if not math.isfinite(rate) or rate < 0:
                raise CalibrationError(f"{d.name}: count rate {rate!r} Hz is not a rate")
            per_det[i].append(rate)
    exposure_s = readings * counting_s
    out = []
    for d, rates in zip(detectors, per_det, strict=True):
        n = int(sum(round(r * counting_s) for r in rates))
        out.append(
            DarkRate(
                detector=d.name,
                readings_hz=rates,
                counts=n,
                rate_hz=n / exposure_s,
                lower_hz=poisson_lower(n, conf) / exposure_s,
                upper_hz=poisson_upper(n, conf) / exposure_s,
            )
        )
    total = sum(x.counts for x in out)
    result = DarkRateResult(
        integration_s=integration_s,
        reading_time_s=counting_s,
        confidence=conf,
        detectors=out,
        total_rate_hz=total / exposure_s,
        total_lower_hz=poisson_lower(total, conf) / exposure_s,
        total_upper_hz=poisson_upper(total, conf) / exposure_s,
    )
    return finish(result, started, state_dir, plot_dark_rate, publish, instruments=detectors)


def plot_dark_rate(result: DarkRateResult, fig: Figure) -> None:
    """Each detector's counts accumulated over the readings against the exposure time,
    the fitted constant rate (a line through the origin) and its Poisson bounds as a
    band; residuals (counts minus the line) below. Counts stay readable at a few per
    reading, where per-reading rates would be all error bar."""
    ax, res = data_and_residuals(fig, residual_label="counts - rate x t")
    t_s = result.reading_time_s
    for k, d in enumerate(result.detectors):
        per = np.asarray([round(r * t_s) for r in d.readings_hz], dtype=np.float64)
        n = np.cumsum(per)
        t = (np.arange(per.size) + 1) * t_s
        color = f"C{k}"
        tt = np.concatenate([[0.0], t])
        ax.step(t, n, where="post", color=color, lw=0.8)
        ax.plot(
            t,
            n,
            "o",
            ms=4,
            color=color,
            label=f"{d.detector}: {d.rate_hz:.3g} Hz [{d.lower_hz:.3g}, {d.upper_hz:.3g}]",
        )
        ax.plot(tt, d.rate_hz * tt, color=color, lw=1.0)
        ax.fill_between(tt, d.lower_hz * tt, d.upper_hz * tt, color=color, alpha=0.1)
        res.plot(t, n - d.rate_hz * t, "o", ms=4, color=color)
    ax.set_ylabel("dark counts, accumulated")
    ax.set_title(
        f"total {result.total_rate_hz:.3g} Hz [{result.total_lower_hz:.3g}, "
        f"{result.total_upper_hz:.3g}] Hz, bounds at {result.confidence:.3%} one-sided; "
        "lines: rate, bands: bounds",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    res.set_xlabel(f"exposure (s), {1e3 * t_s:.0f} ms per reading")
