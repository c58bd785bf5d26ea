"""Peer channel: binary frames, heartbeats, restart detection, reconnect, CURVE."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from qkdnode.bus.errors import PeerDisconnected, PeerTimeout
from qkdnode.bus.keys import generate_keypair
from qkdnode.bus.peer import PeerChannel, PeerLink
from qkdnode.config.sections import BusSection

HB = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def pair(
    curve: bool = True, rx_key_override: bytes | None = None, **kw: Any
) -> AsyncIterator[tuple[PeerChannel, PeerChannel, Callable[..., Any]]]:
    ctx_t, ctx_r = zmq.asyncio.Context(), zmq.asyncio.Context()
    tp, ts = generate_keypair()
    rp, rs = generate_keypair()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    common: dict[str, Any] = {
        "peer_endpoint": endpoint,
        "heartbeat_interval_s": HB,
        "heartbeat_liveness": 3,
        "reconnect_max_s": 0.4,
        "allow_plaintext": not curve,
        **kw,
    }
    bus_t = BusSection(peer_public_key=rp.decode() if curve else None, **common)
    bus_r = BusSection(peer_public_key=tp.decode() if curve else None, **common)

    def make(role: str) -> PeerChannel:
        if role == "transmitter":
            return PeerChannel(ctx_t, bus_t, "transmitter", ts if curve else None)
        return PeerChannel(ctx_r, bus_r, "receiver", (rx_key_override or rs) if curve else None)

    tx, rx = make("transmitter"), make("receiver")
    await tx.start()
    await rx.start()
    try:
        yield tx, rx, make
    finally:
        await rx.stop()
        await tx.stop()
        # destroy, not term: a frame still queued (the over-limit one the receiver
        # dropped) would hold term() for as long as the socket lingers
        ctx_t.destroy(linger=0)
        ctx_r.destroy(linger=0)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_numpy_and_bytes_roundtrip_with_curve() -> None:
    async def go() -> None:
        async with pair() as (tx, rx, _):
            assert isinstance(tx, PeerLink) and isinstance(rx, PeerLink)
            await rx.wait_connected(3)
            await tx.wait_connected(3)
            arr = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]  # non-contiguous
            big = np.random.default_rng(1).integers(0, 255, 3 << 20, dtype=np.uint8)
            await tx.send("sift", {"block": 7}, [arr, b"abc", memoryview(b"xyz"), big])
            msg = await rx.recv(3)
            assert (msg.kind, msg.header, msg.seq) == ("sift", {"block": 7}, 1)
            np.testing.assert_array_equal(msg.array(0), arr)
            assert msg.array(0).dtype == np.int64
            assert msg.buffers[1:3] == [b"abc", b"xyz"]
            np.testing.assert_array_equal(msg.array(3), big)
            assert "sizes=" in repr(msg) and "abc" not in repr(msg)
            await rx.send("ack", {"ok": True}, [])
            back = await tx.recv(3)
            assert (back.kind, back.header, back.buffers) == ("ack", {"ok": True}, [])

    run(go())


def test_recv_timeout_and_reserved_kinds() -> None:
    async def go() -> None:
        async with pair(curve=False) as (tx, rx, _):
            await rx.wait_connected(3)
            with pytest.raises(PeerTimeout):
                await rx.recv(0.2)
            with pytest.raises(ValueError, match="reserved"):
                await tx.send("$hb", {}, [])

    run(go())


def test_wrong_peer_key_never_connects() -> None:
    async def go() -> None:
        async with pair(rx_key_override=generate_keypair()[1]) as (tx, rx, _):
            with pytest.raises(PeerTimeout):
                await tx.wait_connected(0.6)
            assert not rx.connected
            with pytest.raises(PeerDisconnected):
                await tx.send("x", {}, [])

    run(go())


def test_receiver_restart_aborts_then_resumes() -> None:
    async def go() -> None:
        async with pair(curve=True) as (tx, rx, make):
            await tx.wait_connected(3)
            await tx.send("block", {"n": 1}, [b"a"])
            assert (await rx.recv(3)).header == {"n": 1}
            await rx.stop()  # receiver process dies...
            rx2 = make("receiver")  # ...and comes back with a new session
            await rx2.start()
            try:
                with pytest.raises(PeerDisconnected) as info:
                    while True:
                        await tx.recv(3)
                assert info.value.reason in ("restarted", "down")
                # after the event(s) the new peer is usable in both directions
                await rx2.wait_connected(3)
                for _ in range(30):
                    if tx.connected and tx.peer_session == rx2.session:
                        break
                    await asyncio.sleep(HB)
                assert tx.peer_session == rx2.session
                await tx.send("block", {"n": 2}, [b"b"])
                msg = await rx2.recv(3)
                assert msg.header == {"n": 2}
                assert tx.link_epoch >= 1
            finally:
                await rx2.stop()

    run(go())


def test_transmitter_restart_receiver_reconnects_with_backoff() -> None:
    async def go() -> None:
        async with pair(curve=False) as (tx, rx, make):
            await rx.wait_connected(3)
            first_session = rx.peer_session
            await tx.stop()
            with pytest.raises(PeerDisconnected) as info:
                await rx.recv(3)  # liveness runs out: link down
            assert info.value.reason == "down" and not rx.connected
            with pytest.raises(PeerDisconnected):
                await rx.send("x", {}, [])
            tx2 = make("transmitter")
            await tx2.start()
            try:
                await rx.wait_connected(5)
                assert rx.peer_session == tx2.session != first_session
                assert rx.reconnects >= 1
                with pytest.raises(PeerDisconnected) as info:
                    await rx.recv(1)
                assert info.value.reason == "restarted"
                await tx2.wait_connected(3)
                await tx2.send("hello", {}, [np.ones(4)])
                np.testing.assert_array_equal((await rx.recv(3)).array(0), np.ones(4))
            finally:
                await tx2.stop()

    run(go())


def test_lost_messages_are_reported_once() -> None:
    async def go() -> None:
        async with pair(curve=False) as (tx, rx, _):
            await tx.wait_connected(3)
            await tx.send("m", {"i": 1}, [])
            tx._send_seq += 2  # as if two messages vanished on the wire
            await tx.send("m", {"i": 4}, [])
            assert (await rx.recv(2)).header == {"i": 1}
            with pytest.raises(PeerDisconnected) as info:
                await rx.recv(2)
            assert info.value.reason == "lost"
            assert (await rx.recv(2)).header == {"i": 4}
            await tx.send("m", {"i": 5}, [])
            assert (await rx.recv(2)).header == {"i": 5}

    run(go())


def test_frames_over_limit_refused_by_sender_and_receiver() -> None:
    async def go() -> None:
        async with pair(curve=False, max_frame_bytes=64 * 1024) as (tx, rx, _):
            await tx.wait_connected(3)
            with pytest.raises(ValueError, match="max_frame_bytes"):
                await tx.send("big", {}, [b"x" * (65 * 1024)])
            rx._bus = rx._bus.model_copy(update={"max_frame_bytes": 10**9})
            # bypass the sender check: the receiver's ZMQ_MAXMSGSIZE drops the connection
            head = tx._header("big", 1, {}, [])
            await tx._send_frames([head, b"x" * (200 * 1024)])
            with pytest.raises(PeerTimeout):
                while True:
                    await tx.recv(0.2)
                    raise AssertionError("no message expected")
            assert rx.stats["received"] == 0

    run(go())
