"""Transport contracts and the shared reconnect-with-backoff loop."""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable

from drivers.errors import ConnectionLostError
from drivers.transports.reconnect import ReopenHook

log = logging.getLogger(__name__)

#: First delay between reopen attempts, and the cap the doubling delay never exceeds.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


def reopen_with_backoff(
    instrument: str,
    command: str,
    open_once: Callable[[], None],
    budget_s: float,
) -> None:
    """Call ``open_once`` until it succeeds, doubling the delay, for at most ``budget_s``.

    Raises :class:`ConnectionLostError` naming the last failure when the budget runs out.
    ``open_once`` signals failure by raising any exception.
    """
    deadline = time.monotonic() + budget_s
    delay = BACKOFF_FIRST_S
    attempt = 0
    while True:
        attempt += 1
        try:
            open_once()
        except Exception as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLostError(
                    instrument, command, f"reconnect failed after {attempt} attempts: {exc}"
                ) from exc
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, BACKOFF_MAX_S)
            continue
        if attempt > 1:
            log.info("%s: reconnected after %d attempts", instrument, attempt)
        return


class MessageTransport(abc.ABC):
    """A message-based (SCPI) transport: one command string out, one reply string back.

    ``write`` and ``query`` take the lock themselves; a caller that needs several
    messages to stay together (a setting and its error-queue check) holds ``lock`` around
    them. The lock is re-entrant.
    """

    instrument: str

    def __init__(self) -> None:
        self.lock = threading.RLock()
        #: run after a lost connection was reopened (a transport that never reopens
        #: never runs it)
        self.after_reopen = ReopenHook()

    @abc.abstractmethod
    def open(self) -> None:
        """Open the connection. Idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection. Idempotent; never raises."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    def drop_connection(self) -> None:
        """Close the connection but keep wanting it: the next message reopens it and
        runs :attr:`after_reopen` first (a driver whose instrument is not in the state
        it configured uses this so that nothing is sent before it checks again).

        This default closes the transport for good (the next message raises
        NotConnectedError until the driver connects again); a transport that reopens
        by itself overrides it."""
        self.close()

    @abc.abstractmethod
    def write(self, command: str) -> None:
        """Send ``command`` (termination added by the transport)."""

    @abc.abstractmethod
    def query(self, command: str) -> str:
        """Send ``command`` and return the reply without its termination."""


class InProcessTransport(MessageTransport):
    """A transport to something in this process (an instrument model, a pinned exchange):
    open and close only flip a flag."""

    def __init__(self) -> None:
        super().__init__()
        self._open = False
        self._dropped = False

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        self._open = True
        self._dropped = False

    def close(self) -> None:
        self._open = False
        self._dropped = False

    def drop_connection(self) -> None:
        with self.lock:
            self._dropped = self._open

    def reopen_if_dropped(self) -> None:
        """Call before each message: after :meth:`drop_connection`, run
        :attr:`after_reopen` (there is no connection to reopen in this process)."""
        with self.lock:
            if self._dropped:
                self._dropped = False
                self.after_reopen.run(self.drop_connection)
