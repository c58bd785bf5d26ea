"""One link of a node as the site's key manager sees it (``qkdnode.kms.ports.LinkPort``).

Kept apart from :mod:`qkdnode.node` so that the node runtime does not know the key
manager: this adapter only reads the node and sets its two ``kms_*`` hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qkdnode.bus.commands import CallerInfo, CommandSpec
from qkdnode.bus.telemetry import TelemetryListener
from qkdnode.keystore.store import KeyStore
from qkdnode.node import Node


class NodeLinkPort:
    """The key manager's view of ``node``: its store, its health, its peer channel."""

    def __init__(self, node: Node) -> None:
        self._node = node

    @property
    def link_id(self) -> str:
        return self._node.link_id

    @property
    def name(self) -> str:
        """The link's name, or ``<node>-<peer>`` for a one-link node (the console's)."""
        cfg = self._node.cfg.node
        return self._node.link_id or f"{cfg.id}-{cfg.peer_id}"

    @property
    def peer_site(self) -> str:
        return self._node.cfg.node.peer_id

    @property
    def role(self) -> str:
        return self._node.cfg.node.role

    def store(self) -> KeyStore | None:
        session = self._node.session
        keys = session.keys if session is not None else None
        return keys.store if keys is not None else None

    def usable(self) -> bool:
        node = self._node
        session = node.session
        keys = session.keys if session is not None else None
        return bool(
            node.peer is not None and node.peer.connected and keys is not None and keys.in_step
        )

    def rate_bps(self) -> float:
        return float(self._node.stats.secret_key_rate_bps)

    def state(self) -> str:
        return self._node.sm.state.value

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[bytes]) -> None:
        peer = self._node.peer
        if peer is None:
            raise ConnectionError(f"link {self.link_id}: peer channel not started")
        await peer.send(kind, header, list(buffers))

    def add_command(self, spec: CommandSpec) -> None:
        """Serve ``spec`` on the link's control socket as well."""
        if self._node.control is not None:
            self._node.control.add_command(spec)

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self._node.publish(topic, payload)

    def set_alarm(self, name: str, on: bool, cause: str = "") -> None:
        self._node.alarms.set(name, on, cause)

    def attach(
        self,
        on_message: Callable[[str, dict[str, Any], list[bytes]], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._node.kms_sink = on_message
        self._node.kms_lost = on_lost

    async def call(self, command: str, caller: CallerInfo) -> dict[str, Any]:
        """Run control command ``command`` (content ``{}``) as ``caller``, with the checks
        of the control socket; ``CommandError`` when refused or not started."""
        control = self._node.control
        if control is None:
            from qkdnode.bus.errors import CommandError

            raise CommandError(f"link {self.name}: control not started", code="not_ready")
        return await control.invoke(command, {}, caller)

    def calibration_dir(self) -> Path | None:
        """The link's calibration results (``procedures.common.save_result``)."""
        return Path(self._node.state_dir) / "calibration"

    def listen(self, listener: TelemetryListener) -> Callable[[], None]:
        """Hear every telemetry message the link publishes; returns the unsubscribe."""
        telemetry = self._node.telemetry
        if telemetry is None:
            return lambda: None
        telemetry.listeners.append(listener)

        def stop() -> None:
            if listener in telemetry.listeners:
                telemetry.listeners.remove(listener)

        return stop
