"""The two-phase commit inside a block: each side's key landing sees the key stored,
committed or discarded exactly as docs/protocol.md (4.1) says, also when a store cannot
take the block or the last message is lost."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from qkdnode.postproc.auth import AuthenticatedTransport, AuthKeyPool
from qkdnode.postproc.blockstats import BlockStats
from qkdnode.postproc.pipeline import BlockResult, run_block_receiver, run_block_transmitter
from qkdnode.postproc.transport import ZmqPairTransport, decode_frames
from tests.postproc.synth import generate
from tests.postproc.test_pipeline import N_PULSES, PARAMS, PSK


@dataclass
class Landing:
    """A key store stand-in that records what the block did to it."""

    can_store: bool = True
    #: False: the disk refuses the commit (the real landing then puts the pair out of step)
    can_commit: bool = True
    events: list[tuple[str, int]] = field(default_factory=list)
    keys: dict[int, bytes] = field(default_factory=dict)

    async def store(self, block_id: int, key: Any, stats: BlockStats) -> bool:
        self.events.append(("store", block_id))
        if self.can_store:
            self.keys[block_id] = np.packbits(key).tobytes()
        return self.can_store

    async def commit(self, block_id: int) -> bool:
        self.events.append(("commit", block_id))
        return self.can_commit

    async def discard(self, block_id: int) -> None:
        self.events.append(("discard", block_id))
        self.keys.pop(block_id, None)

    async def unconfirmed(self, block_id: int, why: str) -> None:
        self.events.append(("unconfirmed", block_id))


class DropDone:
    """Forwards frames and swallows the receiver's ``done`` (the last message)."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.front = ctx.socket(zmq.PAIR)
        self.back = ctx.socket(zmq.PAIR)
        for s in (self.front, self.back):
            s.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.front.bind_to_random_port('tcp://127.0.0.1')}"

    async def pump(self, src: zmq.asyncio.Socket, dst: zmq.asyncio.Socket) -> None:
        while True:
            frames = await src.recv_multipart()
            if decode_frames(frames).kind == "done":
                continue
            await dst.send_multipart(frames)


def _block(
    tmp_path: Path, tx_landing: Landing, rx_landing: Landing, *, drop_done: bool = False
) -> tuple[BlockResult, BlockResult]:
    params = PARAMS.model_copy(update={"recv_timeout_s": 4.0})

    async def main() -> tuple[BlockResult, BlockResult]:
        ctx = zmq.asyncio.Context()
        pools = [AuthKeyPool.bootstrap(tmp_path / f"{n}.pool", PSK) for n in ("tx", "rx")]
        tx = ZmqPairTransport.bind_random(ctx)
        pumps: list[asyncio.Task[None]] = []
        if drop_done:
            mitm = DropDone(ctx)
            mitm.back.connect(tx.endpoint)
            rx = ZmqPairTransport.connect(ctx, mitm.endpoint)
            pumps = [
                asyncio.create_task(mitm.pump(mitm.front, mitm.back)),
                asyncio.create_task(mitm.pump(mitm.back, mitm.front)),
            ]
        else:
            rx = ZmqPairTransport.connect(ctx, tx.endpoint)
        synth = generate(N_PULSES, params, 5, eta=0.5)
        a_tx = AuthenticatedTransport(tx, pools[0], "transmitter")
        a_rx = AuthenticatedTransport(rx, pools[1], "receiver")
        t, r = await asyncio.gather(
            run_block_transmitter(
                a_tx, 3, synth.prepared, params, landing=tx_landing, advice=123_456
            ),
            run_block_receiver(
                a_rx, 3, synth.slot_index, synth.channel, params, pulses=777, landing=rx_landing
            ),
        )
        for p in pumps:
            p.cancel()
        tx.close()
        rx.close()
        ctx.destroy(linger=0)
        return t, r

    return asyncio.run(main())


def test_both_stored_receiver_commits_then_transmitter(tmp_path: Path) -> None:
    tx, rx = Landing(), Landing()
    t, r = _block(tmp_path, tx, rx)
    assert t.ok and r.ok and t.committed and r.committed
    assert tx.events == [("store", 3), ("commit", 3)]
    assert rx.events == [("store", 3), ("commit", 3)]
    assert tx.keys[3] == rx.keys[3] == t.key_bytes == r.key_bytes
    assert r.advised_block_detections == 123_456  # the advice rides on pa


def test_a_transmitter_that_cannot_store_makes_the_receiver_discard(tmp_path: Path) -> None:
    tx, rx = Landing(can_store=False), Landing()
    t, r = _block(tmp_path, tx, rx)
    assert t.ok and r.ok and not t.committed and not r.committed
    assert tx.events == [("store", 3)]
    assert rx.events == [("store", 3), ("discard", 3)]
    assert not rx.keys


def test_a_receiver_that_cannot_store_makes_the_transmitter_discard(tmp_path: Path) -> None:
    tx, rx = Landing(), Landing(can_store=False)
    t, r = _block(tmp_path, tx, rx)
    assert not t.committed and not r.committed
    assert tx.events == [("store", 3), ("discard", 3)]
    assert rx.events == [("store", 3)]
    assert not tx.keys


