"""A stop never hangs on a worker thread or a task that ignores its cancellation."""

from __future__ import annotations

import asyncio
import threading

from qkdnode.daemon import _join_workers, settle_cancelled


def test_a_blocked_worker_thread_is_reported_with_its_stack_and_left_behind() -> None:
    release = threading.Event()

    def blocked_instrument_call() -> None:
        release.wait(30)

    t = threading.Thread(target=blocked_instrument_call, name="qkdnode-worker-7")
    t.start()
    try:
        stuck = _join_workers(0.2)
        assert list(stuck) == ["qkdnode-worker-7"]
        assert "blocked_instrument_call" in stuck["qkdnode-worker-7"]
    finally:
        release.set()
        t.join()
    assert _join_workers(0.2) == {}


def test_a_task_that_swallows_its_cancellation_does_not_hold_the_stop() -> None:
    async def go() -> None:
        give_up = asyncio.Event()

        async def stubborn() -> None:
            while not give_up.is_set():
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    continue

        async def polite() -> None:
            await asyncio.sleep(10)

        tasks = [
            asyncio.create_task(stubborn(), name="stubborn"),
            asyncio.create_task(polite(), name="polite"),
        ]
        await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await settle_cancelled(tasks, 0.3, "background")
        assert loop.time() - t0 < 2
        assert tasks[1].cancelled() and not tasks[0].done()
        give_up.set()
        tasks[0].cancel()
        await asyncio.wait([tasks[0]], timeout=2)
        assert tasks[0].done()

    asyncio.run(go())
