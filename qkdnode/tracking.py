"""Tracking the polarisation reference during key exchange: a lock-in on the encoder bias.

The reference of a fiber link drifts (temperature, strain): a rotation ``eps`` of every
prepared state raises the error rate in both bases as ``e0 + A sin^2(eps)``. Key blocks are
large (tens of seconds to minutes of light) and their error rate is known only when they
end, too late and too coarse to steer by. So while key flows the transmitter samples the
error rate itself, in short *tracking windows*:

1. It picks a window of ``n`` future slots, moves the encoder bias by ``+delta`` for it,
   and asks the receiver (link step ``track``) to disclose its detections in exactly those
   slots. The receiver takes them out of the block it is filling: they never carry key,
   and the transmitter refuses any block that announces a slot of a window
   (:meth:`qkdnode.postproc.sifting.KeySlotFloor.withhold`).
2. The same at ``-delta``, then the bias goes back.
3. With ``k = pi / (2 V_pi)`` (the bias rotates every state by ``k dV``) the two error rates
   differ by ``q+ - q- = A sin(2 k eps) sin(2 k delta)``, ``eps = b - b*`` the offset of
   the bias from the error-rate minimum. Its sign and size give ``eps``
   (:func:`bias_offset_v`); the bias moves by ``-gain * eps``.

The dither is small (``delta`` = 3 % of V_pi adds 0.2 % to the error rate, and only inside
the windows and the round trip around them); the windows cost a few per cent of the
detections at most (:class:`TrackingConfig`). The disclosed detections are the
transmitter's and receiver's data of slots that are then withheld from every block: what
they tell an adversary concerns no key bit.

The receiver's side, :class:`DetectionAccumulator`, collects the detections of the block
being filled and diverts those of accepted windows.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from drivers.interfaces import Encoder, IntensityClass, StateSource
from qkdnode.procedures.encoding_compensation import qber_from_detections

if TYPE_CHECKING:
    from qkdnode.config.sections import TrackingSection

__all__ = [
    "DetectionAccumulator",
    "TrackingError",
    "TrackingStep",
    "TrackingWindow",
    "bias_offset_v",
    "lock_in_step",
    "merge_sorted",
    "next_bias_v",
    "step_interval_s",
]

I64 = npt.NDArray[np.int64]
I8 = npt.NDArray[np.int8]


class TrackingError(ValueError):
    """A tracking window that cannot be served (already passed, overlaps a block, bad size)."""


@dataclass(frozen=True)
class TrackingWindow:
    """Slots ``[start_slot, stop_slot)`` whose detections are disclosed, never keyed."""

    start_slot: int
    stop_slot: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_slot < self.stop_slot:
            raise TrackingError(
                f"a tracking window needs 0 <= start < stop, got [{self.start_slot}, "
                f"{self.stop_slot})"
            )


def bias_offset_v(
    q_plus: float, q_minus: float, *, dither_v: float, v_pi_v: float, amplitude: float = 1.0
) -> float:
    """Offset ``b - b*`` (V) of the bias from the error-rate minimum, from the error rates at
    ``b + dither_v`` and ``b - dither_v``: ``q+ - q- = A sin(2 k eps) sin(2 k delta)``.

    Valid for ``|k eps| < pi/4`` (error rates up to about ``e0 + A/2``); beyond, the estimate
    saturates at that size with the right sign, which still moves the bias the right way.
    Raises :class:`TrackingError` for a dither or V_pi that is not positive or a dither of
    a quarter wave or more (no information in the difference).
    """
    if not (dither_v > 0 and v_pi_v > 0 and amplitude > 0):
        raise TrackingError("dither, V_pi and amplitude must be > 0")
    k = math.pi / (2.0 * v_pi_v)
    lever = amplitude * math.sin(2.0 * k * dither_v)
    if lever <= 1e-9:
        raise TrackingError(f"dither {dither_v} V gives no signal at V_pi {v_pi_v} V")
    s = max(-1.0, min(1.0, (q_plus - q_minus) / lever))
    return math.asin(s) / (2.0 * k)


@dataclass(frozen=True)
class TrackingStep:
    """One lock-in step: the samples, the estimated offset and the new bias (V)."""

    bias_v: float
    q_plus: float
    q_minus: float
    n_plus: int
    n_minus: int
    offset_v: float
    new_bias_v: float


def next_bias_v(
    bias_v: float,
    q_plus: float,
    q_minus: float,
    *,
    dither_v: float,
    v_pi_v: float,
    gain: float,
    max_step_v: float,
    amplitude: float = 1.0,
) -> tuple[float, float]:
    """``(offset, new bias)``: the bias moved by ``-gain * offset``, at most ``max_step_v``."""
    offset = bias_offset_v(q_plus, q_minus, dither_v=dither_v, v_pi_v=v_pi_v, amplitude=amplitude)
    step = max(-max_step_v, min(max_step_v, -gain * offset))
    return offset, bias_v + step


def step_interval_s(cfg: TrackingSection, detections_per_s: float) -> float:
    """Seconds between lock-in steps: ``cfg.interval_s``, or longer where two windows of
    ``cfg.window_detections`` would be more than ``cfg.max_disclosed_fraction`` of the
    detections of one interval (a slow link drifts no faster, it only has fewer counts)."""
    if detections_per_s <= 0:
        return cfg.interval_s
    by_share = 2 * cfg.window_detections / (cfg.max_disclosed_fraction * detections_per_s)
    return max(cfg.interval_s, by_share)


#: Fewer sifted detections than this in a window: no step (the estimate would be noise).
MIN_SIFTED = 500

WindowRequest = Callable[[TrackingWindow], Awaitable[tuple[I64, I8]]]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished request's outcome as seen (its error is raised by the caller,
    or dropped with the step it belonged to)."""
    if not task.cancelled():
        task.exception()


