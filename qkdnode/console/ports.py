"""One link as the web console sees it (implemented by ``qkdnode.node_port.NodeLinkPort``).

The console never imports the node: it reads a link's status and alarms, runs its
actions through the link's own command table (same checks as on the control socket) and
listens to its telemetry in-process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from qkdnode.bus.commands import CallerInfo
from qkdnode.bus.telemetry import TelemetryListener


class ConsoleLink(Protocol):
    @property
    def link_id(self) -> str: ...

    @property
    def name(self) -> str:
        """The link's name in the console's pages and URLs (never empty)."""
        ...

    @property
    def peer_site(self) -> str: ...

    @property
    def role(self) -> str: ...

    async def call(self, command: str, caller: CallerInfo) -> dict[str, Any]:
        """Run control command ``command`` (content ``{}``) as ``caller``; raises
        ``qkdnode.bus.errors.CommandError`` when refused."""
        ...

    def calibration_dir(self) -> Path | None:
        """Where the link's calibration procedures save their latest result and plot
        (``<procedure>.json`` / ``.png``); None when it has none."""
        ...

    def listen(self, listener: TelemetryListener) -> Callable[[], None]:
        """Call ``listener`` for each telemetry message of the link; returns the function
        that stops it."""
        ...
