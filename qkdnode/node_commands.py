"""The control commands a link of the node answers (docs/protocol.md, section 2
"Commands"): the command table and its handlers, over the link's runtime
(:class:`CommandHost`, which :class:`qkdnode.node.Node` is)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Protocol

import structlog

from drivers.interfaces import SimulatedBackend
from qkdnode import jit
from qkdnode.alarms import AlarmBoard
from qkdnode.bus.commands import CallerInfo, CommandSpec, CommandTable
from qkdnode.bus.errors import CommandError
from qkdnode.bus.peer import PeerChannel
from qkdnode.config import NodeConfig
from qkdnode.context import NodeStats
from qkdnode.hardware import InstrumentSet
from qkdnode.link import LinkCoordinator, LinkError
from qkdnode.statemachine import Event, State, StateMachine, TransitionRefused

log = structlog.get_logger(__name__)

S = State


class CommandHost(Protocol):
    """What the command handlers use of a link's runtime."""

    cfg: NodeConfig
    sm: StateMachine
    stats: NodeStats
    alarms: AlarmBoard
    hardware: InstrumentSet
    backend: SimulatedBackend | None
    peer: PeerChannel | None
    link: LinkCoordinator
    session: Any
    auto: bool

    @property
    def role(self) -> str: ...

    def healthy(self) -> bool: ...

    def key_flow_status(self) -> dict[str, Any]: ...

    async def trigger(self, event: Event, reason: str = "") -> bool: ...


