"""What a node gives the activities it hosts: the typed seam between them.

:class:`NodeContext` lists every attribute and method an activity (calibration,
synchronisation, key exchange, monitoring: :mod:`qkdnode.session`) may use of the node
runtime that hosts it (:class:`qkdnode.node.Node` implements it). Activities import this
module, never the node, so that the runtime can host them without an import circle.
:class:`NodeStats` (the counters of the running exchange) and :class:`PostprocTransport`
(the post-processing sub-channel of the peer link) live here for the same reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from qkdnode.bus.errors import PeerDisconnected, PeerTimeout
from qkdnode.bus.peer import next_message
from qkdnode.link import PP_PREFIX
from qkdnode.postproc.transport import Buffer, TransportError, TransportTimeoutError
from qkdnode.postproc.transport import PeerMessage as PPMessage

if TYPE_CHECKING:
    from qkdnode.alarms import AlarmBoard
    from qkdnode.bus.peer import PeerChannel
    from qkdnode.config import NodeConfig
    from qkdnode.hardware import InstrumentSet
    from qkdnode.keyflow import KeyFlow
    from qkdnode.link import LinkCoordinator
    from qkdnode.statemachine import Event, StateMachine


@dataclass
class NodeStats:
    """Counters of the current exchange session (reset by ``start``)."""

    pulses: int = 0  # slots spanned by the processed blocks
    withheld_slots: int = 0  # transmitter: slots of ``pulses`` withheld for tracking windows
    tags_missed: int = 0  # receiver: tags the time tagger dropped (buffer overflow)
    detections: int = 0  # detections processed in key blocks
    detections_read: int = 0  # receiver: detections mapped to slots (incl. not yet processed)
    block_detections: int = 0  # receiver: detections per block of the running exchange
    sifted_bits: int = 0
    qber: float | None = None
    secret_bits: int = 0
    blocks_ok: int = 0
    blocks_aborted: int = 0
    blocks_dropped: int = 0  # successful blocks whose key the full key store could not take
    exchange_seconds: float = 0.0
    #: monotonic time the running exchange started (None when not exchanging)
    exchange_started_at: float | None = None
    synchronized: bool = False
    calibrated: bool = False
    failures: int = 0
    last_failure: str = ""
    auth_key_balance_bits: int = 0
    last_block: dict[str, Any] = field(default_factory=dict)

    @property
    def exchange_seconds_total(self) -> float:
        """Seconds spent exchanging key, the running exchange included."""
        running = 0.0
        if self.exchange_started_at is not None:
            running = time.monotonic() - self.exchange_started_at
        return self.exchange_seconds + running

    @property
    def secret_key_rate_bps(self) -> float:
        """Secret bits committed per second of key exchange, live from the first second."""
        total = self.exchange_seconds_total
        return self.secret_bits / total if total > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as the ``status`` reply shows them (``exchange_seconds`` includes
        the running exchange). Built field by field: ``dataclasses.asdict`` deep-copies, a
        large share of what each ``status`` request cost. ``last_block`` is shared, not
        copied: it is replaced whole after each block, never changed in place."""
        d = {name: getattr(self, name) for name in _STATS_FIELDS}
        d["exchange_seconds"] = self.exchange_seconds_total
        d["secret_key_rate_bps"] = self.secret_key_rate_bps
        return d


_STATS_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(NodeStats) if f.name != "exchange_started_at"
)


class PostprocTransport:
    """The ``pp.`` sub-channel of the peer link, for the post-processing protocol.

    Implements :class:`qkdnode.postproc.transport.PeerTransport`; bus errors (peer gone,
    restarted) become the post-processing layer's :class:`TransportError`.
    """

    def __init__(self, peer: PeerChannel, inbox: asyncio.Queue[Any]) -> None:
        self._peer = peer
        self._inbox = inbox

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> None:
        try:
            await self._peer.send(PP_PREFIX + kind, header, buffers)
        except PeerDisconnected as exc:
            raise TransportError(f"peer link: {exc}") from None

    async def recv(self, timeout_s: float) -> PPMessage:
        try:
            item = await next_message(self._inbox, timeout_s)
        except PeerTimeout:
            raise TransportTimeoutError(f"no peer message within {timeout_s:g} s") from None
        except PeerDisconnected as exc:
            raise TransportError(f"peer link: {exc}") from None
        return PPMessage(item.kind.removeprefix(PP_PREFIX), item.header, list(item.buffers))


class NodeContext(Protocol):
    """The node as its activities see it."""

    cfg: NodeConfig
    role: Literal["transmitter", "receiver"]
    stats: NodeStats
    sm: StateMachine
    link: LinkCoordinator
    peer: PeerChannel | None
    pp_inbox: asyncio.Queue[Any]
    hardware: InstrumentSet
    keyflow: KeyFlow
    alarms: AlarmBoard
    metrics: Any  # NodeMetrics when metrics are enabled, else None
    state_dir: Path
    auto: bool

    async def trigger(self, event: Event, reason: str = "") -> bool:
        """Apply a state-machine event; False (logged) when the table refuses it."""
        ...

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Telemetry on ``topic`` (never key material)."""
        ...

    def alarm(self, kind: str, message: str, **details: Any) -> None:
        """Raise (or refresh) alarm ``kind``."""
        ...

    def pp_drain(self) -> None:
        """Drop post-processing messages of a block that ended on one side only."""
        ...
