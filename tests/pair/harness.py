"""Both halves of a link in one process: two node runtimes (``qkdnode.node.Node``) on one
event loop, each with its own simulated world (named worlds of one process, joined by a
loopback fiber), peer channel, key store and state machine.

The activities run exactly as in the daemons (same code, same peer protocol); what one
process buys is speed and the ability to look inside both nodes at once (their state
machines, statistics, alarms, key stores) while injecting faults on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdnode.config import parse_config
from qkdnode.daemon import ProcessControl, warm_up_kernels
from qkdnode.demo.line import rewrite_for_run
from qkdnode.node import Node
from qkdnode.paths import private_dir
from qkdnode.statemachine import Event, State

ROOT = Path(__file__).resolve().parents[2]
#: A small block, so that a block closes within seconds on a loaded 2-core machine.
BLOCK_DETECTIONS = 2_000_000


def _config(role: str, tmp: Path, ports: dict[int, int], extra: dict[str, Any]) -> Any:
    base = "transmitter" if role == "transmitter" else "receiver"
    text = (ROOT / "configs" / f"{base}.sim.toml").read_text()
    data = tomllib.loads(rewrite_for_run(text, ports, tmp / role))  # free ports, own state
    data["protocol"]["block_detections"] = BLOCK_DETECTIONS
    # A short count-rate wait per timing-scan point (the receiver scans ~150 delays):
    # the scan, its fit and its minimum-count refusals are the same, in half the time.
    data.setdefault("calibration", {}).setdefault("integration_time_s", 0.04)
    for inst in data["instruments"].values():
        inst["resource"] = role  # two simulated worlds in this process: name each one
    _merge(data, extra)
    return parse_config(data, f"{base}.sim.toml")


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """``extra`` merged into ``into`` table by table (nested tables too)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


@dataclass
class InProcessPair:
    tx: Node
    rx: Node

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.tx, self.rx

    async def drive(self, event: Event, timeout_s: float = 300.0) -> State:
        """Trigger ``event`` on the transmitter (which coordinates the pair) and wait
        until it is back at rest (IDLE, FAULT or PAUSED); for EXCHANGE, until it runs."""
        await self.tx.sm.trigger(event, "test")
        if event is Event.EXCHANGE:
            return self.tx.sm.state
        return await self.tx.sm.wait_for(State.IDLE, State.FAULT, State.PAUSED, timeout_s=timeout_s)

    async def wait_until(self, what: str, check: Any, timeout_s: float = 300.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not check():
            if loop.time() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}: transmitter {self.tx.sm.state.value}, "
                    f"receiver {self.rx.sm.state.value}"
                )
            await asyncio.sleep(0.2)

    def committed(self) -> tuple[int, int]:
        """Keys committed (available) in each node's store."""
        counts = [n.session.keystore_counts() if n.session else {} for n in self.nodes]
        return counts[0].get("available", 0), counts[1].get("available", 0)


@contextlib.asynccontextmanager
async def in_process_pair(
    tmp: Path,
    *,
    extra_tx: dict[str, Any] | None = None,
    extra_rx: dict[str, Any] | None = None,
) -> AsyncIterator[InProcessPair]:
    """Start a transmitter and a receiver in this event loop (instruments open, peer
    connected, both IDLE); on exit, every instrument is made safe and everything closed."""
    ports: dict[int, int] = {}
    process = ProcessControl()
    tx = Node(_config("transmitter", tmp, ports, extra_tx or {}), "tx", process, "transmitter")
    rx = Node(_config("receiver", tmp, ports, extra_rx or {}), "rx", process, "receiver")
    pair = InProcessPair(tx, rx)
    started: list[Node] = []
    try:
        await asyncio.to_thread(warm_up_kernels)
        for node in (rx, tx):
            await asyncio.to_thread(node._warm_up_backend)
        for node in (rx, tx):
            started.append(node)
            private_dir(node.state_dir)
            await node.start_link()
        for node in (tx, rx):
            await node.sm.wait_for(State.IDLE, timeout_s=60)
        yield pair
    finally:
        for node in reversed(started):
            await node.make_link_safe()
            await node.close_link()
