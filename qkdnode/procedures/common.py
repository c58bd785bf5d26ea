"""What every calibration procedure shares: result base model, saving, publishing.

A procedure returns a pydantic result; :func:`save_result` writes it as JSON plus a PNG
plot under ``state_dir/calibration/`` and :func:`publish_result` hands it to the
telemetry publisher supplied by the runtime (a plain callable, so procedures do not
depend on the bus).

Every result carries a snapshot of the instruments it used (:class:`InstrumentSnapshot`,
as QCoDeS snapshots do): each instrument's identity (``*IDN?`` or the vendor's
equivalent) and every setting its driver made, from the driver's
:class:`~drivers.restore.SettingsMemory`, so a result file says on what and with what it
was measured. The plot helpers (:func:`data_and_residuals`) give every procedure's
figure the same form: data with the fit over it, the residuals below, units on axes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from drivers.interfaces import Instrument
from drivers.restore import SettingsMemory

__all__ = [
    "COVERAGE_FACTOR",
    "CalibrationError",
    "CalibrationResult",
    "InstrumentSetting",
    "InstrumentSnapshot",
    "Publisher",
    "PlotFn",
    "data_and_residuals",
    "finish",
    "one_sided_confidence",
    "poisson_lower",
    "poisson_upper",
    "publish_result",
    "save_result",
    "settle",
    "snapshot_instruments",
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


class InstrumentSetting(BaseModel):
    """One setting a driver made, as it told the instrument (unit in ``name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    value: float | bool | str


class InstrumentSnapshot(BaseModel):
    """An instrument as a procedure used it: its config name, driver class, identity
    string and the settings its driver had made when the result was taken."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    driver: str
    identity: str
    settings: list[InstrumentSetting] = Field(default_factory=list)


def snapshot_instruments(instruments: Sequence[Instrument]) -> list[InstrumentSnapshot]:
    """The snapshot of each instrument (in order, once each).

    The identity is asked of the instrument (one ``*IDN?``-like query); an instrument
    that does not answer is recorded with ``identity`` starting ``unavailable:`` and the
    error, never raising (a result is not lost for its snapshot). Settings come from the
    driver's :class:`~drivers.restore.SettingsMemory` (attribute ``memory``); a driver
    without one records none.
    """
    out: list[InstrumentSnapshot] = []
    seen: set[int] = set()
    for inst in instruments:
        if id(inst) in seen:
            continue
        seen.add(id(inst))
        try:
            identity = str(inst.identify())
        except Exception as exc:  # a snapshot never fails the procedure
            identity = f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"
        memory = getattr(inst, "memory", None)
        settings = (
            [InstrumentSetting(name=n, value=v) for n, v in memory.snapshot()]
            if isinstance(memory, SettingsMemory)
            else []
        )
        out.append(
            InstrumentSnapshot(
                name=str(getattr(inst, "name", "")),
                driver=f"{type(inst).__module__}.{type(inst).__qualname__}",
                identity=identity,
                settings=settings,
            )
        )
    return out


class CalibrationResult(BaseModel):
    """Fields common to every calibration result."""

    model_config = ConfigDict(extra="forbid")

    procedure: str
    timestamp_utc: str = Field(default_factory=utc_now)
    duration_s: float = 0.0
    ok: bool = True
    message: str = ""
    #: the instruments the procedure used, as they were set when it finished
    instruments: list[InstrumentSnapshot] = Field(default_factory=list)


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
        # a Figure of its own (no pyplot state): two nodes of one process may save at once
        fig = Figure(figsize=(9.0, 6.0), layout="constrained")
        FigureCanvasAgg(fig)
        plot_fn(result, fig)
        fig.suptitle(f"{result.procedure}  {result.timestamp_utc}", fontsize=9)
        png = out_dir / f"{result.procedure}.png"
        tmp_png = out_dir / f"{result.procedure}.tmp.png"
        fig.savefig(tmp_png, dpi=100)
        os.replace(tmp_png, png)
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
    *,
    instruments: Sequence[Instrument] = (),
) -> R:
    """Stamp the duration and the instruments' snapshot, save and publish: the last
    step of every procedure."""
    result.duration_s = time.monotonic() - started
    if instruments:
        result.instruments = snapshot_instruments(instruments)
    if state_dir is not None:
        save_result(result, state_dir, plot_fn)
    publish_result(result, publish)
    return result


def data_and_residuals(fig: Figure, spec: Any = None, *, residual_label: str) -> tuple[Axes, Axes]:
    """A data panel over a residuals panel (3 : 1, shared x) in ``spec`` (a subplot spec
    of ``fig``, or the whole figure). The residual panel has a zero line and its label;
    the caller labels x on the residual axes (the data panel's x labels are hidden)."""
    grid = (
        spec.subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
        if spec is not None
        else fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
    )
    ax = fig.add_subplot(grid[0])
    res = fig.add_subplot(grid[1], sharex=ax)
    ax.tick_params(labelbottom=False)
    res.axhline(0.0, color="0.4", lw=0.8)
    res.set_ylabel(residual_label)
    for a in (ax, res):
        a.grid(True, alpha=0.3, lw=0.5)
    return ax, res


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
