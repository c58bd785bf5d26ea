"""The link steps this node answers for its peer: one table, handler and serving roles."""

from __future__ import annotations

from typing import Any

import structlog

from qkdnode.delivery.keyservice import KeyService
from qkdnode.link import LinkError, LinkRequest
from qkdnode.pair.core import S, SessionCore, StepSpec
from qkdnode.statemachine import Event

log = structlog.get_logger(__name__)


class StepsMixin(SessionCore):
    """The link steps this node answers for its peer: one table, handler and serving
    roles."""

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
            "probe": StepSpec(lambda a: self._serve_probe(int(a["n"]), int(a["from_slot"])), both),
            "track": StepSpec(
                lambda a: self._serve_track(int(a["start_slot"]), int(a["stop_slot"])), both
            ),
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
