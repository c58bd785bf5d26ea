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
