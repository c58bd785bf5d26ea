"""A background loop of the node that fails is restarted, and says so."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import qkdnode.node as node_mod
from qkdnode.config import load_config
from qkdnode.node import Node

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "transmitter.sim.toml"


def test_a_failing_loop_is_restarted_raises_internal_error_then_clears(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(node_mod, "INTERNAL_ERROR_CLEAR_S", 1.5)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    node = Node(load_config(CONFIG), str(CONFIG))
    runs: list[int] = []

    async def _flaky_watch() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise OSError(27, "File too large")  # what a disk write error looks like
        await asyncio.sleep(3600)

    async def go() -> tuple[bool, bool, str]:
        task = asyncio.create_task(node._keep_running(_flaky_watch))
        await asyncio.sleep(1.3)
        raised = node.alarms.is_active("internal_error")
        message = next(a.cause for a in node.alarms.active() if a.name == "internal_error")
        await asyncio.sleep(1.5)
        cleared = not node.alarms.is_active("internal_error")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return raised, cleared, message

    raised, cleared, message = asyncio.run(go())
    assert len(runs) == 2
    assert raised and "flaky_watch failed and was restarted: [Errno 27] File too large" in message
    assert cleared
