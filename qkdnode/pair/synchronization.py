"""Synchronisation of the pair: the slot clock lock, probes, drift-tracking windows."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from drivers.interfaces import (
    Encoder,
    StateSource,
    TimeTagger,
)
from qkdnode.link import LinkError
from qkdnode.probe_wire import BYTES_PER_DETECTION, ProbeWireError, decode_probe, encode_probe
from qkdnode.statemachine import Event, StateMachine, TransitionRecord
from qkdnode.tracking import (
    TrackingError,
)

if TYPE_CHECKING:
    from qkdnode.procedures.encoder_v_pi import StateErrors

from qkdnode.pair.core import SLOT_SLIP_QBER, S, SessionCore, StepSpec

log = structlog.get_logger(__name__)


class SynchronizationMixin(SessionCore):
    """Synchronisation of the pair: the slot clock lock, probes, drift-tracking windows."""

    # ------------------------------------------------------------------ synchronization
    async def _enter_synchronizing(self, sm: StateMachine, rec: TransitionRecord) -> None:
        try:
            if self.role == "transmitter":
                await self._sync_transmitter()
            else:
                await self._sync_receiver()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._sync_error = str(exc)
            self.node.stats.synchronized = False
            await self._activity_failed("sync_failed", "synchronization", exc)
            return
        await self.node.trigger(Event.LOCKED, "clock locked")

    async def _sync_transmitter(self) -> None:
        src: StateSource = self._one(StateSource)
        await self.set_light(True)
        seed = secrets.randbits(63)
        start_slot = int(await self._call(src.set_sync_pattern, seed))
        try:
            summary = await self.node.link.request(
                "sync",
                120.0,
                public_seed=seed,
                slot_rate_hz=self.cfg.source.slot_rate_hz,
                pattern_start_slot=start_slot,
            )
        finally:
            first = await self._call(src.set_sync_pattern, None)
            self.key_slots.key_states_from(int(first))
        self.exchange_from_slot = int(first)
        window = summary.get("window_ps")
        # the receiver's acceptance window: the in-flight dark rate's share of the gate
        self.rx_window_ps = (
            float(window)
            if isinstance(window, int | float) and not isinstance(window, bool)
            else None
        )
        await self.node.link.request("sync_end", 30.0, exchange_from_slot=self.exchange_from_slot)
        self.node.stats.synchronized = True
        self.node.keyflow.synchronized()
        self.node.publish("sync", {"locked": True, **summary})
        log.info("pair_synchronized", exchange_from_slot=self.exchange_from_slot, **summary)
        if self.encoder_v_pi is None:
            from qkdnode.procedures.common import CalibrationError
            from qkdnode.procedures.encoder_v_pi import EncoderVPiConfig, calibrate_encoder_v_pi

            self._progress("calibration", step="encoder_v_pi", status="started")
            try:
                self.encoder_v_pi = await calibrate_encoder_v_pi(
                    self._one(Encoder),
                    self._probe_state_errors,
                    EncoderVPiConfig(v_pi_guess_v=self.cfg.calibration.encoder_v_pi_v),
                    state_dir=self.node.state_dir,
                    publish=self.node.publish,
                )
                log.info(
                    "encoder_v_pi_measured",
                    v_pi_v=self.encoder_v_pi.v_pi_v,
                    sigma_v=self.encoder_v_pi.v_pi_sigma_v,
                )
            except CalibrationError as exc:
                # V_pi sets the drives; no bound rests on it, and the compensation below
                # still finds the error-rate minimum: carry on from the configured value.
                log.warning(
                    "encoder_v_pi_not_measured",
                    error=str(exc),
                    using_v=self.cfg.calibration.encoder_v_pi_v,
                )
        result = await self._compensate(self._probe_qber)
        if result.final_qber >= SLOT_SLIP_QBER:
            # Bits as random as coin flips: the acquisition locked onto the wrong slots
            # (a false lock); key exchange on it would only abort block after block.
            self.node.stats.synchronized = False
            raise LinkError(
                f"error rate {result.final_qber:.3f} after the encoding compensation: the slot "
                "alignment is wrong (false lock)"
            )

    async def _probe_qber(self) -> float:
        """Transmitter: error rate of a disclosed sample of fresh detections (no key use)."""
        from qkdnode.procedures.encoding_compensation import qber_from_detections

        channels, states = await self._probe()
        est = qber_from_detections(channels, states.basis, states.bit)
        log.info("qber_probe", qber=est.qber, n_sifted=est.n_sifted)
        return float(est.qber)

    async def _probe_state_errors(self) -> StateErrors:
        """Transmitter: errors per prepared state (H, V, D, A) of a disclosed sample of fresh
        detections, vacuum-class slots left out (the encoder V_pi measurement)."""
        from drivers.interfaces import IntensityClass
        from qkdnode.procedures.encoder_v_pi import count_state_errors

        channels, states = await self._probe()
        return count_state_errors(
            channels, states.basis, states.bit, mask=states.intensity != IntensityClass.VACUUM
        )

    async def _probe(self) -> tuple[npt.NDArray[np.int8], Any]:
        """Transmitter: ``calibration.probe_detections`` fresh detections the receiver
        discloses (their slots can never carry key) and the states we prepared in them."""
        src: StateSource = self._one(StateSource)
        from_slot = int(await self._call(src.next_slot))
        reply = await self.node.link.request(
            "probe", 60.0, n=self.cfg.calibration.probe_detections, from_slot=from_slot
        )
        try:
            slots, channels = decode_probe(reply, self.cfg.calibration.probe_detections)
        except ProbeWireError as exc:
            raise LinkError(str(exc)) from exc
        self.key_slots.disclosed(slots)
        if slots.shape[0] > 1:
            self._detections_per_slot = slots.shape[0] / float(slots[-1] - slots[0] + 1)
        states = await self._call(src.prepared, slots)
        return channels, states

    async def _sync_receiver(self) -> None:
        from qkdnode.procedures.sync import acquire_lock

        self.tracker = None
        self._sync_error = ""
        tagger: TimeTagger = self._one(TimeTagger)
        for d in self._detectors():
            await self._call(d.arm)
        await self._check_not_latched()
        await self._call(tagger.start_stream)
        args = self._sync_request
        slot_rate_hz = float(args["slot_rate_hz"])
        # Tags queued before the pattern started would only confuse the acquisition.
        for _ in range(10_000):
            if await asyncio.to_thread(tagger.read_block, 0.0) is None:
                break
        # Coarse offset hint: the first fresh tag belongs to a slot shortly after the
        # pattern's first slot (latency << the acquisition's search range). Without it a
        # receiver that outlived a transmitter restart would be minutes off.
        first_ps: int | None = None
        deadline = time.monotonic() + 10.0
        while first_ps is None and time.monotonic() < deadline:
            block = await asyncio.to_thread(tagger.read_block, 0.5)
            if block is not None and len(block):
                first_ps = int(block.tags["time_ps"][0])
        if first_ps is None:
            raise LinkError("no detections within 10 s: is the light on, the fiber connected?")
        start_slot = int(args.get("pattern_start_slot", 0))
        hint_ps = first_ps - start_slot / slot_rate_hz * 1e12
        result, tracker = await acquire_lock(
            tagger,
            int(args["public_seed"]),
            slot_rate_hz,
            self.cfg.sync,
            publish=self.node.publish,
            offset_hint_ps=hint_ps,
            state_dir=self.node.state_dir,
        )
        if not result.locked:
            raise LinkError(f"no lock: {result.message or 'timing error too large'}")
        self.tracker = tracker
        self._sync_summary = {
            "offset_ps": result.offset_ps,
            "ppm": result.ppm,
            "timing_error_ps": result.timing_error_ps,
            "window_ps": result.window_ps,
        }

    async def _serve_probe(self, n: int, from_slot: int) -> dict[str, Any]:
        """Receiver: disclose ``n`` detections at or after ``from_slot`` (never used for key)."""
        if self.tracker is None:
            raise LinkError("not synchronized")
        if not 100 <= n <= 200_000:
            raise LinkError(f"probe size must be 100..200000, got {n}")
        limit = self.cfg.bus.max_control_frame_bytes - 1024  # room for the envelope
        if n * BYTES_PER_DETECTION > limit:
            raise LinkError(
                f"a probe of {n} detections does not fit bus.max_control_frame_bytes"
                f" ({self.cfg.bus.max_control_frame_bytes}): lower calibration.probe_detections"
            )
        tagger: TimeTagger = self._one(TimeTagger)
        slots: list[npt.NDArray[np.int64]] = []
        chans: list[npt.NDArray[np.int8]] = []
        have = 0
        deadline = time.monotonic() + 30.0
        while have < n and time.monotonic() < deadline:
            block = await asyncio.to_thread(tagger.read_block, 0.5)
            if block is None or len(block) == 0:
                continue
            mapped, _status = self.tracker.update(block.tags)
            keep = mapped.slot_index >= max(from_slot, self.exchange_from_slot)
            slots.append(mapped.slot_index[keep])
            chans.append(mapped.channel[keep])
            have += int(keep.sum())
        if have < n:
            raise LinkError(f"only {have} detections for the probe in 30 s")
        s_all = np.concatenate(slots)[:n]
        c_all = np.concatenate(chans)[:n]
        try:
            return encode_probe(s_all, c_all)
        except ProbeWireError as exc:
            raise LinkError(str(exc)) from exc

    async def _serve_track(self, start_slot: int, stop_slot: int) -> dict[str, Any]:
        """Receiver: disclose our detections in slots ``[start_slot, stop_slot)`` while key
        flows (a drift-tracking window, :mod:`qkdnode.tracking`); they leave the block being
        filled. Refused when a block already handed out reaches into the window."""
        acc, window = self._exchange_window(start_slot, stop_slot)
        try:
            done = acc.open_window(window)
        except TrackingError as exc:
            # The transmitter withheld the window before it asked: whatever of it no
            # earlier window covers is dropped here too (unless a block already holds
            # it), so that no block of ours carries a slot the transmitter refuses.
            with contextlib.suppress(TrackingError):
                acc.exclude(window)
            raise LinkError(str(exc)) from exc
        try:
            async with asyncio.timeout(90.0):
                slots, chans = await asyncio.shield(done)
        except TimeoutError:
            acc.abandon(done)
            raise LinkError("no detections past the tracking window in 90 s") from None
        except TrackingError as exc:
            raise LinkError(str(exc)) from exc
        limit = (self.cfg.bus.max_control_frame_bytes - 1024) // BYTES_PER_DETECTION
        try:
            return encode_probe(slots[:limit], chans[:limit])
        except ProbeWireError as exc:
            raise LinkError(str(exc)) from exc

    # ------------------------------------------------------------------ link steps
    def _synchronization_steps(self) -> dict[str, StepSpec]:
        """The synchronisation's link steps: ``sync`` and ``sync_end`` (the receiver's
        half), ``probe`` and ``track`` (detections disclosed for compensation and drift
        tracking)."""
        both = ("transmitter", "receiver")
        return {
            "sync": StepSpec(self._step_sync, ("receiver",)),
            "sync_end": StepSpec(self._step_sync_end, ("receiver",)),
            "probe": StepSpec(lambda a: self._serve_probe(int(a["n"]), int(a["from_slot"])), both),
            "track": StepSpec(
                lambda a: self._serve_track(int(a["start_slot"]), int(a["stop_slot"])), both
            ),
        }

    async def _step_sync(self, args: dict[str, Any]) -> dict[str, Any]:
        sm = self.node.sm
        self._sync_request = args
        await sm.trigger(Event.SYNC, "transmitter asked")
        await sm.wait_for(S.IDLE, S.FAULT, S.PAUSED, S.AWAITING_PASS, timeout_s=120)
        if self.tracker is None:
            raise LinkError(self._sync_error or "no lock")
        return self._sync_summary

    async def _step_sync_end(self, args: dict[str, Any]) -> dict[str, Any]:
        self.exchange_from_slot = int(args["exchange_from_slot"])
        self.node.stats.synchronized = True
        self.node.keyflow.synchronized()
        return {}
