"""Monitoring while exchanging: QBER compensation, detector rates, intensity drift, the
light-loss test."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from typing import Any

import structlog

from drivers.interfaces import (
    Encoder,
    OpticalPowerMeter,
    TimeTagger,
)
from qkdnode.lightloss import LightWatch, Verdict
from qkdnode.pair.core import DRIFT_CHECK_S, S, SessionCore
from qkdnode.statemachine import Event

log = structlog.get_logger(__name__)


class MonitoringMixin(SessionCore):
    """Monitoring while exchanging: QBER compensation, detector rates, intensity drift,
    the light-loss test."""

    async def _watch_qber(self, qber: float) -> None:
        p = self.cfg.protocol
        if self.qber_reference is None or qber < self.qber_reference:
            self.qber_reference = qber
        with contextlib.suppress(asyncio.QueueFull):
            self._block_results.put_nowait({"qber": qber})
        if qber > p.qber_warning and (self._compensating is None or self._compensating.done()):
            self.node.alarm("qber_high", f"error rate {qber:.4f} above warning {p.qber_warning}")
            self._compensating = self.node.sm.spawn(self._compensate(), "encoding-compensation")

    async def _compensate(self, measure_qber: Any | None = None) -> Any:
        """Transmitter: move the encoder bias to the error-rate minimum.

        ``measure_qber`` defaults to the error rate of the next complete key block
        (compensation during key exchange); before exchange, a disclosed probe is used.
        The drift tracking waits while this runs (one bias lock). Returns the
        compensation's result (its ``final_qber``).
        """
        if measure_qber is None:
            while not self._block_results.empty():
                self._block_results.get_nowait()

            async def next_blocks() -> float:
                await self._block_results.get()  # a block that may predate the change
                return float((await self._block_results.get())["qber"])

            measure_qber = next_blocks
        async with self._bias_lock:
            result = await self._compensate_locked(measure_qber)
        log.info(
            "encoding_compensated",
            ok=result.ok,
            initial_qber=result.initial_qber,
            final_qber=result.final_qber,
        )
        if result.ok and (self.qber_reference is None or result.final_qber < self.qber_reference):
            self.qber_reference = result.final_qber
        if (
            self.node.sm.state is S.EXCHANGING
            and result.final_qber > self.cfg.protocol.qber_warning
        ):
            self.node.stats.calibrated = False
            await self.node.trigger(Event.QBER_HIGH, "compensation did not restore the QBER")
        return result

    async def _compensate_locked(self, measure_qber: Any) -> Any:
        from qkdnode.procedures.encoding_compensation import (
            EncodingCompensationConfig,
            compensate_encoding,
        )

        return await compensate_encoding(
            self._one(Encoder),
            measure_qber,
            self.qber_reference,
            EncodingCompensationConfig(
                v_pi_v=(
                    self.encoder_v_pi.bias_v_pi_v
                    if self.encoder_v_pi is not None
                    else self.cfg.calibration.encoder_v_pi_v
                )
            ),
            state_dir=self.node.state_dir,
            publish=self.node.publish,
        )

    # ------------------------------------------------------------------ monitoring, faults
    async def monitor_tick(self) -> None:
        """Receiver: count-rate and detector checks; both: recovery from FAULT."""
        sm = self.node.sm
        now = time.monotonic()
        if now - self._last_erase > self.cfg.keystore.erase_interval_s:
            self._last_erase = now
            try:
                erased = await asyncio.to_thread(self.keystore.erase_due)
            except (sqlite3.Error, OSError) as exc:
                # One alarm, not a traceback every sweep; the next good sweep clears it.
                self.node.alarm("keystore_write_error", f"key store upkeep failed: {exc}")
                erased = 0
            if erased:
                log.info("keys_erased", keys=erased)
            if self.node.metrics is not None:
                self.node.metrics.set_keystore(
                    self.keystore_counts(), self.cfg.keystore.max_key_count
                )
        if (
            self.role == "transmitter"
            and sm.state is S.EXCHANGING
            and now - self._last_drift_check >= DRIFT_CHECK_S
        ):
            self._last_drift_check = now
            if self._drift_check is None or self._drift_check.done():
                # Beside the monitor, never in it: a slow meter must not stall the watch.
                self._drift_check = asyncio.get_running_loop().create_task(
                    self._check_intensity_drift()
                )
        if self.role == "receiver" and sm.state is S.EXCHANGING:
            from drivers.interfaces import DetectorStatus

            dets = self._detectors()
            try:
                statuses = [await self._call(d.status) for d in dets]
                rates = [await self._call(d.count_rate_hz) for d in dets]
            except Exception as exc:
                await self._fault("instrument", f"detector unreachable: {exc}")
                return
            light: dict[str, Any] = {}
            test = self.light_watch.test() if self.light_watch is not None else None
            if test is not None:
                light = {
                    "reference_rate_hz": test.reference_rate_hz,
                    "floor_rate_hz": test.floor_rate_hz(),
                    "dark_rate_hz": test.dark_rate_hz,
                    "window_s": test.decision_window_s(),
                    "sensitive": test.sensitive,
                }
                if not test.sensitive and not self._warned_insensitive:
                    self._warned_insensitive = True
                    log.warning("light_loss_insensitive", **light)
            self.node.publish("rates", {"detector_count_rate_hz": rates, "light_loss": light})
            if self.node.metrics is not None:
                names = [n for n, i in self.node.hardware.instruments.items() if i in dets]
                self.node.metrics.set_detector_rates(dict(zip(names, rates, strict=True)))
            if any(s is DetectorStatus.LATCHED for s in statuses):
                await self._fault("bright_light", "detector latched: bright light (blinding?)")
                return

    async def _check_intensity_drift(self) -> None:
        """Transmitter, while exchanging: the power-meter tap sees the key mixture; its
        power must stay within ``calibration.intensity_drift_allowance`` of what the last
        calibration predicts, since the key length assumes the intensities stay in their
        intervals until the next calibration. Outside: alarm, and the exchange stops so
        that a new calibration (automatic with ``node.autostart``) re-measures them."""
        m = self.intensities
        if m is None:
            return
        st = self.settings
        expected = m.mix_power_w(st.p_signal, st.p_decoy, st.p_vacuum)
        from qkdnode.procedures.modulator import read_power

        meter: OpticalPowerMeter = self._one(OpticalPowerMeter)
        readings = 20
        if self._im_lock.locked():
            return  # the light is being measured or changed on purpose (bias tracking)
        try:
            async with asyncio.timeout(DRIFT_CHECK_S), self._im_lock:
                m = self.intensities or m  # as of now (a re-measurement replaces them)
                expected = m.mix_power_w(st.p_signal, st.p_decoy, st.p_vacuum)
                reading = float(await read_power(meter, readings, 0.0)) - m.zero_w
        except Exception as exc:
            log.warning("intensity_check_failed", error=str(exc))
            return
        if expected <= 0:
            return
        ratio = reading / expected
        # Meter noise of the mean of the readings, three standard errors.
        sigma = max(m.signal.tap_power_sigma_w, m.zero_noise_w / readings**0.5)
        noise = 3.0 * sigma / expected
        allowance = self.cfg.calibration.intensity_drift_allowance
        if abs(ratio - 1.0) <= allowance + noise:
            await self._check_class_drift(reading, expected, noise)
            return
        message = (
            f"tap power {reading:.4g} W is {100 * (ratio - 1):+.1f} % from the calibrated "
            f"{expected:.4g} W (allowance {100 * allowance:.1f} %)"
        )
        log.warning("intensity_drift", ratio=ratio, allowance=allowance)
        self.node.alarm("intensity_drift", message)
        self.node.stats.calibrated = False
        await self.node.trigger(Event.STOP, f"intensities drifted: {message}")

    async def _check_class_drift(self, reading_w: float, expected_w: float, noise: float) -> None:
        """Transmitter: the tap-power reading ``reading_w`` (W, zero subtracted; ``noise``
        its three standard errors relative to ``expected_w``, the calibration's mixture)
        attributed to the modulator's bias, class by class
        (:func:`~qkdnode.procedures.class_drift.attribute_mixture_change`): compared with
        the tap power right after the last tracking step (where that step saw the bias
        directly; a laser drift since is tiny) or, before one or after a re-measurement,
        with the calibration's mixture. An offset that explains it and moves a class
        beyond its own allowance, the one the finite-key bound widens its interval by
        (``calibration.signal_drift_allowance``, ``decoy_drift_allowance``, the vacuum's
        rise against ``vacuum_drift_allowance``): alarm ``intensity_drift``
        and stop, like the mixture check.
        Where the mixture is insensitive to the bias the attribution says so (logged) and
        the tracking steps decide. Nothing before the first tracking step."""
        from qkdnode.procedures.bias_tracking import attribute_tap_reading, class_fractions
        from qkdnode.procedures.class_drift import CLASS_NAMES

        state = self.class_drift
        if state is None:
            return
        attr = attribute_tap_reading(state, reading_w, expected_w, noise, self.intensities)
        if attr is None:
            return
        if not attr.conditioned or attr.class_change is None or attr.offset_v is None:
            log.debug("intensity_class_check_undecided", explanation=attr.explanation)
            return
        ch = attr.class_change
        fractions = class_fractions(state, self.intensities, ch)
        k = max(range(3), key=lambda i: fractions[i])
        if fractions[k] <= 1.0 or self.node.sm.state is not S.EXCHANGING:
            return
        message = (
            f"tap power {100 * attr.mixture_change:+.2f} % since the last bias tracking step, "
            f"attributed to the modulator's bias ({1e3 * attr.offset_v:+.1f} mV from its "
            f"optimum), moves the {CLASS_NAMES[k]} class by "
            f"{100 * ch[k]:+.1f} % ({100 * fractions[k]:.0f} % of its allowance)"
        )
        log.warning(
            "intensity_class_drift",
            offset_v=attr.offset_v,
            class_change=attr.class_change,
            worst_fraction=fractions[k],
        )
        self.node.alarm("intensity_drift", message)
        self.node.stats.calibrated = False
        await self.node.trigger(Event.STOP, f"intensities drifted: {message}")

    def detection_rate_hz(self) -> float:
        """Total click rate at the receiver (0 if unknown): the receiver's reading when
        the exchange started; the transmitter's estimate from the probes and blocks."""
        if self.role == "transmitter":
            return self._detections_per_slot * self.cfg.source.slot_rate_hz
        return self._locked_rate_hz

    def _new_light_watch(self) -> LightWatch:
        a = self.cfg.alarms
        return LightWatch(
            reference_rate_hz=self._locked_rate_hz,
            dark_rate_hz=self.dark_rate_hz,
            fade_floor=a.no_light_fade_floor,
            false_alarm_probability=a.no_light_false_alarm_probability,
            window_s=a.no_light_window_s,
            confirm_windows=a.no_light_confirm_windows,
        )

    async def _light_gone(self, tagger: TimeTagger, watch: LightWatch) -> bool:
        """Receiver, when the slot tracking lost the clock: is the light gone (FAULT), or
        only the lock (synchronise again)? The tagger stream goes on being counted until
        the light-loss test confirms the light gone (True) or decides a window with
        light in it (False). A test still learning its reference rate, or a stream that
        delivers nothing for the confirmation time, means the lock only: counts that do
        not arrive are not counted as dark."""
        test = watch.test()
        if test is None:
            return False
        window_s = test.decision_window_s()
        deadline = time.monotonic() + window_s * (watch.confirm_windows + 2) + 5.0
        watch.restart_window()
        decided = watch.windows_decided
        while time.monotonic() < deadline:
            block = await asyncio.to_thread(tagger.read_block, 0.5)
            if block is None:
                continue
            if watch.add_block(len(block), block.start_ps, block.stop_ps) is Verdict.GONE:
                return True
            if watch.windows_decided > decided and watch.dark_windows == 0:
                return False
        return False