@pytest.mark.system  # waits out the commit timeout (~5 s): make test-system
def test_a_lost_done_leaves_the_transmitter_pending_and_says_so(tmp_path: Path) -> None:
    tx, rx = Landing(), Landing()
    t, r = _block(tmp_path, tx, rx, drop_done=True)
    assert r.ok and r.committed  # the receiver committed before it said so
    assert not t.ok and not t.committed
    # stored, never committed nor discarded: pending until the key-ID sync settles it
    assert tx.events == [("store", 3), ("unconfirmed", 3)]
    assert tx.keys[3] == rx.keys[3]


def test_a_receiver_whose_disk_refuses_the_commit_says_so_and_nobody_serves(
    tmp_path: Path,
) -> None:
    tx, rx = Landing(), Landing(can_commit=False)
    t, r = _block(tmp_path, tx, rx)
    assert not r.committed and not t.committed
    assert rx.events == [("store", 3), ("commit", 3)]  # pending there, out of step
    assert tx.events == [("store", 3), ("discard", 3)]  # the receiver said "not committed"


def test_a_transmitter_whose_disk_refuses_the_commit_stays_pending(tmp_path: Path) -> None:
    tx, rx = Landing(can_commit=False), Landing()
    t, r = _block(tmp_path, tx, rx)
    assert r.committed  # the receiver holds it; the key-ID sync commits it here later
    assert tx.events == [("store", 3), ("commit", 3)]
    assert not t.committed


@dataclass
class SlowCommit(Landing):
    """A landing whose commit hangs (a stalled disk) until the block is cancelled."""

    commit_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def commit(self, block_id: int) -> bool:
        self.events.append(("commit", block_id))
        self.commit_started.set()
        await asyncio.Event().wait()
        return True


def _cancelled_block(
    tmp_path: Path, tx_landing: Landing, rx_landing: Landing, *, cancel: str
) -> tuple[BaseException | BlockResult, BaseException | BlockResult]:
    """One block in which the ``cancel`` side's task is cancelled (as a state change
    cancels it): the transmitter once the receiver has finished (it waits for a ``done``
    that is dropped), the receiver while its commit is in progress."""
    params = PARAMS.model_copy(update={"recv_timeout_s": 4.0})

    async def main() -> tuple[BaseException | BlockResult, BaseException | BlockResult]:
        ctx = zmq.asyncio.Context()
        pools = [AuthKeyPool.bootstrap(tmp_path / f"{n}.pool", PSK) for n in ("tx", "rx")]
        tx = ZmqPairTransport.bind_random(ctx)
        mitm = DropDone(ctx)
        mitm.back.connect(tx.endpoint)
        rx = ZmqPairTransport.connect(ctx, mitm.endpoint)
        pumps = [
            asyncio.create_task(mitm.pump(mitm.front, mitm.back)),
            asyncio.create_task(mitm.pump(mitm.back, mitm.front)),
        ]
        synth = generate(N_PULSES, params, 5, eta=0.5)
        a_tx = AuthenticatedTransport(tx, pools[0], "transmitter")
        a_rx = AuthenticatedTransport(rx, pools[1], "receiver")
        t_task = asyncio.create_task(
            run_block_transmitter(a_tx, 3, synth.prepared, params, landing=tx_landing)
        )
        r_task = asyncio.create_task(
            run_block_receiver(
                a_rx, 3, synth.slot_index, synth.channel, params, pulses=777, landing=rx_landing
            )
        )
        if cancel == "transmitter":
            await r_task
            await asyncio.sleep(0.2)
            t_task.cancel()
        else:
            assert isinstance(rx_landing, SlowCommit)
            await asyncio.wait_for(rx_landing.commit_started.wait(), 30)
            r_task.cancel()
        out = await asyncio.gather(t_task, r_task, return_exceptions=True)
        for p in pumps:
            p.cancel()
        tx.close()
        rx.close()
        ctx.destroy(linger=0)
        return out[0], out[1]

    return asyncio.run(main())


def test_a_transmitter_cancelled_with_its_key_pending_puts_the_pair_out_of_step(
    tmp_path: Path,
) -> None:
    tx, rx = Landing(), Landing()
    t, r = _cancelled_block(tmp_path, tx, rx, cancel="transmitter")
    assert isinstance(t, asyncio.CancelledError)  # the cancellation is not swallowed
    assert isinstance(r, BlockResult) and r.committed
    # pending here while the receiver serves: the landing must hear of it (the real
    # landing then puts the key service out of step until the key-ID sync settles it)
    assert tx.events == [("store", 3), ("unconfirmed", 3)]


@pytest.mark.system  # waits out the commit timeout (~5 s): make test-system
def test_a_receiver_cancelled_during_its_commit_puts_the_pair_out_of_step(
    tmp_path: Path,
) -> None:
    tx, rx = Landing(), SlowCommit()
    t, r = _cancelled_block(tmp_path, tx, rx, cancel="receiver")
    assert isinstance(r, asyncio.CancelledError)
    assert rx.events == [("store", 3), ("commit", 3), ("unconfirmed", 3)]
    assert isinstance(t, BlockResult) and not t.committed  # no 'done': pending there too
    assert tx.events == [("store", 3), ("unconfirmed", 3)]
