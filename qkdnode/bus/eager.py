"""Run a coroutine eagerly: synchronously up to its first suspension.

Most control handlers finish without awaiting anything; running them inline saves a task
and a loop iteration per request (Python 3.12's eager task factory does the same). A
coroutine that does suspend is handed over to a real task which resumes it correctly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


class _Resume:
    """Awaitable that continues a coroutine already started with ``send(None)``."""

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        value = self._first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancellation and throw() go to the coroutine
                try:
                    value = self._coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = self._coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _await(awaitable: _Resume) -> Any:
    return await awaitable


def start_eager(
    coro: Coroutine[Any, Any, Any],
) -> tuple[bool, Any, asyncio.Task[Any] | None]:
    """Start ``coro``. Returns ``(True, result, None)`` if it finished synchronously,
    ``(False, None, task)`` otherwise. Exceptions raised before the first suspension
    propagate to the caller."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return True, stop.value, None
    return False, None, asyncio.ensure_future(_await(_Resume(coro, first)))
