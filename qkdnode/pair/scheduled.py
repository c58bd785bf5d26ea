"""Calibration on a schedule while key flows: the transmitter's intensity-modulator bias
tracking with the check (and re-measurement) of its mean photon numbers.

Every ``calibration.bias_track_interval_s`` the transmitter picks a window of slots
``[start, stop)`` ahead of its state source, asks the receiver to drop its detections
there (link step ``skip``), withholds it from every block, waits for the window to
begin, runs the tracking step (and the re-measurement when the check asks for it) and
extends the window if it ran past its end: key flows around the window. A check that
finds the intensities beyond their drift allowance stops the exchange (alarm
``intensity_drift``; a new calibration follows). A block that announced a slot of a
window anyway (an extension the receiver had already cut past) is refused by the
transmitter's key-slot floor. Results are saved and published like every calibration's.

The receiver's dark counts are measured at every calibration
(:func:`~qkdnode.procedures.dark_rate.measure_dark_rate`, Poisson bounds), not while
key flows: a dark window of the seconds a count-rate reading needs leaves the slot
tracking without light for that long.
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
#: seconds before a refused window is asked for again
WINDOW_RETRY_S = 0.5


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
        # Asked first: a refused window is not withheld (no block loses its slots). The
        # slots are still ahead of the state source: no block can hold them yet.
        await self.node.link.request("skip", 30.0, start_slot=start, stop_slot=stop)
        self.key_slots.withhold(start, stop)
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
        # the first step at once: the bias may have drifted since the calibration
        wait_s = min(cal.bias_track_interval_s, WINDOW_RETRY_S)
        while True:
            await asyncio.sleep(wait_s)
            wait_s = cal.bias_track_interval_s
            try:
                # no tap-power check while the bias is dithered
                async with (
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
                    remeasure_error: Exception | None = None
                    if result.action == "remeasure" and self.intensities is not None:
                        try:
                            remeasured = await remeasure_intensities(
                                im, voa, meter, self.modulator, self.intensities
                            )
                        except asyncio.CancelledError:
                            raise
                        except Exception as exc:  # the light may be off: stop, below
                            remeasure_error = exc
            except asyncio.CancelledError:
                raise
            except LinkError as exc:
                # the receiver refused the window (it overlaps another activity's, the
                # encoder's tracking or the polarisation compensation): soon again
                log.info("bias_tracking_window_refused", error=str(exc)[:200])
                wait_s = min(cal.bias_track_interval_s, WINDOW_RETRY_S)
                continue
            except Exception as exc:  # instrument, fit: never ends the exchange
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
            if remeasure_error is not None:
                message = (
                    "the intensities drifted and could not be measured again: "
                    f"{type(remeasure_error).__name__}: {str(remeasure_error)[:200]}"
                )
                self.node.alarm("intensity_drift", message)
                self.node.stats.calibrated = False
                await self.node.trigger(Event.STOP, message)
                return
            if result.action == "stop":
                message = result.message + (
                    f" (tap power {100 * ((result.power_ratio or 0) - 1):+.1f} % from the "
                    f"calibrated, allowance {100 * cal.intensity_drift_allowance:.1f} %)"
                )
                self.node.alarm("intensity_drift", message)
                self.node.stats.calibrated = False
                await self.node.trigger(Event.STOP, f"intensities drifted: {message}")
                return

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

    def _dark_measured(self, rate_hz: float, upper_hz: float) -> None:
        """Receiver: a new dark-count floor (total over the detectors, Hz)."""
        self.dark_rate_hz = rate_hz
        log.info("dark_rate_measured", dark_rate_hz=round(rate_hz, 3), upper_hz=round(upper_hz, 3))

    # ------------------------------------------------------------------ link steps
    def _scheduled_steps(self) -> dict[str, StepSpec]:
        """``skip``: the receiver drops a window's detections."""
        return {"skip": StepSpec(self._step_skip, ("receiver",))}
