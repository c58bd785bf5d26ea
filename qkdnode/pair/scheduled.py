"""Calibration on a schedule while key flows: the transmitter's intensity-modulator bias
tracking with the check (and re-measurement) of its mean photon numbers, and the
receiver's dark-count rate from the vacuum decoy class.

Every ``calibration.bias_track_interval_s`` (shorter while the bias drifts fast: each
step checks every intensity class from the modulator's curve and chooses the next
interval, down to ``calibration.bias_track_min_interval_s``; see
:mod:`qkdnode.procedures.bias_tracking`) the transmitter picks a window of slots
``[start, stop)`` ahead of its state source, asks the receiver to drop its detections
there (link step ``skip``), withholds it from every block, waits for the window to
begin, runs the tracking step (and the re-measurement when the check asks for it), then
ends the window a little after the step: early (``skip_end``: the rest of it carries key
again), or later than planned if the step ran past its end (the rest withheld too). Key
flows around the window, and the window costs the key only the slots the step needed.
The first step after a calibration comes half a second into the exchange and its window
reaches back to the first key slot, so that no block uses light sent before the bias is
back on its optimum (the bias drifted since the calibration). A check that finds the
intensities (the key mixture's tap power, or any class from the bias offset
the step found) beyond their drift allowance, or a drift too fast for the shortest
interval, stops the exchange (alarm ``intensity_drift``; a new calibration follows). The
per-class state (offsets, interval) is the session's ``class_drift``: the 10 s tap-power
check attributes its readings to the bias with it. A block that announced a slot of a
window anyway (an extension the receiver had already cut past) is refused by the
transmitter's key-slot floor. Results are saved and published like every calibration's.

The receiver's dark counts are measured with the light off at every calibration
(:func:`~qkdnode.procedures.dark_rate.measure_dark_rate`, Poisson bounds) and, while key
flows, without any dark window: a light-off window of the seconds a count-rate reading
needs would leave the slot tracking without light that long. Instead the transmitter
counts, per sifted block, the detections in the slots it sent as the vacuum class and
the number of such slots (:mod:`~qkdnode.procedures.dark_inflight`: Garwood bounds, the
vacuum class's own light subtracted within bounds from the calibrated intensities and
the signal class's yield). Every ``calibration.dark_track_interval_s`` it estimates the
dark rate over the blocks of the last ``calibration.dark_track_window_s`` (none below
``calibration.dark_track_min_counts`` vacuum clicks), saves and publishes the result
(``dark_inflight``) and sends the rate to the receiver (link step ``dark``). The receiver
checks the value against its own click rate (a dark rate cannot exceed it) and refuses a
missing, non-finite, negative, disordered or too high one, keeping its floor; otherwise
the dark-count floor of its light-loss test moves into the interval (kept while the
interval holds it, else set to the nearer bound: as far as the counts demand), and alarm
``dark_count_rise`` is raised when the lower bound exceeds
``calibration.dark_rise_factor`` times its light-off calibration's upper bound (cleared
when it falls back or a calibration measures again).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import structlog

from drivers.interfaces import (
    IntensityModulator,
    OpticalPowerMeter,
    StateSource,
    VariableAttenuator,
)
from qkdnode.link import LinkError
from qkdnode.pair.core import SLOT_SLIP_QBER, S, SessionCore, StepSpec
from qkdnode.postproc.sifting import SiftingError
from qkdnode.statemachine import Event
from qkdnode.tracking import TrackingError, TrackingWindow

if TYPE_CHECKING:
    from qkdnode.postproc.blockstats import BlockStats
    from qkdnode.procedures.dark_inflight import LeakRatio
    from qkdnode.procedures.mean_photon_number import MeanPhotonResult

log = structlog.get_logger(__name__)

#: seconds of slots between the state source's next slot and a window's first slot
WINDOW_LEAD_S = 0.05
#: seconds before a refused window is asked for again
WINDOW_RETRY_S = 0.5
#: times the first window (reaching back to the first key slot) is asked for before an
#: ordinary one is (the receiver refuses it until its exchange is set up)
FIRST_WINDOW_TRIES = 6


class ScheduledMixin(SessionCore):
    """Calibration on a schedule while exchanging (module docstring)."""

    # ------------------------------------------------------------------ transmitter
    @contextlib.asynccontextmanager
    async def _withheld_window(
        self, seconds: float, from_slot: int | None = None
    ) -> AsyncIterator[list[int]]:
        """Transmitter: slots from a little ahead of the state source (or from
        ``from_slot`` when that is earlier: slots already sent, none of them in a block
        yet), up to ``seconds`` long, withheld from every block and dropped by the
        receiver; the body runs once the window has begun. The window ends a little after
        the body does: ended early, the rest of it is given back to the key (link step
        ``skip_end``); run past its end, the rest is withheld too. The yielded
        ``[start, stop)`` is the window as it ended once the body is done. Raises
        LinkError when the receiver refuses the window (nothing was changed yet)."""
        src: StateSource = self._one(StateSource)
        rate = self.cfg.source.slot_rate_hz
        lead = max(1, int(WINDOW_LEAD_S * rate))
        ahead = int(await self._call(src.next_slot)) + lead
        start = ahead if from_slot is None else min(int(from_slot), ahead)
        stop = ahead + max(1, int(seconds * rate))
        # Asked first: a refused window is not withheld (no block loses its slots). The
        # slots are still ahead of the state source: no block can hold them yet.
        await self.node.link.request("skip", 30.0, start_slot=start, stop_slot=stop)
        self.key_slots.withhold(start, stop)
        while int(await self._call(src.next_slot)) < start:
            await asyncio.sleep(0.005)
        window = [start, stop]
        try:
            yield window
        finally:
            # the light is back to its calibrated state from the state source's next slot
            end = int(await self._call(src.next_slot)) + lead
            if end > stop:
                # ran past the window: the rest is withheld too (a block the receiver cut
                # into it meanwhile is refused here, never keyed with these slots)
                self.key_slots.withhold(stop, end)
                window[1] = end
                try:
                    await self.node.link.request("skip", 30.0, start_slot=stop, stop_slot=end)
                except LinkError as exc:
                    log.warning("window_extension_refused", error=str(exc)[:200])
            elif end < stop:
                # ended early: the slots after it may carry key again (given back here
                # first, so that no block the receiver cuts past the end meanwhile is
                # refused); a receiver that refuses keeps dropping their detections, and
                # no block holds them
                try:
                    self.key_slots.shorten(start, stop, end)
                except SiftingError:
                    pass  # a block already spans the whole window: nothing to give back
                else:
                    window[1] = end
                    try:
                        await self.node.link.request(
                            "skip_end", 30.0, start_slot=start, stop_slot=stop, end_slot=end
                        )
                    except LinkError as exc:
                        log.info("window_end_refused", error=str(exc)[:200])

    async def _scheduled_bias_tracking(self) -> None:
        """Transmitter, while exchanging: a bias-tracking step and the intensity checks
        every ``calibration.bias_track_interval_s``, or the shorter interval the
        per-class check chose (never returns; off: only waits). A failed step is logged
        and the next one tried; a check beyond the drift allowance, or a drift too fast
        for the shortest interval, stops the exchange."""
        from qkdnode.procedures.bias_tracking import (
            BiasTrackingPoint,
            ClassDriftState,
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
        # the per-class check starts from the calibration: intervals measured with the
        # bias at its optimum, when they were measured (the drift since then counts)
        state = ClassDriftState(
            base_interval_s=cal.bias_track_interval_s,
            floor_interval_s=cal.bias_track_min_interval_s,
            walk_v_per_sqrt_s=cal.bias_track_walk_v_per_sqrt_s,
            last_time_s=self.intensities_at_s,
        )
        self.class_drift = state
        # The first step at once, its window reaching back to the first slot a block may
        # use: the bias may have drifted since the calibration, and no block then uses a
        # slot sent before the step put it back (the per-class check judges the offset
        # it leaves only). Refused FIRST_WINDOW_TRIES times (the receiver not set up yet,
        # a block cut already, a span over a minute): an ordinary window, and the check
        # takes the whole path since the calibration.
        wait_s = min(cal.bias_track_interval_s, WINDOW_RETRY_S)
        first: int | None = self.key_slots.floor
        first_tries = FIRST_WINDOW_TRIES
        while True:
            await asyncio.sleep(wait_s)
            # as the last step chose it (shorter while the bias moves a class quickly)
            wait_s = state.interval_s
            try:
                # no tap-power check while the bias is dithered
                async with (
                    self._im_lock,
                    self._withheld_window(cal.bias_track_window_s, first) as window,
                ):
                    state.unkeyed_since_last = first is not None
                    result = await track_bias(
                        tracker,
                        self.intensities,
                        probs,
                        allowance=cal.intensity_drift_allowance,
                        remeasure_at=cal.intensity_remeasure_at,
                        history=history,
                        started_at=started,
                        class_state=state,
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
                # encoder's tracking or the polarisation compensation; the first one may
                # come before the receiver's exchange is set up, or reach too far back):
                # soon again
                log.info("bias_tracking_window_refused", error=str(exc)[:200])
                wait_s = min(cal.bias_track_interval_s, WINDOW_RETRY_S)
                first_tries -= 1
                if first_tries <= 0:
                    first = None
                state.unkeyed_since_last = False
                continue
            except Exception as exc:  # instrument, fit: never ends the exchange
                log.warning(
                    "bias_tracking_step_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}"
                )
                first = None
                state.unkeyed_since_last = False
                continue
            first = None
            fields: dict[str, object] = {
                "bias_v": round(result.bias_after_v, 5),
                "offset_v": round(result.offset_v, 5),
                "power_ratio": None if result.power_ratio is None else round(result.power_ratio, 5),
                "action": result.action,
                "window_slots": window[1] - window[0],  # as it ended
            }
            pc = result.per_class
            if pc is not None:
                fields |= {
                    "class_change": [round(x, 5) for x in pc.class_change],
                    "worst_class": pc.worst_class,
                    "interval_s": round(pc.next_interval_s, 3),
                }
                # from the step's start (its window, readings and result took time)
                assert state.last_time_s is not None
                wait_s = max(0.0, pc.next_interval_s - (time.monotonic() - state.last_time_s))
            log.info("im_bias_tracked", **fields)
            state_dir = self.node.state_dir
            await asyncio.to_thread(save_result, result, state_dir, plot_bias_tracking)
            publish_result(result, self.node.publish)
            if remeasured is not None:
                from qkdnode.procedures.mean_photon_number import plot_mean_photon_number

                # the blocks from here on take the new intervals, measured with the bias
                # where this step left it (and the tap power the monitor compares with
                # is theirs)
                self.intensities = remeasured
                if result.per_class is not None:
                    state.reference_offset_v = result.per_class.offset_after_v
                state.tap_power_w = None
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
                message = result.message
                if result.mixture_action == "stop":
                    message += (
                        f" (tap power {100 * ((result.power_ratio or 0) - 1):+.1f} % from the "
                        f"calibrated, allowance {100 * cal.intensity_drift_allowance:.1f} %)"
                    )
                self.node.alarm("intensity_drift", message)
                self.node.stats.calibrated = False
                await self.node.trigger(Event.STOP, f"intensities drifted: {message}")
                return

    def _count_vacuum(
        self,
        block_id: int,
        block: BlockStats,
        pulses: int,
        floor_before: int,
        withheld: list[tuple[int, int]],
    ) -> None:
        """Transmitter, after a block: its vacuum- and signal-class detections and slots
        for the in-flight dark rate. The block spans the ``pulses`` slots up to the key-slot
        floor its claim set; the windows withheld in that span (``withheld``, as they were
        before the block) carried no block's detections and are not counted. A block whose
        bits came out random (the slot alignment slipped: its classes are noise) or whose
        span does not fit is left out."""
        from qkdnode.procedures.dark_inflight import VacuumCounts

        tracker = self._dark_tracker
        per_class = block.detections_per_class
        if tracker is None or per_class is None or len(per_class) != 3 or pulses <= 0:
            return
        if block.qber_x is None or block.qber_x >= SLOT_SLIP_QBER:
            return
        slots = counted_slots(pulses, self.key_slots.floor, floor_before, withheld)
        if slots is None:
            log.info("dark_block_skipped", block_id=block_id, reason="span does not fit")
            return
        st = self.settings
        tracker.add(
            VacuumCounts(
                block_id=block_id,
                finished_unix_s=time.time(),
                vacuum_slots=st.p_vacuum * slots,
                vacuum_detections=int(per_class[2]),
                signal_slots=st.p_signal * slots,
                signal_detections=int(per_class[0]),
            )
        )

    async def _scheduled_dark_tracking(self) -> None:
        """Transmitter, while exchanging: the in-flight dark rate every
        ``calibration.dark_track_interval_s`` (module docstring; never returns; off: only
        waits). Too few counts, a round that fails (an instrument's snapshot, the disk),
        or a receiver that refuses the value are logged and the next round tried: this
        never ends the exchange."""
        from qkdnode.procedures.dark_inflight import DarkTracker

        cal = self.cfg.calibration
        if cal.dark_track_interval_s <= 0:
            await asyncio.Event().wait()
        if self._dark_tracker is None:
            self._dark_tracker = DarkTracker(
                window_s=cal.dark_track_window_s,
                min_counts=cal.dark_track_min_counts,
                gate_rate_hz=self.cfg.source.slot_rate_hz,
            )
        tracker = self._dark_tracker
        tracker.clear()  # blocks of an earlier exchange may predate a calibration
        warned = False
        while True:
            await asyncio.sleep(cal.dark_track_interval_s)
            summary = self._rx_calibration_summary
            gate_ps = _finite(summary.get("gate_width_ps"))
            window_ps = _finite(self.rx_window_ps)
            if gate_ps is None or window_ps is None or gate_ps <= 0 or window_ps <= 0:
                if not warned:
                    warned = True
                    log.warning(
                        "dark_track_off",
                        reason="the receiver's gate width or acceptance window is not known",
                        gate_width_ps=gate_ps,
                        window_ps=window_ps,
                    )
                continue
            try:
                await self._dark_track_round(tracker, window_ps, gate_ps)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("dark_track_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")

    async def _dark_track_round(self, tracker: Any, window_ps: float, gate_ps: float) -> None:
        """One in-flight estimate with the receiver's acceptance window and gate (ps):
        sent to the receiver, saved and published (or logged as skipped below the
        minimum count)."""
        from qkdnode.procedures.common import (
            CalibrationError,
            publish_result,
            save_result,
            snapshot_instruments,
        )
        from qkdnode.procedures.dark_inflight import (
            DarkInflightResult,
            dark_rose,
            plot_dark_inflight,
        )

        m = self.intensities
        if m is None:
            return
        cal = self.cfg.calibration
        started = time.monotonic()
        acceptance = min(1.0, window_ps / gate_ps)
        try:
            ratio = leak_ratio(m)
            point = tracker.estimate(ratio, acceptance)
        except (CalibrationError, ValueError) as exc:
            log.info("dark_track_skipped", reason=str(exc)[:200])
            return
        log.info(
            "dark_rate_tracked",
            rate_hz=round(point.rate_hz, 3),
            lower_hz=round(point.lower_hz, 3),
            upper_hz=round(point.upper_hz, 3),
            vacuum_detections=point.vacuum_detections,
            blocks=point.blocks,
        )
        try:
            await self.node.link.request(
                "dark",
                30.0,
                rate_hz=point.rate_hz,
                lower_hz=point.lower_hz,
                upper_hz=point.upper_hz,
            )
        except LinkError as exc:
            log.warning("dark_rate_not_taken", error=str(exc)[:200])
        summary = self._rx_calibration_summary
        cal_upper = _finite(summary.get("dark_upper_hz"))
        instruments = [self._one(StateSource), self._one(IntensityModulator)]
        result = DarkInflightResult(
            confidence=tracker.confidence,
            gate_rate_hz=tracker.gate_rate_hz,
            acceptance_window_ps=window_ps,
            gate_width_ps=gate_ps,
            window_s=tracker.window_s,
            min_counts=tracker.min_counts,
            leak_ratio=ratio,
            latest=point,
            history=list(tracker.history),
            calibrated_rate_hz=_finite(summary.get("dark_rate_hz")),
            calibrated_lower_hz=_finite(summary.get("dark_lower_hz")),
            calibrated_upper_hz=cal_upper,
            rise_factor=cal.dark_rise_factor,
            risen=dark_rose(point.lower_hz, cal_upper, cal.dark_rise_factor),
            # the instruments are asked for their identity: off the event loop
            instruments=await asyncio.to_thread(snapshot_instruments, instruments),
        )
        result.duration_s = time.monotonic() - started
        await asyncio.to_thread(save_result, result, self.node.state_dir, plot_dark_inflight)
        publish_result(result, self.node.publish)

    # ------------------------------------------------------------------ receiver
    async def _step_skip(self, args: dict[str, Any]) -> dict[str, Any]:
        """Receiver, while exchanging: drop our detections in ``[start_slot, stop_slot)``
        (also those already collected): a window the transmitter withheld. A window that
        overlaps earlier ones is dropped whole (its uncovered parts added). Refused when
        it starts before the exchange's first slot, spans more than 60 s, or reaches into
        a block already cut."""
        self._drop_window(int(args["start_slot"]), int(args["stop_slot"]))
        return {}

    def _drop_window(self, start_slot: int, stop_slot: int) -> None:
        acc, window = self._exchange_window(start_slot, stop_slot)
        try:
            acc.exclude(window)
        except TrackingError as exc:
            raise LinkError(str(exc)) from exc

    async def _step_skip_end(self, args: dict[str, Any]) -> dict[str, Any]:
        """Receiver, while exchanging: the dropped window ``[start_slot, stop_slot)`` ends
        at ``end_slot`` instead (the transmitter's step ended early): detections from
        there on join the block again. Refused unless exactly that window was dropped
        (``skip``) and ``end_slot`` lies inside it."""
        acc = self._accumulator
        if acc is None or self.node.sm.state is not S.EXCHANGING:
            raise LinkError(f"not exchanging ({self.node.sm.state.value})")
        try:
            window = TrackingWindow(int(args["start_slot"]), int(args["stop_slot"]))
            acc.shorten(window, int(args["end_slot"]))
        except TrackingError as exc:
            raise LinkError(str(exc)) from exc
        return {}

    def _dark_measured(self, rate_hz: float, lower_hz: float, upper_hz: float) -> None:
        """Receiver: the light-off calibration's dark-count floor (total over the
        detectors, Hz), the reference of the in-flight values."""
        self.dark_rate_hz = rate_hz
        self.dark_calibrated = (rate_hz, lower_hz, upper_hz)
        log.info("dark_rate_measured", dark_rate_hz=round(rate_hz, 3), upper_hz=round(upper_hz, 3))

    async def _step_dark(self, args: dict[str, Any]) -> dict[str, Any]:
        """Receiver, while exchanging: the transmitter's in-flight dark rate (``rate_hz``,
        ``lower_hz``, ``upper_hz``) sets the light-loss test's floor: the floor in force
        is kept while the interval holds it, else moved to the nearer bound. Refused
        (LinkError, floor unchanged) when not exchanging or when the value is not a rate
        this receiver can have (:func:`parse_dark_report`)."""
        watch = self.light_watch
        if self.node.sm.state is not S.EXCHANGING or watch is None:
            raise LinkError(f"dark rate refused: not exchanging ({self.node.sm.state.value})")
        clicks_hz = watch.reference_rate_hz or self._locked_rate_hz
        try:
            rate, lower, upper = parse_dark_report(args, clicks_hz)
        except LinkError as exc:
            log.warning("dark_rate_refused", error=str(exc)[:200])
            raise
        # The floor moves only as far as the measurement demands: kept while the interval
        # holds it, else to the interval's nearer bound (a rise is followed by its lower
        # bound: a floor never set above what the counts show).
        floor = min(max(self.dark_rate_hz, lower), upper)
        watch.set_dark_rate(floor)
        self.dark_rate_hz = floor
        calibrated = self.dark_calibrated
        factor = self.cfg.calibration.dark_rise_factor
        cal_upper = calibrated[2] if calibrated is not None else None
        from qkdnode.procedures.dark_inflight import dark_rose

        risen = dark_rose(lower, cal_upper, factor)
        test = watch.test()
        sensitive = test.sensitive if test is not None else None
        fields = {
            "floor_hz": round(floor, 3),
            "dark_rate_hz": round(rate, 3),
            "lower_hz": round(lower, 3),
            "upper_hz": round(upper, 3),
            "calibrated_upper_hz": None if cal_upper is None else round(cal_upper, 3),
            "risen": risen,
            "sensitive": sensitive,
        }
        log.info("dark_floor_updated", **fields)
        self.node.publish("dark_rate", fields)
        if risen:
            assert cal_upper is not None
            self.node.alarm(
                "dark_count_rise",
                f"dark count rate at least {lower:.4g} Hz while key flows, above "
                f"{factor:g} x the light-off calibration's upper bound {cal_upper:.4g} Hz "
                "(detector warming? light leak?); the light-loss floor follows it"
                + ("" if sensitive is not False else ": the light-loss test is insensitive"),
            )
        else:
            self.node.alarms.clear("dark_count_rise", "in-flight dark rate back in range")
        return {"floor_hz": floor, "risen": risen, "sensitive": sensitive}

    # ------------------------------------------------------------------ link steps
    def _scheduled_steps(self) -> dict[str, StepSpec]:
        """``skip``: the receiver drops a window's detections; ``skip_end``: such a window
        ends early; ``dark``: the receiver takes the in-flight dark rate."""
        return {
            "skip": StepSpec(self._step_skip, ("receiver",)),
            "skip_end": StepSpec(self._step_skip_end, ("receiver",)),
            "dark": StepSpec(self._step_dark, ("receiver",)),
        }


def leak_ratio(m: MeanPhotonResult) -> LeakRatio:
    """``mu3 / mu_s`` from the intensity calibration's statistical intervals (the factor
    common to the classes cancels). A vacuum class below the meter's resolution has only
    an upper bound: its point value is taken half-way. ValueError without a signal."""
    from qkdnode.procedures.dark_inflight import LeakRatio

    (s_lo, s_hi), _, (v_lo, v_hi) = m.class_bounds()
    if m.signal.mu is None or not s_lo > 0:
        raise ValueError("the signal intensity is not measured")
    lower, upper = max(v_lo, 0.0) / s_hi, v_hi / s_lo
    if m.vacuum.mu is not None:
        point = min(max(m.vacuum.mu / m.signal.mu, lower), upper)
    else:
        point = 0.5 * (lower + upper)
    return LeakRatio(
        lower=lower,
        point=point,
        upper=upper,
    )


def counted_slots(
    pulses: int, floor_after: int, floor_before: int, withheld: list[tuple[int, int]]
) -> int | None:
    """The slots a block's detections could come from: the ``pulses`` slots up to
    ``floor_after`` (the key-slot floor its claim set: one past its last slot) less the
    withheld windows ``[a, b)`` in them. None when the span reaches below
    ``floor_before`` (the floor before the block: an announced span that does not fit)
    or nothing is left."""
    start = floor_after - pulses
    if pulses <= 0 or start < floor_before:
        return None
    lost = sum(max(0, min(b, floor_after) - max(a, start)) for a, b in withheld)
    slots = pulses - lost
    return slots if slots > 0 else None


def _finite(value: object) -> float | None:
    """A finite real number from a peer's reply, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def parse_dark_report(args: dict[str, Any], clicks_hz: float) -> tuple[float, float, float]:
    """``(rate_hz, lower_hz, upper_hz)`` of a ``dark`` request, or LinkError naming what is
    wrong: a missing or non-numeric field, a non-finite or negative value, bounds that do
    not enclose the rate, or a rate above ``clicks_hz``, the receiver's own click rate
    (dark counts are among its clicks; with no click rate known nothing is taken)."""
    out: list[float] = []
    for key in ("rate_hz", "lower_hz", "upper_hz"):
        value = args.get(key)
        x = _finite(value)
        if x is None or x < 0:
            raise LinkError(f"dark rate refused: {key} = {str(value)[:40]!r} is not a rate")
        out.append(x)
    rate, lower, upper = out
    if not lower <= rate <= upper:
        raise LinkError(
            f"dark rate refused: bounds [{lower:.4g}, {upper:.4g}] Hz do not enclose {rate:.4g} Hz"
        )
    if not (math.isfinite(clicks_hz) and clicks_hz > 0):
        raise LinkError("dark rate refused: no click rate of our own to check it against")
    if rate > clicks_hz:
        raise LinkError(
            f"dark rate refused: {rate:.4g} Hz is above our own click rate {clicks_hz:.4g} Hz"
        )
    return rate, lower, upper
