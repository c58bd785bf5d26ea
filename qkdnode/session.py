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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from drivers.interfaces import (
    Encoder,
    IntensityModulator,
    Laser,
    OpticalPowerMeter,
    SinglePhotonDetector,
    StateSource,
    TimeTagger,
    VariableAttenuator,
)
from qkdnode.link import LinkError, LinkRequest
from qkdnode.log import bound_context
from qkdnode.statemachine import Event, State, StateMachine, TransitionRecord

if TYPE_CHECKING:
    from qkdnode.node import Node

log = structlog.get_logger(__name__)
S = State

ZERO_RATE_FAULT_S = 3.0


class ExchangeSession:
    """State activities and the key store of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg
        self.role = node.cfg.node.role
        self.keystore: Any = None
        self.auth_pool: Any = None
        self.tracker: Any = None  # receiver: procedures.sync.SlotTracker once locked
        self.first_key_slot = 0
        self.next_block_id = 0
        self.qber_reference: float | None = None
        self._block_results: asyncio.Queue[dict[str, Any]] = asyncio.Queue(64)
        self._compensating: asyncio.Task[Any] | None = None
        self._zero_rate_since: float | None = None
        self._fault_cause: str | None = None
        sm: StateMachine = node.sm
        sm.on_enter(S.CALIBRATING, self._enter_calibrating)
        sm.on_enter(S.SYNCHRONIZING, self._enter_synchronizing)
        sm.on_enter(S.EXCHANGING, self._enter_exchanging)
        sm.on_enter(S.FAULT, self._enter_fault)
        sm.on_enter(S.IDLE, self._enter_idle)

    # ------------------------------------------------------------------ life cycle
    async def open(self) -> None:
        from qkdnode.keystore.store import KeyStore
        from qkdnode.postproc.auth import AuthKeyPool

        c = self.cfg
        state_dir = self.node.state_dir
        path = c.keystore.path if c.keystore.path.is_absolute() else state_dir / c.keystore.path
        link_id = "~".join(sorted([c.node.id, c.node.peer_id]))
        self.keystore = await asyncio.to_thread(
            KeyStore.open, path, link_id=link_id, side=self.role,
            key_ttl_s=c.keystore.key_ttl_s, max_key_count=c.keystore.max_key_count,
        )
        self.next_block_id = await asyncio.to_thread(self._max_block_id) + 1
        self.auth_pool = await asyncio.to_thread(
            AuthKeyPool.open_or_bootstrap, state_dir / "auth_pool.bin", self._auth_psk(),
        )
        self.node.stats.auth_key_balance_bits = self.auth_pool.balance_bits()

    def _auth_psk(self) -> bytes:
        from qkdnode.paths import read_credential

        psk_file = self.cfg.protocol.auth_psk_file
        if psk_file is None and (self.cfg.simulation is not None and self.cfg.simulation.enabled):
            # Simulated links without a configured secret derive one from the link's seed:
            # both simulated nodes know it, nobody else needs to. Real nodes must configure
            # protocol.auth_psk_file or the auth.psk credential.
            import hashlib

            seed = self.cfg.simulation.link.seed
            link = "~".join(sorted([self.cfg.node.id, self.cfg.node.peer_id]))
            return hashlib.sha512(f"qkdnode-sim-psk:{link}:{seed}".encode()).digest() * 64
        return read_credential("auth.psk", psk_file)

    def _max_block_id(self) -> int:
        row = self.keystore._conn.execute("SELECT MAX(block_id) FROM blocks").fetchone()
        erased = self.keystore._conn.execute("SELECT MAX(block_id) FROM erased").fetchone()
        vals = [v for v in (row[0], erased[0]) if v is not None]
        return int(max(vals)) if vals else -1

    async def close(self) -> None:
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
        return list(self.node.hardware.of_type(SinglePhotonDetector).values())

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
    async def serve(self, req: LinkRequest) -> dict[str, Any]:
        """Receiver (and, for ``block`` bookkeeping, transmitter) side of a request."""
        sm = self.node.sm
        step = req.step
        if step == "stop":
            if sm.state not in (S.IDLE, S.FAULT, S.SHUTDOWN, S.CONNECTING, S.OFFLINE):
                await self.node.trigger(Event.STOP, "peer asked to stop")
            return {"state": sm.state.value}
        if step == "light":
            await self.set_light(bool(req.args.get("on", True)))
            return {}
        if self.role != "receiver":
            raise LinkError(f"{step!r} is a receiver step")
        if step == "calibrate":
            await sm.trigger(Event.CALIBRATE, "transmitter asked")
            await sm.wait_for(S.IDLE, S.FAULT, S.PAUSED, timeout_s=300)
            if not self.node.stats.calibrated:
                raise LinkError("receiver calibration failed")
            return self._rx_calibration_summary
        if step == "sync":
            self._sync_request = req.args
            await sm.trigger(Event.SYNC, "transmitter asked")
            await sm.wait_for(S.IDLE, S.FAULT, S.PAUSED, timeout_s=120)
            if self.tracker is None:
                raise LinkError(self._sync_error or "no lock")
            return self._sync_summary
        if step == "sync_end":
            self.first_key_slot = int(req.args["first_key_slot"])
            self.node.stats.synchronized = True
            return {}
        if step == "exchange":
            self.next_block_id = max(self.next_block_id, int(req.args.get("next_block_id", 0)))
            await sm.trigger(Event.EXCHANGE, "transmitter asked")
            return {"state": sm.state.value}
        raise LinkError(f"unknown step {step!r}")

    # ------------------------------------------------------------------ calibration
    _rx_calibration_summary: dict[str, Any] = {}

    async def _enter_calibrating(self, sm: StateMachine, rec: TransitionRecord) -> None:
        try:
            if self.role == "transmitter":
                await self._calibrate_transmitter()
            else:
                await self._calibrate_receiver()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("calibration_failed", error=str(exc))
            self.node.alarm("calibration_failed", str(exc))
            await self.node.trigger(Event.FAILED, f"calibration failed: {exc}")
            return
        self.node.stats.calibrated = True
        await self.node.trigger(Event.CALIBRATED, "calibration complete")

    async def _calibrate_transmitter(self) -> None:
        from qkdnode.procedures.mean_photon_number import (
            MeanPhotonConfig,
            calibrate_mean_photon_number,
        )
        from qkdnode.procedures.modulator import calibrate_modulator

        src = self.cfg.source
        laser: Laser = self._one(Laser)
        im: IntensityModulator = self._one(IntensityModulator)
        voa: VariableAttenuator = self._one(VariableAttenuator)
        meter: OpticalPowerMeter = self._one(OpticalPowerMeter)
        await self._call(laser.set_wavelength_nm, src.wavelength_nm)
        await self.set_light(True)
        mod = await calibrate_modulator(
            im, meter, state_dir=self.node.state_dir, publish=self.node.publish
        )
        mu = await calibrate_mean_photon_number(
            laser, im, voa, meter, mod, mu_signal=src.mu_signal, mu_decoy=src.mu_decoy,
            slot_rate_hz=src.slot_rate_hz, cfg=MeanPhotonConfig(),
            state_dir=self.node.state_dir, publish=self.node.publish,
        )
        log.info("transmitter_calibrated", v_pi=getattr(mod, "v_pi", None),
                 mu_signal=getattr(mu, "mu_signal", None))
        # The receiver calibrates its detectors with our light on.
        await self.set_light(True)
        self._rx_calibration_summary = await self.node.link.request("calibrate", 300.0)

    async def _calibrate_receiver(self) -> None:
        from qkdnode.procedures.detector_timing import calibrate_detector_timing

        dets = self._detectors()
        for d in dets:
            await self._call(d.arm)
        tagger: TimeTagger = self._one(TimeTagger)
        timing = await calibrate_detector_timing(
            dets, self.cfg.source.slot_rate_hz, state_dir=self.node.state_dir,
            publish=self.node.publish, wait_integration=self._integration_wait(tagger),
        )
        self._rx_calibration_summary = {"detector_timing_ok": bool(timing.ok)}

    def _integration_wait(self, tagger: TimeTagger) -> Any:
        async def wait() -> None:
            await asyncio.sleep(0.12)

        return wait

    # ------------------------------------------------------------------ synchronization
    _sync_request: dict[str, Any] = {}
    _sync_summary: dict[str, Any] = {}
    _sync_error: str = ""

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
            log.error("sync_failed", error=str(exc))
            self.node.alarm("sync_failed", str(exc))
            await self.node.trigger(Event.FAILED, f"synchronization failed: {exc}")
            return
        await self.node.trigger(Event.LOCKED, "clock locked")

    async def _sync_transmitter(self) -> None:
        src: StateSource = self._one(StateSource)
        await self.set_light(True)
        seed = secrets.randbits(63)
        await self._call(src.set_sync_pattern, seed)
        try:
            summary = await self.node.link.request(
                "sync", 120.0, public_seed=seed, slot_rate_hz=self.cfg.source.slot_rate_hz
            )
        finally:
            first = await self._call(src.set_sync_pattern, None)
        self.first_key_slot = int(first)
        await self.node.link.request("sync_end", 30.0, first_key_slot=self.first_key_slot)
        self.node.stats.synchronized = True
        self.node.publish("sync", {"locked": True, **summary})
        log.info("pair_synchronized", first_key_slot=self.first_key_slot, **summary)

    async def _sync_receiver(self) -> None:
        from qkdnode.procedures.sync import acquire_lock

        self.tracker = None
        self._sync_error = ""
        tagger: TimeTagger = self._one(TimeTagger)
        for d in self._detectors():
            await self._call(d.arm)
        await self._call(tagger.start_stream)
        args = self._sync_request
        result, tracker = await acquire_lock(
            tagger, int(args["public_seed"]), float(args["slot_rate_hz"]),
            publish=self.node.publish,
        )
        if not result.locked:
            raise LinkError(f"no lock: {result.message or 'timing error too large'}")
        self.tracker = tracker
        self._sync_summary = {
            "offset_ps": result.offset_ps, "ppm": result.ppm,
            "timing_error_ps": result.timing_error_ps, "window_ps": result.window_ps,
        }

    # ------------------------------------------------------------------ key exchange
    async def _enter_exchanging(self, sm: StateMachine, rec: TransitionRecord) -> None:
        stats = self.node.stats
        if rec.old is S.IDLE and rec.event is Event.EXCHANGE:
            pass
        started = time.monotonic()
        try:
            if self.role == "transmitter":
                await self.node.link.request("exchange", 30.0, next_block_id=self.next_block_id)
                await self._exchange_transmitter(started)
            else:
                await self._exchange_receiver(started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("exchange_failed", error=str(exc))
            self.node.alarm("exchange_failed", str(exc))
            await self.node.trigger(Event.FAILED, f"exchange failed: {exc}")
        finally:
            stats.exchange_seconds += time.monotonic() - started

    def _pp_transport(self) -> Any:
        from qkdnode.node import PostprocTransport

        assert self.node.peer is not None
        return PostprocTransport(self.node.peer, self.node.pp_inbox)

    def _pp_params(self) -> Any:
        from qkdnode.postproc.params import postproc_params_from_config

        return postproc_params_from_config(self.cfg)

    async def _exchange_transmitter(self, started: float) -> None:
        from qkdnode.postproc.auth import AuthenticatedTransport
        from qkdnode.postproc.pipeline import run_block_transmitter

        src: StateSource = self._one(StateSource)
        params = self._pp_params()
        transport = AuthenticatedTransport(self._pp_transport(), self.auth_pool, "transmitter")
        while True:
            block_id = self.next_block_id
            with bound_context(block_id=block_id):
                result = await run_block_transmitter(
                    transport, block_id, src.prepared, params
                )
                self.next_block_id = block_id + 1
                await self._finish_block(block_id, result, started)

    async def _exchange_receiver(self, started: float) -> None:
        from qkdnode.postproc.auth import AuthenticatedTransport
        from qkdnode.postproc.pipeline import run_block_receiver

        if self.tracker is None:
            raise LinkError("not synchronized")
        tagger: TimeTagger = self._one(TimeTagger)
        params = self._pp_params()
        transport = AuthenticatedTransport(self._pp_transport(), self.auth_pool, "receiver")
        target = self.cfg.protocol.block_detections
        queue: asyncio.Queue[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]] = (
            asyncio.Queue(8)
        )
        reader = asyncio.create_task(self._read_detections(tagger, target, queue))
        try:
            while True:
                slots, channels = await queue.get()
                block_id = self.next_block_id
                with bound_context(block_id=block_id):
                    result = await run_block_receiver(transport, block_id, slots, channels, params)
                    self.next_block_id = block_id + 1
                    await self._finish_block(block_id, result, started)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _read_detections(
        self,
        tagger: TimeTagger,
        target: int,
        out: asyncio.Queue[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]],
    ) -> None:
        """Receiver: tags -> (slot, channel) with tracking; hands out full blocks."""
        slots: list[npt.NDArray[np.int64]] = []
        chans: list[npt.NDArray[np.int8]] = []
        have = 0
        while True:
            block = await asyncio.to_thread(tagger.read_block, 0.5)
            if block is None or len(block) == 0:
                continue
            mapped, status = self.tracker.update(block.tags)
            if status.lost:
                self.node.alarm("lock_lost", "timing lock lost", in_window=status.in_window_fraction)
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(
                        self.node.trigger(Event.LOCK_LOST, "tracking lost the slot clock")
                    )
                )
                return
            keep = mapped.slot_index >= self.first_key_slot
            s = mapped.slot_index[keep]
            if s.size == 0:
                continue
            slots.append(s.astype(np.int64))
            chans.append(mapped.channel[keep])
            have += int(s.size)
            self.node.stats.detections += int(s.size)
            if have >= target:
                all_s = np.concatenate(slots)
                all_c = np.concatenate(chans)
                order = np.argsort(all_s, kind="stable")
                all_s, all_c = all_s[order], all_c[order]
                await out.put((all_s[:target], all_c[:target]))
                rest_s, rest_c = all_s[target:], all_c[target:]
                slots, chans, have = [rest_s], [rest_c], int(rest_s.size)

    async def _finish_block(self, block_id: int, result: Any, started: float) -> None:
        from qkdnode.keystore.models import Provenance

        stats = self.node.stats
        summary = result.stats_dict() if hasattr(result, "stats_dict") else dict(result.stats)
        stats.sifted_bits += int(summary.get("sifted_bits", 0))
        if self.role == "transmitter":
            stats.detections += int(summary.get("detections", 0))
        qber = summary.get("qber_z")
        if qber is not None:
            stats.qber = float(qber)
        stats.last_block = summary
        stats.exchange_seconds_now = time.monotonic() - started  # type: ignore[attr-defined]
        if result.ok:
            key = result.key_bytes()
            size = self.cfg.keystore.key_size_bits
            if len(key) * 8 >= size:
                prov = Provenance(
                    qber=float(qber or 0.0), eps_sec=self.cfg.protocol.eps_sec,
                    eps_cor=self.cfg.protocol.eps_cor,
                    final_key_bits=int(summary.get("final_key_bits", len(key) * 8)),
                )
                await asyncio.to_thread(self.keystore.add_block, block_id, key, size, prov)
                await asyncio.to_thread(self.keystore.commit_block, block_id)
            stats.blocks_ok += 1
            stats.secret_bits += int(summary.get("final_key_bits", len(key) * 8))
        else:
            stats.blocks_aborted += 1
        stats.auth_key_balance_bits = self.auth_pool.balance_bits()
        log.info("block_summary", block_id=block_id, ok=bool(result.ok),
                 reason=getattr(result, "abort_reason", ""), **_scalars(summary))
        self.node.publish("block", {"block_id": block_id, "ok": bool(result.ok),
                                    **_scalars(summary)})
        if self.role == "transmitter" and qber is not None:
            await self._watch_qber(float(qber))

    async def _watch_qber(self, qber: float) -> None:
        p = self.cfg.protocol
        if self.qber_reference is None or qber < self.qber_reference:
            self.qber_reference = qber
        with contextlib.suppress(asyncio.QueueFull):
            self._block_results.put_nowait({"qber": qber})
        if qber > p.qber_warning and (self._compensating is None or self._compensating.done()):
            self.node.alarm("qber_high", f"error rate {qber:.4f} above warning {p.qber_warning}")
            self._compensating = self.node.sm.spawn(self._compensate(), "encoding-compensation")

    async def _compensate(self) -> None:
        from qkdnode.procedures.encoding_compensation import compensate_encoding

        while not self._block_results.empty():
            self._block_results.get_nowait()

        async def measure_qber() -> float:
            await self._block_results.get()  # a block that may predate the change
            return float((await self._block_results.get())["qber"])

        result = await compensate_encoding(
            self._one(Encoder), measure_qber, None, state_dir=self.node.state_dir,
            publish=self.node.publish,
        )
        log.info("encoding_compensated", ok=result.ok)

    # ------------------------------------------------------------------ monitoring, faults
    async def monitor_tick(self) -> None:
        """Receiver: count-rate and detector checks; both: recovery from FAULT."""
        sm = self.node.sm
        if self.role == "receiver" and sm.state is S.EXCHANGING:
            from drivers.interfaces import DetectorStatus

            dets = self._detectors()
            try:
                statuses = [await self._call(d.status) for d in dets]
                rates = [await self._call(d.count_rate_hz) for d in dets]
            except Exception as exc:
                await self._fault("instrument", f"detector unreachable: {exc}")
                return
            self.node.publish("rates", {"detector_count_rate_hz": rates})
            if any(s is DetectorStatus.LATCHED for s in statuses):
                await self._fault("bright_light", "detector latched: bright light (blinding?)")
                return
            if sum(rates) < 1.0:
                now = time.monotonic()
                self._zero_rate_since = self._zero_rate_since or now
                if now - self._zero_rate_since > ZERO_RATE_FAULT_S:
                    await self._fault("no_light", "count rate fell to zero: fiber cut?")
            else:
                self._zero_rate_since = None

    async def _fault(self, cause: str, message: str) -> None:
        self._fault_cause = cause
        self.node.alarm(cause, message)
        await self.node.trigger(Event.FAULT, message)

    async def _enter_fault(self, sm: StateMachine, rec: TransitionRecord) -> None:
        self.node.stats.synchronized = False
        self.tracker = None
        await asyncio.to_thread(self.node.hardware.make_safe)

    async def _enter_idle(self, sm: StateMachine, rec: TransitionRecord) -> None:
        if rec.old is S.EXCHANGING and self.role == "transmitter":
            with contextlib.suppress(LinkError):
                await self.node.link.request("stop", 10.0)

    async def recover(self, reason: str) -> None:
        sm = self.node.sm
        await sm.trigger(Event.RECOVER, reason)
        for name, inst in self.node.hardware.instruments.items():
            try:
                await self._call(inst.close)
                await self._call(inst.connect)
                if hasattr(inst, "reset_latch"):
                    await self._call(inst.reset_latch)
            except Exception as exc:
                log.error("recover_failed", instrument=name, error=str(exc))
                await self.node.trigger(Event.FAULT, f"{name} still failing: {exc}")
                return
        await sm.trigger(Event.CONNECTED, reason)

    # ------------------------------------------------------------------ keys
    async def fetch_keys(self, number: int, size_bits: int, caller: str) -> dict[str, Any]:
        import base64

        from qkdnode.keystore.models import Pair

        pair = Pair(master=f"ctl:{caller}", slave=f"ctl:{self.cfg.node.peer_id}")
        keys = await asyncio.to_thread(self.keystore.take_keys, pair, number, size_bits)
        return {"keys": [{"key_ID": str(k.key_id), "key": base64.b64encode(k.key).decode()}
                         for k in keys]}

    async def keys_digest(self) -> dict[str, Any]:
        from qkdnode.node import key_digest

        def rows() -> list[tuple[str, bytes]]:
            cur = self.keystore._conn.execute(
                "SELECT k.ref, k.key FROM keys k JOIN blocks b ON b.block_id = k.block_id "
                "WHERE b.committed = 1"
            )
            return [(str(r), bytes(k)) for r, k in cur.fetchall()]

        return key_digest(await asyncio.to_thread(rows))


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
