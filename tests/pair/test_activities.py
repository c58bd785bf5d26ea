"""The pair activities (calibration, synchronisation, key exchange) with both halves in
one process (tests/pair/harness.py), including their failure paths."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from qkdnode.bus.peer import PeerMessage
from qkdnode.statemachine import Event, State
from tests.pair.harness import in_process_pair


def test_calibrate_sync_exchange_commit_identical_keys(tmp_path: Path) -> None:
    async def go() -> None:
        async with in_process_pair(tmp_path) as p:
            assert await p.drive(Event.CALIBRATE) is State.IDLE
            assert p.tx.stats.calibrated and p.rx.stats.calibrated
            # the receiver's calibrations count what the simulated counters count (one
            # fiber batch per reading), not the wait between readings
            batch_s = (1 << 20) / p.rx.cfg.source.slot_rate_hz
            for name in ("dark_rate", "detector_timing"):
                saved = json.loads((p.rx.state_dir / "calibration" / f"{name}.json").read_text())
                assert saved["reading_time_s"] == pytest.approx(batch_s, rel=0.01), name
            assert await p.drive(Event.SYNC) is State.IDLE
            assert p.tx.stats.synchronized and p.rx.stats.synchronized
            await p.drive(Event.EXCHANGE)
            await p.wait_until("a committed block", lambda: min(p.committed()) > 0)
            # A forged block announcement (a huge block id, no valid check) must not move
            # the transmitter's block counter: the receiver's next blocks still commit.
            first = p.committed()
            forged = PeerMessage(
                "pp.sift",
                {"slots": {}, "pulses": 1, "_auth": {"b": 10**9, "q": 0, "p": [0, 0]}},
                [],
            )
            p.tx.pp_inbox.put_nowait(forged)
            await p.wait_until("another committed block", lambda: min(p.committed()) > max(first))
            assert p.tx.session.next_block_id < 10**9
            # The transmitter's disk refuses one commit (the receiver has committed): its
            # copy stays pending, the alarm is raised, and the key-ID sync makes the two
            # stores the same again while the exchange goes on.
            store = p.tx.session.keystore
            real_commit = store.commit_block
            refused: list[int] = []

            def commit_once_refused(block_id: int) -> None:
                if not refused:
                    refused.append(block_id)
                    raise sqlite3.OperationalError("disk I/O error")
                real_commit(block_id)

            store.commit_block = commit_once_refused
            await p.wait_until("a refused commit", lambda: bool(refused))
            assert p.tx.alarms.is_active("keystore_write_error")

            async def in_step() -> bool:
                a, b = [await n.session.keys_digest() for n in p.nodes]
                pending = p.tx.session.keystore_counts().get("pending", 0)
                return bool(a == b and a["count"] > 0 and pending == 0)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 120
            while not await in_step():
                assert loop.time() < deadline, "the stores did not come back in step"
                await asyncio.sleep(0.5)
            await p.tx.sm.trigger(Event.STOP, "test")
            await p.wait_until("both idle", lambda: p.rx.sm.state is State.IDLE)
            digests = [await n.session.keys_digest() for n in p.nodes]
            assert digests[0] == digests[1] and digests[0]["count"] > 0

    asyncio.run(go())


def test_calibration_fails_cleanly_when_the_receivers_detectors_are_gone(tmp_path: Path) -> None:
    async def go() -> None:
        async with in_process_pair(tmp_path) as p:
            assert p.rx.backend is not None
            p.rx.backend.faults.inject("detector_disconnect")
            end = await p.drive(Event.CALIBRATE)
            assert end in (State.IDLE, State.FAULT)
            assert not p.tx.stats.calibrated
            await p.wait_until(
                "the receiver to give up", lambda: p.rx.sm.state in (State.IDLE, State.FAULT)
            )
            assert not p.rx.stats.calibrated
            # the transmitter's light is off again: the failed step left nothing on
            assert p.tx.sm.state is not State.CALIBRATING
            assert p.tx.stats.failures + p.rx.stats.failures >= 1

    asyncio.run(go())


@pytest.mark.system  # ~20 s: `make test` keeps its budget
def test_synchronisation_without_light_fails_and_says_why(tmp_path: Path) -> None:
    async def go() -> None:
        async with in_process_pair(tmp_path) as p:
            assert await p.drive(Event.CALIBRATE) is State.IDLE
            assert p.tx.backend is not None
            p.tx.backend.faults.inject("fiber_cut")
            end = await p.drive(Event.SYNC)
            assert end in (State.IDLE, State.FAULT)
            assert not p.tx.stats.synchronized and not p.rx.stats.synchronized
            assert p.tx.stats.last_failure or p.rx.stats.last_failure

    asyncio.run(go())


@pytest.mark.system  # ~20 s: `make test` keeps its budget
def test_exchange_under_full_intercept_resend_aborts_every_block(tmp_path: Path) -> None:
    async def go() -> None:
        async with in_process_pair(tmp_path) as p:
            assert await p.drive(Event.CALIBRATE) is State.IDLE
            assert await p.drive(Event.SYNC) is State.IDLE
            assert p.tx.backend is not None
            p.tx.backend.faults.inject("eve", fraction=1.0, mode="intercept-resend")
            await p.drive(Event.EXCHANGE)
            await p.wait_until(
                "an aborted block on both sides",
                lambda: p.tx.stats.blocks_aborted >= 1 and p.rx.stats.blocks_aborted >= 1,
            )
            assert p.tx.stats.blocks_ok == 0 and p.rx.stats.blocks_ok == 0
            assert p.committed() == (0, 0)
            assert p.tx.stats.qber > 0.2  # the attack shows in the error rate
            await p.tx.sm.trigger(Event.STOP, "test")

    asyncio.run(go())
