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
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.interfaces import TAG_DTYPE, TimeTagger
from qkdnode.procedures.common import COVERAGE_FACTOR
from qkdnode.procedures.sync_model import (
    AcquisitionError,
    ClockModel,
    SyncConfig,
    SyncResult,
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
    "SyncResult",
    "TrackStatus",
    "acquire",
    "acquire_lock",
    "check_pattern",
    "estimate_slot_clock",
    "map_tags_to_slots",
    "resolve_slot_index",
    "robust_sigma",
    "slot_period_ps",
]


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
) -> tuple[SyncResult, SlotTracker]:
    """Receiver side: read tags while the transmitter emits the pattern ``public_seed``,
    acquire, then track ``cfg.confirm_blocks`` blocks to confirm the lock.

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
    return result, tracker
