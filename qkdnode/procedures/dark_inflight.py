"""The receiver's dark-count rate measured while key flows, from the vacuum decoy class.

Transmitter side, no dark window: the transmitter sends the vacuum class (``mu3``, near 0
but not 0: the intensity modulator's finite extinction) in a known fraction of the slots,
and the receiver's detections in those slots are its dark counts, its afterpulses and
the little light ``mu3`` still carries. Per committed block the transmitter knows the
detections of each intensity class (:attr:`BlockStats.detections_per_class`, from its
own prepared states) and how many slots of each class it sent into the slots the block
spans (the class probability times the span less the withheld windows: the binomial
spread of that number is below 1e-3 relative at a block's millions of vacuum slots and is
neglected).

Over the blocks of a sliding time window (:class:`DarkTracker`), with ``N3`` vacuum
detections in ``S3`` vacuum slots and ``Ns`` signal detections in ``Ss`` signal slots:

* ``P3 = N3 / S3``, the click probability of a vacuum slot, with exact one-sided Poisson
  (Garwood) bounds at ``confidence`` (:func:`~qkdnode.procedures.common.poisson_lower`
  and ``poisson_upper``, as the light-off measurement of
  :mod:`~qkdnode.procedures.dark_rate`);
* the leakage is **subtracted within bounds**: a slot of class ``k`` clicks with
  ``P_k = 1 - (1 - Y0) exp(-eta mu_k)`` (Poisson light, ``eta`` the whole transmittance
  with the detectors). From the signal class, ``eta mu_s <= -ln(1 - P_s)`` (``Y0 >= 0``)
  and ``eta mu_s >= -ln(1 - P_s) + ln(1 - P3)`` (``Y0 <= P3``); times the calibrated ratio
  ``mu3 / mu_s`` (the statistical intervals of the intensity calibration: the factor the
  three classes share cancels in the ratio) that bounds ``L = eta mu3`` from both sides;
* ``Y0 = 1 - (1 - P3) exp(L)``, the probability of a dark click in one slot's gates over
  all detectors: lower from (``P3`` lower, ``L`` upper, clipped at 0), upper from
  (``P3`` upper, ``L`` lower), point from the point values;
* a block holds only the detections inside the receiver's acceptance window (a few
  hundred ps about the pulse), while the detectors count dark clicks over their whole
  gate: ``Y0`` is the window's, and ``acceptance_fraction`` = window / gate (at most 1;
  dark counts are uniform in time over the gate) turns it into the gate's,
  ``Y0 / acceptance_fraction``;
* the dark count rate ``D = Y0 / acceptance_fraction * gate_rate_hz`` with the gate rate
  the slot rate (the detectors open one gate per slot): what the detectors' count-rate
  readings sum to with the light off, the quantity of the calibration's light-off
  measurement and the floor of the light-loss test, which counts every tag (the
  simulator draws dark counts as Poisson in each gate with ``dark_rate_hz *
  gate_width``; the sum over detectors and the probability of any click differ by
  ``O(Y0^2)``).

Each bound holds at ``confidence`` given the others (a union over the vacuum count, the
signal count and the intensity calibration). Biases, all small and stated: afterpulses
of the light's clicks falling into vacuum slots count as dark (upwards; none without
afterpulsing); a detector dead after a light click misses the dark counts of those gates
(downwards, the click rate times the dead time, about 1 % at 25 km); a free-running
detector's counts outside the acceptance window are not seen (the in-gate rate only).

Refused (:class:`~qkdnode.procedures.common.CalibrationError`, nothing reported) below
``min_counts`` vacuum detections in the window, as the calibration procedures refuse a
point value on too few counts; and without a measured signal class.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field

from qkdnode.procedures.common import (
    COVERAGE_FACTOR,
    CalibrationError,
    CalibrationResult,
    one_sided_confidence,
    poisson_lower,
    poisson_upper,
)

__all__ = [
    "DarkInflightPoint",
    "DarkInflightResult",
    "DarkTracker",
    "LeakRatio",
    "VacuumCounts",
    "dark_rose",
    "estimate_inflight_dark",
    "plot_dark_inflight",
]


class VacuumCounts(BaseModel):
    """One committed block as the transmitter counted it (slots may be fractional: the
    class probability times the slots the block spans)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_id: int
    #: Unix seconds when the block was committed
    finished_unix_s: float
    vacuum_slots: float = Field(ge=0)
    vacuum_detections: int = Field(ge=0)
    signal_slots: float = Field(ge=0)
    signal_detections: int = Field(ge=0)