async def lock_in_step(
    encoder: Encoder,
    source: StateSource,
    request_window: WindowRequest,
    cfg: TrackingSection,
    *,
    v_pi_v: float,
    detections_per_slot: float,
    amplitude: float = 1.0,
    lead_slots: int = 0,
    poll_s: float = 0.005,
) -> TrackingStep | None:
    """Transmitter: one step of the lock-in (module docstring); returns None when a window
    held too few detections to steer by (the bias is left where it was).

    ``request_window(window)`` must have the window withheld from every block *before* it
    asks the receiver, and return the receiver's detections in it. The bias sits at
    ``+/- dither`` only from the moment each window is chosen until the state source has
    prepared its last slot; the receiver's answers are awaited afterwards. Instrument and
    link errors propagate (the bias is restored first).
    """
    dither_v = cfg.dither_fraction * v_pi_v
    n_slots = max(1, math.ceil(cfg.window_detections / max(detections_per_slot, 1e-12)))
    bias_v = float(await asyncio.to_thread(encoder.bias_v))
    lo, hi = encoder.bias_range_v
    requests: list[tuple[TrackingWindow, asyncio.Task[tuple[I64, I8]]]] = []
    try:
        try:
            for sign in (1.0, -1.0):
                await asyncio.to_thread(
                    encoder.set_bias_v, float(np.clip(bias_v + sign * dither_v, lo, hi))
                )
                start = int(await asyncio.to_thread(source.next_slot)) + lead_slots
                window = TrackingWindow(start, start + n_slots)
                task = asyncio.ensure_future(request_window(window))
                # however this step ends (even cancelled twice), a failed request's
                # error counts as seen: it is raised below or dropped with the step
                task.add_done_callback(_retrieve)
                requests.append((window, task))
                while int(await asyncio.to_thread(source.next_slot)) < window.stop_slot:
                    await asyncio.sleep(poll_s)
        finally:
            await asyncio.to_thread(encoder.set_bias_v, bias_v)
        # Every request is awaited, even when one fails.
        answers = await asyncio.gather(*(task for _, task in requests), return_exceptions=True)
    except BaseException:
        # cancelled or failed, the bias already back: no request outlives its step
        for _, task in requests:
            task.cancel()
        await asyncio.gather(*(task for _, task in requests), return_exceptions=True)
        raise
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    rates: list[tuple[float, int]] = []
    for (window, _), answer in zip(requests, answers, strict=True):
        assert not isinstance(answer, BaseException)
        slots, channels = answer
        inside = (slots >= window.start_slot) & (slots < window.stop_slot)
        if not bool(np.all(inside)):
            raise TrackingError("the receiver's window holds slots outside the window asked for")
        states = await asyncio.to_thread(source.prepared, slots)
        est = qber_from_detections(
            channels,
            states.basis,
            states.bit,
            mask=states.intensity != IntensityClass.VACUUM,
        )
        rates.append((est.qber, est.n_sifted))
    (q_plus, n_plus), (q_minus, n_minus) = rates
    if min(n_plus, n_minus) < MIN_SIFTED or math.isnan(q_plus) or math.isnan(q_minus):
        return None
    offset, new_bias = next_bias_v(
        bias_v,
        q_plus,
        q_minus,
        dither_v=dither_v,
        v_pi_v=v_pi_v,
        gain=cfg.gain,
        max_step_v=cfg.max_step_fraction * v_pi_v,
        amplitude=amplitude,
    )
    new_bias = float(np.clip(new_bias, lo, hi))
    await asyncio.to_thread(encoder.set_bias_v, new_bias)
    return TrackingStep(bias_v, q_plus, q_minus, n_plus, n_minus, offset, new_bias)


