"""Polarisation compensation while key flows: the receiver steers its polarisation
controller from windows of detections the transmitter helps it read
(:mod:`qkdnode.polarization` for the estimate and the step).

The receiver's half (:meth:`PolarizationMixin._compensate_polarization`, a task of the
receiver's exchange): every ``polarization.interval_s`` it dithers the controller's last
retarder, picks a window of future slots, registers it with the transmitter
(``polarization_window``: the transmitter withholds those slots from every block before
it answers), diverts its own detections of the window from the block it is filling, and
once the window has passed asks for the states the transmitter prepared in the slots it
detected (``polarization_states``); twice (``+dither``, ``-dither``), then one step of
the controller. A step that finds a jump is followed by the next at once.

The transmitter's half answers the two steps: a window only if it starts at or after its
key-slot floor (no block has announced a slot there yet), states only for slots of a
window it withheld. What it discloses (basis and bit of a few thousand slots that never
carry key) tells an adversary nothing about any key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time
from collections import deque
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from drivers.interfaces import IntensityClass, PolarizationController, StateSource
from qkdnode.link import LinkError
from qkdnode.pair.core import S, SessionCore, StepSpec
from qkdnode.polarization import (
    CompensationSettings,
    PolarizationError,
    WindowCounts,
    compensation_step,
)
from qkdnode.probe_wire import BYTES_PER_DETECTION, ProbeWireError, decode_probe, encode_probe
from qkdnode.tracking import TrackingError, TrackingWindow

log = structlog.get_logger(__name__)

#: windows the transmitter remembers for ``polarization_states`` (the receiver asks for
#: the states of a window right after it passed)
_REMEMBERED_WINDOWS = 16
#: the code of a vacuum pulse's state in a ``polarization_states`` reply (no information)
_VACUUM = 255


class SlotClock:
    """Receiver: which slot the light is at now, from the detections read so far.

    A detection is read some time after its light arrived (the tagger's buffering, and
    the node's reading, which may fall behind under load), so every sample ``(t, largest
    slot read)`` lies at or below the light's slot at ``t``; with the slot rate fixed, the
    least-delayed sample of the last ``horizon_s`` (the largest ``slot - rate t``) places
    the light's slot now, behind it by no more than that sample's delay. Windows placed
    from it do not depend on how far the reading lags.
    """

    def __init__(self, slot_rate_hz: float, horizon_s: float = 5.0) -> None:
        self.slot_rate_hz = slot_rate_hz
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, t_s: float, slot: int) -> None:
        if slot < 0:
            return
        self._samples.append((t_s, slot - self.slot_rate_hz * t_s))
        while self._samples and self._samples[0][0] < t_s - self.horizon_s:
            self._samples.popleft()

    def now_slot(self, t_s: float) -> int | None:
        """The light's slot at ``t_s`` (None before the first sample)."""
        if not self._samples:
            return None
        return int(max(offset for _, offset in self._samples) + self.slot_rate_hz * t_s)


