"""Connection-loss handling shared by the transports: retry once after a reconnect, and
closing a handle that may already be dead.

The reconnect itself (reopen with backoff) is :func:`drivers.transports.base.reopen_with_backoff`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from drivers.errors import ConnectionLostError

T = TypeVar("T")


def retry_once_after_reconnect(
    log: logging.Logger,
    instrument: str,
    command: str,
    attempt: Callable[[], T],
    *,
    lost_errors: tuple[type[BaseException], ...],
    reconnect: Callable[[], None],
) -> T:
    """Return ``attempt()``; when it raises one of ``lost_errors`` (the connection is
    lost), log a warning on ``log``, call ``reconnect`` and try once more.

    A second loss raises :class:`ConnectionLostError` naming it; any other exception of
    ``attempt`` (timeouts, protocol errors) and of ``reconnect`` propagates unchanged.
    """
    for try_index in (0, 1):
        try:
            return attempt()
        except lost_errors as exc:
            failure = exc
        log.warning("%s: %s: connection lost (%s); reopening", instrument, command, failure)
        if try_index == 1:
            raise ConnectionLostError(
                instrument, command, f"failed again after reconnect: {failure}"
            ) from failure
        reconnect()
    raise AssertionError("unreachable")


def close_quietly(log: logging.Logger, instrument: str, handle: Any) -> None:
    """Close ``handle`` (None: nothing to do); a failure is logged at debug level only,
    since a lost connection often cannot be closed cleanly."""
    if handle is not None:
        try:
            handle.close()
        except Exception:
            log.debug("%s: close failed", instrument, exc_info=True)


class ReopenHook:
    """What a driver runs after its transport reopened a lost connection and before the
    interrupted message is sent again: the driver checks whether the instrument lost its
    settings (it was power-cycled) and puts them back (:mod:`drivers.restore`).

    The transport calls :meth:`run` with its lock held. A hook started from inside the
    hook (the connection dropped again while it ran) does nothing. If the hook raises,
    ``drop`` closes the connection so that the next message reopens and checks again,
    and the error propagates to the caller of the interrupted message.
    """

    def __init__(self) -> None:
        self.callback: Callable[[], None] | None = None
        self._running = False

    def run(self, drop: Callable[[], None]) -> None:
        if self.callback is None or self._running:
            return
        self._running = True
        try:
            self.callback()
        except BaseException:
            drop()
            raise
        finally:
            self._running = False
