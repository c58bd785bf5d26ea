"""Calibration of both sides: the transmitter's modulators and intensities, the
receiver's detector timing and dark counts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any

import structlog

from drivers.errors import NotSupportedError
from drivers.interfaces import (
    DetectorStatus,
    IntensityModulator,
    Laser,
    OpticalPowerMeter,
    StateSource,
    TimeTagger,
    VariableAttenuator,
)
from qkdnode.link import LinkError
from qkdnode.pair.core import S, SessionCore, StepSpec
from qkdnode.statemachine import Event, StateMachine, TransitionRecord

log = structlog.get_logger(__name__)


class CalibrationMixin(SessionCore):
    """Calibration of both sides: the transmitter's modulators and intensities, the
    receiver's detector timing and dark counts."""

    # ------------------------------------------------------------------ calibration
    async def _enter_calibrating(self, sm: StateMachine, rec: TransitionRecord) -> None:
        self.node.stats.synchronized = False  # new detector delays: the lock must be redone
        try:
            if self.role == "transmitter":
                await self._calibrate_transmitter()
            else:
                await self._calibrate_receiver()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.node.stats.calibrated = False
            await self._activity_failed("calibration_failed", "calibration", exc)
            return
        self.node.stats.calibrated = True
        self.node.keyflow.calibrated()
        await self.node.trigger(Event.CALIBRATED, "calibration complete")

    async def _calibrate_transmitter(self) -> None:
        from qkdnode.procedures.mean_photon_number import (
            IntensityUncertainty,
            MeanPhotonConfig,
            calibrate_mean_photon_number,
        )
        from qkdnode.procedures.modulator import calibrate_modulator

        src, cal = self.cfg.source, self.cfg.calibration
        laser: Laser = self._one(Laser)
        im: IntensityModulator = self._one(IntensityModulator)
        voa: VariableAttenuator = self._one(VariableAttenuator)
        meter: OpticalPowerMeter = self._one(OpticalPowerMeter)
        if self._advised_settings is not None and self.cfg.protocol.settings == "auto":
            old = self.settings
            self.settings, self._advised_settings = self._advised_settings, None
            log.info(
                "settings_applied",
                **{f"{k}_from": round(v, 4) for k, v in asdict(old).items()},
                **{k: round(v, 4) for k, v in asdict(self.settings).items()},
            )
        st = self.settings
        stsrc: StateSource = self._one(StateSource)
        first = await self._call(
            stsrc.set_class_probabilities, st.p_signal, st.p_decoy, st.p_basis_z
        )
        # No block may mix states drawn with different probabilities.
        self.key_slots.key_states_from(int(first))
        await self._call(laser.set_wavelength_nm, src.wavelength_nm)
        await self.set_light(True)
        self._progress("calibration", step="modulator_transfer", status="started")
        mod = await calibrate_modulator(
            im, meter, state_dir=self.node.state_dir, publish=self.node.publish
        )
        self._progress("calibration", step="mean_photon_number", status="started")
        mu = await calibrate_mean_photon_number(
            laser,
            im,
            voa,
            meter,
            mod,
            mu_signal=st.mu_signal,
            mu_decoy=st.mu_decoy,
            slot_rate_hz=src.slot_rate_hz,
            cfg=MeanPhotonConfig(
                tap_to_output_db=cal.tap_to_output_db,
                uncertainty=IntensityUncertainty(
                    tap_to_output_uncertainty_db=cal.tap_to_output_uncertainty_db,
                    meter_uncertainty=cal.power_meter_uncertainty,
                    drift_allowance=cal.intensity_drift_allowance,
                    signal_drift_allowance=cal.signal_drift_allowance,
                    decoy_drift_allowance=cal.decoy_drift_allowance,
                    vacuum_drift_allowance=cal.vacuum_drift_allowance,
                ),
            ),
            state_dir=self.node.state_dir,
            publish=self.node.publish,
        )
        self.intensities = mu
        self.modulator = mod
        self.class_drift = None  # the next tracking starts from the new calibration
        self.intensities_at_s = time.monotonic()
        self.encoder_v_pi = None  # measured again once the pair is locked
        log.info(
            "transmitter_calibrated",
            im_v_pi=mod.drive_fit.v_pi_v,
            mu_signal=mu.signal.mu,
            mu_decoy=mu.decoy.mu,
            mu_vacuum_upper=mu.vacuum.upper,
        )
        # The receiver calibrates its detectors with our light on.
        await self.set_light(True)
        self._progress("calibration", step="receiver_detector_timing", status="started")
        self._rx_calibration_summary = await self.node.link.request("calibrate", 300.0)

    async def _calibrate_receiver(self) -> None:
        from qkdnode.procedures.detector_timing import (
            DetectorTimingConfig,
            calibrate_detector_timing,
        )

        dets = self._detectors()
        for d in dets:
            await self._call(d.arm)
        await self._check_not_latched()
        tagger: TimeTagger = self._one(TimeTagger)
        counting_s = await self._counting_time_s()
        self._progress("calibration", step="detector_timing", status="started")
        timing = await calibrate_detector_timing(
            dets,
            self.cfg.source.slot_rate_hz,
            DetectorTimingConfig(reading_time_s=counting_s),
            state_dir=self.node.state_dir,
            publish=self.node.publish,
            wait_integration=self._integration_wait(tagger, counting_s),
        )
        if not timing.ok:
            # A detector whose gate is not on the pulses clicks on dark counts only (on a
            # satellite pass at its rise, say, with too few counts to fit): exchanging
            # with it would lose its basis. Calibration fails and is tried again.
            raise LinkError(f"detector timing: {timing.message}")
        self.dark_rate_hz = await self._measure_dark_rate(counting_s)
        assert self.dark_calibrated is not None
        _, dark_lower, dark_upper = self.dark_calibrated
        # the light-off values: what the transmitter's in-flight dark rate is shown against
        self._rx_calibration_summary = {
            "detector_timing_ok": bool(timing.ok),
            "dark_rate_hz": self.dark_rate_hz,
            "dark_lower_hz": dark_lower,
            "dark_upper_hz": dark_upper,
            "gate_width_ps": await self._gate_width_ps(),
        }

    async def _counting_time_s(self) -> float | None:
        """Receiver: the shortest counting time behind the detectors' count-rate readings
        (s), or None when a detector does not state it (the calibrations then take the
        readings' scatter, or the wait between them, as their counting time)."""
        times = []
        for d in self._detectors():
            try:
                times.append(float(await self._call(d.count_integration_s)))
            except NotSupportedError:
                return None
        return min(times) if times else None

    async def _gate_width_ps(self) -> float | None:
        """Receiver: the detectors' sensitive time per slot (ps): the config's
        ``calibration.detector_gate_width_ns``, else the widest gate the detectors report,
        else None (a driver that cannot tell; the in-flight dark rate is then off)."""
        configured = self.cfg.calibration.detector_gate_width_ns
        if configured is not None:
            return configured * 1e3
        widths: list[float] = []
        for d in self._detectors():
            try:
                widths.append(float(await self._call(d.gate_width_ns)) * 1e3)
            except Exception as exc:  # NotSupportedError, an instrument error: not known
                log.info("gate_width_unknown", detector=d.name, error=str(exc)[:200])
                return None
        return max(widths) if widths and all(w > 0 for w in widths) else None

    async def _measure_dark_rate(self, counting_s: float | None) -> float:
        """Receiver, while the transmitter calibrates: the detectors' total click rate
        with the transmitter's light off (the dark-count floor of the light-loss test).
        Each reading counts for the detectors' own counting time ``counting_s`` (Poisson
        bounds of the counts actually behind them), taken at least that far apart. The
        light is switched on again whatever happens."""
        from qkdnode.procedures.dark_rate import measure_dark_rate

        seconds = max(self.cfg.calibration.integration_time_s, counting_s or 0.0)
        try:
            await self.node.link.request("light", 30.0, on=False)
            # light still in flight (fiber, buffers) must not count as dark
            await asyncio.sleep(max(1.0, 4 * seconds))
            result = await measure_dark_rate(
                self._detectors(),
                integration_s=seconds,
                reading_time_s=counting_s,
                readings=5,
                state_dir=self.node.state_dir,
                publish=self.node.publish,
            )
        finally:
            await self.node.link.request("light", 30.0, on=True)
        self._dark_measured(result.total_rate_hz, result.total_lower_hz, result.total_upper_hz)
        return result.total_rate_hz

    async def _check_not_latched(self) -> None:
        """Receiver: a detector latched by bright light is a fault, not a failed step."""

        for d in self._detectors():
            if await self._call(d.status) is DetectorStatus.LATCHED:
                await self._fault("bright_light", f"{d.name} latched: bright light (blinding?)")
                raise LinkError(f"{d.name} latched by bright light")

    def _integration_wait(self, tagger: TimeTagger, counting_s: float | None = None) -> Any:
        """The wait before each reading of a scan: ``calibration.integration_time_s``, at
        least the detectors' counting time (a reading never mixes two settings)."""
        seconds = max(self.cfg.calibration.integration_time_s, counting_s or 0.0)

        async def wait() -> None:
            await asyncio.sleep(seconds)

        return wait

    # ------------------------------------------------------------------ link steps
    def _calibration_steps(self) -> dict[str, StepSpec]:
        """The calibration's link steps: ``light`` (the transmitter's laser while it
        calibrates) and ``calibrate`` (the receiver's half)."""
        return {
            "light": StepSpec(self._step_light, ("transmitter",)),
            "calibrate": StepSpec(self._step_calibrate, ("receiver",)),
        }

    async def _step_light(self, args: dict[str, Any]) -> dict[str, Any]:
        # Only while we calibrate (the receiver's dark-count measurement needs our
        # light off, then on again); at any other time the laser is ours alone.
        state = self.node.sm.state
        if state is not S.CALIBRATING:
            raise LinkError(f"'light' only while the transmitter calibrates ({state.value})")
        await self.set_light(bool(args.get("on", True)))
        return {}

    async def _step_calibrate(self, args: dict[str, Any]) -> dict[str, Any]:
        sm = self.node.sm
        await sm.trigger(Event.CALIBRATE, "transmitter asked")
        await sm.wait_for(S.IDLE, S.FAULT, S.PAUSED, S.AWAITING_PASS, timeout_s=300)
        if not self.node.stats.calibrated:
            raise LinkError("receiver calibration failed")
        return self._rx_calibration_summary