class LeakRatio(BaseModel):
    """``mu3 / mu_s`` of the intensity calibration (dimensionless): lower, point, upper."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lower: float = Field(ge=0)
    point: float = Field(ge=0)
    upper: float = Field(ge=0)


class DarkInflightPoint(BaseModel):
    """One in-flight estimate: dark count rate (Hz, summed over detectors) and bounds."""

    model_config = ConfigDict(extra="forbid")

    unix_s: float
    blocks: int
    vacuum_detections: int
    vacuum_slots: float
    #: click probability of a vacuum slot (all detectors)
    p_vacuum_click: float
    #: the light mu3 carries, click probability per vacuum slot: lower, point, upper
    leak_lower: float
    leak: float
    leak_upper: float
    #: dark click probability per slot (all detectors) in the acceptance window
    y0: float
    y0_lower: float
    y0_upper: float
    #: the acceptance window over the detectors' gate (at most 1)
    acceptance_fraction: float
    rate_hz: float
    lower_hz: float
    upper_hz: float


class DarkInflightResult(CalibrationResult):
    """The in-flight dark count rate (the latest point) with its history and the
    calibration's light-off value it is compared with."""

    procedure: str = "dark_inflight"
    confidence: float
    gate_rate_hz: float
    #: the receiver's acceptance window (full width) and its detectors' gate, ps
    acceptance_window_ps: float
    gate_width_ps: float
    window_s: float
    min_counts: int
    leak_ratio: LeakRatio
    latest: DarkInflightPoint
    history: list[DarkInflightPoint] = Field(default_factory=list)
    #: the receiver's light-off measurement at calibration (Hz), None when not known
    calibrated_rate_hz: float | None = None
    calibrated_lower_hz: float | None = None
    calibrated_upper_hz: float | None = None
    rise_factor: float
    #: the in-flight lower bound above rise_factor times the calibrated upper bound
    risen: bool = False


def dark_rose(lower_hz: float, calibrated_upper_hz: float | None, factor: float) -> bool:
    """Whether an in-flight lower bound exceeds ``factor`` times the calibration's upper
    bound (False when the calibration's value is not known)."""
    if calibrated_upper_hz is None or not math.isfinite(calibrated_upper_hz):
        return False
    return lower_hz > factor * max(calibrated_upper_hz, 0.0)


def estimate_inflight_dark(
    blocks: Iterable[VacuumCounts],
    leak_ratio: LeakRatio,
    *,
    gate_rate_hz: float,
    acceptance_fraction: float = 1.0,
    min_counts: int = 100,
    confidence: float | None = None,
    unix_s: float | None = None,
) -> DarkInflightPoint:
    """The dark count rate from ``blocks`` (module docstring). Raises
    :class:`CalibrationError` below ``min_counts`` vacuum detections or when no signal
    slot clicked; ValueError on a gate rate that is not positive or an acceptance
    fraction outside (0, 1]."""
    if not gate_rate_hz > 0:
        raise ValueError(f"gate_rate_hz must be positive, got {gate_rate_hz!r}")
    if not 0 < acceptance_fraction <= 1:
        raise ValueError(f"acceptance_fraction must lie in (0, 1], got {acceptance_fraction!r}")
    conf = confidence if confidence is not None else one_sided_confidence(COVERAGE_FACTOR)
    items = list(blocks)
    n3 = sum(b.vacuum_detections for b in items)
    s3 = sum(b.vacuum_slots for b in items)
    ns = sum(b.signal_detections for b in items)
    ss = sum(b.signal_slots for b in items)
    if n3 < min_counts or s3 <= 0:
        raise CalibrationError(
            f"{n3} detections in the vacuum slots of {len(items)} blocks: fewer than the "
            f"{min_counts} a dark rate needs"
        )
    if ns <= 0 or ss <= 0 or ns >= ss:
        raise CalibrationError(f"signal class: {ns} detections in {ss:.0f} slots, no yield")
    p3 = n3 / s3
    p3_lo = min(poisson_lower(n3, conf) / s3, 1.0)
    p3_hi = min(poisson_upper(n3, conf) / s3, 1.0 - 1e-15)
    ps = ns / ss
    ps_lo = poisson_lower(ns, conf) / ss
    ps_hi = min(poisson_upper(ns, conf) / ss, 1.0 - 1e-15)
    x_s = -math.log1p(-ps)
    x_s_hi = -math.log1p(-ps_hi)
    x_s_lo = max(0.0, -math.log1p(-ps_lo) + math.log1p(-p3_hi))
    # the light mu3 carries: click probability of a vacuum slot without dark counts
    leak = -math.expm1(-x_s * leak_ratio.point)
    leak_hi = -math.expm1(-x_s_hi * leak_ratio.upper)
    leak_lo = -math.expm1(-x_s_lo * leak_ratio.lower)

    def y0(p: float, lk: float) -> float:
        return min(1.0, max(0.0, 1.0 - (1.0 - p) * math.exp(lk)))

    y_pt, y_lo, y_hi = y0(p3, leak), y0(p3_lo, leak_hi), y0(p3_hi, leak_lo)
    return DarkInflightPoint(
        unix_s=time.time() if unix_s is None else unix_s,
        blocks=len(items),
        vacuum_detections=n3,
        vacuum_slots=s3,
        p_vacuum_click=p3,
        leak_lower=leak_lo,
        leak=leak,
        leak_upper=leak_hi,
        y0=y_pt,
        y0_lower=y_lo,
        y0_upper=y_hi,
        acceptance_fraction=acceptance_fraction,
        rate_hz=y_pt / acceptance_fraction * gate_rate_hz,
        lower_hz=y_lo / acceptance_fraction * gate_rate_hz,
        upper_hz=y_hi / acceptance_fraction * gate_rate_hz,
    )


