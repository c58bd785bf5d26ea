"""A console over real bus pieces: each link is a real ``ControlServer`` (plaintext, on a
loopback port) and a real ``TelemetryPublisher`` with a small command table, seen through
the same two calls the node's port makes (``ControlServer.invoke``, telemetry listeners).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from qkdnode.bus.commands import CallerInfo, CommandSpec, CommandTable, NoContent
from qkdnode.bus.control import ControlServer
from qkdnode.bus.telemetry import TelemetryListener, TelemetryPublisher
from qkdnode.config.console import ConsoleSection
from qkdnode.config.sections import BusSection
from qkdnode.console.service import ConsoleService


@dataclass
class BusLink:
    """One link's control and telemetry; ``actions`` records who ran what."""

    name: str
    control: ControlServer
    telemetry: TelemetryPublisher
    state: list[str]
    actions: list[tuple[str, str]] = field(default_factory=list)
    role: str = "transmitter"
    peer_site: str = "bob"
    plots: Path | None = None

    @property
    def link_id(self) -> str:
        return self.name

    async def call(self, command: str, caller: CallerInfo) -> dict[str, Any]:
        return await self.control.invoke(command, {}, caller)

    def calibration_dir(self) -> Path | None:
        return self.plots

    def listen(self, listener: TelemetryListener) -> Callable[[], None]:
        self.telemetry.listeners.append(listener)
        return lambda: self.telemetry.listeners.remove(listener)


async def make_link(ctx: zmq.asyncio.Context, name: str) -> BusLink:
    bus = BusSection(
        control_endpoint="tcp://127.0.0.1:0",
        telemetry_endpoint="tcp://127.0.0.1:0",
        allow_plaintext=True,
    )
    state = ["EXCHANGING"]
    link: BusLink

    async def status(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {
            "state": state[0],
            "role": "transmitter",
            "peer_id": "bob",
            "healthy": True,
            "peer_connected": True,
            "stats": {
                "secret_key_rate_bps": 1234.5,
                "qber": 0.021,
                "secret_bits": 99_000,
                "auth_key_balance_bits": 250_000,
                "last_block": {"block_id": 7},
            },
            "keystore": {"available": 40},
            "state_since": time.time() - 30,
            "seconds_since_last_block": 3.0,
            "keystore_fill_ratio": 0.4,
            "alarms": [],
        }

    def action(name: str) -> Any:
        async def run(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
            link.actions.append((name, caller.name))
            return {"state": state[0]}

        return run

    table = CommandTable(
        [
            CommandSpec("status", status, None, "monitor", NoContent),
            CommandSpec("stop", action("stop"), None, "operator", NoContent),
            CommandSpec("start", action("start"), frozenset({"IDLE"}), "operator", NoContent),
        ]
    )
    telemetry = TelemetryPublisher(ctx, bus, None)
    await telemetry.start()
    control = ControlServer(ctx, bus, table, lambda: state[0], None, telemetry=telemetry)
    await control.start()
    link = BusLink(name, control, telemetry, state)
    return link


@contextlib.asynccontextmanager
async def console_env(tmp: Path, **cfg: Any) -> AsyncIterator[tuple[ConsoleService, list[BusLink]]]:
    """Two bus links and a console over them on a free loopback port."""
    ctx = zmq.asyncio.Context()
    links = [await make_link(ctx, "alice-bob"), await make_link(ctx, "alice-carol")]
    service = await start_console(tmp, links, **cfg)
    try:
        yield service, links
    finally:
        await service.stop()
        for link in links:
            await link.control.stop()
            await link.telemetry.stop()
        ctx.destroy(linger=0)


async def start_console(tmp: Path, links: list[BusLink], **cfg: Any) -> ConsoleService:
    section = ConsoleSection.model_validate(
        {"listen_host": "127.0.0.1", "listen_port": 0, "sample_interval_s": 0.5, **cfg}
    )
    service = ConsoleService("alice", section, tmp, lambda: links, live_interval_s=0.2)
    await service.start()
    return service


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
