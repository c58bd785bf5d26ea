"""What each state does on each side of the link: calibration, synchronization, key exchange.

The transmitter drives the pair. Its state activities ask the receiver to follow with
:class:`qkdnode.link.LinkCoordinator` requests; the receiver's :meth:`ExchangeSession.serve`
moves its own state machine and runs its part. During key exchange the receiver paces the
blocks: it accumulates mapped detections and starts a block when it has enough; the
transmitter's exchange loop answers block after block.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import structlog

from drivers.interfaces import (
    DetectorStatus,
    Encoder,
    IntensityModulator,
    Laser,
    OpticalPowerMeter,
    SinglePhotonDetector,
    StateSource,
    TimeTagger,
    VariableAttenuator,
)
from qkdnode.context import NodeContext, PostprocTransport
from qkdnode.delivery.keyservice import KeyService
from qkdnode.keystore.ids import ID_SEED_BYTES
from qkdnode.lightloss import LightWatch, Verdict
from qkdnode.link import LinkError, LinkRequest
from qkdnode.log import bound_context
from qkdnode.postproc.optimize import Settings
from qkdnode.postproc.sifting import KeySlotFloor
from qkdnode.probe_wire import BYTES_PER_DETECTION, ProbeWireError, decode_probe, encode_probe
from qkdnode.statemachine import Event, State, StateMachine, TransitionRecord
from qkdnode.tracking import (
    DetectionAccumulator,
    TrackingError,
    TrackingWindow,
    lock_in_step,
    step_interval_s,
)

if TYPE_CHECKING:
    from qkdnode.procedures.encoder_v_pi import EncoderVPiResult, StateErrors
    from qkdnode.procedures.mean_photon_number import MeanPhotonResult

log = structlog.get_logger(__name__)
S = State


@dataclass(frozen=True)
class StepSpec:
    """One link step a node answers: its handler (request args -> reply result) and the
    roles that serve it."""

    handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
    roles: tuple[str, ...]


#: seconds between two checks of the transmitter's output power against its calibration
DRIFT_CHECK_S = 10.0
#: the smallest block the node forms (below it the finite-key terms leave nothing)
MIN_BLOCK_DETECTIONS = 10_000


class ExchangeSession:
    """State activities and the key store of one node."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self._steps = self._step_table()
        self.cfg = node.cfg
        self.role = node.cfg.node.role
        self.keystore: Any = None
        self.keys: KeyService | None = None
        self.auth_pool: Any = None
        self.tracker: Any = None  # receiver: procedures.sync.SlotTracker once locked
        self.exchange_from_slot = 0
        #: transmitter: the first slot a block may use, kept from our own state source
        self.key_slots = KeySlotFloor()
        self.next_block_id = 0
        #: Z- over X-basis error rate of the last good block (sizes the Cascade blocks)
        self.z_over_x_error_ratio: float | None = None
        self.qber_reference: float | None = None
        self._last_drift_check = 0.0
        self._drift_check: asyncio.Task[None] | None = None
        #: receiver: detections of the block being filled
        self._block_target = self.cfg.protocol.block_detections
        #: transmitter: block size advised to the receiver (None: nothing measured yet)
        self._advised_block: int | None = None
        self._advice_link: Any = None
        self._advice_task: asyncio.Task[None] | None = None
        #: transmitter: the intensities measured by the last calibration (with intervals)
        self.intensities: MeanPhotonResult | None = None
        #: transmitter: targets and probabilities in force (from [source] until the
        #: optimiser's advice is applied at a calibration, protocol.settings = "auto")
        src = self.cfg.source
        self.settings = Settings(
            src.mu_signal, src.mu_decoy, src.p_signal, src.p_decoy, src.p_basis_z
        )
        self._advised_settings: Settings | None = None
        #: transmitter: the encoder's measured V_pi (None until measured after lock)
        self.encoder_v_pi: EncoderVPiResult | None = None
        self._block_results: asyncio.Queue[dict[str, Any]] = asyncio.Queue(64)
        self._compensating: asyncio.Task[Any] | None = None
        #: transmitter: the encoder bias is being moved (compensation or drift tracking)
        self._bias_lock = asyncio.Lock()
        #: transmitter: detections per slot the receiver sees (from probes and blocks)
        self._detections_per_slot = 0.0
        #: receiver: the block being filled, minus drift-tracking windows (while exchanging)
        self._accumulator: DetectionAccumulator | None = None
        self._store_full = False  # the last block found the key store full
        #: receiver: clicks per second with the transmitter's light off (calibration)
        self.dark_rate_hz = 0.0
        #: receiver: the light-loss test on the tagger stream (while exchanging)
        self.light_watch: LightWatch | None = None
        self._warned_insensitive = False
        self.etsi: Any = None
        self._blocks_done: dict[int, asyncio.Event] = {}
        self._tx_transport: Any = None
        self._halts: set[asyncio.Future[None]] = set()
        self._locked_rate_hz = 0.0
        # Receiver: what the transmitter asked for and what we answered (link requests).
        self._rx_calibration_summary: dict[str, Any] = {}
        self._sync_request: dict[str, Any] = {}
        self._sync_summary: dict[str, Any] = {}
        self._sync_error = ""
        self._exchange_started = time.monotonic()
        self._last_erase = 0.0
        sm: StateMachine = node.sm
        sm.on_enter(S.CALIBRATING, self._enter_calibrating)
        sm.on_enter(S.SYNCHRONIZING, self._enter_synchronizing)
        sm.on_enter(S.EXCHANGING, self._enter_exchanging)
        sm.on_enter(S.FAULT, self._enter_fault)
        sm.on_enter(S.IDLE, self._enter_idle)

    # ------------------------------------------------------------------ life cycle
    async def open(self) -> None:
        from qkdnode.keystore.ids import link_id_for
        from qkdnode.keystore.store import KeyStore
        from qkdnode.postproc.auth import AuthKeyPool

        c = self.cfg
        state_dir = self.node.state_dir
        path = c.keystore.path if c.keystore.path.is_absolute() else state_dir / c.keystore.path
        self.keystore = await asyncio.to_thread(
            lambda: KeyStore.open(
                path,
                link_id=link_id_for(c.node.id, c.node.peer_id),
                side=self.role,
                key_ttl_s=c.keystore.key_ttl_s,
                max_key_count=c.keystore.max_key_count,
                compact_interval_s=c.keystore.compact_interval_s,
            )
        )
        self.next_block_id = self.keystore.last_block_id() + 1
        node = self.node
        self.keys = KeyService(
            self.keystore,
            node.link.request,
            lambda: node.peer is not None and node.peer.connected,
        )
        if c.delivery.enabled:
            from qkdnode.delivery.etsi import start_etsi_server

            self.etsi = await start_etsi_server(
                self.keys, c.delivery, key_size_bits=c.keystore.key_size_bits
            )
        pool_path = state_dir / "auth_pool.json"
        if pool_path.exists():
            self.auth_pool = await asyncio.to_thread(AuthKeyPool.load, pool_path)
        else:
            self.auth_pool = await asyncio.to_thread(
                AuthKeyPool.bootstrap,
                pool_path,
                self._auth_psk(),
                source=str(self.cfg.protocol.auth_psk_file or "the auth.psk credential"),
            )
        self.node.stats.auth_key_balance_bits = self._auth_balance_bits()

    def _auth_balance_bits(self) -> int:
        pool = self.auth_pool
        return int(8 * min(pool.available_bytes("t2r"), pool.available_bytes("r2t")))

    def _auth_psk(self) -> bytes:
        from qkdnode.paths import read_credential

        psk_file = self.cfg.protocol.auth_psk_file
        if psk_file is None and (self.cfg.simulation is not None and self.cfg.simulation.enabled):
            # A simulated link without a configured secret derives a PUBLIC one from the
            # link's node ids: fine for a simulation, worthless for security. Real nodes
            # must configure protocol.auth_psk_file or the auth.psk credential.
            import hashlib

            link = "~".join(sorted([self.cfg.node.id, self.cfg.node.peer_id]))
            log.warning("auth_psk_public_simulation_default", link=link)
            out = b""
            for i in range(1024):  # 64 KiB: enough one-time key for the first blocks
                out += hashlib.sha512(f"qkdnode-sim-psk:{link}:{i}".encode()).digest()
            return out
        return read_credential("auth.psk", psk_file)

    async def close(self) -> None:
        if self.etsi is not None:
            with contextlib.suppress(Exception):
                await self.etsi.stop()
        if self.keys is not None:
            await self.keys.close()
        if self.keystore is not None:
            await asyncio.to_thread(self.keystore.close)

    def keystore_counts(self) -> dict[str, int]:
        if self.keystore is None:
            return {}
        return dict(self.keystore.counts())

    # ------------------------------------------------------------------ instruments
    def _one(self, cls: type[Any]) -> Any:
        return self.node.hardware.one(cls)

    def _detectors(self) -> list[SinglePhotonDetector]:
        insts = self.node.hardware.instruments.values()
        return [i for i in insts if isinstance(i, SinglePhotonDetector)]

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def set_light(self, on: bool) -> None:
        """Transmitter: laser emission, modulator outputs and shutter together."""
        laser: Laser = self._one(Laser)
        voa: VariableAttenuator = self._one(VariableAttenuator)
        await self._call(laser.set_emission, on)
        for cls in (IntensityModulator, Encoder):
            await self._call(self._one(cls).set_output, on)
        await self._call(voa.set_shutter, on)

    # ------------------------------------------------------------------ link requests
    def _step_table(self) -> dict[str, StepSpec]:
        """The link steps this node answers (docs/protocol.md, "Link steps"): handler and
        the roles that serve it."""
        both = ("transmitter", "receiver")
        rx = ("receiver",)
        return {
            "state": StepSpec(self._step_state, both),
            "stop": StepSpec(self._step_stop, both),
            "halt": StepSpec(self._step_halt, both),
            "light": StepSpec(self._step_light, ("transmitter",)),
            "activate": StepSpec(lambda a: self._key_service().serve_activate(a), both),
            "release": StepSpec(lambda a: self._key_service().serve_release(a), both),
            "notice": StepSpec(lambda a: self._key_service().serve_notice(a), both),
            "keysync": StepSpec(self._step_keysync, both),
            "block": StepSpec(
                lambda a: self._serve_block(int(a["block_id"]), int(a.get("pulses", 0))), both
            ),
            "probe": StepSpec(lambda a: self._serve_probe(int(a["n"]), int(a["from_slot"])), both),
            "track": StepSpec(
                lambda a: self._serve_track(int(a["start_slot"]), int(a["stop_slot"])), both
            ),
            "commit": StepSpec(lambda a: self._peer_commit("commit", int(a["block_id"])), both),
            "discard": StepSpec(lambda a: self._peer_commit("discard", int(a["block_id"])), both),
            "calibrate": StepSpec(self._step_calibrate, rx),
            "sync": StepSpec(self._step_sync, rx),
            "sync_end": StepSpec(self._step_sync_end, rx),
            "exchange": StepSpec(self._step_exchange, rx),
        }

    async def serve(self, req: LinkRequest) -> dict[str, Any]:
        """Answer the peer's link request ``req`` from the step table; LinkError for a
        step this role does not serve (the peer gets the message)."""
        spec = self._steps.get(req.step)
        if spec is None:
            raise LinkError(f"unknown step {req.step!r}")
        if self.role not in spec.roles:
            raise LinkError(f"{req.step!r} is a {' or '.join(spec.roles)} step")
        return dict(await spec.handler(req.args))

    def _key_service(self) -> KeyService:
        if self.keys is None:
            raise LinkError("key store not open")
        return self.keys

    async def _step_state(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "state": self.node.sm.state.value,
            "producing": self.node.auto,
            "in_step": bool(self.keys is not None and self.keys.in_step),
        }

    async def _step_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        sm = self.node.sm
        if sm.state not in (S.IDLE, S.FAULT, S.SHUTDOWN, S.CONNECTING, S.OFFLINE):
            await self.node.trigger(Event.STOP, "peer asked to stop")
        return {"state": sm.state.value}

    async def _step_halt(self, args: dict[str, Any]) -> dict[str, Any]:
        # The receiver stopped (fault, lost lock): the pair must synchronize again.
        sm = self.node.sm
        self.node.stats.synchronized = False
        if sm.state in (S.CALIBRATING, S.SYNCHRONIZING, S.EXCHANGING):
            await self.node.trigger(Event.STOP, f"peer halted: {args.get('reason', '')}")
        return {"state": sm.state.value}

    async def _step_light(self, args: dict[str, Any]) -> dict[str, Any]:
        # Only while we calibrate (the receiver's dark-count measurement needs our
        # light off, then on again); at any other time the laser is ours alone.
        state = self.node.sm.state
        if state is not S.CALIBRATING:
            raise LinkError(f"'light' only while the transmitter calibrates ({state.value})")
        await self.set_light(bool(args.get("on", True)))
        return {}

    async def _step_keysync(self, args: dict[str, Any]) -> dict[str, Any]:
        mine = await self._key_service().serve_sync(args)
        return {
            "summary": mine.model_dump(mode="json"),
            "next_block_id": self.keystore.last_block_id() + 1,
        }

    async def _step_calibrate(self, args: dict[str, Any]) -> dict[str, Any]:
        sm = self.node.sm
        await sm.trigger(Event.CALIBRATE, "transmitter asked")
        await sm.wait_for(S.IDLE, S.FAULT, S.PAUSED, timeout_s=300)
        if not self.node.stats.calibrated:
            raise LinkError("receiver calibration failed")
        return self._rx_calibration_summary

    async def _step_sync(self, args: dict[str, Any]) -> dict[str, Any]:
        sm = self.node.sm
        self._sync_request = args
        await sm.trigger(Event.SYNC, "transmitter asked")
        await sm.wait_for(S.IDLE, S.FAULT, S.PAUSED, timeout_s=120)
        if self.tracker is None:
            raise LinkError(self._sync_error or "no lock")
        return self._sync_summary

    async def _step_sync_end(self, args: dict[str, Any]) -> dict[str, Any]:
        self.exchange_from_slot = int(args["exchange_from_slot"])
        self.node.stats.synchronized = True
        self.node.keyflow.synchronized()
        return {}

    async def _step_exchange(self, args: dict[str, Any]) -> dict[str, Any]:
        self.next_block_id = max(self.next_block_id, int(args.get("next_block_id", 0)))
        # Slots the transmitter disclosed since the synchronisation (probes) carry no key.
        self.exchange_from_slot = max(self.exchange_from_slot, int(args.get("first_slot", 0)))
        await self.node.sm.trigger(Event.EXCHANGE, "transmitter asked")
        return {"state": self.node.sm.state.value}

    def _progress(self, what: str, **fields: Any) -> None:
        """Telemetry topic ``progress``: a calibration step started, or how full the
        block being collected is (receiver, once a second)."""
        self.node.publish("progress", {"what": what, **fields})

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
            log.error("calibration_failed", error=str(exc))
            self.node.alarm("calibration_failed", str(exc))
            await self.node.trigger(Event.FAILED, f"calibration failed: {exc}")
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
                ),
            ),
            state_dir=self.node.state_dir,
            publish=self.node.publish,
        )
        self.intensities = mu
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
        from qkdnode.procedures.detector_timing import calibrate_detector_timing

        dets = self._detectors()
        for d in dets:
            await self._call(d.arm)
        await self._check_not_latched()
        tagger: TimeTagger = self._one(TimeTagger)
        self._progress("calibration", step="detector_timing", status="started")
        timing = await calibrate_detector_timing(
            dets,
            self.cfg.source.slot_rate_hz,
            state_dir=self.node.state_dir,
            publish=self.node.publish,
            wait_integration=self._integration_wait(tagger),
        )
        self.dark_rate_hz = await self._measure_dark_rate()
        self._rx_calibration_summary = {
            "detector_timing_ok": bool(timing.ok),
            "dark_rate_hz": self.dark_rate_hz,
        }

    async def _measure_dark_rate(self) -> float:
        """Receiver, while the transmitter calibrates: the detectors' total click rate
        with the transmitter's light off (the dark-count floor of the light-loss test).
        The light is switched on again whatever happens."""
        seconds = self.cfg.calibration.integration_time_s
        readings: list[float] = []
        try:
            await self.node.link.request("light", 30.0, on=False)
            # light still in flight (fiber, buffers) must not count as dark
            await asyncio.sleep(max(1.0, 4 * seconds))
            for _ in range(5):
                await asyncio.sleep(seconds)
                readings.append(sum([await self._call(d.count_rate_hz) for d in self._detectors()]))
        finally:
            await self.node.link.request("light", 30.0, on=True)
        dark = float(np.median(readings))
        log.info("dark_rate_measured", dark_rate_hz=round(dark, 3))
        return dark

    async def _check_not_latched(self) -> None:
        """Receiver: a detector latched by bright light is a fault, not a failed step."""
        from drivers.interfaces import DetectorStatus

        for d in self._detectors():
            if await self._call(d.status) is DetectorStatus.LATCHED:
                await self._fault("bright_light", f"{d.name} latched: bright light (blinding?)")
                raise LinkError(f"{d.name} latched by bright light")

    def _integration_wait(self, tagger: TimeTagger) -> Any:
        seconds = self.cfg.calibration.integration_time_s

        async def wait() -> None:
            await asyncio.sleep(seconds)

        return wait

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
            log.error("sync_failed", error=str(exc))
            self.node.alarm("sync_failed", str(exc))
            await self.node.trigger(Event.FAILED, f"synchronization failed: {exc}")
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
        await self._compensate(self._probe_qber)

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
        acc = self._accumulator
        if acc is None or self.node.sm.state is not S.EXCHANGING:
            raise LinkError(f"not exchanging ({self.node.sm.state.value})")
        max_slots = int(self.cfg.source.slot_rate_hz * 60)
        if not (self.exchange_from_slot <= start_slot and 0 < stop_slot - start_slot <= max_slots):
            raise LinkError(
                f"tracking window [{start_slot}, {stop_slot}) must start at or after slot "
                f"{self.exchange_from_slot} and span 1..{max_slots} slots"
            )
        try:
            done = acc.open_window(TrackingWindow(start_slot, stop_slot))
        except TrackingError as exc:
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

    # ------------------------------------------------------------------ key exchange
    async def _enter_exchanging(self, sm: StateMachine, rec: TransitionRecord) -> None:
        stats = self.node.stats
        started = time.monotonic()
        stats.exchange_started_at = started
        try:
            if self.role == "transmitter":
                await self.node.link.request(
                    "exchange",
                    30.0,
                    next_block_id=self.next_block_id,
                    first_slot=self.key_slots.floor,
                )
                await self._exchange_transmitter(started)
            else:
                await self._exchange_receiver(started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.node.stats.synchronized = False
            log.exception("exchange_failed", error=str(exc))
            self.node.alarm("exchange_failed", str(exc))
            await self.node.trigger(Event.FAILED, f"exchange failed: {exc}")
        finally:
            stats.exchange_seconds += time.monotonic() - started
            stats.exchange_started_at = None

    def _pp_transport(self) -> Any:
        assert self.node.peer is not None
        return PostprocTransport(self.node.peer, self.node.pp_inbox)

    def _pp_params(self) -> Any:
        """Post-processing parameters of the next block. The transmitter, which computes
        the key length, uses the intensities its calibration measured, each as an interval
        (the finite-key bound takes the worst case within it); never the targets. The
        receiver takes the key length from the transmitter's authenticated ``pa`` message
        and needs the intensities for nothing."""
        from qkdnode.postproc.params import PostprocParams

        proto, st = self.cfg.protocol, self.settings
        common = {
            "eps_sec": proto.eps_sec,
            "eps_cor": proto.eps_cor,
            "qber_abort": proto.qber_abort,
            "p_signal": st.p_signal,
            "p_decoy": st.p_decoy,
            "p_basis_z": st.p_basis_z,
        }
        if self.role == "receiver":
            return PostprocParams(mu_signal=st.mu_signal, mu_decoy=st.mu_decoy, **common)
        m = self.intensities
        if m is None or m.signal.mu is None or m.decoy.mu is None:
            raise LinkError("the intensities are not measured: calibrate first")
        (sl, su), (dl, du), (vl, vu) = m.class_bounds()
        c_lo, c_hi = m.common_scale()
        return PostprocParams(
            mu_signal=m.signal.mu,
            mu_decoy=m.decoy.mu,
            mu_vacuum=m.vacuum.mu_or_upper,
            mu_signal_lower=sl,
            mu_signal_upper=su,
            mu_decoy_lower=dl,
            mu_decoy_upper=du,
            mu_vacuum_lower=vl,
            mu_vacuum_upper=vu,
            mu_scale_lower=c_lo,
            mu_scale_upper=c_hi,
            **common,
        )

    async def _exchange_transmitter(self, started: float) -> None:
        """Transmitter: blocks are started by the receiver's ``block`` requests (served by
        :meth:`_serve_block`); this activity only keeps the state's lifetime."""
        from qkdnode.postproc.auth import AuthenticatedTransport

        self._tx_transport = AuthenticatedTransport(
            self._pp_transport(), self.auth_pool, "transmitter"
        )
        self._exchange_started = started
        await self._track_drift()

    async def _track_drift(self) -> None:
        """Transmitter, while exchanging: the lock-in of :mod:`qkdnode.tracking`, one step
        every ``tracking.interval_s`` (never returns; with 0 it only waits). A failed step
        is logged and the next one tried: tracking never stops key exchange."""
        cfg = self.cfg.tracking
        if cfg.interval_s <= 0:
            await asyncio.Event().wait()
        lead_s = 0.01
        slot_rate = self.cfg.source.slot_rate_hz
        max_n = (self.cfg.bus.max_control_frame_bytes - 1024) // BYTES_PER_DETECTION

        async def window(w: TrackingWindow) -> tuple[Any, Any]:
            # Withheld before the receiver is asked: no block may carry these slots.
            self.key_slots.withhold(w.start_slot, w.stop_slot)
            reply = await self.node.link.request(
                "track", 120.0, start_slot=w.start_slot, stop_slot=w.stop_slot
            )
            try:
                return decode_probe(reply, max_n)
            except ProbeWireError as exc:
                raise LinkError(str(exc)) from exc

        while True:
            rate_hz = self._detections_per_slot * slot_rate
            await asyncio.sleep(step_interval_s(cfg, rate_hz))
            if self._detections_per_slot <= 0:
                continue
            v_pi = (
                self.encoder_v_pi.bias_v_pi_v
                if self.encoder_v_pi is not None
                else self.cfg.calibration.encoder_v_pi_v
            )
            amp = self.encoder_v_pi.fit.amp if self.encoder_v_pi is not None else 1.0
            try:
                async with self._bias_lock:
                    step = await lock_in_step(
                        self._one(Encoder),
                        self._one(StateSource),
                        window,
                        cfg,
                        v_pi_v=v_pi,
                        amplitude=amp,
                        detections_per_slot=self._detections_per_slot,
                        lead_slots=int(lead_s * slot_rate),
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # instrument, link or tracking: never ends the exchange
                log.warning(
                    "drift_tracking_step_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}"
                )
                if "already cut" in str(exc):
                    lead_s = min(2 * lead_s, 2.0)
                continue
            if step is None:
                log.info("drift_tracking_skipped", reason="too few detections in a window")
                continue
            n_det = step.n_plus + step.n_minus
            fields = {
                "bias_v": round(step.bias_v, 5),
                "new_bias_v": round(step.new_bias_v, 5),
                "offset_v": round(step.offset_v, 5),
                "qber_plus": round(step.q_plus, 5),
                "qber_minus": round(step.q_minus, 5),
                "sifted": n_det,
            }
            log.info("drift_tracked", **fields)
            self.node.publish("tracking", fields)

    async def _serve_block(self, block_id: int, pulses: int) -> dict[str, Any]:
        """Transmitter: run block ``block_id`` that the receiver is starting now."""
        if self.node.sm.state is not S.EXCHANGING or self._tx_transport is None:
            raise LinkError(f"not exchanging (state {self.node.sm.state.value})")
        if block_id < self.next_block_id:
            raise LinkError(f"block {block_id} already used; next is {self.next_block_id}")
        self.next_block_id = block_id + 1
        task = self.node.sm.spawn(self._tx_block(block_id, pulses), f"block-{block_id}")
        ok: bool = await task
        reply: dict[str, Any] = {"ok": ok}
        if self._advised_block is not None:
            reply["next_block_detections"] = self._advised_block
        return reply

    async def _tx_block(self, block_id: int, pulses: int) -> bool:
        from qkdnode.postproc.pipeline import run_block_transmitter

        src: StateSource = self._one(StateSource)
        with bound_context(block_id=block_id):
            result = await run_block_transmitter(
                self._tx_transport,
                block_id,
                src.prepared,
                self._pp_params(),
                z_over_x_error_ratio=self.z_over_x_error_ratio,
                key_slots=self.key_slots,
            )
            qz, qx = result.stats.get("qber_z"), result.stats.get("qber_x")
            detections = result.stats.get("detections")
            if isinstance(detections, int) and detections > 0 and pulses > 0:
                self._detections_per_slot = detections / pulses
            if result.ok and qz is not None and qx:
                self.z_over_x_error_ratio = float(qz) / float(qx)
            await self._finish_block(block_id, result, self._exchange_started, pulses)
            if result.ok and self.cfg.protocol.block_size == "auto":
                self._advise(result.stats, pulses)
        return bool(result.ok)

    def _advise(self, block: dict[str, Any], pulses: int) -> None:
        """Transmitter: fit the link to the block just committed and, when it moved by more
        than 10 % (or on the first block), work out in a thread the block size the
        finite-key bound needs there and the settings that would serve it best. The size
        goes to the receiver with the next block's reply; the settings are logged and
        published as advice (applied at the next calibration)."""
        from qkdnode.postproc.linkfit import BlockObservation, LinkFitError, fit_link

        m = self.intensities
        per_class = block.get("detections_per_class")
        if m is None or not isinstance(per_class, list) or len(per_class) != 3:
            return
        src, st = self.cfg.source, self.settings
        try:
            link = fit_link(
                BlockObservation(
                    pulses=pulses,
                    detections_per_class=(int(per_class[0]), int(per_class[1]), int(per_class[2])),
                    mu=(m.signal.mu_or_upper, m.decoy.mu_or_upper, m.vacuum.mu_or_upper),
                    p_class=(st.p_signal, st.p_decoy, st.p_vacuum),
                    qber_z=float(block.get("qber_z") or block.get("qber_x") or 0.0),
                    rx_basis_z_fraction=float(block.get("rx_basis_z_fraction") or 0.5),
                    slot_rate_hz=src.slot_rate_hz,
                    ec_inefficiency=block.get("ec_efficiency"),
                )
            )
        except (LinkFitError, ValueError) as exc:
            log.warning("link_fit_failed", error=str(exc))
            return
        old = self._advice_link
        if (
            old is not None
            and abs(link.transmittance / old.transmittance - 1) < 0.1
            and abs(link.optical_error - old.optical_error) < 0.1 * max(old.optical_error, 1e-3)
        ):
            return
        if self._advice_task is not None and not self._advice_task.done():
            return
        self._advice_link = link
        self._advice_task = asyncio.get_running_loop().create_task(self._advice_for(link))

    async def _advice_for(self, link: Any) -> None:
        """Transmitter, in a thread: the block size the bound needs on ``link`` (sent to the
        receiver, capped at ``protocol.block_detections``) and the settings that maximise
        the finite-key rate of that block (applied at the next calibration with
        ``protocol.settings = "auto"``)."""
        from qkdnode.postproc.finitekey import Interval
        from qkdnode.postproc.optimize import (
            Detections,
            OptimizeError,
            SourceModel,
            expected_key,
            optimize_settings,
            required_block,
        )

        proto = self.cfg.protocol
        m = self.intensities
        vacuum = Interval(m.vacuum.lower, m.vacuum.upper) if m is not None else Interval.point(0.0)
        source = SourceModel(mu_vacuum=vacuum)
        try:
            advice = await asyncio.to_thread(required_block, link, fraction=0.9, source=source)
            block = Detections(min(advice.detections, proto.block_detections))
            best = await asyncio.to_thread(
                optimize_settings, link, block, source=source, start=self.settings
            )
            now = await asyncio.to_thread(expected_key, link, self.settings, block, source=source)
        except (OptimizeError, ValueError, ArithmeticError) as exc:
            # Advice only: the receiver keeps its block size, the settings stay.
            log.warning("block_advice_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._advised_block = int(block.count)
        st = best.settings
        if best.bits_per_pulse > 1.02 * now.bits_per_pulse:
            self._advised_settings = st
        log.info(
            "link_measured",
            transmittance=link.transmittance,
            background_per_pulse=link.background_per_pulse,
            optical_error=link.optical_error,
            needed_block_detections=int(advice.detections),
            advised_block_detections=self._advised_block,
            advised_mu_signal=round(st.mu_signal, 4),
            advised_mu_decoy=round(st.mu_decoy, 4),
            advised_p_signal=round(st.p_signal, 4),
            advised_p_decoy=round(st.p_decoy, 4),
            advised_p_basis_z=round(st.p_basis_z, 4),
            expected_bits_per_pulse_advised=best.bits_per_pulse,
            expected_bits_per_pulse_now=now.bits_per_pulse,
            applied_at_next_calibration=self._advised_settings is not None
            and proto.settings == "auto",
            seconds=round(advice.seconds, 3),
        )

    async def _exchange_receiver(self, started: float) -> None:
        from qkdnode.postproc.auth import AuthenticatedTransport
        from qkdnode.postproc.pipeline import run_block_receiver

        if self.tracker is None:
            raise LinkError("not synchronized")
        tagger: TimeTagger = self._one(TimeTagger)
        params = self._pp_params()
        transport = AuthenticatedTransport(self._pp_transport(), self.auth_pool, "receiver")
        # One block waits while one is processed: blocks are large (memory), and a block
        # queued longer than that would only grow stale.
        queue: asyncio.Queue[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]] = asyncio.Queue(1)
        self._locked_rate_hz = sum([await self._call(d.count_rate_hz) for d in self._detectors()])
        self._set_block_target(self._first_block_target())
        reader = asyncio.create_task(self._read_detections(tagger, queue))
        try:
            while True:
                slots, channels = await queue.get()
                block_id = self.next_block_id
                self.next_block_id = block_id + 1
                with bound_context(block_id=block_id):
                    # The transmitter learns of the block first; both number it the same.
                    pulses = int(slots[-1] - slots[0] + 1)
                    announce = asyncio.create_task(
                        self.node.link.request(
                            "block",
                            params.recv_timeout_s * 60,
                            block_id=block_id,
                            pulses=pulses,
                        )
                    )
                    try:
                        result = await run_block_receiver(
                            transport, block_id, slots, channels, params
                        )
                        await self._finish_block(block_id, result, started, pulses)
                        reply = await announce
                        advised = reply.get("next_block_detections") if reply else None
                        if isinstance(advised, int) and not isinstance(advised, bool):
                            self._set_block_target(advised)
                    except LinkError as exc:
                        log.warning("block_not_served", error=str(exc))
                        self.node.pp_drain()
                    finally:
                        if not announce.done():
                            announce.cancel()
                        await _settle(announce)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _read_detections(
        self,
        tagger: TimeTagger,
        out: asyncio.Queue[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]],
    ) -> None:
        """Receiver: tags -> (slot, channel) with tracking; hands out full blocks. Detections
        of drift-tracking windows are diverted on the way (:class:`DetectionAccumulator`)."""
        acc = self._accumulator = DetectionAccumulator()
        watch = self.light_watch = self._new_light_watch()
        last_progress = 0.0
        try:
            while True:
                block = await asyncio.to_thread(tagger.read_block, 0.5)
                if block is None:
                    continue
                if watch.add_block(len(block), block.start_ps, block.stop_ps) is Verdict.GONE:
                    # Not awaited: the fault cancels the exchange task that owns this one.
                    self._detached(self._fault("no_light", watch.explain()))
                    return
                if len(block) == 0:
                    continue
                mapped, status = await asyncio.to_thread(self.tracker.update, block.tags)
                if status.lost:
                    if await self._light_gone(tagger, watch):
                        self._detached(self._fault("no_light", watch.explain()))
                        return
                    self.node.alarm(
                        "lock_lost", "timing lock lost", in_window=status.in_window_fraction
                    )
                    self.tracker = None
                    self.node.stats.synchronized = False
                    self._halt_peer("lock lost")
                    self._detached(
                        self.node.trigger(Event.LOCK_LOST, "tracking lost the slot clock")
                    )
                    return
                keep = mapped.slot_index >= self.exchange_from_slot
                s = mapped.slot_index[keep]
                if s.size == 0:
                    continue
                acc.add(s.astype(np.int64), mapped.channel[keep])
                self.node.stats.detections_read += int(s.size)
                now = time.monotonic()
                if now - last_progress >= 1.0:
                    last_progress = now
                    self._progress(
                        "block",
                        block_id=self.next_block_id,
                        done=acc.have,
                        total=self._block_target,
                    )
                if acc.have >= self._block_target:
                    # Cut between slots: the clicks of one slot belong to one block (the
                    # transmitter refuses a slot that an earlier block announced).
                    full = await asyncio.to_thread(acc.cut, self._block_target)
                    if full is not None:
                        await out.put(full)
        finally:
            self._accumulator = None
            acc.close("the receiver stopped collecting detections")

    def _first_block_target(self) -> int:
        """Receiver: detections of the first block: ``protocol.block_detections``, but no
        more than ``protocol.max_block_seconds`` of light at the rate seen at the start.
        Later blocks follow the transmitter's advice (what the finite-key bound needs on
        the link the last block measured), within the same limits."""
        proto = self.cfg.protocol
        by_time = self._locked_rate_hz * proto.max_block_seconds
        return int(min(proto.block_detections, by_time)) if by_time > 0 else proto.block_detections

    def _set_block_target(self, detections: int) -> None:
        """Receiver: the size of the block being filled, clamped to our own limits."""
        proto = self.cfg.protocol
        by_time = self._locked_rate_hz * proto.max_block_seconds
        upper = min(proto.block_detections, by_time) if by_time > 0 else proto.block_detections
        target = int(max(MIN_BLOCK_DETECTIONS, min(int(detections), upper)))
        if proto.block_size == "fixed":
            target = proto.block_detections
        if target != self._block_target:
            log.info("block_size", detections=target, advised=int(detections))
        self._block_target = target
        self.node.stats.block_detections = target

    async def _finish_block(self, block_id: int, result: Any, started: float, pulses: int) -> None:
        """Book-keeping of one finished block: statistics, key store, telemetry, QBER watch.

        ``pulses`` is the number of slots the block's detections span (both nodes count
        the same: the receiver measures it and announces it with the block)."""
        from qkdnode.keystore.models import Provenance

        stats = self.node.stats
        summary = dict(result.stats)
        stats.sifted_bits += int(summary.get("sifted_z", 0)) + int(summary.get("sifted_x", 0))
        stats.pulses += pulses
        summary["pulses"] = pulses
        stats.detections += int(summary.get("detections", 0))
        qber = summary.get("qber_z")
        if qber is None:
            qber = summary.get("qber_x")
        if qber is not None:
            stats.qber = float(qber)
        stats.last_block = summary
        auth_bits = max(
            int(summary.get("auth_bits_sent", 0)), int(summary.get("auth_bits_received", 0))
        )
        self.node.keyflow.block_finished(
            bool(result.ok),
            result.abort_reason,
            float(qber) if qber is not None else None,
            auth_bits or None,
        )
        if not result.ok and self.role == "transmitter" and _slot_slip(summary):
            # Bits as random as coin flips: the slot clock slipped by whole slots (a clock
            # step of the receiver's tagger): every later block would abort the same way.
            message = (
                f"X-basis error rate {float(summary['qber_x']):.3f} on "
                f"{int(summary['sifted_x'])} bits: the slot alignment slipped (clock step?)"
            )
            log.warning("slot_alignment_lost", block_id=block_id, message=message)
            self.node.alarm("lock_lost", message)
            self.node.stats.synchronized = False
            self._detached(self._resynchronise(message))
        stored = False
        if result.ok:
            key = result.key_bytes
            size = self.cfg.keystore.key_size_bits
            if len(key) >= ID_SEED_BYTES + size // 8:
                prov = Provenance(
                    qber=float(qber or 0.0),
                    eps_sec=self.cfg.protocol.eps_sec,
                    eps_cor=self.cfg.protocol.eps_cor,
                )
                stored = await self._store_block(block_id, key, size, prov)
        if self.role == "receiver":
            self._block_event(block_id).set()
        else:
            await self._commit_pair(block_id, stored)
        if result.ok:
            stats.blocks_ok += 1
            stats.secret_bits += int(summary.get("final_key_bits", 0))
        else:
            stats.blocks_aborted += 1
        stats.auth_key_balance_bits = self._auth_balance_bits()
        metrics = self.node.metrics
        if metrics is not None:
            qb: dict[str, float] = {}
            if summary.get("qber_z") is not None:
                qb["Z"] = float(summary["qber_z"])
            if summary.get("qber_x") is not None:
                qb["X"] = float(summary["qber_x"])
            seconds = summary.get("seconds")
            stages = {
                str(k): float(v)
                for k, v in (seconds.items() if isinstance(seconds, dict) else ())
                if isinstance(v, int | float)
            }
            metrics.observe_block(
                {
                    "outcome": "ok" if result.ok else "aborted",
                    "qber": qb or None,
                    "sifted_bits": int(summary.get("sifted_z", 0))
                    + int(summary.get("sifted_x", 0)),
                    "secret_bits": int(summary.get("final_key_bits", 0)),
                    "disclosed_bits": int(summary.get("ec_disclosed_bits", 0)),
                    "duration_s": sum(stages.values()) or None,
                    "ec_efficiency": summary.get("ec_efficiency"),
                    "stage_durations_s": stages,
                }
            )
            metrics.set_auth_balance_bits(stats.auth_key_balance_bits)
        fields = {k: v for k, v in _scalars(summary).items() if k != "block_id"}
        log.info("block_summary", ok=bool(result.ok), reason=result.abort_reason, **fields)
        self.node.publish("block", {"block_id": block_id, "ok": bool(result.ok), **fields})
        if self.role == "transmitter" and qber is not None:
            await self._watch_qber(float(qber))

    def _block_event(self, block_id: int) -> asyncio.Event:
        ev = self._blocks_done.get(block_id)
        if ev is None:
            ev = self._blocks_done[block_id] = asyncio.Event()
            for old in [b for b in self._blocks_done if b < block_id - 16]:
                del self._blocks_done[old]
        return ev

    async def _store_block(self, block_id: int, key: bytes, size: int, prov: Any) -> bool:
        """Add a block's keys as PENDING; False (block dropped, exchange goes on) when the
        store is full because consumers are not taking keys, or cannot be written (disk
        full, I/O error: alarm ``keystore_write_error``). The two-phase commit then
        discards the block on both nodes, so the stores stay identical."""
        from qkdnode.keystore import StoreFullError

        try:
            await asyncio.to_thread(self.keystore.add_block, block_id, key, size, prov)
        except StoreFullError as exc:
            self.node.stats.blocks_dropped += 1
            log.warning("block_dropped_keystore_full", block_id=block_id, error=str(exc))
            self.node.alarm("keystore_full", f"key store full, blocks dropped: {exc}")
            self._store_full = True
            return False
        except (sqlite3.Error, OSError) as exc:
            self.node.stats.blocks_dropped += 1
            log.error("block_not_stored", block_id=block_id, error=str(exc)[:200])
            self.node.alarm(
                "keystore_write_error", f"block {block_id} not stored: {str(exc)[:200]}"
            )
            return False
        if self._store_full:
            log.info("keystore_has_room_again", block_id=block_id)
        self._store_full = False
        self.node.alarms.clear("keystore_full", "a block was stored")
        self.node.alarms.clear("keystore_write_error", "a block was stored")
        return True

    async def _commit_pair(self, block_id: int, stored: bool) -> None:
        """Transmitter: two-phase commit of a block's keys with the receiver.

        Keys become AVAILABLE on a node only once both nodes hold them durably: the
        receiver commits first (it answers only after its own copy is on disk), then we
        do. A crash in between is repaired by the key-ID sync on reconnect.
        """
        step: Literal["commit", "discard"] = "commit" if stored else "discard"
        try:
            reply = await self.node.link.request(step, 60.0, block_id=block_id)
        except LinkError as exc:
            log.warning("block_commit_unconfirmed", block_id=block_id, error=str(exc))
            # Stays PENDING here, perhaps committed there: no key is served on either node
            # until the key-ID sync (retried every few seconds) has settled the block.
            if self.keys is not None:
                self.keys.out_of_step(f"block {block_id} commit unconfirmed")
            return
        if stored and reply.get("committed"):
            await asyncio.to_thread(self.keystore.commit_block, block_id)
            self.node.keyflow.block_committed()
        elif stored:
            await asyncio.to_thread(self.keystore.discard_block, block_id)
            log.warning("block_discarded_peer_has_no_key", block_id=block_id)

    async def _peer_commit(self, step: str, block_id: int) -> dict[str, Any]:
        """Receiver: commit or discard ``block_id`` once our side of it has finished."""
        async with asyncio.timeout(60.0):
            await self._block_event(block_id).wait()
        info = await asyncio.to_thread(self.keystore.block_provenance, block_id)
        if info is None:
            return {"committed": False}
        if step == "commit":
            await asyncio.to_thread(self.keystore.commit_block, block_id)
            self.node.keyflow.block_committed()
            return {"committed": True}
        await asyncio.to_thread(self.keystore.discard_block, block_id)
        return {"committed": False}

    async def _watch_qber(self, qber: float) -> None:
        p = self.cfg.protocol
        if self.qber_reference is None or qber < self.qber_reference:
            self.qber_reference = qber
        with contextlib.suppress(asyncio.QueueFull):
            self._block_results.put_nowait({"qber": qber})
        if qber > p.qber_warning and (self._compensating is None or self._compensating.done()):
            self.node.alarm("qber_high", f"error rate {qber:.4f} above warning {p.qber_warning}")
            self._compensating = self.node.sm.spawn(self._compensate(), "encoding-compensation")

    async def _compensate(self, measure_qber: Any | None = None) -> None:
        """Transmitter: move the encoder bias to the error-rate minimum.

        ``measure_qber`` defaults to the error rate of the next complete key block
        (compensation during key exchange); before exchange, a disclosed probe is used.
        The drift tracking waits while this runs (one bias lock).
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
        try:
            async with asyncio.timeout(DRIFT_CHECK_S):
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
            return
        message = (
            f"tap power {reading:.4g} W is {100 * (ratio - 1):+.1f} % from the calibrated "
            f"{expected:.4g} W (allowance {100 * allowance:.1f} %)"
        )
        log.warning("intensity_drift", ratio=ratio, allowance=allowance)
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

    async def _fault(self, cause: str, message: str) -> None:
        self.node.alarm(cause, message)
        self._halt_peer(message)
        await self.node.trigger(Event.FAULT, message)

    async def _resynchronise(self, reason: str) -> None:
        """Transmitter: stop both nodes so that the supervisor synchronises the pair again
        (the receiver first; a stop it does not get leaves it to the pair watch)."""
        with contextlib.suppress(Exception):
            await self.node.link.request("stop", 10.0)
        await self.node.trigger(Event.STOP, reason)

    def _halt_peer(self, reason: str) -> None:
        """Receiver: tell the transmitter we stopped (best effort, not awaited)."""
        if self.role != "receiver":
            return

        async def halt() -> None:
            with contextlib.suppress(Exception):
                await self.node.link.request("halt", 10.0, reason=reason)

        self._detached(halt())

    def _detached(self, coro: Any) -> None:
        """Run ``coro`` as its own task, kept referenced until done (not owned by a state)."""
        task = asyncio.ensure_future(coro)
        self._halts.add(task)
        task.add_done_callback(self._halts.discard)

    async def _enter_fault(self, sm: StateMachine, rec: TransitionRecord) -> None:
        """Safe state now; then retry the instruments until the cause is gone."""
        self.node.stats.synchronized = False
        self.node.stats.calibrated = False
        self.tracker = None
        await asyncio.to_thread(self.node.hardware.make_safe)
        backoff_s = 2.0
        while True:
            await asyncio.sleep(backoff_s)
            try:
                await self.recover("automatic recovery")
                return
            except LinkError as exc:
                log.info("fault_persists", error=str(exc), retry_s=backoff_s)
                backoff_s = min(backoff_s * 2, 60.0)

    async def _enter_idle(self, sm: StateMachine, rec: TransitionRecord) -> None:
        if rec.old is S.CONNECTING and self.role == "transmitter":
            await self.key_sync_safely()
        if rec.old is S.EXCHANGING and self.role == "transmitter":
            with contextlib.suppress(LinkError):
                await self.node.link.request("stop", 10.0)

    async def recover(self, reason: str) -> None:
        """FAULT -> reconnect every instrument, clear latches -> CONNECTING (-> IDLE)."""
        for name, inst in self.node.hardware.instruments.items():
            try:
                await self._call(inst.close)
                await self._call(inst.connect)
                if isinstance(inst, SinglePhotonDetector):
                    await self._call(inst.reset_latch)
                    await self._call(inst.arm)
                    status = await self._call(inst.status)
                    await self._call(inst.disarm)
                    if status is not DetectorStatus.ARMED:
                        raise LinkError(f"detector {status.name} after reset (light still on?)")
            except Exception as exc:
                log.error("recover_failed", instrument=name, error=str(exc))
                raise LinkError(f"{name} still failing: {exc}") from None
        await self.node.sm.trigger(Event.RECOVER, reason)

    # ------------------------------------------------------------------ keys
    async def fetch_keys(self, number: int, size_bits: int, caller: str) -> dict[str, Any]:
        """Operator delivery (``keys.get``): keys issued to ``ctl:<caller>`` through the same
        activation as ETSI enc_keys (the peer reserves them for ``ctl:<peer id>``)."""
        import base64

        assert self.keys is not None
        keys = await self.keys.issue(
            f"ctl:{caller}", [f"ctl:{self.cfg.node.peer_id}"], number, size_bits
        )
        return {
            "keys": [
                {"key_ID": str(k.key_id), "key": base64.b64encode(k.key).decode()} for k in keys
            ]
        }

    async def keys_digest(self) -> dict[str, Any]:
        return dict(await asyncio.to_thread(self.keystore.digest))

    # ------------------------------------------------------------------ key-ID sync
    async def key_sync_safely(self) -> None:
        """:meth:`key_sync`, any failure logged (``key_sync_failed``): the peer gone, a
        summary refused, a store that cannot be written (disk full or failing). Delivery
        stays out of step and the node retries."""
        try:
            await self.key_sync()
        except Exception as exc:
            log.warning("key_sync_failed", error=f"{type(exc).__name__}: {exc}")

    async def key_sync(self) -> None:
        """Transmitter, on every (re)connect: exchange summaries, apply the reconciliation."""
        assert self.keys is not None
        await self.keys.sync()
        self.next_block_id = max(
            self.next_block_id,
            self.keystore.last_block_id() + 1,
            self.keys.peer_next_block_id,
        )
        log.info("key_sync_done", **self.keystore_counts())


#: A block whose X-basis error rate is at least this, on at least SLOT_SLIP_MIN_BITS bits,
#: has lost the slot alignment (random bits give 1/2; a full intercept-resend attack 1/4).
SLOT_SLIP_QBER = 0.35
SLOT_SLIP_MIN_BITS = 1000


def _slot_slip(summary: dict[str, Any]) -> bool:
    """Whether an aborted block's statistics say the slot alignment slipped."""
    qber_x, sifted_x = summary.get("qber_x"), summary.get("sifted_x")
    if not isinstance(qber_x, int | float) or not isinstance(sifted_x, int):
        return False
    return qber_x >= SLOT_SLIP_QBER and sifted_x >= SLOT_SLIP_MIN_BITS


async def _settle(task: asyncio.Task[Any]) -> None:
    """Wait for ``task`` to end, ignoring its outcome, but never swallow a cancellation of
    the caller itself (a state leaving must be able to stop the loop that calls this)."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        pass


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, bool | int | float | str) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, bool | int | float | str):
                    out[f"{k}_{k2}"] = v2
    return out


__all__ = ["ExchangeSession", "Path"]