class DarkTracker:
    """The blocks of the last ``window_s`` seconds and the estimates made from them.

    :meth:`add` takes each committed block; :meth:`estimate` gives a new point (and keeps
    it in the history, at most ``history`` points) or raises :class:`CalibrationError`
    below ``min_counts``. Not thread-safe (the event loop's)."""

    def __init__(
        self,
        *,
        window_s: float,
        min_counts: int,
        gate_rate_hz: float,
        confidence: float | None = None,
        history: int = 500,
    ) -> None:
        if window_s <= 0 or min_counts < 1:
            raise ValueError("need window_s > 0 and min_counts >= 1")
        self.window_s = window_s
        self.min_counts = min_counts
        self.gate_rate_hz = gate_rate_hz
        self.confidence = (
            confidence if confidence is not None else one_sided_confidence(COVERAGE_FACTOR)
        )
        self._blocks: deque[VacuumCounts] = deque()
        self.history: deque[DarkInflightPoint] = deque(maxlen=history)

    def add(self, counts: VacuumCounts) -> None:
        self._blocks.append(counts)

    def clear(self) -> None:
        """Forget the blocks (a new calibration: new intensities, perhaps new classes)."""
        self._blocks.clear()

    def _window(self, now_unix_s: float) -> list[VacuumCounts]:
        while self._blocks and self._blocks[0].finished_unix_s < now_unix_s - self.window_s:
            self._blocks.popleft()
        return list(self._blocks)

    def estimate(
        self,
        leak_ratio: LeakRatio,
        acceptance_fraction: float = 1.0,
        now_unix_s: float | None = None,
    ) -> DarkInflightPoint:
        now = time.time() if now_unix_s is None else now_unix_s
        point = estimate_inflight_dark(
            self._window(now),
            leak_ratio,
            gate_rate_hz=self.gate_rate_hz,
            acceptance_fraction=acceptance_fraction,
            min_counts=self.min_counts,
            confidence=self.confidence,
            unix_s=now,
        )
        self.history.append(point)
        return point


def plot_dark_inflight(result: DarkInflightResult, fig: Figure) -> None:
    """The in-flight dark count rate against time with its interval (band), the
    calibration's light-off value and interval overlaid (dashed line, grey band), the
    rise threshold dotted; below, in the acceptance window, the vacuum slots' click
    probability and the part of it the vacuum class's light makes (subtracted, with its
    bounds), both times the gate rate (Hz)."""
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    points = result.history or [result.latest]
    t0 = points[0].unix_s
    t = np.asarray([(p.unix_s - t0) / 60.0 for p in points])
    rate = np.asarray([p.rate_hz for p in points])
    lo = np.asarray([p.lower_hz for p in points])
    hi = np.asarray([p.upper_hz for p in points])
    ax.fill_between(t, lo, hi, color="C0", alpha=0.2, step="mid", label="in-flight interval")
    ax.plot(t, rate, "o-", ms=3, color="C0", label="in-flight (vacuum class)")
    if result.calibrated_rate_hz is not None:
        ax.axhline(
            result.calibrated_rate_hz, color="k", ls="--", lw=1, label="light-off (calibration)"
        )
        if result.calibrated_lower_hz is not None and result.calibrated_upper_hz is not None:
            ax.axhspan(
                result.calibrated_lower_hz,
                result.calibrated_upper_hz,
                color="0.5",
                alpha=0.2,
                label="light-off interval",
            )
            ax.axhline(
                result.rise_factor * result.calibrated_upper_hz,
                color="C3",
                ls=":",
                lw=1,
                label=f"alarm: {result.rise_factor:g} x light-off upper bound",
            )
    ax.set_ylabel("dark count rate, all detectors (Hz)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    last = result.latest
    ax.set_title(
        f"{last.rate_hz:.3g} Hz [{last.lower_hz:.3g}, {last.upper_hz:.3g}] from "
        f"{last.vacuum_detections} vacuum-slot clicks in {last.blocks} blocks "
        f"(window {result.window_s:g} s), bounds {result.confidence:.3%} one-sided\n"
        f"acceptance window {result.acceptance_window_ps:.0f} ps of a "
        f"{result.gate_width_ps:.0f} ps gate; mu3/mu_s {result.leak_ratio.point:.3g} "
        f"[{result.leak_ratio.lower:.3g}, {result.leak_ratio.upper:.3g}]",
        fontsize=8,
    )
    g = result.gate_rate_hz
    ax2.plot(
        t, [p.p_vacuum_click * g for p in points], "s-", ms=3, color="C1", label="vacuum slots"
    )
    ax2.plot(
        t, [p.leak * g for p in points], "^-", ms=3, color="C2", label="their light (subtracted)"
    )
    ax2.fill_between(
        t,
        [p.leak_lower * g for p in points],
        [p.leak_upper * g for p in points],
        color="C2",
        alpha=0.2,
        step="mid",
    )
    ax2.set_ylabel("click prob. x gate rate (Hz)", fontsize=8)
    ax2.set_xlabel("time since the first point (min)")
    ax2.legend(fontsize=7)
