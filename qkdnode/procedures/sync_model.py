"""Settings, clock model and result of the clock synchronization
(:mod:`qkdnode.procedures.sync`).

:class:`SyncConfig` is the ``[sync]`` config section; :class:`ClockModel` maps transmitter
slot times to receiver tag times (``rx_time_ps = offset_ps + rate * tx_time_ps``, in ps)
and :func:`map_tags_to_slots` numbers tags by it; :class:`SyncResult` is the outcome of an
acquisition and :class:`AcquisitionError` its failure. No I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from qkdnode.procedures.common import COVERAGE_FACTOR

__all__ = [
    "AcquisitionError",
    "ClockFit",
    "ClockModel",
    "SyncConfig",
    "SyncResult",
    "fit_clock",
    "map_tags_to_slots",
    "slot_period_ps",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


class AcquisitionError(RuntimeError):
    """Coarse acquisition failed (too few tags, no slot comb, no pattern match)."""


class SyncConfig(BaseModel):
    """Synchronization settings (a ``[sync]`` config section)."""

    model_config = ConfigDict(extra="forbid")

    acquisition_time_s: float = Field(0.05, gt=0, le=60, description="minimum tag span read")
    max_acquisition_time_s: float = Field(2.0, gt=0, le=600)
    min_acquisition_tags: int = Field(20_000, ge=100)
    read_timeout_s: float = Field(0.5, gt=0, le=60)
    max_offset_s: float = Field(5.0, gt=0, le=1000, description="|clock offset| searched")
    max_ppm: float = Field(120.0, gt=0, le=2000, description="|frequency offset| searched")
    window_ps: float | None = Field(
        None, gt=0, description="acceptance window (full width); None = 10 sigma of the peak"
    )
    max_window_fraction: float = Field(0.5, gt=0, le=1)
    lock_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="lock when |timing error| <= this fraction of a slot"
    )
    max_spread_fraction: float = Field(0.25, gt=0, le=1)
    min_significance: float = Field(8.0, gt=0, description="pattern correlation z-score")
    min_comb_strength: float = Field(6.0, gt=0, description="slot-comb phasor z-score")
    lost_fraction_ratio: float = Field(0.5, gt=0, lt=1)
    lost_after_segments: int = Field(5, ge=1)
    track_segment_s: float = Field(0.002, gt=0, description="tracking loop update period")
    min_fit_tags: int = Field(30, ge=3)
    phase_gain: float = Field(1.0, gt=0, le=1)
    rate_gain: float = Field(0.5, gt=0, le=1)
    confirm_blocks: int = Field(2, ge=0, description="blocks tracked after acquisition")
    channels: list[int] | None = Field(None, description="tagger channels used (None = all)")
    clock_wander_ppm_per_sqrt_s: float = Field(
        0.01,
        ge=0,
        description="the tagger clock's frequency random walk (datasheet): part of the "
        "frequency's uncertainty at the end of the acquisition",
    )
    max_ppm_uncertainty: float = Field(
        0.5,
        gt=0,
        description="refuse the lock when COVERAGE_FACTOR standard uncertainties of the "
        "frequency offset exceed this (ppm): too few tags or too short a span",
    )


def slot_period_ps(slot_rate_hz: float) -> float:
    return 1e12 / slot_rate_hz


@dataclass(frozen=True)
class ClockModel:
    """``rx_time_ps = offset_ps + rate * tx_time_ps`` where ``tx_time_ps = slot * period``."""

    offset_ps: float
    rate: float

    @property
    def ppm(self) -> float:
        return (self.rate - 1.0) * 1e6

    def rx_time_ps(self, tx_time_ps: npt.ArrayLike) -> F64:
        tx = np.asarray(tx_time_ps, dtype=np.float64)
        return np.asarray(self.offset_ps + tx + (self.rate - 1.0) * tx, dtype=np.float64)

    def tx_time_ps(self, rx_time_ps: npt.ArrayLike) -> F64:
        rx = np.asarray(rx_time_ps, dtype=np.float64)
        return np.asarray((rx - self.offset_ps) / self.rate, dtype=np.float64)

    def slot_rx_time_ps(self, slot_index: npt.ArrayLike, slot_rate_hz: float) -> F64:
        return self.rx_time_ps(np.asarray(slot_index, dtype=np.float64) * (1e12 / slot_rate_hz))


def _slot_residuals(time_ps: I64, model: ClockModel, period_ps: float) -> tuple[I64, F64]:
    """Nearest slot of each tag and its timing residual (tag - predicted), precisely.

    Integer arithmetic is kept where magnitudes are large so that runs of days lose no
    precision: residual = (t - floor(offset)) - n*floor(T) [int64] - n*frac(T) - frac(offset)
    - (rate - 1) * n * T.
    """
    off_int = math.floor(model.offset_ps)
    off_frac = model.offset_ps - off_int
    d = np.asarray(time_ps, dtype=np.int64) - np.int64(off_int)
    n = np.rint((d.astype(np.float64) - off_frac) / (model.rate * period_ps)).astype(np.int64)
    t_int = math.floor(period_ps)
    t_frac = period_ps - t_int
    res = (d - n * np.int64(t_int)).astype(np.float64)
    if t_frac:
        res -= n.astype(np.float64) * t_frac
    res -= off_frac + (model.rate - 1.0) * (n.astype(np.float64) * period_ps)
    return n, res


def map_tags_to_slots(
    tags: npt.NDArray[np.void], model: ClockModel, slot_rate_hz: float, window_ps: float
) -> tuple[I64, npt.NDArray[np.int8], F64]:
    """Map time tags (dtype TAG_DTYPE) to transmitter slots.

    Returns ``(slot_index, channel, residual_ps)`` for the tags within ``+/- window_ps/2``
    of a slot's predicted detection time (and with a non-negative slot index).
    """
    n, res = _slot_residuals(tags["time_ps"], model, slot_period_ps(slot_rate_hz))
    keep = (np.abs(res) <= window_ps / 2) & (n >= 0)
    return n[keep], tags["channel"][keep].astype(np.int8), res[keep]


@dataclass(frozen=True)
class ClockFit:
    """A least-squares line through detections numbered by a model, with its uncertainty.

    ``model``: the fitted clock; ``ppm_sigma``: standard uncertainty of its frequency
    offset (ppm) at the end of the data: the fit's (timing scatter over the span) and the
    clock's wander (a random walk of the frequency: the fitted slope is a parabolically
    weighted mean of the frequency over the span, which differs from its value at the
    end by ``wander * sqrt(13/35 * span)``);
    ``offset_sigma_ps``: standard uncertainty of the model's time at the data's centre
    slot ``centre_slot`` (the offset extrapolated to slot 0 is as good as that plus the
    frequency's part times the distance); ``n``: detections fitted."""

    model: ClockModel
    ppm_sigma: float
    offset_sigma_ps: float
    centre_slot: float
    n: int


def fit_clock(
    slot: I64,
    residual_ps: F64,
    model: ClockModel,
    period_ps: float,
    wander_ppm_per_sqrt_s: float = 0.0,
) -> ClockFit:
    """Refit ``model`` on detections it numbered (``slot``) with their timing residuals.

    The residuals of a true line ``t = o + r * n * P`` against ``model`` grow linearly in
    ``n``: a linear fit ``residual = a + b (n - mean n)`` gives the line. The scatter is
    the robust (median absolute deviation) spread of the residuals about the fit, so that
    a few afterpulses or dark counts in the window do not count as jitter. Raises
    :class:`AcquisitionError` for fewer than 10 detections or a single slot."""
    n = np.asarray(slot, dtype=np.float64)
    r = np.asarray(residual_ps, dtype=np.float64)
    if n.size < 10:
        raise AcquisitionError(f"{n.size} detections: too few to fit the clock")
    centre = float(n.mean())
    x = n - centre
    sxx = float(np.dot(x, x))
    if sxx <= 0:
        raise AcquisitionError("all detections in one slot: no span to fit the clock over")
    a = float(r.mean())
    b = float(np.dot(x, r - a) / sxx)
    fitted = r - a - b * x
    med = float(np.median(fitted))
    sigma_ps = 1.4826 * float(np.median(np.abs(fitted - med)))
    slope_sigma = sigma_ps / math.sqrt(sxx)  # ps per slot
    span_s = float(n.max() - n.min()) * period_ps * 1e-12
    ppm_fit = slope_sigma / (model.rate * period_ps) * 1e6
    ppm_wander = wander_ppm_per_sqrt_s * math.sqrt(13.0 / 35.0 * span_s)
    rate = model.rate + b / period_ps
    offset = model.offset_ps + a - b * centre
    return ClockFit(
        model=ClockModel(offset, rate),
        ppm_sigma=math.hypot(ppm_fit, ppm_wander),
        offset_sigma_ps=sigma_ps / math.sqrt(n.size),
        centre_slot=centre,
        n=int(n.size),
    )


class SyncResult(BaseModel):
    """Outcome of an acquisition (published on telemetry as ``sync.acquired``)."""

    model_config = ConfigDict(extra="forbid")

    locked: bool
    offset_ps: float
    rate: float
    ppm: float
    slot_rate_hz: float
    window_ps: float
    n_tags: int
    span_s: float
    comb_strength: float
    significance: float
    slot_margin: float
    bright_fraction: float  # of the in-window tags numbered by the final model
    residual_sigma_ps: float
    timing_error_ps: float
    in_window_fraction: float
    duration_s: float = 0.0
    message: str = ""
    pattern_z: float = 0.0  # pattern z-score of the final model's slots (see check_pattern)
    ppm_sigma: float = Field(
        0.0, ge=0, description="standard uncertainty of ppm (0: not computed, coarse only)"
    )
    offset_sigma_ps: float = Field(
        0.0, ge=0, description="standard uncertainty of the timing at the tags' centre slot"
    )
    coverage_factor: float = COVERAGE_FACTOR

    @property
    def model(self) -> ClockModel:
        return ClockModel(self.offset_ps, self.rate)
