"""Key exchange: block pacing on the receiver, the transmitter's answers, settings advice,
drift tracking and the post-processing parameters of each block."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from drivers.interfaces import (
    Encoder,
    StateSource,
    TimeTagger,
)
from qkdnode.context import PostprocTransport
from qkdnode.lightloss import Verdict
from qkdnode.link import LinkError
from qkdnode.log import bound_context
from qkdnode.pair.core import MIN_BLOCK_DETECTIONS, SessionCore, StepSpec, _settle
from qkdnode.pair.passes import PassClose, PassRecord, PassTally, append_record
from qkdnode.postproc.blockstats import BlockStats
from qkdnode.probe_wire import BYTES_PER_DETECTION, ProbeWireError, decode_probe
from qkdnode.statemachine import Event, StateMachine, TransitionRecord
from qkdnode.tracking import (
    DetectionAccumulator,
    TrackingWindow,
    lock_in_step,
    step_interval_s,
)

log = structlog.get_logger(__name__)

#: Seconds the transmitter waits, at a pass's end, for the block it is finishing.
PASS_END_BLOCK_WAIT_S = 120.0

#: What the receiver's detection reader hands its block loop: a block's (slots, channels),
#: or the close of a pass.
_BlockOrClose = tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]] | PassClose


class ExchangeMixin(SessionCore):
    """Key exchange: block pacing on the receiver, the transmitter's answers, settings
    advice, drift tracking and the post-processing parameters of each block."""

    # ------------------------------------------------------------------ key exchange
    async def _enter_exchanging(self, sm: StateMachine, rec: TransitionRecord) -> None:
        stats = self.node.stats
        started = time.monotonic()
        stats.exchange_started_at = started
        try:
            if self.role == "transmitter":
                # Leftovers of an earlier exchange must not start a block: the receiver's
                # next block is the first one read from here on.
                self.node.pp_drain()
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
            await self._activity_failed("exchange_failed", "exchange", exc, trace=True)
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
        return PostprocParams(**m.bound_fields(), **common)

    async def _exchange_transmitter(self, started: float) -> None:
        """Transmitter: serve the blocks the receiver starts (each announced by its first
        post-processing message) and track the encoder's drift, until the state ends;
        either failing ends the exchange."""
        from qkdnode.postproc.auth import AuthenticatedTransport

        self._tx_transport = AuthenticatedTransport(
            self._pp_transport(), self.auth_pool, "transmitter"
        )
        self._exchange_started = started
        tasks = [
            asyncio.create_task(self._serve_blocks(), name="blocks"),
            asyncio.create_task(self._track_drift(), name="drift-tracking"),
            asyncio.create_task(self._scheduled_bias_tracking(), name="im-bias-tracking"),
            asyncio.create_task(self._scheduled_dark_tracking(), name="dark-tracking"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failure ends the exchange
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                await _settle(task)

    async def _serve_blocks(self) -> None:
        """Transmitter: each block begins with the receiver's ``sift`` (its block id in
        the authentication field, the slots it spans in ``pulses``); anything else that
        is not part of a block in progress is a leftover and dropped."""
        from qkdnode.postproc.transport import TransportError

        inbox = self._pp_transport()
        while True:
            try:
                msg = await inbox.recv(60.0)
            except TransportError:  # nothing yet, or the peer link blinked: keep waiting
                continue
            auth = msg.header.get("_auth")
            block_id = auth.get("b") if isinstance(auth, dict) else None
            pulses = msg.header.get("pulses", 0)
            if (
                msg.kind != "sift"
                or not isinstance(block_id, int)
                or isinstance(block_id, bool)
                or block_id < self.next_block_id
                or not isinstance(pulses, int)
                or isinstance(pulses, bool)
                or pulses < 0
            ):
                log.info(
                    "pp_leftover_dropped",
                    kind=msg.kind,
                    block_id=block_id,
                    next_block_id=self.next_block_id,
                )
                continue
            before, self.next_block_id = self.next_block_id, block_id + 1
            async with self._tx_block_lock:  # a pass's end waits for the block's commit
                await self._tx_block(block_id, pulses, msg)
            if self._tx_transport.messages_received == 0:
                # Its first message failed its check: a forged block id moves nothing.
                self.next_block_id = before

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

    async def _tx_block(self, block_id: int, pulses: int, first: Any) -> bool:
        from qkdnode.postproc.pipeline import run_block_transmitter

        src: StateSource = self._one(StateSource)
        # the slot floor and the withheld windows before the block claims its slots (the
        # in-flight dark rate counts the slots the block spans)
        floor_before, withheld = self.key_slots.floor, self.key_slots.withheld
        with bound_context(block_id=block_id):
            result = await run_block_transmitter(
                self._tx_transport,
                block_id,
                src.prepared,
                self._pp_params(),
                z_over_x_error_ratio=self.z_over_x_error_ratio,
                key_slots=self.key_slots,
                first=first,
                landing=self._landing,
                advice=self._advised_block,
            )
            # at once, while the floor is where this block's claim left it
            self._count_vacuum(block_id, result.stats, pulses, floor_before, withheld)
            qz, qx = result.stats.qber_z, result.stats.qber_x
            detections = result.stats.detections
            # the slots that could hold key: a tracking window's detections never reach
            # a block, so its slots would dilute the yield (and the link fit) per slot
            key_pulses = pulses - (result.stats.withheld_slots or 0)
            if detections > 0 and key_pulses > 0:
                self._detections_per_slot = detections / key_pulses
            if result.ok and qz is not None and qx:
                self.z_over_x_error_ratio = qz / qx
            await self._finish_block(block_id, result, self._exchange_started, pulses)
            if result.ok and self.cfg.protocol.block_size == "auto" and key_pulses > 0:
                self._advise(result.stats, key_pulses)
        return bool(result.ok)

    def _advise(self, block: BlockStats, pulses: int) -> None:
        """Transmitter: fit the link to the block just committed (``pulses``: the slots of
        its span that could carry key, withheld windows left out) and, when it moved by more
        than 10 % (or on the first block), work out in a thread the block size the
        finite-key bound needs there and the settings that would serve it best. The size
        goes to the receiver with the next block's reply; the settings are logged and
        published as advice (applied at the next calibration)."""
        from qkdnode.postproc.linkfit import BlockObservation, LinkFitError, fit_link

        m = self.intensities
        per_class = block.detections_per_class
        if m is None or per_class is None or len(per_class) != 3:
            return
        src, st = self.cfg.source, self.settings
        try:
            link = fit_link(
                BlockObservation(
                    pulses=pulses,
                    detections_per_class=(int(per_class[0]), int(per_class[1]), int(per_class[2])),
                    mu=(m.signal.mu_or_upper, m.decoy.mu_or_upper, m.vacuum.mu_or_upper),
                    p_class=(st.p_signal, st.p_decoy, st.p_vacuum),
                    qber_z=float(block.qber_z or block.qber_x or 0.0),
                    rx_basis_z_fraction=float(block.rx_basis_z_fraction or 0.5),
                    slot_rate_hz=src.slot_rate_hz,
                    ec_inefficiency=block.ec_efficiency,
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
        from qkdnode.postproc.finitekey_model import Interval
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
        queue: asyncio.Queue[_BlockOrClose] = asyncio.Queue(1)
        self._locked_rate_hz = sum([await self._call(d.count_rate_hz) for d in self._detectors()])
        window = self.cfg.passes.window_at(time.time()) if self.cfg.passes is not None else None
        self._pass = None if window is None else PassTally(window.rise_unix_s, window.set_unix_s)
        self._set_block_target(self._first_block_target())
        if self._pass is not None:
            log.info(
                "pass_exchange",
                sets_in_s=round(self._pass.set_unix_s - time.time(), 1),
                blocks="one for the pass (passes.block_per_pass: the finite-key bound on "
                "the whole pass's statistics)"
                if self._pass_blocks()
                else f"of {self._block_target} detections",
            )
        reader = asyncio.create_task(self._read_detections(tagger, queue))
        polarization = asyncio.create_task(
            self._compensate_polarization(), name="polarization-compensation"
        )
        try:
            while True:
                item = await queue.get()
                if isinstance(item, PassClose):
                    self._close_pass(item)
                    return
                slots, channels = item
                block_id = self.next_block_id
                self.next_block_id = block_id + 1
                with bound_context(block_id=block_id):
                    # The block's first message tells the transmitter of it (its id, the
                    # slots it spans); its keys are committed within its last round trip.
                    pulses = int(slots[-1] - slots[0] + 1)
                    result = await run_block_receiver(
                        transport,
                        block_id,
                        slots,
                        channels,
                        params,
                        pulses=pulses,
                        landing=self._landing,
                    )
                    await self._finish_block(block_id, result, started, pulses)
                    if self._pass is not None:
                        b = result.stats
                        self._pass.add_block(
                            bool(result.ok),
                            result.abort_reason,
                            detections=b.detections,
                            sifted_z=b.sifted_z,
                            secret_bits=b.final_key_bits,
                            qber_z=b.qber_z,
                            qber_x=b.qber_x,
                            pulses=pulses,
                            disclosed_bits=b.ec_disclosed_bits,
                        )
                    if result.advised_block_detections is not None:
                        self._set_block_target(result.advised_block_detections)
                    if not result.ok:
                        self.node.pp_drain()  # what is left of the aborted block
        finally:
            polarization.cancel()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await polarization
            with contextlib.suppress(BaseException):
                await reader

    async def _read_detections(
        self,
        tagger: TimeTagger,
        out: asyncio.Queue[_BlockOrClose],
    ) -> None:
        """Receiver: tags -> (slot, channel) with tracking; hands out full blocks. Detections
        of drift-tracking windows are diverted on the way (:class:`DetectionAccumulator`)."""
        acc = self._accumulator = DetectionAccumulator()
        watch = self.light_watch = self._new_light_watch()
        last_progress = 0.0

        async def close_pass(reason: str, at_set: bool) -> None:
            # The pass's block: everything collected until now (the light is gone or the
            # satellite set: nothing later may join it).
            self._pass_dropped = None
            if acc.have >= MIN_BLOCK_DETECTIONS:
                full = await asyncio.to_thread(acc.cut, acc.have)
                if full is not None:
                    await out.put(full)
            elif acc.have:
                self._pass_dropped = (
                    f"{acc.have} detections at the close, fewer than a block needs "
                    f"({MIN_BLOCK_DETECTIONS})"
                )
            await out.put(PassClose(reason, at_set))

        try:
            while True:
                if self._pass is not None and time.time() >= self._pass.set_unix_s:
                    await close_pass("the satellite set below the minimum elevation", True)
                    return
                block = await asyncio.to_thread(tagger.read_block, 0.5)
                if block is None:
                    continue
                if block.missed_events:
                    # the tagger's buffer overflowed: light the link delivered, never read
                    self.node.stats.tags_missed += int(block.missed_events)
                    log.warning("tagger_overflow", missed_tags=int(block.missed_events))
                if watch.add_block(len(block), block.start_ps, block.stop_ps) is Verdict.GONE:
                    if self._pass is not None:
                        why = f"the light went during the pass: {watch.explain()}"
                        await close_pass(why, False)
                        return
                    # Not awaited: the fault cancels the exchange task that owns this one.
                    self._detached(self._fault("no_light", watch.explain()))
                    return
                if len(block) == 0:
                    continue
                mapped, status = await asyncio.to_thread(self.tracker.update, block.tags)
                if status.lost and self._pass is not None:
                    await close_pass("the light went during the pass: timing lock lost", False)
                    return
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

    def _close_pass(self, closing: PassClose) -> None:
        """Receiver: the pass's last block is done. Record the pass, then leave the
        exchange: to AWAITING_PASS at the set (and tell the transmitter), through
        LOCK_LOST when the light went mid-pass (the supervisor synchronises again when it
        comes back, within the same pass)."""
        tally = self._pass
        assert tally is not None
        record = PassRecord.close(tally, closing, self._pass_dropped)
        append_record(self.node.state_dir, record)
        fields = record.as_dict()
        log.info("pass_closed", **fields)
        self.node.publish("pass", fields)
        why = record.no_key_reason or ""
        self.node.keyflow.pass_closed(record.secret_bits, why)
        self._pass = None
        self.tracker = None
        self.node.stats.synchronized = False
        if closing.at_set:

            async def tell() -> None:
                with contextlib.suppress(Exception):
                    await self.node.link.request(
                        "pass_end", 10.0, secret_bits=record.secret_bits, reason=why[:500]
                    )

            self._detached(tell())
            self._detached(self.node.trigger(Event.PASS_END, closing.reason))
            return
        self.node.alarm("lock_lost", closing.reason)
        self._halt_peer(closing.reason)
        self._detached(self.node.trigger(Event.LOCK_LOST, closing.reason))

    def pass_set_without_exchange(self, rise_unix_s: float, set_unix_s: float, state: str) -> None:
        """A pass set while the node was not exchanging (still calibrating or
        synchronising, or never started): it gave no key. The receiver records it like a
        closed pass; both nodes keep the reason for the key-flow alarm."""
        why = f"the pass set while the node was {state}: nothing (more) was exchanged"
        self.node.keyflow.pass_closed(0, why)
        if self.role != "receiver":
            return
        tally = PassTally(rise_unix_s, set_unix_s)
        record = PassRecord.close(tally, PassClose(why, True), None)
        append_record(self.node.state_dir, record)
        fields = record.as_dict()
        log.info("pass_closed", **fields)
        self.node.publish("pass", fields)

    async def _step_pass_end(self, args: dict[str, Any]) -> dict[str, Any]:
        """Transmitter: the receiver closed the pass (its last block is done)."""
        bits = args.get("secret_bits", 0)
        reason = args.get("reason", "")
        self.node.keyflow.pass_closed(
            bits if isinstance(bits, int) and not isinstance(bits, bool) else 0,
            str(reason)[:500],
        )
        # The receiver has finished its last block; ours may still be in its last round
        # trip (its commit comes on the receiver's word, on the post-processing channel,
        # which this step may overtake): leaving EXCHANGING now would cancel it and leave
        # its keys pending here while the receiver serves them.
        try:
            async with asyncio.timeout(PASS_END_BLOCK_WAIT_S), self._tx_block_lock:
                pass
        except TimeoutError:
            log.warning("pass_end_block_unfinished", waited_s=PASS_END_BLOCK_WAIT_S)
        await self.node.trigger(Event.PASS_END, "the receiver closed the pass")
        return {"state": self.node.sm.state.value}

    def _first_block_target(self) -> int:
        """Receiver: detections of the first block: ``protocol.block_detections``, but no
        more than ``protocol.max_block_seconds`` of light at the rate seen at the start.
        Later blocks follow the transmitter's advice (what the finite-key bound needs on
        the link the last block measured), within the same limits."""
        proto = self.cfg.protocol
        if self._pass is not None and self._pass_blocks():
            return proto.block_detections  # the pass ends the block, not its size
        by_time = self._locked_rate_hz * proto.max_block_seconds
        return int(min(proto.block_detections, by_time)) if by_time > 0 else proto.block_detections

    def _pass_blocks(self) -> bool:
        """One block per pass (``passes.block_per_pass``)."""
        return self.cfg.passes is not None and self.cfg.passes.block_per_pass

    def _set_block_target(self, detections: int) -> None:
        """Receiver: the size of the block being filled, clamped to our own limits."""
        proto = self.cfg.protocol
        by_time = self._locked_rate_hz * proto.max_block_seconds
        upper = min(proto.block_detections, by_time) if by_time > 0 else proto.block_detections
        target = int(max(MIN_BLOCK_DETECTIONS, min(int(detections), upper)))
        if proto.block_size == "fixed" or (self._pass is not None and self._pass_blocks()):
            target = proto.block_detections
        if target != self._block_target:
            log.info("block_size", detections=target, advised=int(detections))
        self._block_target = target
        self.node.stats.block_detections = target

    # ------------------------------------------------------------------ link steps
    def _exchange_steps(self) -> dict[str, StepSpec]:
        """The key exchange's link step: ``exchange`` (the receiver's half). The blocks
        themselves are one post-processing conversation each, not link steps."""
        return {
            "exchange": StepSpec(self._step_exchange, ("receiver",)),
            "pass_end": StepSpec(self._step_pass_end, ("transmitter",)),
        }

    async def _step_exchange(self, args: dict[str, Any]) -> dict[str, Any]:
        self.next_block_id = max(self.next_block_id, int(args.get("next_block_id", 0)))
        # Slots the transmitter disclosed since the synchronisation (probes) carry no key.
        self.exchange_from_slot = max(self.exchange_from_slot, int(args.get("first_slot", 0)))
        await self.node.sm.trigger(Event.EXCHANGE, "transmitter asked")
        return {"state": self.node.sm.state.value}