class PolarizationMixin(SessionCore):
    """Polarisation compensation: the receiver's loop, the transmitter's two steps."""

    _polarization_windows: deque[TrackingWindow] | None = None

    # ------------------------------------------------------------------ receiver
    def _polarization_controller(self) -> PolarizationController | None:
        """The receiver's polarisation controller, if the node has exactly one."""
        found = [
            i
            for i in self.node.hardware.instruments.values()
            if isinstance(i, PolarizationController)
        ]
        return found[0] if len(found) == 1 else None

    async def _compensate_polarization(self) -> None:
        """Receiver, while exchanging: the compensation loop (module docstring). Never
        returns; a failed step is logged and the next one tried (compensation never ends
        the exchange). Waits forever when off or without a controller."""
        cfg = self.cfg.polarization
        controller = self._polarization_controller()
        if cfg.interval_s <= 0 or controller is None:
            await asyncio.Event().wait()
        assert controller is not None
        settings = CompensationSettings(
            dither_rad=cfg.dither_rad,
            gain=cfg.gain,
            deadband_rad=cfg.deadband_rad,
            jump_rad=cfg.jump_rad,
        )
        slot_rate = self.cfg.source.slot_rate_hz
        limit = (self.cfg.bus.max_control_frame_bytes - 1024) // BYTES_PER_DETECTION
        n_detections = min(cfg.window_detections, limit)
        clock = SlotClock(slot_rate)
        sampler = asyncio.create_task(self._sample_slots(clock), name="polarization-clock")
        try:
            await self._polarization_loop(controller, settings, clock, n_detections)
        finally:
            sampler.cancel()

    async def _sample_slots(self, clock: SlotClock) -> None:
        """Receiver: feed ``clock`` with the largest slot read, ten times a second."""
        while True:
            acc = self._accumulator
            if acc is not None:
                clock.add(time.monotonic(), acc.seen_upto)
            await asyncio.sleep(0.1)

    async def _polarization_loop(
        self,
        controller: PolarizationController,
        settings: CompensationSettings,
        clock: SlotClock,
        n_detections: int,
    ) -> None:
        """Receiver: the steps, one every ``interval_s`` (at once after a jump's)."""
        cfg = self.cfg.polarization
        slot_rate = self.cfg.source.slot_rate_hz
        fiber = None  # the last estimate of the fiber's rotation (continuity)
        wait_s = cfg.interval_s
        while True:
            await asyncio.sleep(wait_s)
            rate_hz = self._locked_rate_hz
            wait_s = cfg.interval_s
            if rate_hz > 0:
                by_share = 2 * n_detections / (cfg.max_disclosed_fraction * rate_hz)
                wait_s = max(cfg.interval_s, by_share)
            if self._accumulator is None or rate_hz <= 0:
                continue
            n_slots = max(1, math.ceil(n_detections * slot_rate / rate_hz))
            lead_slots = int(cfg.lead_s * slot_rate)

            async def window(n_slots: int = n_slots, lead_slots: int = lead_slots) -> WindowCounts:
                return await self._polarization_window(n_slots, lead_slots, clock)

            started = time.monotonic()
            try:
                step = await compensation_step(controller, window, settings, fiber)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # instrument, link, estimate: never ends the exchange
                log.warning(
                    "polarization_step_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}"
                )
                fiber = None
                continue
            est = step.estimate
            fiber = est.fiber
            fields = {
                "error_rad": round(est.error_rad, 4),
                "visibility": round(est.visibility, 4),
                "qber_z": round(step.qber_z, 5),
                "qber_x": round(step.qber_x, 5),
                "detections": step.detections,
                "moved": step.moved,
                "jump": step.again,
                "retardances_rad": [round(v, 4) for v in step.new_retardances_rad],
                "margin": round(est.margin, 3),
                "mismatch": round(est.mismatch, 3),
                "continuous": est.continuous,
                "seconds": round(time.monotonic() - started, 3),
            }
            log.info("polarization_compensated", **fields)
            self.node.publish("polarization", fields)
            if step.again:
                wait_s = 0.0

    async def _polarization_window(
        self, n_slots: int, lead_slots: int, clock: SlotClock
    ) -> WindowCounts:
        """Receiver: one disclosed window with the controller as it is now: its slots
        start ``lead_slots`` after the light's slot now (:class:`SlotClock`), so every
        detection in it came after the controller was set, however far behind the
        reading of the detections is."""
        acc = self._accumulator
        if acc is None or self.node.sm.state is not S.EXCHANGING:
            raise LinkError("not exchanging")
        now = clock.now_slot(time.monotonic())
        start = max(acc.seen_upto + 1, self.exchange_from_slot, now or 0) + lead_slots
        log.debug(
            "polarization_window",
            start_slot=start,
            ahead_of_read_s=round((start - acc.seen_upto) / self.cfg.source.slot_rate_hz, 3),
        )
        w = TrackingWindow(start, start + n_slots)
        done = acc.open_window(w)
        try:
            await self.node.link.request(
                "polarization_window", 30.0, start_slot=w.start_slot, stop_slot=w.stop_slot
            )
            # the controller sits dithered until the window has passed: never long
            wait_s = 2.0 + 4.0 * (start + n_slots - acc.seen_upto) / self.cfg.source.slot_rate_hz
            async with asyncio.timeout(wait_s):
                slots, channels = await asyncio.shield(done)
        except BaseException:
            acc.abandon(done)
            raise
        limit = (self.cfg.bus.max_control_frame_bytes - 1024) // BYTES_PER_DETECTION
        slots, channels = slots[:limit], channels[:limit]
        if slots.size == 0:
            raise PolarizationError("no detections in the window")
        try:
            request = encode_probe(slots, np.zeros(slots.shape[0], np.int8))
        except ProbeWireError as exc:
            raise LinkError(str(exc)) from exc
        reply = await self.node.link.request(
            "polarization_states",
            30.0,
            start_slot=w.start_slot,
            stop_slot=w.stop_slot,
            detections=request,
        )
        states = _decode_states(reply, slots.shape[0])
        keep = states != _VACUUM
        return WindowCounts.from_detections(channels[keep], states[keep] // 2, states[keep] % 2)

    # ------------------------------------------------------------------ transmitter
    async def _serve_polarization_window(self, args: dict[str, Any]) -> dict[str, Any]:
        """Transmitter: withhold the receiver's window from every block, if no block has
        announced a slot at or after its start."""
        if self.node.sm.state is not S.EXCHANGING:
            raise LinkError(f"not exchanging ({self.node.sm.state.value})")
        try:
            w = TrackingWindow(int(args["start_slot"]), int(args["stop_slot"]))
        except (KeyError, TypeError, ValueError, TrackingError) as exc:
            raise LinkError(f"bad polarization window: {exc}") from None
        max_slots = int(self.cfg.source.slot_rate_hz * 60)
        if w.stop_slot - w.start_slot > max_slots:
            raise LinkError(f"a polarization window spans at most {max_slots} slots")
        if w.start_slot < self.key_slots.floor:
            raise LinkError(
                f"polarization window starts at slot {w.start_slot}, below the first slot a "
                f"block may still use ({self.key_slots.floor})"
            )
        self.key_slots.withhold(w.start_slot, w.stop_slot)
        if self._polarization_windows is None:
            self._polarization_windows = deque(maxlen=_REMEMBERED_WINDOWS)
        self._polarization_windows.append(w)
        return {}

    async def _serve_polarization_states(self, args: dict[str, Any]) -> dict[str, Any]:
        """Transmitter: basis and bit (``2 basis + bit``; 255 for a vacuum pulse) of each of
        the receiver's detections in a window it withheld."""
        try:
            w = TrackingWindow(int(args["start_slot"]), int(args["stop_slot"]))
            limit = (self.cfg.bus.max_control_frame_bytes - 1024) // BYTES_PER_DETECTION
            slots, _ = decode_probe(args["detections"], limit)
        except (KeyError, TypeError, ValueError, TrackingError, ProbeWireError) as exc:
            raise LinkError(f"bad polarization_states request: {exc}") from None
        if w not in (self._polarization_windows or ()):
            raise LinkError(f"[{w.start_slot}, {w.stop_slot}) is no polarization window of ours")
        if slots.size and (int(slots.min()) < w.start_slot or int(slots.max()) >= w.stop_slot):
            raise LinkError("polarization_states asks for slots outside its window")
        source: StateSource = self._one(StateSource)
        prep = await asyncio.to_thread(source.prepared, slots)
        codes = (prep.basis.astype(np.uint8) * 2 + prep.bit.astype(np.uint8)).astype(np.uint8)
        codes[prep.intensity == IntensityClass.VACUUM] = _VACUUM
        return {"n": int(codes.shape[0]), "states": base64.b64encode(codes.tobytes()).decode()}

    def _polarization_steps(self) -> dict[str, StepSpec]:
        """The compensation's link steps, both the transmitter's to answer."""
        return {
            "polarization_window": StepSpec(self._serve_polarization_window, ("transmitter",)),
            "polarization_states": StepSpec(self._serve_polarization_states, ("transmitter",)),
        }


def _decode_states(reply: dict[str, Any], n: int) -> npt.NDArray[np.uint8]:
    """The ``n`` state codes of a ``polarization_states`` reply (LinkError otherwise)."""
    try:
        raw = base64.b64decode(reply["states"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise LinkError(f"polarization_states reply: {type(exc).__name__}: {exc}") from None
    if reply.get("n") != n or len(raw) != n:
        raise LinkError(f"polarization_states reply: expected {n} states, got {len(raw)}")
    codes = np.frombuffer(raw, dtype=np.uint8)
    if bool(np.any((codes > 3) & (codes != _VACUUM))):
        raise LinkError("polarization_states reply: a state code outside 0..3 and 255")
    return codes