def _flat_fields(obj: Any) -> dict[str, Any]:
    """A dataclass of plain values as a dict: ``dataclasses.asdict`` without its deep copy,
    paid on every ``status`` request."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


class NodeCommands:
    """The handlers of one link's control commands."""

    def __init__(self, node: CommandHost) -> None:
        self.node = node

    def table(self) -> CommandTable:
        """The daemon's control commands (docs/protocol.md, section 2 "Commands")."""
        from qkdnode.bus.commands import KeysGetContent, NoContent, SimInjectContent
        from qkdnode.bus.errors import ErrorCode as E

        live = frozenset(s.value for s in State if s not in (S.SHUTDOWN,))
        pair_errors = (E.WRONG_NODE, E.REFUSED)
        return CommandTable(
            [
                CommandSpec(
                    "status",
                    self._cmd_status,
                    None,
                    "monitor",
                    NoContent,
                    "state, health and session statistics",
                ),
                CommandSpec(
                    "alarms",
                    self._cmd_alarms,
                    None,
                    "monitor",
                    NoContent,
                    "active alarms and the recent raise/clear events",
                ),
                CommandSpec(
                    "calibrate",
                    self._cmd_pair(Event.CALIBRATE),
                    frozenset({"IDLE", "EXCHANGING"}),
                    "operator",
                    NoContent,
                    "calibrate both nodes of the link",
                    pair_errors,
                ),
                CommandSpec(
                    "sync",
                    self._cmd_pair(Event.SYNC),
                    frozenset({"IDLE"}),
                    "operator",
                    NoContent,
                    "acquire clock lock between the nodes",
                    pair_errors,
                ),
                CommandSpec(
                    "start",
                    self._cmd_pair(Event.EXCHANGE),
                    frozenset({"IDLE"}),
                    "operator",
                    NoContent,
                    "start continuous key exchange",
                    pair_errors,
                ),
                CommandSpec(
                    "stop",
                    self._cmd_stop,
                    frozenset({"CALIBRATING", "SYNCHRONIZING", "EXCHANGING", "PAUSED", "IDLE"}),
                    "operator",
                    NoContent,
                    "stop the current activity on both nodes",
                ),
                CommandSpec(
                    "recover",
                    self._cmd_recover,
                    frozenset({"FAULT"}),
                    "operator",
                    NoContent,
                    "clear a fault: reconnect instruments and return to IDLE",
                    (E.NOT_READY, E.REFUSED, E.COMMAND_FAILED),
                ),
                CommandSpec(
                    "keys.get",
                    self._cmd_keys_get,
                    live,
                    "operator",
                    KeysGetContent,
                    "fetch keys from the key store (operator delivery)",
                    (E.NO_KEY, E.INVALID_CONTENT),
                ),
                CommandSpec(
                    "keys.digest",
                    self._cmd_keys_digest,
                    live,
                    "operator",
                    NoContent,
                    "count and SHA-256 digest of the committed keys",
                    (E.NOT_READY,),
                ),
                CommandSpec(
                    "sim.inject",
                    self._cmd_inject,
                    live,
                    "operator",
                    SimInjectContent,
                    "inject or clear a simulated fault (simulation only)",
                    (E.NOT_SIMULATED, E.INVALID_CONTENT),
                ),
            ]
        )

    async def _cmd_status(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {
            "state": self.node.sm.state.value,
            "role": self.node.role,
            "node_id": self.node.cfg.node.id,
            "peer_id": self.node.cfg.node.peer_id,
            "healthy": self.node.healthy(),
            "peer_connected": bool(self.node.peer and self.node.peer.connected),
            "instruments": {n: up for n, up in self.node.hardware.up.items()},
            "kernels": jit.BACKEND,
            "stats": self.node.stats.as_dict(),
            "keystore": self.node.session.keystore_counts() if self.node.session else {},
            **self.node.key_flow_status(),
            "settings": (
                _flat_fields(self.node.session.settings)
                if self.node.session is not None and self.node.role == "transmitter"
                else None
            ),
        }

    async def _cmd_alarms(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {
            "active": [a.as_dict() for a in self.node.alarms.active()],
            "events": self.node.alarms.events(),
        }

    def _cmd_pair(self, event: Event) -> Any:
        async def handler(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
            if self.node.role != "transmitter":
                raise CommandError(
                    f"pair commands are coordinated by the transmitter "
                    f"({self.node.cfg.node.peer_id!r}); send {event.value!r} to it",
                    code="wrong_node",
                    details={"field": "command", "role": self.node.role},
                )
            if event is Event.EXCHANGE:
                self.node.auto = True  # from now on the pair returns to key exchange by itself
            try:
                rec = await self.node.sm.trigger(event, f"operator {caller.name}")
            except TransitionRefused as exc:
                raise CommandError(
                    str(exc), code="refused", details={"state": self.node.sm.state.value}
                ) from None
            return {"state": rec.new.value}

        return handler

    async def _cmd_stop(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        self.node.auto = False
        if self.node.sm.state is not S.IDLE:
            await self.node.trigger(Event.STOP, f"operator {caller.name}")
        if (
            self.node.role == "transmitter"
            and self.node.peer is not None
            and self.node.peer.connected
        ):
            with contextlib.suppress(LinkError):
                await self.node.link.request("stop", 10.0)
        return {"state": self.node.sm.state.value}

    async def _cmd_recover(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        if self.node.session is None:
            raise CommandError("the node is still starting", code="not_ready")
        try:
            await self.node.session.recover(f"operator {caller.name}")
        except TransitionRefused as exc:
            raise CommandError(
                str(exc), code="refused", details={"state": self.node.sm.state.value}
            ) from None
        except LinkError as exc:  # an instrument still fails: the fault stays
            raise CommandError(str(exc), code="command_failed") from None
        return {"state": self.node.sm.state.value}

    async def _cmd_keys_get(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        from qkdnode.keystore.errors import KeyRequestError, KeyStoreError

        if self.node.session is None or self.node.session.keys is None:
            raise CommandError("no key available: the key store is not open yet", code="no_key")
        number = int(content["number"])
        size = content.get("size_bits")
        size_bits = int(size) if size is not None else self.node.cfg.keystore.key_size_bits
        try:
            return dict(await self.node.session.fetch_keys(number, size_bits, caller.name))
        except KeyRequestError as exc:
            raise CommandError(
                str(exc), code="invalid_content", details={"field": "content.size_bits"}
            ) from None
        except KeyStoreError as exc:  # none available, peer not in step or unreachable
            raise CommandError(str(exc), code="no_key") from None

    async def _cmd_keys_digest(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        if self.node.session is None or self.node.session.keystore is None:
            raise CommandError("the key store is not open yet", code="not_ready")
        return dict(await self.node.session.keys_digest())

    async def _cmd_inject(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        if self.node.backend is None:  # no [simulation], or not enabled
            raise CommandError("sim.inject needs a simulated link", code="not_simulated")
        from qkdnode.bus.commands import SimInjectContent

        req = SimInjectContent.model_validate(content)
        faults = self.node.backend.faults
        try:
            if req.clear:
                faults.clear(req.fault)
            else:
                faults.inject(req.fault, **req.fault_parameters())
        except (TypeError, ValueError) as exc:  # e.g. a receiver fault sent to the transmitter
            raise CommandError(
                str(exc), code="invalid_content", details={"field": "content.fault"}
            ) from None
        log.warning("sim_fault", fault=req.fault, cleared=req.clear)
        return {"fault": req.fault, "cleared": req.clear}
