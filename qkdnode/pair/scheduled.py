"""Calibration on a schedule while key flows: the transmitter's intensity-modulator bias
tracking with the check (and re-measurement) of its mean photon numbers, the receiver's
dark counts.

Both run in windows of slots withheld from every block, so key flows around them:

* transmitter, every ``calibration.bias_track_interval_s``: it picks the window
  ``[start, stop)`` ahead of its state source, withholds it, asks the receiver to drop
  its detections there (link step ``skip``), waits for the window to begin, runs the
  tracking step (and the re-measurement when the check asks for it) and extends the
  window if it ran past its end. A check that finds the intensities beyond their drift
  allowance stops the exchange (alarm ``intensity_drift``; a new calibration follows).
* receiver, every ``calibration.dark_count_interval_s``: it asks the transmitter to
  close its shutter (link step ``dark``); the transmitter withholds the slots it keeps
  dark and answers with them; the receiver drops their detections, pauses its light-loss
  test and its slot tracking while the light is off, reads the dark counts
  (:func:`~qkdnode.procedures.dark_rate.measure_dark_rate`) and takes the new floor.

A block that announced a slot of a window anyway (a window extended after the receiver
had cut past it) is refused by the transmitter (its key-slot floor); the results are
saved and published like every calibration's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from drivers.interfaces import (
    IntensityModulator,
    OpticalPowerMeter,
    StateSource,
    VariableAttenuator,
)
from qkdnode.link import LinkError
from qkdnode.pair.core import S, SessionCore, StepSpec
from qkdnode.statemachine import Event
from qkdnode.tracking import TrackingError, TrackingWindow

log = structlog.get_logger(__name__)

#: seconds of slots between the state source's next slot and a window's first slot
WINDOW_LEAD_S = 0.05
#: the light in flight (fiber, tagger buffers) must pass before the dark is counted
DARK_SETTLE_S = 1.0
#: dark-count readings per scheduled measurement
DARK_READINGS = 5


class ScheduledMixin(SessionCore):
    """Calibration on a schedule while exchanging (module docstring)."""

    # ------------------------------------------------------------------ transmitter
    @contextlib.asynccontextmanager
    async def _withheld_window(self, seconds: float) -> AsyncIterator[tuple[int, int]]:
        """Transmitter: slots from a little ahead of the state source, ``seconds`` long
        (longer if the body runs longer), withheld from every block and dropped by the
        receiver; the body runs once the window has begun. Raises LinkError when the
        receiver refuses the window (nothing was changed yet)."""
        src: StateSource = self._one(StateSource)
        rate = self.cfg.source.slot_rate_hz
        lead = max(1, int(WINDOW_LEAD_S * rate))
        start = int(await self._call(src.next_slot)) + lead
        stop = start + max(1, int(seconds * rate))
        self.key_slots.withhold(start, stop)
        await self.node.link.request("skip", 30.0, start_slot=start, stop_slot=stop)
        while int(await self._call(src.next_slot)) < start:
            await asyncio.sleep(0.005)
        try:
            yield start, stop
        finally:
            end = int(await self._call(src.next_slot)) + lead
            if end > stop:
                # ran past the window: the rest is withheld too (a block the receiver cut
                # into it meanwhile is refused here, never keyed with these slots)
                self.key_slots.withhold(stop, end)
                try:
                    await self.node.link.request("skip", 30.0, start_slot=stop, stop_slot=end)
                except LinkError as exc:
                    log.warning("window_extension_refused", error=str(exc)[:200])

    async def _scheduled_bias_tracking(self) -> None:
        """Transmitter, while exchanging: a bias-tracking step and the intensity check
        every ``calibration.bias_track_interval_s`` (never returns; off: only waits). A
        failed step is logged and the next one tried; a check beyond the drift allowance
        stops the exchange."""
        from qkdnode.procedures.bias_tracking import (
            BiasTrackingPoint,
            plot_bias_tracking,
            remeasure_intensities,
            track_bias,
        )
        from qkdnode.procedures.common import publish_result, save_result
        from qkdnode.procedures.modulator import BiasTracker

        cal = self.cfg.calibration
        if cal.bias_track_interval_s <= 0 or self.modulator is None:
            await asyncio.Event().wait()
        assert self.modulator is not None
        im: IntensityModulator = self._one(IntensityModulator)
        meter: OpticalPowerMeter = self._one(OpticalPowerMeter)
        voa: VariableAttenuator = self._one(VariableAttenuator)
        st = self.settings
        probs = (st.p_signal, st.p_decoy, st.p_vacuum)
        tracker = BiasTracker(im, meter, self.modulator, probs)
        history: list[BiasTrackingPoint] = []
        started = time.monotonic()
        while True:
            await asyncio.sleep(cal.bias_track_interval_s)
            try:
                # one window at a time (the encoder's tracking windows too), and no
                # tap-power check while the bias is dithered
                async with (
                    self._bias_lock,
                    self._im_lock,
                    self._withheld_window(cal.bias_track_window_s) as window,
                ):
                    result = await track_bias(
                        tracker,
                        self.intensities,
                        probs,
                        allowance=cal.intensity_drift_allowance,
                        remeasure_at=cal.intensity_remeasure_at,
                        history=history,
                        started_at=started,
                    )
                    remeasured = None
                    if result.action == "remeasure" and self.intensities is not None:
                        remeasured = await remeasure_intensities(
                            im, voa, meter, self.modulator, self.intensities
                        )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # instrument, link, fit: never ends the exchange
                log.warning(
                    "bias_tracking_step_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}"
                )
                continue
            fields = {
                "bias_v": round(result.bias_after_v, 5),
                "offset_v": round(result.offset_v, 5),
                "power_ratio": None if result.power_ratio is None else round(result.power_ratio, 5),
                "action": result.action,
                "window_slots": window[1] - window[0],
            }
            log.info("im_bias_tracked", **fields)
            state_dir = self.node.state_dir
            await asyncio.to_thread(save_result, result, state_dir, plot_bias_tracking)
            publish_result(result, self.node.publish)
            if remeasured is not None:
                from qkdnode.procedures.mean_photon_number import plot_mean_photon_number

                # the blocks from here on take the new intervals
                self.intensities = remeasured
                await asyncio.to_thread(save_result, remeasured, state_dir, plot_mean_photon_number)
                publish_result(remeasured, self.node.publish)
                log.info(
                    "intensities_remeasured",
                    mu_signal=remeasured.signal.mu,
                    mu_decoy=remeasured.decoy.mu,
                    attenuation_db=round(remeasured.attenuation_db, 3),
                )
            if result.action == "stop":
                message = result.message + (
                    f" (tap power {100 * ((result.power_ratio or 0) - 1):+.1f} % from the "
                    f"calibrated, allowance {100 * cal.intensity_drift_allowance:.1f} %)"
                )
                self.node.alarm("intensity_drift", message)
                self.node.stats.calibrated = False
                await self.node.trigger(Event.STOP, f"intensities drifted: {message}")
                return

    async def _step_dark(self, args: dict[str, Any]) -> dict[str, Any]:
        """Transmitter, while exchanging: close the shutter for ``seconds`` (at most 30)
        of slots withheld from every block; answers at once with the window
        ``{"start_slot", "stop_slot"}`` and opens the shutter again at its end (whatever
        happens: a cancelled exchange leaves it closed, the safe side)."""
        if self.node.sm.state is not S.EXCHANGING:
            raise LinkError(f"'dark' only while exchanging ({self.node.sm.state.value})")
        seconds = float(args.get("seconds", 0.0))
        if not 0 < seconds <= 30:
            raise LinkError(f"dark for {seconds!r} s: need 0 < seconds <= 30")
        src: StateSource = self._one(StateSource)
        voa: VariableAttenuator = self._one(VariableAttenuator)
        rate = self.cfg.source.slot_rate_hz
        lead = max(1, int(WINDOW_LEAD_S * rate))
        await self._im_lock.acquire()  # no tap-power check while dark
        try:
            start = int(await self._call(src.next_slot))
            stop = start + int((seconds + 2 * WINDOW_LEAD_S) * rate)
            self.key_slots.withhold(start - lead, stop + lead)
            await self._call(voa.set_shutter, False)
        except BaseException:
            self._im_lock.release()
            raise

        async def reopen() -> None:
            try:
                while int(await self._call(src.next_slot)) < stop - lead:
                    await asyncio.sleep(0.01)
                # only into an exchange: any other state has made the light safe or
                # switches it on itself (calibration, synchronisation)
                if self.node.sm.state is S.EXCHANGING:
                    await self._call(voa.set_shutter, True)
            finally:
                self._im_lock.release()

        self._detached(reopen())
        return {"start_slot": start - lead, "stop_slot": stop + lead}

    # ------------------------------------------------------------------ receiver
    async def _step_skip(self, args: dict[str, Any]) -> dict[str, Any]:
        """Receiver, while exchanging: drop our detections in ``[start_slot, stop_slot)``
        (also those already collected): a window the transmitter withheld. Refused like
        a ``track`` window (starts before the exchange's first slot, spans more than 60 s,
        overlaps another window, or reaches into a block already cut)."""
        self._drop_window(int(args["start_slot"]), int(args["stop_slot"]))
        return {}

    def _drop_window(self, start_slot: int, stop_slot: int) -> None:
        acc = self._accumulator
        if acc is None or self.node.sm.state is not S.EXCHANGING:
            raise LinkError(f"not exchanging ({self.node.sm.state.value})")
        max_slots = int(self.cfg.source.slot_rate_hz * 60)
        if not (self.exchange_from_slot <= start_slot and 0 < stop_slot - start_slot <= max_slots):
            raise LinkError(
                f"window [{start_slot}, {stop_slot}) must start at or after slot "
                f"{self.exchange_from_slot} and span 1..{max_slots} slots"
            )
        try:
            acc.abandon(acc.open_window(TrackingWindow(start_slot, stop_slot)))
        except TrackingError as exc:
            raise LinkError(str(exc)) from exc

    async def _scheduled_dark_counts(self) -> None:
        """Receiver, while exchanging: the dark counts every
        ``calibration.dark_count_interval_s`` (never returns; off: only waits). A failed
        measurement is logged and the next one tried."""
        cal = self.cfg.calibration
        if cal.dark_count_interval_s <= 0:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(cal.dark_count_interval_s)
            try:
                await self._dark_counts_in_window()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "dark_count_measurement_failed",
                    error=f"{type(exc).__name__}: {str(exc)[:200]}",
                )

    async def _dark_counts_in_window(self) -> None:
        from qkdnode.procedures.dark_rate import measure_dark_rate

        seconds_per_reading = self.cfg.calibration.integration_time_s
        dark_s = DARK_SETTLE_S + (DARK_READINGS + 1) * seconds_per_reading + 0.5
        self._dark_pause_until = time.monotonic() + dark_s + 30.0  # until the answer
        try:
            reply = await self.node.link.request("dark", 30.0, seconds=dark_s)
            self._dark_pause_until = time.monotonic() + dark_s + DARK_SETTLE_S
            with contextlib.suppress(LinkError):  # a block already cut into it: refused there
                self._drop_window(int(reply["start_slot"]), int(reply["stop_slot"]))
            await asyncio.sleep(DARK_SETTLE_S)
            result = await measure_dark_rate(
                self._detectors(),
                integration_s=seconds_per_reading,
                readings=DARK_READINGS,
                state_dir=self.node.state_dir,
                publish=self.node.publish,
            )
        finally:
            # the light-loss test and the tracking resume once the light is back
            self._dark_pause_until = min(
                self._dark_pause_until, time.monotonic() + DARK_SETTLE_S + 0.5
            )
        self._dark_measured(result.total_rate_hz, result.total_upper_hz)

    def _dark_measured(self, rate_hz: float, upper_hz: float) -> None:
        """Receiver: a new dark-count floor (total over the detectors, Hz)."""
        self.dark_rate_hz = rate_hz
        log.info("dark_rate_measured", dark_rate_hz=round(rate_hz, 3), upper_hz=round(upper_hz, 3))

    def _dark_paused(self) -> bool:
        """Receiver: the transmitter's light is off for a dark-count measurement (the
        light-loss test and the slot tracking skip these tags)."""
        return time.monotonic() < self._dark_pause_until

    # ------------------------------------------------------------------ link steps
    def _scheduled_steps(self) -> dict[str, StepSpec]:
        """``skip`` (the receiver drops a window's detections) and ``dark`` (the
        transmitter's shutter closed for a window)."""
        return {
            "skip": StepSpec(self._step_skip, ("receiver",)),
            "dark": StepSpec(self._step_dark, ("transmitter",)),
        }
