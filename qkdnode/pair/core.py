"""The state and services every pair activity shares: key store and key service, the
authentication pool, instruments, faults and recovery, key delivery calls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from drivers.interfaces import (
    DetectorStatus,
    Encoder,
    IntensityModulator,
    Laser,
    SinglePhotonDetector,
    TimeTagger,
    VariableAttenuator,
)
from qkdnode.backoff import Backoff
from qkdnode.context import NodeContext
from qkdnode.delivery.keyservice import KeyService
from qkdnode.doppler import DopplerCorrectedTagger, TofPrediction
from qkdnode.lightloss import LightWatch
from qkdnode.link import LinkError
from qkdnode.pair.passes import PassTally
from qkdnode.postproc.blockstats import BlockStats
from qkdnode.postproc.optimize import Settings
from qkdnode.postproc.sifting import KeySlotFloor
from qkdnode.statemachine import Event, State, StateMachine, TransitionRecord
from qkdnode.tracking import (
    DetectionAccumulator,
    TrackingWindow,
)

if TYPE_CHECKING:
    from qkdnode.postproc.pipeline import BlockResult, KeyLanding
    from qkdnode.procedures.bias_tracking import ClassDriftState
    from qkdnode.procedures.encoder_v_pi import EncoderVPiResult
    from qkdnode.procedures.mean_photon_number import MeanPhotonResult
    from qkdnode.procedures.modulator import ModulatorResult

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


class SessionCore:
    """State and services of one node's pair activities (see :mod:`qkdnode.pair`)."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node
        self._steps = self._step_table()
        self.cfg = node.cfg
        self.role = node.cfg.node.role
        self.keystore: Any = None
        self.keys: KeyService | None = None
        self.auth_pool: Any = None
        self.tracker: Any = None  # receiver: procedures.sync_tracking.SlotTracker once locked
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
        # receiver, a link with pass windows: the blocks of the pass being exchanged
        self._pass: PassTally | None = None
        self._pass_dropped: str | None = None
        #: held by the transmitter while it serves a block
        self._tx_block_lock = asyncio.Lock()
        self._tof_prediction = _tof_prediction(self.cfg) if self.role == "receiver" else None
        self._doppler_tagger: DopplerCorrectedTagger | None = None
        #: transmitter: block size advised to the receiver (None: nothing measured yet)
        self._advised_block: int | None = None
        self._advice_link: Any = None
        self._advice_task: asyncio.Task[None] | None = None
        #: transmitter: the intensities measured by the last calibration (with intervals)
        self.intensities: MeanPhotonResult | None = None
        #: transmitter: the intensity modulator's last calibration (its bias tracking's
        #: model)
        self.modulator: ModulatorResult | None = None
        #: transmitter: what the per-class intensity check carries between tracking
        #: steps (bias offsets, interval; procedures.bias_tracking.ClassDriftState), set
        #: by the scheduled tracking, None until its first step after a calibration
        self.class_drift: ClassDriftState | None = None
        #: transmitter: time.monotonic() when the intensities in use were measured at the
        #: last calibration (the bias was at its optimum then)
        self.intensities_at_s: float | None = None
        #: transmitter: held while the tap power is read or the light changed for a
        #: measurement (bias tracking, re-measurement, tap-power check)
        self._im_lock = asyncio.Lock()
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
        #: receiver: clicks per second with the transmitter's light off (calibration),
        #: then the in-flight value from the vacuum class (pair/scheduled.py): the floor
        #: of the light-loss test
        self.dark_rate_hz = 0.0
        #: receiver: the light-off calibration's dark rate (rate, lower, upper; Hz)
        self.dark_calibrated: tuple[float, float, float] | None = None
        #: transmitter: the vacuum class's clicks of recent blocks (pair/scheduled.py;
        #: a procedures.dark_inflight.DarkTracker once the tracking runs)
        self._dark_tracker: Any = None
        #: transmitter: the receiver's acceptance window (full width, ps) of the last sync
        self.rx_window_ps: float | None = None
        #: receiver: the light-loss test on the tagger stream (while exchanging)
        self.light_watch: LightWatch | None = None
        self._warned_insensitive = False
        self.etsi: Any = None
        self._tx_transport: Any = None
        #: where each block's keys go (set by the combined session: the key store)
        self._landing: KeyLanding | None = None
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
            peer_kme_id=c.delivery.peer_kme_id,
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
    def _exchange_window(
        self, start_slot: int, stop_slot: int
    ) -> tuple[DetectionAccumulator, TrackingWindow]:
        """Receiver: the detection accumulator and the window ``[start_slot, stop_slot)``
        a peer's ``track`` or ``skip`` names. LinkError when not exchanging, or when the
        window starts before the exchange's first slot or spans more than 60 s of slots."""
        acc = self._accumulator
        if acc is None or self.node.sm.state is not S.EXCHANGING:
            raise LinkError(f"not exchanging ({self.node.sm.state.value})")
        max_slots = int(self.cfg.source.slot_rate_hz * 60)
        if not (self.exchange_from_slot <= start_slot and 0 < stop_slot - start_slot <= max_slots):
            raise LinkError(
                f"window [{start_slot}, {stop_slot}) must start at or after slot "
                f"{self.exchange_from_slot} and span 1..{max_slots} slots"
            )
        return acc, TrackingWindow(start_slot, stop_slot)

    def _one(self, cls: type[Any]) -> Any:
        inst = self.node.hardware.one(cls)
        if cls is TimeTagger and self._tof_prediction is not None:
            # a satellite's ground station: the predicted time of flight removed
            if self._doppler_tagger is None or self._doppler_tagger._tagger is not inst:
                self._doppler_tagger = DopplerCorrectedTagger(inst, self._tof_prediction)
            return self._doppler_tagger
        return inst

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

    def _progress(self, what: str, **fields: Any) -> None:
        """Telemetry topic ``progress``: a calibration step started, or how full the
        block being collected is (receiver, once a second)."""
        self.node.publish("progress", {"what": what, **fields})

    async def _activity_failed(
        self, alarm: str, what: str, exc: Exception, *, trace: bool = False
    ) -> None:
        """A state's activity ended on ``exc``: log it (event and alarm ``alarm``, with the
        traceback when ``trace``) and leave the state (``FAILED``)."""
        (log.exception if trace else log.error)(alarm, error=str(exc))
        self.node.alarm(alarm, str(exc))
        await self.node.trigger(Event.FAILED, f"{what} failed: {exc}")

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
        backoff = Backoff(2.0, 60.0)
        while True:
            await asyncio.sleep(backoff.next())
            try:
                await self.recover("automatic recovery")
                return
            except LinkError as exc:
                log.info("fault_persists", error=str(exc), retry_s=backoff.current_s)

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

    if TYPE_CHECKING:  # defined by the activity mixins that ExchangeSession combines

        async def _check_not_latched(self) -> None: ...
        async def _compensate(self, measure_qber: Any | None = None) -> Any: ...
        async def _enter_calibrating(self, sm: StateMachine, rec: TransitionRecord) -> None: ...
        async def _enter_exchanging(self, sm: StateMachine, rec: TransitionRecord) -> None: ...
        async def _enter_synchronizing(self, sm: StateMachine, rec: TransitionRecord) -> None: ...
        async def _finish_block(
            self, block_id: int, result: BlockResult, started: float, pulses: int
        ) -> None: ...
        async def _light_gone(self, tagger: TimeTagger, watch: LightWatch) -> bool: ...
        def _new_light_watch(self) -> LightWatch: ...
        async def _serve_probe(self, n: int, from_slot: int) -> dict[str, Any]: ...
        async def _serve_track(self, start_slot: int, stop_slot: int) -> dict[str, Any]: ...
        def _step_table(self) -> dict[str, StepSpec]: ...
        def _calibration_steps(self) -> dict[str, StepSpec]: ...
        def _synchronization_steps(self) -> dict[str, StepSpec]: ...
        def _exchange_steps(self) -> dict[str, StepSpec]: ...
        def _polarization_steps(self) -> dict[str, StepSpec]: ...
        def _scheduled_steps(self) -> dict[str, StepSpec]: ...
        async def _scheduled_bias_tracking(self) -> None: ...
        def _dark_measured(self, rate_hz: float, lower_hz: float, upper_hz: float) -> None: ...
        async def _scheduled_dark_tracking(self) -> None: ...
        def _count_vacuum(
            self,
            block_id: int,
            block: BlockStats,
            pulses: int,
            floor_before: int,
            withheld: list[tuple[int, int]],
        ) -> None: ...
        async def _compensate_polarization(self) -> None: ...
        async def _watch_qber(self, qber: float) -> None: ...


#: A block whose X-basis error rate is at least this, on at least SLOT_SLIP_MIN_BITS bits,
#: has lost the slot alignment (random bits give 1/2; a full intercept-resend attack 1/4).
SLOT_SLIP_QBER = 0.35
SLOT_SLIP_MIN_BITS = 1000


def _slot_slip(block: BlockStats) -> bool:
    """Whether an aborted block's statistics say the slot alignment slipped."""
    if block.qber_x is None or block.sifted_x is None:
        return False
    return block.qber_x >= SLOT_SLIP_QBER and block.sifted_x >= SLOT_SLIP_MIN_BITS


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


def _tof_prediction(cfg: Any) -> TofPrediction | None:
    """The ground station's predicted time of flight (``[passes]`` with an ``orbit``)."""
    passes = cfg.passes
    if passes is None or passes.orbit is None or not passes.windows:
        return None
    return TofPrediction(passes.orbit, [w.rise_unix_s for w in passes.windows], passes.time_scale)
