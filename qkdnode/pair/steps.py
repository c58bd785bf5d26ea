"""The link steps this node answers for its peer: one table of handlers and serving roles,
composed of the pair's control and key-service steps (here) and the steps each activity
answers (``_calibration_steps``, ``_synchronization_steps``, ``_exchange_steps``)."""

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
        """The link steps this node answers (docs/protocol.md, "Link steps"): the pair's
        control and key-service steps here, and each activity's own steps (calibration,
        synchronisation, key exchange), each with its handler and the roles that serve it.
        """
        both = ("transmitter", "receiver")
        own = {
            "state": StepSpec(self._step_state, both),
            "stop": StepSpec(self._step_stop, both),
            "halt": StepSpec(self._step_halt, both),
            "activate": StepSpec(lambda a: self._key_service().serve_activate(a), both),
            "release": StepSpec(lambda a: self._key_service().serve_release(a), both),
            "notice": StepSpec(lambda a: self._key_service().serve_notice(a), both),
            "keysync": StepSpec(self._step_keysync, both),
        }
        table = dict(own)
        for steps in (
            self._calibration_steps(),
            self._synchronization_steps(),
            self._exchange_steps(),
            self._polarization_steps(),
            self._scheduled_steps(),
        ):
            clash = set(table) & set(steps)
            if clash:  # a programming error: one step, one handler
                raise RuntimeError(f"link steps answered twice: {sorted(clash)}")
            table.update(steps)
        return table

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

    async def _step_keysync(self, args: dict[str, Any]) -> dict[str, Any]:
        mine = await self._key_service().serve_sync(args)
        return {
            "summary": mine.model_dump(mode="json"),
            "next_block_id": self.keystore.last_block_id() + 1,
        }
