"""The node runtime: state machine, bus, procedures, key exchange and key store wired together.

The transmitter coordinates the pair (see :mod:`qkdnode.link`): operator commands
``calibrate``, ``sync``, ``start`` and ``stop`` sent to it move both nodes; the receiver
follows its requests. Every state's activity is a task owned by that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import zmq
import zmq.asyncio

from drivers.interfaces import InstrumentHealth
from qkdnode.alarms import Alarm, AlarmBoard
from qkdnode.backoff import Backoff
from qkdnode.bus.control import ControlServer
from qkdnode.bus.errors import PeerDisconnected, PeerTimeout
from qkdnode.bus.keys import resolve_server_secret
from qkdnode.bus.peer import PeerChannel
from qkdnode.bus.telemetry import TelemetryPublisher
from qkdnode.config import NodeConfig
from qkdnode.context import NodeStats
from qkdnode.daemon import STOP_STEP_TIMEOUT_S, DaemonBase, ProcessControl, settle_cancelled
from qkdnode.keyflow import KeyFlow, Resources
from qkdnode.link import (
    KMS_PREFIX,
    LINK_PREFIX,
    PP_PREFIX,
    LinkCoordinator,
    LinkError,
    LinkRequest,
)
from qkdnode.node_commands import NodeCommands
from qkdnode.statemachine import Event, State, StateMachine, TransitionRecord, TransitionRefused
from qkdnode.watch import DEFAULT_BLOCK_S

log = structlog.get_logger(__name__)

S = State
#: seconds between attempts at a key-ID sync that failed (transmitter)
KEY_SYNC_RETRY_S = 2.0
#: seconds between instrument health checks, and between probes of the peer's state
HEALTH_CHECK_S = 5.0
PEER_PROBE_S = 5.0
#: seconds a restarted background loop must run before internal_error clears
INTERNAL_ERROR_CLEAR_S = 60.0
#: seconds instrument_restored stays active after the last restoration
INSTRUMENT_RESTORED_ALARM_S = 600.0


class Node(DaemonBase):
    """One link of the node: this side's state machine, activities, peer channel, key
    store and control, telemetry and metrics endpoints (see :class:`DaemonBase` for
    ``process`` and ``link_id``)."""

    def __init__(
        self,
        cfg: NodeConfig,
        config_path: str,
        process: ProcessControl | None = None,
        link_id: str = "",
    ) -> None:
        super().__init__(cfg, config_path, process, link_id)
        self.role = cfg.node.role
        self.sm = StateMachine()
        self.sm.guards = {
            "peer_connected": lambda: self.peer is not None and self.peer.connected,
            "synchronized": lambda: self.stats.synchronized,
        }
        self.sm.add_listener(self._on_transition)
        self.stats = NodeStats()
        self.zctx: zmq.asyncio.Context | None = None
        self.telemetry: TelemetryPublisher | None = None
        self.control: ControlServer | None = None
        self.peer: PeerChannel | None = None
        self.link = LinkCoordinator(self._link_send)
        self.link.handler = self._serve_link
        self.pp_inbox: asyncio.Queue[Any] = asyncio.Queue(256)
        #: the site's key manager's ears on this link (set by ``node_port.NodeLinkPort``):
        #: ``kms.*`` messages, and the peer channel's losses
        self.kms_sink: Callable[[str, dict[str, Any], list[bytes]], None] | None = None
        self.kms_lost: Callable[[str], None] | None = None
        self.session: Any = None  # qkdnode.session.ExchangeSession, created on demand
        self._bg: list[asyncio.Task[Any]] = []
        self._was_connected = False
        self._peer_session: str | None = None
        self._last_sync_try = 0.0
        self.alarms = AlarmBoard(self.publish)
        self.keyflow = KeyFlow(
            self.alarms,
            cfg.alarms,
            role=self.role,
            block_detections=cfg.protocol.block_detections,
            qber_warning=cfg.protocol.qber_warning,
            max_block_s=(
                cfg.protocol.max_block_seconds
                if cfg.protocol.block_size == "auto"
                else DEFAULT_BLOCK_S
            ),
            state_dir=self.state_dir,
        )
        self._auto = False
        self.auto = cfg.node.autostart and cfg.node.role == "transmitter"
        self._last_health_check = 0.0
        self._peer_probe: asyncio.Task[None] | None = None
        self._heal: asyncio.Task[bool] | None = None
        self._last_peer_probe = 0.0
        self._restored_clear: asyncio.TimerHandle | None = None
        self.metrics: Any = None

    # ------------------------------------------------------------------ services
    async def start_services(self) -> None:
        from qkdnode.session import ExchangeSession

        bus = self.cfg.bus
        secret = None if bus.allow_plaintext else resolve_server_secret(bus.server_secret_key_file)
        self.zctx = zmq.asyncio.Context()
        self.telemetry = TelemetryPublisher(self.zctx, bus, secret)
        await self.telemetry.start()
        self.control = ControlServer(
            self.zctx,
            bus,
            NodeCommands(self).table(),
            lambda: self.sm.state.value,
            secret,
            telemetry=self.telemetry,
            server_name=self.cfg.node.id,
        )
        await self.control.start()
        control = self.control
        self.sm.add_listener(lambda _record: control.monitor_changed())
        self.peer = PeerChannel(self.zctx, bus, self.role, secret)
        await self.peer.start()
        if self.cfg.metrics.enabled:
            from qkdnode.metrics import NodeMetrics

            self.metrics = NodeMetrics(self.cfg.node.id, self.role)
            self.alarms.listeners.append(self._on_alarm)
            self.metrics.set_state(self.sm.state.value)
            self.metrics.set_healthy(self.healthy())
            for name, up in self.hardware.up.items():
                self.metrics.set_instrument_up(name, up)
            await self.metrics.start_http(
                self.cfg.metrics.listen_host, self.cfg.metrics.listen_port
            )
        self.session = ExchangeSession(self)
        await self.session.open()
        if self.metrics is not None:
            self.metrics.set_auth_balance_bits(self.stats.auth_key_balance_bits)
            self.metrics.set_keystore(
                self.session.keystore_counts(), self.cfg.keystore.max_key_count
            )
            self.metrics.set_session(0.0, 0.0)
        self._bg.append(
            asyncio.create_task(self._keep_running(self._peer_reader), name="peer-reader")
        )
        self._bg.append(asyncio.create_task(self._keep_running(self._monitor), name="monitor"))
        if self.role == "transmitter":
            self._bg.append(
                asyncio.create_task(self._keep_running(self._supervise), name="supervisor")
            )
        if self.cfg.passes is not None:
            self._bg.append(
                asyncio.create_task(self._keep_running(self._watch_passes), name="passes")
            )
        self.sm.on_enter(S.CONNECTING, self._enter_connecting)
        await self.sm.trigger(Event.START, "daemon started")

    async def _enter_connecting(self, sm: StateMachine, rec: TransitionRecord) -> None:
        """Instruments are open and sockets bound; wait for the peer node."""
        assert self.peer is not None
        while True:
            try:
                await self.peer.wait_connected(5.0)
                break
            except (TimeoutError, PeerTimeout):
                log.info("waiting_for_peer", peer_id=self.cfg.node.peer_id)
        await self.trigger(Event.CONNECTED, "instruments connected, peer reachable")

    async def stop_services(self) -> None:
        for t in self._bg:
            t.cancel()
        await settle_cancelled(self._bg, STOP_STEP_TIMEOUT_S, "background")
        if self.session is not None:
            try:
                async with asyncio.timeout(STOP_STEP_TIMEOUT_S):
                    await self.session.close()
            except Exception as exc:
                log.error("session_close_failed", error=f"{type(exc).__name__}: {exc}")
        for comp in (self.control, self.peer, self.telemetry):
            if comp is not None:
                with contextlib.suppress(Exception):
                    await comp.stop()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                await self.metrics.stop()
        if self.zctx is not None:
            self.zctx.destroy(linger=0)

    async def _keep_running(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop for the daemon's life: should it ever end on an error
        (a failure nobody foresaw must not silently stop the peer watch, the key-ID sync
        retries or the supervisor), log it, raise ``internal_error`` and start it again
        a second later. Cancellation ends it."""
        name = getattr(loop, "__name__", "loop").lstrip("_")
        clear: asyncio.TimerHandle | None = None
        while True:
            try:
                await loop()
                log.error("background_loop_ended", loop=name)
            except Exception as exc:
                log.exception("background_loop_failed", loop=name, error=str(exc))
                self.alarm("internal_error", f"{name} failed and was restarted: {exc}")
                if clear is not None:
                    clear.cancel()
                # cleared once the restarted loop has run a minute without failing
                clear = asyncio.get_running_loop().call_later(
                    INTERNAL_ERROR_CLEAR_S,
                    self.alarms.clear,
                    "internal_error",
                    f"{name} ran {INTERNAL_ERROR_CLEAR_S:g} s since its restart",
                )
            await asyncio.sleep(1.0)

    async def cancel_activities(self) -> None:
        with contextlib.suppress(TransitionRefused):
            await self.sm.trigger(Event.SHUTDOWN, self.stop_reason or "failure")
        await self.sm.close()

    def reload(self) -> None:
        """SIGHUP: reload the delivery CRL (the previous list stays on failure)."""
        super().reload()
        etsi = self.session.etsi if self.session is not None else None
        if etsi is None:
            return
        from qkdnode.delivery.revocation import RevocationError

        try:
            crl = etsi.api.revocation.reload()
        except RevocationError as exc:
            log.error("crl_reload_failed", error=str(exc), config_key="delivery.crl_file")
            self.alarm("crl_reload_failed", f"delivery CRL not reloaded: {exc}")
            return
        log.info("crl_reloaded", revoked=0 if crl is None else len(crl.serials))

    @property
    def auto(self) -> bool:
        """Transmitter: the pair is meant to exchange key (autostart, or an operator's
        ``start``/``exchange``); it returns to key exchange by itself after faults."""
        return self._auto

    @auto.setter
    def auto(self, on: bool) -> None:
        self._auto = on
        if self.role == "transmitter":
            self.keyflow.producing(on)

    def key_flow_status(self) -> dict[str, Any]:
        """The ``status`` fields that answer "is this link producing key?" (valid from
        the first second after start)."""
        counts = self.session.keystore_counts() if self.session else {}
        keys = self.session.keys if self.session is not None else None
        return {
            "state_since": self.sm.history[-1].at_unix_s if self.sm.history else None,
            "producing": self.keyflow.should_produce,
            "seconds_since_last_block": self.keyflow.seconds_since_last_block(),
            "keystore_fill_ratio": counts.get("available", 0) / self.cfg.keystore.max_key_count,
            "delivery_in_step": bool(keys is not None and keys.in_step),
            "alarms": [a.as_dict() for a in self.alarms.active()],
        }

    def healthy(self) -> bool:
        """Producing key as it should: not in FAULT and no critical alarm active."""
        return self.sm.state is not S.FAULT and not self.alarms.critical()

    # ------------------------------------------------------------------ telemetry
    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Publish on telemetry; a value that is not a finite number (NaN: not measured)
        goes out as null."""
        if self.telemetry is not None:
            try:
                payload = {
                    k: None if isinstance(v, float) and not math.isfinite(v) else v
                    for k, v in payload.items()
                }
                self.telemetry.publish(topic, payload)
            except Exception as exc:
                log.warning("telemetry_publish_failed", topic=topic, error=str(exc))

    def alarm(self, kind: str, message: str, **details: Any) -> None:
        """Raise alarm ``kind`` (see :mod:`qkdnode.alarms`); it stays active until the
        condition's owner clears it."""
        self.alarms.raise_(kind, message, **details)

    def _on_alarm(self, alarm: Alarm) -> None:
        if self.metrics is not None:
            self.metrics.set_alarm(alarm.name, alarm.severity.value, alarm.active)
            self.metrics.set_healthy(self.healthy())

    def _on_transition(self, rec: TransitionRecord) -> None:
        prefix = f"{self.link_id}: " if self.link_id else ""
        self.notifier.status(f"{prefix}{rec.new.value} ({rec.event.value})")
        self.keyflow.state_changed(rec.new.value)
        if rec.event is Event.FAILED:
            self.stats.failures += 1
            self.stats.last_failure = rec.reason
        if self.metrics is not None:
            self.metrics.set_state(rec.new.value)
            self.metrics.set_healthy(self.healthy())
        self.publish(
            "state",
            {
                "old": rec.old.value,
                "new": rec.new.value,
                "event": rec.event.value,
                "reason": rec.reason,
            },
        )

    async def trigger(self, event: Event, reason: str = "") -> bool:
        """Trigger ``event``; False (logged) when the table refuses it."""
        try:
            await self.sm.trigger(event, reason)
            return True
        except TransitionRefused as exc:
            log.info(
                "transition_refused",
                trigger=event.value,
                state=self.sm.state.value,
                reason=exc.reason,
            )
            return False

    def pp_drain(self) -> None:
        """Drop post-processing messages of a block that ended on one side only."""
        while not self.pp_inbox.empty():
            self.pp_inbox.get_nowait()

    # ------------------------------------------------------------------ peer link
    async def _link_send(self, kind: str, header: dict[str, Any]) -> None:
        if self.peer is None:
            raise LinkError("peer channel not started")
        await self.peer.send(kind, header, [])

    async def _peer_reader(self) -> None:
        assert self.peer is not None
        while True:
            try:
                msg = await self.peer.recv(1.0)
            except PeerTimeout:
                continue
            except PeerDisconnected as exc:
                self.link.fail_pending(f"peer disconnected: {exc}")
                with contextlib.suppress(asyncio.QueueFull):
                    self.pp_inbox.put_nowait(exc)
                if self.kms_lost is not None:
                    self.kms_lost(f"peer disconnected: {exc}")
                continue
            if msg.kind.startswith(LINK_PREFIX):
                self.link.on_message(msg.kind, msg.header)
            elif msg.kind.startswith(KMS_PREFIX):
                if self.kms_sink is None:
                    log.debug("kms_message_without_key_manager", kind=msg.kind)
                else:
                    try:
                        self.kms_sink(msg.kind, msg.header, msg.buffers)
                    except Exception as exc:  # the peer's message must not stop the reader
                        log.exception("kms_message_failed", kind=msg.kind, error=str(exc))
            elif msg.kind.startswith(PP_PREFIX):
                try:
                    self.pp_inbox.put_nowait(msg)
                except asyncio.QueueFull:
                    log.warning("pp_inbox_full_dropping", kind=msg.kind)
            else:
                log.warning("peer_unknown_kind", kind=msg.kind)

    async def _monitor(self) -> None:
        """Peer liveness and restarts, instrument health, key-store upkeep (twice a second).

        A peer that went away, or came back as a new process (its session id changed),
        pauses whatever the pair was doing; the transmitter forgets that the pair was
        calibrated and synchronized, since a restarted receiver lost both.
        """
        assert self.peer is not None
        while True:
            await asyncio.sleep(0.5)
            connected = self.peer.connected
            session = self.peer.peer_session
            restarted = (
                connected
                and session is not None
                and self._peer_session is not None
                and session != self._peer_session
            )
            if session is not None:
                self._peer_session = session
            if connected != self._was_connected or restarted:
                self._was_connected = connected
                log.info("peer_link", connected=connected, restarted=restarted)
                self.publish("peer", {"connected": connected, "restarted": restarted})
                active = (S.CALIBRATING, S.SYNCHRONIZING, S.EXCHANGING)
                keys = self.session.keys if self.session is not None else None
                if (not connected or restarted) and keys is not None:
                    keys.peer_lost("peer link down" if not connected else "peer restarted")
                if not connected or restarted:
                    self.stats.synchronized = False
                    if self.role == "transmitter" and restarted:
                        self.stats.calibrated = False
                    if self.sm.state in active:
                        await self.trigger(Event.PEER_LOST, "peer link down or peer restarted")
                if connected and self.sm.state is S.PAUSED:
                    await self.trigger(Event.PEER_BACK, "peer link back")
                if connected and self.role == "transmitter" and self.session is not None:
                    await self.session.key_sync_safely()
                    self._last_sync_try = time.monotonic()
            elif (
                connected
                and self.role == "transmitter"
                and self.session is not None
                and self.session.keys is not None
                and not self.session.keys.in_step
                and time.monotonic() - self._last_sync_try > KEY_SYNC_RETRY_S
            ):
                # A key-ID sync that failed is retried: key delivery waits for it.
                self._last_sync_try = time.monotonic()
                await self.session.key_sync_safely()
            self.keyflow.peer_link(connected)
            if self.session is not None:
                try:
                    await self.session.monitor_tick()
                except Exception as exc:
                    log.exception("monitor_tick_failed", error=str(exc))
            try:
                await self._watch_key_flow(connected)
            except Exception as exc:
                log.exception("key_flow_watch_failed", error=str(exc))

    async def _watch_key_flow(self, connected: bool) -> None:
        """Instrument health (every 5 s), the peer's state (every 5 s), then the alarms
        and the metrics that say whether key flows."""
        now = time.monotonic()
        if now - self._last_health_check >= HEALTH_CHECK_S:
            self._last_health_check = now
            self.note_restored(await asyncio.to_thread(self.hardware.health))
            if self.metrics is not None:
                for name, up in self.hardware.up.items():
                    self.metrics.set_instrument_up(name, up)
        if (
            connected
            and now - self._last_peer_probe >= PEER_PROBE_S
            and (self._peer_probe is None or self._peer_probe.done())
        ):
            self._last_peer_probe = now
            self._peer_probe = asyncio.create_task(self._probe_peer_state())
        res = Resources(
            state=self.sm.state.value,
            auth_balance_bits=self.stats.auth_key_balance_bits,
            instruments_down=[n for n, up in self.hardware.up.items() if not up],
            detection_rate_hz=self.session.detection_rate_hz() if self.session else 0.0,
        )
        self.keyflow.evaluate(res)
        if self.alarms.is_active("pair_inconsistent") and self.sm.state is S.EXCHANGING:
            # Exchanging alone produces nothing: stop; the transmitter's supervisor starts
            # the pair again (both nodes), a receiver waits to be asked.
            peer_state = self.keyflow.peer_state
            if self._heal is None or self._heal.done():
                log.warning("pair_inconsistent_stopping", peer_state=peer_state)
                # Not awaited: the monitor must go on whatever the transition does.
                self._heal = asyncio.create_task(
                    self.trigger(Event.STOP, f"peer is {peer_state}, not exchanging")
                )
        if self.metrics is not None:
            self.metrics.set_session(
                self.stats.secret_key_rate_bps, self.keyflow.seconds_since_last_block()
            )
            self.metrics.set_auth_balance_bits(self.stats.auth_key_balance_bits)
            self.metrics.set_healthy(self.healthy())

    def note_restored(self, healths: dict[str, InstrumentHealth]) -> None:
        """Alarm ``instrument_restored`` when a health check says a driver put back the
        settings of a power-cycled instrument; it clears INSTRUMENT_RESTORED_ALARM_S after
        the last such report (the instrument is usable: this asks for a look, not a stop)."""
        restored = {name: h.restored for name, h in healths.items() if h.restored}
        if not restored:
            return
        cause = "settings lost (power cycle?) and restored: " + "; ".join(
            f"{name}: {', '.join(lines)}" for name, lines in sorted(restored.items())
        )
        self.alarms.clear("instrument_restored", "a newer restoration")
        self.alarm("instrument_restored", cause, instruments=sorted(restored))
        if self._restored_clear is not None:
            self._restored_clear.cancel()
        self._restored_clear = asyncio.get_running_loop().call_later(
            INSTRUMENT_RESTORED_ALARM_S,
            self.alarms.clear,
            "instrument_restored",
            f"no instrument lost its settings for {INSTRUMENT_RESTORED_ALARM_S:g} s",
        )

    async def _probe_peer_state(self) -> None:
        try:
            reply = await self.link.request("state", PEER_PROBE_S)
        except LinkError:
            return
        state = reply.get("state")
        producing = reply.get("producing")
        keys = self.session.keys if self.session is not None else None
        if self.role == "transmitter" and reply.get("in_step") is False and keys is not None:
            # The receiver's key service went out of step (a release it could not send,
            # say): the key-ID sync that the transmitter runs brings both back.
            keys.out_of_step("the peer's key service is out of step")
        self.keyflow.peer_status(
            str(state) if state is not None else None,
            bool(producing) if isinstance(producing, bool) else None,
        )

    async def _watch_passes(self) -> None:
        """A link with pass windows (``[passes]``): between windows the node waits in
        AWAITING_PASS; at a rise it goes to IDLE (the transmitter's supervisor then
        synchronises and starts the exchange, calibrating first if it never did). At a set,
        a node not exchanging leaves at once; an exchanging receiver closes the pass's
        block itself (:mod:`qkdnode.pair.exchange`) and tells the transmitter, which
        otherwise leaves ``passes.close_timeout_s`` after the set."""
        cfg = self.cfg.passes
        assert cfg is not None
        leaving = (S.IDLE, S.CALIBRATING, S.SYNCHRONIZING)
        current = None  # the window the node last started
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            window = cfg.window_at(now)
            state = self.sm.state
            if window is not None:
                if state is S.AWAITING_PASS:
                    self.keyflow.pass_started()
                    current = window
                    await self.trigger(
                        Event.PASS_START,
                        f"pass rises (sets in {window.set_unix_s - now:.0f} s)",
                    )
                continue
            if state in leaving:
                nxt = cfg.next_after(now)
                when = f"next pass in {nxt.rise_unix_s - now:.0f} s" if nxt else "no pass ahead"
                ended = await self.trigger(Event.PASS_END, f"outside a pass window ({when})")
                if ended and current is not None and self.session is not None:
                    self.session.pass_set_without_exchange(
                        current.rise_unix_s, current.set_unix_s, state.value
                    )
                current = None
            elif state is S.EXCHANGING and self.role == "transmitter":
                last = max((w.set_unix_s for w in cfg.windows if w.set_unix_s <= now), default=0)
                if now - last > cfg.close_timeout_s:
                    await self.trigger(
                        Event.PASS_END,
                        f"the pass set {now - last:.0f} s ago and its last block is not done",
                    )

    def in_pass_window(self) -> bool:
        """False only for a link with pass windows outside them."""
        return self.cfg.passes is None or self.cfg.passes.window_at(time.time()) is not None

    async def _supervise(self) -> None:
        """Transmitter with autostart (or after ``start``): keep the pair exchanging key.

        From IDLE with the peer connected: calibrate if the pair is not calibrated,
        synchronize if it is not synchronized, else start the exchange. Failed attempts
        back off from 2 s to 15 s.
        """
        backoff = Backoff(2.0, 15.0)
        while True:
            await asyncio.sleep(1.0)
            if not self.auto or self.sm.state is not S.IDLE or not self.in_pass_window():
                continue
            if self.peer is None or not self.peer.connected:
                continue
            if await self._auto_step():
                backoff.reset()
            else:
                delay = backoff.next()
                log.info("autostart_backoff", seconds=delay)
                await asyncio.sleep(delay)

    async def _auto_step(self) -> bool:
        st = self.stats
        if not st.calibrated:
            event = Event.CALIBRATE
        elif not st.synchronized:
            event = Event.SYNC
        else:
            event = Event.EXCHANGE
        if not await self.trigger(event, "automatic"):
            return False
        if event is Event.EXCHANGE:
            return True
        await self.sm.wait_for(
            S.IDLE, S.FAULT, S.PAUSED, S.AWAITING_PASS, S.SHUTDOWN, timeout_s=900
        )
        return st.calibrated if event is Event.CALIBRATE else st.synchronized

    async def _serve_link(self, req: LinkRequest) -> dict[str, Any]:
        assert self.session is not None
        return dict(await self.session.serve(req))
