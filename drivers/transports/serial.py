"""Serial transport through pyserial's ``serial_for_url``.

Any URL pyserial understands works: ``/dev/ttyUSB0``, a pty path, ``socket://host:port``,
``rfc2217://...``, ``loop://``. Reads block with the call's timeout. A lost port (read or
write error, peer closed) is reopened with backoff and the exchange is sent once more.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import serial

from drivers.errors import (
    ConnectionLostError,
    InstrumentTimeoutError,
    NotConnectedError,
    ProtocolError,
)
from drivers.transports.base import reopen_with_backoff
from drivers.transports.reconnect import (
    ReopenHook,
    close_quietly,
    retry_once_after_reconnect,
)

log = logging.getLogger(__name__)

try:  # a pty or tty whose other end vanished fails in termios calls too
    import termios

    _PORT_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError, termios.error)
except ImportError:  # pragma: no cover - not POSIX
    _PORT_ERRORS = (serial.SerialException, OSError)


class ReplyReader:
    """Reads a reply from an open port with the transport's timeout."""

    def __init__(self, port: Any, instrument: str, command: str, timeout_s: float) -> None:
        self._port = port
        self._instrument = instrument
        self._command = command
        self._timeout_s = timeout_s

    def exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes; a timeout with nothing raises InstrumentTimeoutError,
        with part of the reply ProtocolError (truncated)."""
        data = bytes(self._port.read(n))
        if len(data) == n:
            return data
        if not data:
            raise InstrumentTimeoutError(
                self._instrument, self._command, f"no reply within {self._timeout_s:g} s"
            )
        raise ProtocolError(
            self._instrument, self._command, f"truncated reply: {len(data)} of {n} bytes {data!r}"
        )

    def line(self, terminator: bytes = b"\n", max_bytes: int = 4096) -> bytes:
        """One line including ``terminator``."""
        data = bytes(self._port.read_until(terminator, max_bytes))
        if data.endswith(terminator):
            return data
        if not data:
            raise InstrumentTimeoutError(
                self._instrument, self._command, f"no reply within {self._timeout_s:g} s"
            )
        raise ProtocolError(
            self._instrument, self._command, f"truncated reply (no terminator): {data!r}"
        )


class SerialDriverOptions(Protocol):
    """The options of a serial driver that configure its transport."""

    @property
    def baudrate(self) -> int: ...

    @property
    def reconnect_timeout_s(self) -> float: ...


class SerialTransport:
    """One serial port, one lock, reconnect with backoff."""

    def __init__(
        self,
        instrument: str,
        url: str,
        *,
        baudrate: int = 9600,
        timeout_s: float = 2.0,
        reconnect_timeout_s: float = 5.0,
    ) -> None:
        self.instrument = instrument
        self.url = url
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.lock = threading.RLock()
        self._port: Any = None
        self._wanted = False  # open() was called and close() was not: reconnect when lost
        #: run after a lost port was reopened, before the interrupted exchange is resent
        self.after_reopen = ReopenHook()

    @classmethod
    def for_driver(
        cls, instrument: str, url: str, timeout_s: float, options: SerialDriverOptions
    ) -> SerialTransport:
        """The transport of a serial driver, configured from its options."""
        return cls(
            instrument,
            url,
            baudrate=options.baudrate,
            timeout_s=timeout_s,
            reconnect_timeout_s=options.reconnect_timeout_s,
        )

    @property
    def is_open(self) -> bool:
        return self._port is not None

    @contextlib.contextmanager
    def opened_for_setup(self) -> Iterator[None]:
        """Hold the lock and open the port; close it again if the body raises, so a
        driver whose connect fails (no reply, implausible limits) leaves it closed."""
        with self.lock:
            self.open()
            try:
                yield
            except Exception:
                self.close()
                raise

    def _open_once(self) -> None:
        self._port = serial.serial_for_url(
            self.url,
            baudrate=self.baudrate,
            timeout=self.timeout_s,
            write_timeout=self.timeout_s,
        )

    def open(self) -> None:
        with self.lock:
            if self._port is not None:
                return
            self._wanted = True
            try:
                self._open_once()
            except (serial.SerialException, OSError, ValueError) as exc:
                raise ConnectionLostError(
                    self.instrument, "open", f"cannot open {self.url!r}: {exc}"
                ) from exc

    def close(self) -> None:
        with self.lock:
            self._wanted = False
            self._drop()

    def drop_connection(self) -> None:
        """Close the port but keep wanting it: the next exchange reopens it and runs
        :attr:`after_reopen` first."""
        self._drop()

    def _drop(self) -> None:
        with self.lock:
            port, self._port = self._port, None
            close_quietly(log, self.instrument, port)

    def discard_input(self) -> None:
        """Drop whatever the instrument sent that nobody asked for (after an error)."""
        with self.lock:
            if self._port is not None:
                try:
                    self._port.reset_input_buffer()
                except _PORT_ERRORS:
                    log.debug("%s: reset_input_buffer failed", self.instrument, exc_info=True)

    def exchange(
        self, command: str, request: bytes, read_reply: Callable[[ReplyReader], bytes] | None
    ) -> bytes:
        """Send ``request`` and read the reply with ``read_reply`` (None: no reply expected).

        ``command`` names the exchange in errors. Holds the lock for the whole exchange.
        """
        with self.lock:
            if self._port is None:
                if not self._wanted:
                    raise NotConnectedError(self.instrument, command, "not connected")
                self._reconnect(command)

            def attempt() -> bytes:
                try:
                    port = self._port
                    port.reset_input_buffer()
                    port.write(request)
                    port.flush()
                    if read_reply is None:
                        return b""
                    return read_reply(ReplyReader(port, self.instrument, command, self.timeout_s))
                # a SerialException, so turned into a timeout here, before the retry sees it
                except serial.SerialTimeoutException as exc:
                    raise InstrumentTimeoutError(
                        self.instrument, command, f"write not accepted within {self.timeout_s:g} s"
                    ) from exc

            return retry_once_after_reconnect(
                log,
                self.instrument,
                command,
                attempt,
                lost_errors=_PORT_ERRORS,
                reconnect=lambda: self._reconnect(command),
            )

    def _reconnect(self, command: str) -> None:
        self._drop()
        reopen_with_backoff(self.instrument, command, self._open_once, self.reconnect_timeout_s)
        self.after_reopen.run(self._drop)
