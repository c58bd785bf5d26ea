"""What every calibration procedure shares: result base model, saving, publishing.

A procedure returns a pydantic result; :func:`save_result` writes it as JSON plus a PNG
plot under ``state_dir/calibration/`` and :func:`publish_result` hands it to the
telemetry publisher supplied by the runtime (a plain callable, so procedures do not
depend on the bus).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

__all__ = [
    "COVERAGE_FACTOR",
    "CalibrationError",
    "CalibrationResult",
    "Publisher",
    "PlotFn",
    "finish",
    "one_sided_confidence",
    "poisson_lower",
    "poisson_upper",
    "publish_result",
    "save_result",
    "settle",
    "utc_now",
]

#: ``publish(topic, payload)``: the runtime's telemetry publisher.
Publisher = Callable[[str, dict[str, Any]], None]

R = TypeVar("R", bound="CalibrationResult")

#: Draws a result on a fresh figure.
PlotFn = Callable[[Any, Figure], None]

#: Planck constant times the speed of light, in J m.
HC_J_M = 6.62607015e-34 * 299_792_458.0


#: Intervals reported by the procedures are estimate +/- this many standard uncertainties
#: (99.73 % two-sided, 99.865 % one-sided for a Gaussian); Poisson bounds use the same
#: one-sided confidence (:func:`one_sided_confidence`).
COVERAGE_FACTOR = 3.0


class CalibrationError(RuntimeError):
    """A procedure could not reach a trustworthy result (no signal, fit failed...)."""


def one_sided_confidence(coverage_factor: float) -> float:
    """Confidence of a one-sided bound ``coverage_factor`` standard deviations out."""
    return float(stats.norm.cdf(coverage_factor))


def poisson_upper(counts: int, confidence: float) -> float:
    """Exact (Garwood) one-sided upper bound on a Poisson mean after ``counts`` events.

    Zero events bound the mean by ``-ln(1 - confidence)`` (6.6 at 99.865 %), never by 0.
    """
    if counts < 0 or not 0 < confidence < 1:
        raise ValueError("need counts >= 0 and 0 < confidence < 1")
    return float(stats.chi2.ppf(confidence, 2 * counts + 2) / 2)


def poisson_lower(counts: int, confidence: float) -> float:
    """Exact (Garwood) one-sided lower bound on a Poisson mean after ``counts`` events."""
    if counts < 0 or not 0 < confidence < 1:
        raise ValueError("need counts >= 0 and 0 < confidence < 1")
    if counts == 0:
        return 0.0
    return float(stats.chi2.ppf(1 - confidence, 2 * counts) / 2)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class CalibrationResult(BaseModel):
    """Fields common to every calibration result."""

    model_config = ConfigDict(extra="forbid")

    procedure: str
    timestamp_utc: str = Field(default_factory=utc_now)
    duration_s: float = 0.0
    ok: bool = True
    message: str = ""


def save_result(result: CalibrationResult, state_dir: Path, plot_fn: PlotFn | None) -> Path:
    """Write ``result`` as JSON (and a PNG drawn by ``plot_fn``) under state_dir/calibration.

    Files are named ``<procedure>.json`` / ``.png`` (the latest result, replaced
    atomically) and a time-stamped copy of the JSON is kept alongside. Returns the JSON path.
    """
    out_dir = Path(state_dir) / "calibration"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = result.model_dump_json(indent=2)
    json_path = out_dir / f"{result.procedure}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, json_path)
    stamp = result.timestamp_utc.replace(":", "").replace("-", "").replace("+0000", "Z")
    (out_dir / f"{result.procedure}-{stamp}.json").write_text(text, encoding="utf-8")
    if plot_fn is not None:
        fig = plt.figure(figsize=(7.0, 4.5))
        try:
            plot_fn(result, fig)
            fig.suptitle(f"{result.procedure}  {result.timestamp_utc}", fontsize=9)
            png = out_dir / f"{result.procedure}.png"
            tmp_png = out_dir / f"{result.procedure}.tmp.png"
            fig.savefig(tmp_png, dpi=90)
            os.replace(tmp_png, png)
        finally:
            plt.close(fig)
    return json_path


def publish_result(result: CalibrationResult, publish: Publisher | None) -> None:
    """Send the result on telemetry topic ``calibration.<procedure>`` (JSON-safe dict)."""
    if publish is None:
        return
    payload = json.loads(result.model_dump_json())
    publish(f"calibration.{result.procedure}", payload)


def finish(
    result: R,
    started: float,
    state_dir: Path | None,
    plot_fn: PlotFn | None,
    publish: Publisher | None,
) -> R:
    """Stamp the duration, save and publish: the last step of every procedure."""
    result.duration_s = time.monotonic() - started
    if state_dir is not None:
        save_result(result, state_dir, plot_fn)
    publish_result(result, publish)
    return result


async def settle(seconds: float) -> None:
    """Wait for an instrument setting to take effect (no-op for zero)."""
    if seconds > 0:
        await asyncio.sleep(seconds)


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking instrument call in a worker thread."""
    return await asyncio.to_thread(fn, *args)


async def maybe_await(value: Awaitable[Any] | Any) -> Any:
    if isinstance(value, Awaitable):
        return await value
    return value
