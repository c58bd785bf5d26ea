"""The link steps a node answers: one table, every step of the wire protocol in it, each
served by the roles the protocol says, and anything else refused with a clear error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import get_args

import pytest

from qkdnode.config import load_config
from qkdnode.link import LinkError, LinkRequest, Step
from qkdnode.session import ExchangeSession
from qkdnode.statemachine import StateMachine

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class _Host:
    """What a session reads when it is built: the node config and the state machine
    (serving a step that needs more of the node fails the test loudly)."""

    def __init__(self, config: str) -> None:
        self.cfg = load_config(CONFIGS / config)
        self.sm = StateMachine()


def _session(config: str) -> ExchangeSession:
    return ExchangeSession(_Host(config))  # type: ignore[arg-type]


def test_every_protocol_step_is_in_the_table() -> None:
    steps = _session("transmitter.sim.toml")._step_table()
    assert set(steps) == set(get_args(Step))


def test_receiver_steps_are_refused_by_a_transmitter_and_the_reverse() -> None:
    tx, rx = _session("transmitter.sim.toml"), _session("receiver.sim.toml")

    async def ask(s: ExchangeSession, step: str) -> str:
        with pytest.raises(LinkError) as info:
            await s.serve(LinkRequest(rid=1, step=step, args={}))  # type: ignore[arg-type]
        return str(info.value)

    for step in ("calibrate", "sync", "sync_end", "exchange"):
        assert asyncio.run(ask(tx, step)) == f"{step!r} is a receiver step"
    assert asyncio.run(ask(rx, "light")) == "'light' is a transmitter step"
    # a key step before the key store is open
    assert asyncio.run(ask(rx, "activate")) == "key store not open"


def test_docs_list_every_step() -> None:
    text = (CONFIGS.parent / "docs" / "protocol.md").read_text()
    missing = [s for s in get_args(Step) if f"`{s}`" not in text]
    assert not missing, missing
