"""Clock synchronization of the receiver to the transmitter's slot clock, from time tags.

The receiver's tagger stamps detections on its own clock:
``t_rx = offset + rate * t_tx (+ slow wander)``, with ``t_tx = slot_index * slot_period``
(every fixed optical and electronic delay is folded into ``offset``). Synchronization
recovers ``offset`` and ``rate`` (a :class:`ClockModel`) from the tags alone, in three steps
(all pure functions of arrays):

1. **Slot clock** (:func:`estimate_slot_clock`): the detections sit on a comb of period
   ``slot_period * rate``. Each tag becomes a phasor ``exp(2 pi i t / T)``; summed in short
   time bins and Fourier-transformed, they show a line at the frequency offset (at most
   +/-``max_ppm``). Segment phases then refine rate and phase, and a robust linear fit of
   the timing residuals finishes it (sub-ps on rate, ~jitter/sqrt(N) on phase).
2. **Slot index** (:func:`resolve_slot_index`): the comb gives the slots up to an unknown
   integer ``K``. The transmitter sends the public pattern of :mod:`drivers.syncpattern`
   (frames of 256 slots, bright or dark by a PRBS): the tags, counted per frame, are
   FFT-cross-correlated with the pattern over every ``K`` allowed by ``max_offset_s``
   (offsets of seconds), at four sub-frame phases; the best frame is then refined to the
   exact slot.
3. **Tracking** (:class:`SlotTracker`): during key exchange each block of tags is mapped
   to slots and a robust linear fit of (slot, residual) corrects the model (a
   phase/frequency loop). Lock is declared when the model's prediction error is within
   ``lock_fraction`` of a slot; loss of lock when the fraction of in-window detections
   collapses or the error leaves the window.

The parts live in modules of their own and are re-exported here:
:mod:`qkdnode.procedures.sync_model` (settings, clock model, mapping of tags to slots,
result), :mod:`qkdnode.procedures.sync_search` (steps 1 and 2, combined by :func:`acquire`)
and :mod:`qkdnode.procedures.sync_tracking` (step 3). :func:`acquire_lock`, here, is the
receiver-side procedure around these cores: it reads the tagger.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from drivers.interfaces import TAG_DTYPE, TimeTagger
from qkdnode.procedures.common import (
    COVERAGE_FACTOR,
    CalibrationResult,
    data_and_residuals,
    finish,
)
from qkdnode.procedures.sync_model import (
    AcquisitionError,
    ClockModel,
    SyncConfig,
    SyncResult,
    _slot_residuals,
    fit_clock,
    map_tags_to_slots,
    slot_period_ps,
)
from qkdnode.procedures.sync_search import (
    PatternCheck,
    SlotClockEstimate,
    acquire,
    check_pattern,
    estimate_slot_clock,
    resolve_slot_index,
    robust_sigma,
)
from qkdnode.procedures.sync_tracking import MappedTags, SlotTracker, TrackStatus

__all__ = [
    "AcquisitionError",
    "ClockModel",
    "MappedTags",
    "PatternCheck",
    "SlotClockEstimate",
    "SlotTracker",
    "SyncConfig",
    "SyncRecord",
    "SyncResult",
    "TrackStatus",
    "acquire",
    "acquire_lock",
    "check_pattern",
    "estimate_slot_clock",
    "map_tags_to_slots",
    "plot_sync",
    "resolve_slot_index",
    "robust_sigma",
    "slot_period_ps",
]


#: Bins of the folded timing histogram over one slot period.
_PHASE_BINS = 200
#: Segments of the residual-against-time panel.
_TIME_SEGMENTS = 40


class SyncRecord(CalibrationResult):
    """The synchronisation's result file: the acquisition's outcome and what its plot
    shows. ``phase_*``: the acquisition's tags folded on the final clock model, timing
    residual (tag minus the predicted slot time, ps) histogrammed over one slot period;
    ``segment_*``: the median residual of the in-window tags in consecutive segments of
    the acquisition (seconds from its first tag), with its standard error (ps). A good
    lock is a narrow peak at 0 on a flat dark-count floor, and segments flat at 0."""

    procedure: str = "sync"
    sync: SyncResult
    phase_bin_edges_ps: list[float]
    phase_counts: list[int]
    #: the same residuals in fine bins around the peak (the acceptance window and at
    #: least six standard deviations either side)
    peak_bin_edges_ps: list[float]
    peak_counts: list[int]
    segment_time_s: list[float]
    segment_residual_ps: list[float]
    segment_error_ps: list[float]


def sync_record(tags: npt.NDArray[np.void], result: SyncResult) -> SyncRecord:
    """The record of an acquisition from its tags and its (final) result."""
    period = slot_period_ps(result.slot_rate_hz)
    if tags.size:
        _, res = _slot_residuals(tags["time_ps"], result.model, period)
        t_s = (tags["time_ps"] - tags["time_ps"][0]).astype(np.float64) * 1e-12
    else:
        res = np.zeros(0)
        t_s = np.zeros(0)
    edges = np.linspace(-period / 2, period / 2, _PHASE_BINS + 1)
    counts, _ = np.histogram(res, edges)
    reach = min(max(6 * result.residual_sigma_ps, 0.75 * result.window_ps), period / 2)
    fine = np.linspace(-reach, reach, 61)
    fine_counts, _ = np.histogram(res, fine)
    inside = np.abs(res) <= result.window_ps / 2
    seg_t: list[float] = []
    seg_r: list[float] = []
    seg_e: list[float] = []
    if inside.sum() >= 2 * _TIME_SEGMENTS:
        ti, ri = t_s[inside], res[inside]
        for part_t, part_r in zip(
            np.array_split(ti, _TIME_SEGMENTS), np.array_split(ri, _TIME_SEGMENTS), strict=True
        ):
            seg_t.append(float(part_t.mean()))
            seg_r.append(float(np.median(part_r)))
            # standard error of a median: 1.2533 sigma / sqrt(n)
            seg_e.append(float(1.2533 * part_r.std() / math.sqrt(part_r.size)))
    return SyncRecord(
        sync=result,
        ok=result.locked,
        message=result.message,
        phase_bin_edges_ps=[float(x) for x in edges],
        phase_counts=[int(c) for c in counts],
        peak_bin_edges_ps=[float(x) for x in fine],
        peak_counts=[int(c) for c in fine_counts],
        segment_time_s=seg_t,
        segment_residual_ps=seg_r,
        segment_error_ps=seg_e,
    )


def plot_sync(record: SyncRecord, fig: Figure) -> None:
    """Left: the timing residuals of the acquisition's tags against the final clock
    model near the peak (linear, fine bins), a Gaussian of the measured spread on the
    dark floor over it, the acceptance window dashed, residuals below; the whole slot
    period as an inset (log). Right: the median residual in segments of the acquisition
    against time, with a straight line fitted (its slope: the rate left between those
    tags and the final model, which tracking removed), residuals below."""
    r = record.sync
    outer = fig.add_gridspec(1, 2, width_ratios=(1.1, 1), wspace=0.3)
    ax, res = data_and_residuals(fig, outer[0], residual_label="data - model (tags)")
    edges = np.asarray(record.peak_bin_edges_ps)
    counts = np.asarray(record.peak_counts, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    width = float(edges[1] - edges[0])
    coarse_edges = np.asarray(record.phase_bin_edges_ps)
    coarse = np.asarray(record.phase_counts, dtype=np.float64)
    coarse_c = (coarse_edges[:-1] + coarse_edges[1:]) / 2
    coarse_w = float(coarse_edges[1] - coarse_edges[0])
    far = np.abs(coarse_c) > 4 * r.window_ps
    floor = float(np.median(coarse[far])) / coarse_w * width if far.any() else 0.0
    sigma = max(r.residual_sigma_ps, width / 4)
    total = float(np.sum(counts) - floor * counts.size)

    def model(x: np.ndarray) -> np.ndarray:
        g = np.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return np.asarray(floor + total * width * g)

    err = np.sqrt(np.maximum(counts, 1.0))
    ax.errorbar(centres, counts, err, fmt="o", ms=3, lw=0.6, label="tags")
    xf = np.linspace(edges[0], edges[-1], 600)
    ax.plot(xf, model(xf), lw=1.2, label=f"Gaussian, sigma {r.residual_sigma_ps:.1f} ps")
    for x in (-r.window_ps / 2, r.window_ps / 2):
        ax.axvline(x, ls="--", lw=0.8, color="C3")
        res.axvline(x, ls="--", lw=0.8, color="C3")
    ax.set_ylabel(f"tags per {width:.1f} ps")
    ax.set_title(
        f"{'locked' if r.locked else 'NOT locked'}: {r.ppm:+.3f} ppm, acceptance window "
        f"{r.window_ps:.0f} ps (dashed), in window {100 * r.in_window_fraction:.1f} %",
        fontsize=8,
    )
    ax.legend(fontsize=7, loc="upper right")
    res.errorbar(centres, counts - model(centres), err, fmt="o", ms=3, lw=0.6)
    res.set_xlabel("timing residual: tag - predicted slot time (ps)")
    inset = ax.inset_axes((0.02, 0.55, 0.28, 0.4))
    inset.step(coarse_c / 1e3, np.maximum(coarse, 0.5), where="mid", lw=0.6)
    inset.set_yscale("log")
    inset.set_title("whole slot (ns)", fontsize=6)
    inset.tick_params(labelsize=5)
    right, rres = data_and_residuals(fig, outer[1], residual_label="data - line (ps)")
    t = np.asarray(record.segment_time_s)
    y = np.asarray(record.segment_residual_ps)
    e = np.maximum(np.asarray(record.segment_error_ps), 1e-3)
    if t.size >= 2:
        slope, icpt = np.polyfit(t, y, 1, w=1 / e)
        right.errorbar(t, y, e, fmt="o", ms=3, lw=0.8, label="median per segment")
        right.plot(t, icpt + slope * t, lw=1.2, label=f"line: {slope * 1e-6:+.2e} ppm")
        rres.errorbar(t, y - (icpt + slope * t), e, fmt="o", ms=3, lw=0.8)
    right.axhline(0.0, color="0.4", lw=0.8)
    right.set_ylabel("timing residual (ps)")
    right.set_title(
        f"{r.n_tags} tags over {r.span_s:.3f} s; offset {r.offset_ps / 1e6:.3f} us",
        fontsize=8,
    )
    right.legend(fontsize=7)
    rres.set_xlabel("time from the first tag (s)")


async def read_tags(
    tagger: TimeTagger,
    *,
    min_span_s: float,
    min_tags: int,
    max_time_s: float,
    read_timeout_s: float,
    channels: list[int] | None = None,
) -> npt.NDArray[np.void]:
    """Read blocks until the tags span ``min_span_s`` and number ``min_tags`` (or the
    tags span ``max_time_s``, or as much wall time passes)."""
    blocks: list[npt.NDArray[np.void]] = []
    count = 0
    first: int | None = None
    last = 0
    wall0 = time.monotonic()
    while True:
        block = await asyncio.to_thread(tagger.read_block, read_timeout_s)
        if block is not None and len(block):
            tags = block.tags
            if channels is not None:
                tags = tags[np.isin(tags["channel"], channels)]
            if tags.size:
                blocks.append(tags)
                count += int(tags.size)
                if first is None:
                    first = int(tags["time_ps"][0])
                last = int(tags["time_ps"][-1])
        span = (last - first) * 1e-12 if first is not None else 0.0
        if (span >= min_span_s and count >= min_tags) or span >= max_time_s:
            break
        if time.monotonic() - wall0 > max_time_s + 10 * read_timeout_s + 5.0:
            break
    if not blocks:
        return np.zeros(0, dtype=TAG_DTYPE)
    return np.concatenate(blocks)


async def acquire_lock(
    tagger: TimeTagger,
    public_seed: int,
    slot_rate_hz: float,
    cfg: SyncConfig | None = None,
    *,
    publish: Any = None,
    offset_hint_ps: float = 0.0,
    state_dir: Path | None = None,
) -> tuple[SyncResult, SlotTracker]:
    """Receiver side: read tags while the transmitter emits the pattern ``public_seed``,
    acquire, then track ``cfg.confirm_blocks`` blocks to confirm the lock.

    The result is saved (``sync.json`` and ``sync.png`` under ``state_dir/calibration``,
    :class:`SyncRecord`) and published on ``calibration.sync`` like every procedure's.

    The tag stream must be running (``tagger.start_stream()``) and the transmitter must
    already emit the pattern. Returns the result and a tracker ready for key exchange.
    Raises :class:`AcquisitionError` if no lock could be established.
    """
    cfg = cfg or SyncConfig()
    started = time.monotonic()
    tags = await read_tags(
        tagger,
        min_span_s=cfg.acquisition_time_s,
        min_tags=cfg.min_acquisition_tags,
        max_time_s=cfg.max_acquisition_time_s,
        read_timeout_s=cfg.read_timeout_s,
        channels=cfg.channels,
    )
    if tags.size < 100:
        raise AcquisitionError(f"only {tags.size} tags during acquisition: is the light on?")
    result = await asyncio.to_thread(
        acquire, tags["time_ps"], public_seed, slot_rate_hz, cfg, offset_hint_ps
    )
    tracker = SlotTracker(result.model, slot_rate_hz, result.window_ps, cfg)
    tracker.update(tags)
    # Confirm on blocks the loop fits (at low rates it holds small blocks back and
    # tracks them with the next ones): cfg.confirm_blocks of them, within a bounded time.
    confirmed = 0
    deadline = time.monotonic() + max(2.0, 4 * cfg.confirm_blocks * cfg.read_timeout_s)
    while confirmed < cfg.confirm_blocks and time.monotonic() < deadline:
        block = await asyncio.to_thread(tagger.read_block, cfg.read_timeout_s)
        if block is not None and len(block):
            _, status = tracker.update(block.tags)
            confirmed += status.n_tags > 0
    last = tracker.history[-1]
    locked = (
        result.locked and tracker.locked and not tracker.lost and confirmed >= cfg.confirm_blocks
    )
    # The clock as measured: one line through every acquisition tag (the loop's own model
    # is fitted to the last segments and carries their noise), with its uncertainty;
    # refused when it is too wide for the frequency to be trusted. First pass in the wide
    # capture window around the tracked model, second in the acceptance window around
    # the first fit.
    period = slot_period_ps(slot_rate_hz)
    message = result.message
    try:
        clock_model = tracker.model
        for window in (period * cfg.max_window_fraction, result.window_ps):
            slots, _, residuals = map_tags_to_slots(tags, clock_model, slot_rate_hz, window)
            clock = fit_clock(
                slots, residuals, clock_model, period, cfg.clock_wander_ppm_per_sqrt_s
            )
            clock_model = clock.model
    except AcquisitionError as exc:
        raise AcquisitionError(f"clock fit: {exc}") from None
    if COVERAGE_FACTOR * clock.ppm_sigma > cfg.max_ppm_uncertainty:
        locked = False
        message = (
            f"frequency offset known to +/-{COVERAGE_FACTOR * clock.ppm_sigma:.3g} ppm "
            f"from {clock.n} tags over {result.span_s:.3g} s, worse than the "
            f"{cfg.max_ppm_uncertainty:g} ppm allowed: acquire longer"
        )
    result = result.model_copy(
        update={
            "locked": locked,
            "message": message,
            "offset_ps": clock.model.offset_ps,
            "rate": clock.model.rate,
            "ppm": clock.model.ppm,
            "ppm_sigma": clock.ppm_sigma,
            "offset_sigma_ps": clock.offset_sigma_ps,
            "timing_error_ps": last.timing_error_ps,
            "in_window_fraction": last.in_window_fraction,
            "duration_s": time.monotonic() - started,
        }
    )
    if publish is not None:
        publish("sync.acquired", result.model_dump())
    record = await asyncio.to_thread(sync_record, tags, result)
    # the plot in a thread: the tags keep coming while it renders
    await asyncio.to_thread(
        finish, record, started, state_dir, plot_sync, publish, instruments=[tagger]
    )
    return result, tracker
