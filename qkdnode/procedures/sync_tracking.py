"""Tracking of the clock synchronization (:mod:`qkdnode.procedures.sync`): during key
exchange, :class:`SlotTracker` keeps the :class:`ClockModel` on the detections block by
block (a phase/frequency loop, compiled in :mod:`qkdnode.procedures.track_kernel`), maps
the tags to slots and declares lock and loss of lock. No I/O: the caller hands it the tags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from qkdnode.procedures.sync_model import ClockModel, SyncConfig, slot_period_ps
from qkdnode.procedures.track_kernel import track

__all__ = ["MappedTags", "SlotTracker", "TrackStatus"]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class MappedTags:
    """Tags of one block mapped to slots (only those inside the window)."""

    slot_index: I64
    channel: npt.NDArray[np.int8]
    residual_ps: F64


@dataclass(frozen=True)
class TrackStatus:
    n_tags: int
    n_in_window: int
    in_window_fraction: float
    timing_error_ps: float  # median residual before this block's correction
    residual_sigma_ps: float
    ppm: float
    locked: bool
    lost: bool


@dataclass
class SlotTracker:
    """Phase/frequency loop keeping the :class:`ClockModel` on the detections.

    :meth:`update` takes each block of tags as it arrives and works through it in
    segments of ``cfg.track_segment_s``: per segment, the residuals within the wide
    *capture* window (``max_window_fraction`` of a slot) give the model's timing error
    (median) and a robust linear fit against the slot index corrects phase and rate;
    the segment's tags are then mapped with the corrected model and those within the
    narrow *acceptance* window ``window_ps`` are returned for the key exchange.

    Lock: a segment is good when the timing error is within ``lock_fraction`` of a slot
    and the in-window fraction has not collapsed; ``lost_after_segments`` bad segments
    in a row declare loss of lock (re-acquire with the pattern).
    """

    model: ClockModel
    slot_rate_hz: float
    window_ps: float
    cfg: SyncConfig = field(default_factory=SyncConfig)
    reference_fraction: float | None = None
    locked: bool = False
    lost: bool = False
    bad_segments: int = 0
    history: list[TrackStatus] = field(default_factory=list)
    max_history: int = 10_000
    _held: npt.NDArray[np.void] | None = field(default=None, repr=False)

    def update(self, tags: npt.NDArray[np.void]) -> tuple[MappedTags, TrackStatus]:
        """Track ``tags`` (a block, in arrival order) and map them to slots.

        At low count rates (a satellite pass) a block may hold fewer tags than one fitted
        segment needs (``4 * cfg.min_fit_tags``): they are held back and tracked with the
        next block's (the returned mapping is then empty and ``n_tags`` 0), so that the
        loop fits every segment instead of coasting on the model."""
        if self.cfg.channels is not None and tags.size:
            tags = tags[np.isin(tags["channel"], self.cfg.channels)]
        if self._held is not None:
            tags = np.concatenate([self._held, tags])
            self._held = None
        if 0 < tags.size < 4 * self.cfg.min_fit_tags:
            self._held = tags
            return MappedTags(
                np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.float64)
            ), TrackStatus(
                n_tags=0,
                n_in_window=0,
                in_window_fraction=0.0,
                timing_error_ps=math.nan,
                residual_sigma_ps=math.nan,
                ppm=self.model.ppm,
                locked=self.locked,
                lost=self.lost,
            )
        times = np.asarray(tags["time_ps"], dtype=np.int64)
        period = slot_period_ps(self.slot_rate_hz)
        out = track(
            times,
            segment_ps=self._segment_ps(times),
            offset_ps=self.model.offset_ps,
            rate=self.model.rate,
            period_ps=period,
            capture_ps=self.cfg.max_window_fraction * period,
            window_ps=self.window_ps,
            min_fit_tags=self.cfg.min_fit_tags,
            phase_gain=self.cfg.phase_gain,
            rate_gain=self.cfg.rate_gain,
        )
        self.model = ClockModel(out.offset_ps, out.rate)
        segments = out.segments if times.size else np.array([[math.nan, math.nan, 0.0, 0.0]])
        for err, sig, n_in, n_all in segments.tolist():
            self._judge_segment(err, sig, n_in, int(n_all), period)
        inw = out.in_window
        mapped = MappedTags(
            out.slot[inw], tags["channel"][inw].astype(np.int8), out.residual_ps[inw]
        )
        fitted = segments[~np.isnan(segments[:, 0])]
        n_in_total = int(mapped.slot_index.shape[0])
        status = TrackStatus(
            n_tags=int(times.size),
            n_in_window=n_in_total,
            in_window_fraction=n_in_total / times.size if times.size else 0.0,
            timing_error_ps=float(np.max(np.abs(fitted[:, 0]))) if fitted.size else math.nan,
            residual_sigma_ps=float(np.median(fitted[:, 1])) if fitted.size else math.nan,
            ppm=self.model.ppm,
            locked=self.locked,
            lost=self.lost,
        )
        self.history.append(status)
        if len(self.history) > self.max_history:
            del self.history[: len(self.history) - self.max_history]
        return mapped, status

    def _segment_ps(self, times: I64) -> int:
        """Length of the loop's segments: ``cfg.track_segment_s``, stretched at low count
        rates (a satellite pass, a long fiber) so that a segment holds about four times
        ``cfg.min_fit_tags`` tags (a segment with fewer is not fitted and counts as bad)."""
        segment = self.cfg.track_segment_s * 1e12
        if times.size >= 2:
            span = float(times[-1] - times[0])
            if span > 0:
                per_tag = span / (times.size - 1)
                segment = max(segment, 4.0 * self.cfg.min_fit_tags * per_tag)
        return max(int(segment), 1)

    def _judge_segment(
        self, err: float, sig: float, n_in: float, n_all: int, period: float
    ) -> None:
        """Lock bookkeeping of one segment (timing error ``err`` and spread ``sig`` in ps,
        NaN when it had too few tags to fit)."""
        good = (
            not math.isnan(err)
            and abs(err) <= self.cfg.lock_fraction * period
            and sig <= self.cfg.max_spread_fraction * period
        )
        frac = n_in / n_all if n_all else 0.0
        ref = self.reference_fraction
        if good and n_all:
            if ref is None:
                self.reference_fraction = frac
            elif frac >= self.cfg.lost_fraction_ratio * ref:
                # follow slow changes of the link's signal-to-noise ratio
                self.reference_fraction = 0.95 * ref + 0.05 * frac
        fraction_ok = ref is None or frac >= self.cfg.lost_fraction_ratio * ref
        if good and fraction_ok:
            self.bad_segments = 0
            self.locked = True
            self.lost = False
        else:
            self.bad_segments += 1
            if self.locked and self.bad_segments >= self.cfg.lost_after_segments:
                self.locked = False
                self.lost = True