@dataclass
class _Pending:
    window: TrackingWindow
    done: asyncio.Future[tuple[I64, I8]]
    slots: list[I64] = field(default_factory=list)
    channels: list[I8] = field(default_factory=list)


class DetectionAccumulator:
    """Receiver: the detections of the block being filled, minus those of tracking windows.

    :meth:`add` takes each new batch of mapped detections (slots increasing within a
    batch); detections inside an accepted window go to that window's sample, which is
    complete once a slot at or beyond its end has been seen. :meth:`cut` hands out a block
    of at least ``target`` detections, cut between slots. A window is accepted
    (:meth:`open_window`) only if no block handed out so far reaches into it; detections
    of it already collected for the open block are moved to the sample. Detections that
    arrive late for a closed window are dropped, never keyed. :meth:`add` and
    :meth:`open_window` run on the event loop, :meth:`cut` may run in a thread.
    """

    def __init__(self, max_windows: int = 64) -> None:
        self._lock = threading.Lock()
        self._slots: list[I64] = []
        self._channels: list[I8] = []
        self.have = 0
        self.cut_upto = -1  # last slot of the last block handed out
        self.seen_upto = -1  # largest slot added so far
        self._pending: list[_Pending] = []
        self._closed: deque[TrackingWindow] = deque(maxlen=max_windows)
        #: closed windows whose detections were dropped, never disclosed (:meth:`abandon`)
        self._dropped: set[TrackingWindow] = set()
        self.diverted = 0

    def open_window(self, window: TrackingWindow) -> asyncio.Future[tuple[I64, I8]]:
        """Accept ``window``; the future gives its detections ``(slots, channels)``.

        Raises :class:`TrackingError` if a block handed out reaches into it or it overlaps a
        window already accepted."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if window.start_slot <= self.cut_upto:
                raise TrackingError(
                    f"tracking window starts at slot {window.start_slot}, inside a block "
                    f"already cut (up to slot {self.cut_upto})"
                )
            for w in [p.window for p in self._pending] + list(self._closed):
                if window.start_slot < w.stop_slot and w.start_slot < window.stop_slot:
                    raise TrackingError("tracking window overlaps an earlier one")
            pending = _Pending(window, loop.create_future())
            # Detections of the window already collected for the open block move to it.
            for i, (s, c) in enumerate(zip(self._slots, self._channels, strict=True)):
                inside = (s >= window.start_slot) & (s < window.stop_slot)
                if inside.any():
                    pending.slots.append(s[inside])
                    pending.channels.append(c[inside])
                    self._slots[i], self._channels[i] = s[~inside], c[~inside]
                    self.have -= int(inside.sum())
                    self.diverted += int(inside.sum())
            self._pending.append(pending)
            self._complete_locked()
        return pending.done

    def exclude(self, window: TrackingWindow) -> None:
        """Keep ``window``'s detections out of every block, nothing sent anywhere (a
        ``skip``): the parts of it no accepted window covers yet are taken as abandoned
        windows, so a window that overlaps earlier ones (an extension running into a
        tracking window) is excluded whole. Raises :class:`TrackingError` if a block
        handed out reaches into it."""
        with self._lock:
            if window.start_slot <= self.cut_upto:
                raise TrackingError(
                    f"window starts at slot {window.start_slot}, inside a block already cut "
                    f"(up to slot {self.cut_upto})"
                )
            covered = sorted(
                (w.start_slot, w.stop_slot)
                for w in [p.window for p in self._pending] + list(self._closed)
                if w.start_slot < window.stop_slot and window.start_slot < w.stop_slot
            )
            gaps: list[TrackingWindow] = []
            at = window.start_slot
            for lo, hi in covered:
                if lo > at:
                    gaps.append(TrackingWindow(at, lo))
                at = max(at, hi)
            if at < window.stop_slot:
                gaps.append(TrackingWindow(at, window.stop_slot))
            for gap in gaps:
                # detections of the gap already collected for the open block are dropped
                for i, (sl, ch) in enumerate(zip(self._slots, self._channels, strict=True)):
                    inside = (sl >= gap.start_slot) & (sl < gap.stop_slot)
                    if inside.any():
                        self._slots[i], self._channels[i] = sl[~inside], ch[~inside]
                        self.have -= int(inside.sum())
                        self.diverted += int(inside.sum())
                self._closed.append(gap)

    def close(self, reason: str) -> None:
        """The exchange ended: every window still waiting fails with ``reason``."""
        with self._lock:
            pending, self._pending = self._pending, []
        for p in pending:
            if not p.done.done():
                p.done.set_exception(TrackingError(reason))

    def abandon(self, future: asyncio.Future[tuple[I64, I8]]) -> None:
        """The requester gave up: the window stays excluded from blocks, nothing is sent."""
        with self._lock:
            for p in list(self._pending):
                if p.done is future:
                    self._pending.remove(p)
                    self._closed.append(p.window)
                    self._dropped = {w for w in self._dropped if w in self._closed}
                    self._dropped.add(p.window)

    def shorten(self, window: TrackingWindow, stop_slot: int) -> TrackingWindow:
        """An abandoned window (:meth:`abandon`, one whose detections are only dropped)
        ends at ``stop_slot`` instead: detections from there on join the block again (those
        already dropped stay dropped). Returns the shortened window. Raises
        :class:`TrackingError` when no such abandoned window exists or ``stop_slot`` is not
        inside it."""
        with self._lock:
            if window not in self._dropped or window not in self._closed:
                # a window whose detections were disclosed (``track``) never shrinks
                raise TrackingError(
                    f"no dropped window [{window.start_slot}, {window.stop_slot}) to shorten"
                )
            if not window.start_slot < stop_slot < window.stop_slot:
                raise TrackingError(
                    f"window [{window.start_slot}, {window.stop_slot}) cannot end at slot "
                    f"{stop_slot} (a window only shrinks and keeps at least one slot)"
                )
            short = TrackingWindow(window.start_slot, int(stop_slot))
            self._closed[self._closed.index(window)] = short
            self._dropped.discard(window)
            self._dropped.add(short)
            return short

    def add(self, slots: I64, channels: I8) -> None:
        """A batch of mapped detections (key slots only)."""
        if slots.size == 0:
            return
        lo, hi = int(slots.min()), int(slots.max())
        with self._lock:
            keep = np.ones(slots.shape[0], dtype=np.bool_)
            for w in self._closed:
                if w.start_slot <= hi and lo < w.stop_slot:  # most lie wholly before
                    keep &= ~((slots >= w.start_slot) & (slots < w.stop_slot))
            for p in self._pending:
                if not (p.window.start_slot <= hi and lo < p.window.stop_slot):
                    continue
                inside = (slots >= p.window.start_slot) & (slots < p.window.stop_slot)
                if inside.any():
                    p.slots.append(slots[inside])
                    p.channels.append(channels[inside])
                    self.diverted += int(inside.sum())
                    keep &= ~inside
            self.seen_upto = max(self.seen_upto, int(slots.max()))
            s, c = slots[keep], channels[keep]
            if s.size:
                self._slots.append(s)
                self._channels.append(c)
                self.have += int(s.size)
            self._complete_locked()

    def _complete_locked(self) -> None:
        for p in list(self._pending):
            if self.seen_upto >= p.window.stop_slot:
                self._pending.remove(p)
                self._closed.append(p.window)
                if p.slots:
                    s = np.concatenate(p.slots)
                    c = np.concatenate(p.channels)
                    order = np.argsort(s, kind="stable")
                    result = (s[order], c[order])
                else:
                    result = (np.zeros(0, np.int64), np.zeros(0, np.int8))
                if not p.done.done():
                    p.done.set_result(result)

    def cut(self, target: int) -> tuple[I64, I8] | None:
        """A block of at least ``target`` detections (all clicks of its last slot), or None
        while fewer are collected. What is left starts the next block."""
        with self._lock:
            if self.have < target or self.have == 0:
                return None
            slots, chans = self._slots, self._channels
            self._slots, self._channels = [], []
            have = self.have
        all_s, all_c = merge_sorted(slots, chans)
        cut = int(np.searchsorted(all_s, all_s[min(target, have) - 1], side="right"))
        with self._lock:
            # A window accepted while we merged only sees batches added after it, and
            # open_window refuses windows below cut_upto: re-check the merged arrays.
            last = int(all_s[cut - 1])
            inside = np.zeros(all_s.shape[0], dtype=np.bool_)
            for w in [p.window for p in self._pending] + list(self._closed):
                # all_s is sorted: a window's detections are one run of it
                a, b = np.searchsorted(all_s, (w.start_slot, w.stop_slot), side="left")
                inside[a:b] = True
            rest_s, rest_c = all_s[cut:], all_c[cut:]
            block_s, block_c = all_s[:cut], all_c[:cut]
            if inside.any():
                block_s, block_c = block_s[~inside[:cut]], block_c[~inside[:cut]]
                rest_s, rest_c = rest_s[~inside[cut:]], rest_c[~inside[cut:]]
            self.cut_upto = max(self.cut_upto, last)
            self._slots = [rest_s, *self._slots]
            self._channels = [rest_c, *self._channels]
            self.have = sum(int(s.size) for s in self._slots)
        return block_s, block_c


def merge_sorted(slots: list[I64], chans: list[I8]) -> tuple[I64, I8]:
    """Concatenate detection batches and order them by slot (stable for equal slots: the
    clicks of one slot keep their order)."""
    if not slots:
        return np.zeros(0, np.int64), np.zeros(0, np.int8)
    all_s = np.concatenate(slots)
    all_c = np.concatenate(chans)
    if all_s.shape[0] < 2 or bool(np.all(all_s[1:] >= all_s[:-1])):
        return all_s, all_c  # the usual case: the tagger delivers tags in time order
    order = np.argsort(all_s, kind="stable")
    return all_s[order], all_c[order]
