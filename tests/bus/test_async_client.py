"""AsyncClient: concurrent requests, heartbeats, reconnect after a server restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qkdnode.client import AsyncClient, RemoteError, asubscribe
from tests.bus.conftest import Keys, spawn_devserver


def test_concurrent_requests_match_replies(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True)

    async def go() -> None:
        async with AsyncClient(srv.endpoint, keys.server[0], keys.operator, timeout_s=5) as c:
            results = await asyncio.gather(*(c.call("echo", i=i) for i in range(300)))
            assert [r["i"] for r in results] == list(range(300))
            with pytest.raises(RemoteError) as info:
                await c.call("keys.get", number=1)
            assert info.value.code == "not_allowed_in_state"
            assert await c.heartbeat() < 1.0

    asyncio.run(go())


def test_async_subscribe(start_inproc: Any) -> None:
    srv = start_inproc()
    srv.lt.call(lambda: srv.pub.publish("state", {"new": "idle"}))

    async def go() -> None:
        async with AsyncClient(srv.endpoint, timeout_s=3) as c:
            it = asubscribe(srv.pub.endpoint, c, idle_timeout_s=2)
            first = await it.__anext__()
            assert (first.kind, first.topic) == ("snapshot", "state")
            # The SUB socket joins asynchronously (ZeroMQ's slow joiner): a message published
            # before it is connected is missed and repaired by a fresh snapshot. Publish until
            # a delta arrives, then check that the next message follows in sequence.
            stop = asyncio.Event()

            async def keep_publishing() -> None:
                while not stop.is_set():
                    srv.lt.loop.call_soon_threadsafe(srv.pub.publish, "state", {"new": "idle"})
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(keep_publishing())
            prev = await it.__anext__()
            while prev.kind != "delta":
                prev = await it.__anext__()
            stop.set()
            await task
            srv.lt.loop.call_soon_threadsafe(srv.pub.publish, "alarm", {"x": 1})
            nxt = await it.__anext__()
            while nxt.topic != "alarm":
                prev, nxt = nxt, await it.__anext__()
            assert (nxt.kind, nxt.seq) == ("delta", prev.seq + 1)
            await it.aclose()

    asyncio.run(go())


def test_heartbeat_detects_dead_server_and_reconnects() -> None:
    dp = spawn_devserver("--plaintext")
    port_endpoint = dp.control

    async def go() -> None:
        c = AsyncClient(
            port_endpoint, timeout_s=2, heartbeat_interval_s=0.1, liveness=2, reconnect_max_s=0.3
        )
        await c.open()
        try:
            assert (await c.call("status"))["state"] == "idle"
            await asyncio.sleep(0.3)
            assert c.connected
            dp.proc.kill()
            dp.proc.wait()
            for _ in range(50):
                if not c.connected:
                    break
                await asyncio.sleep(0.05)
            assert not c.connected
            dp2 = spawn_devserver("--plaintext", "--control", port_endpoint)
            try:
                for _ in range(60):
                    if c.connected:
                        break
                    await asyncio.sleep(0.05)
                assert c.connected and c.reconnects >= 1
                st = await c.call("status")
                assert st["pid"] == dp2.proc.pid
            finally:
                dp2.proc.terminate()
                dp2.proc.wait(5)
        finally:
            await c.close()

    asyncio.run(go())
