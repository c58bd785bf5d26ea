"""A message transport over a ZeroMQ REQ socket (instruments that serve REQ/REP).

Instruments such as ID Quantique's Time Controllers take one text command per ZeroMQ
message on a REP socket and answer every message with one message. A REQ socket is
strictly send-then-receive: after a request goes unanswered it cannot send again, so on a
timeout the socket is closed and a fresh one connected (the "lazy pirate" pattern of the
ZeroMQ guide) before the next command. ZeroMQ reconnects by itself when the peer comes
back; a peer that is gone shows as a timeout, never as an exception. The instrument may
have restarted in between, so the first message after a replaced socket runs
:attr:`after_reopen` first (the driver's settings check).
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from drivers.errors import InstrumentTimeoutError, NotConnectedError, ProtocolError
from drivers.transports.base import MessageTransport

log = logging.getLogger(__name__)

#: Longest reply accepted (a histogram of 16384 bins as text fits well inside).
MAX_REPLY_BYTES = 4 * 1024 * 1024


class ZmqReqTransport(MessageTransport):
    """One REQ socket connected to ``endpoint`` (``tcp://host:port``)."""

    def __init__(
        self,
        instrument: str,
        endpoint: str,
        *,
        timeout_s: float = 2.0,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        super().__init__()
        self.instrument = instrument
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket[Any] | None = None
        self._check_pending = False  # the socket was replaced: run after_reopen first

    @property
    def is_open(self) -> bool:
        return self._socket is not None

    def open(self) -> None:
        with self.lock:
            if self._socket is None:
                self._socket = self._new_socket()

    def _new_socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ProtocolError(
                self.instrument, "open", f"bad endpoint {self.endpoint!r}: {exc}"
            ) from None
        return sock

    def close(self) -> None:
        with self.lock:
            sock, self._socket = self._socket, None
            if sock is not None:
                sock.close(0)

    def _reset(self) -> None:
        """Replace a socket left waiting for a reply that will not come."""
        if self._socket is not None:
            self._socket.close(0)
        self._socket = self._new_socket()
        self._check_pending = True

    def drop_connection(self) -> None:
        """Run :attr:`after_reopen` again before the next message (ZeroMQ reconnects by
        itself: there is nothing to close)."""
        with self.lock:
            self._check_pending = True

    def write(self, command: str) -> None:
        """Send ``command`` and discard its reply (every REQ gets one)."""
        self.query(command)

    def query(self, command: str) -> str:
        """Send ``command``; the reply text, stripped of surrounding whitespace.

        InstrumentTimeoutError when nothing comes within the timeout (the socket is then
        replaced); ProtocolError for a reply that is not UTF-8 text or comes in several parts.
        """
        with self.lock:
            if self._socket is not None and self._check_pending:
                self._check_pending = False
                self.after_reopen.run(self.drop_connection)
            sock = self._socket
            if sock is None:
                raise NotConnectedError(self.instrument, command, "not connected")
            timeout_ms = max(1, round(self.timeout_s * 1000))
            try:
                if not sock.poll(timeout_ms, zmq.POLLOUT):
                    self._reset()
                    raise InstrumentTimeoutError(
                        self.instrument, command, f"not accepted within {self.timeout_s:g} s"
                    )
                sock.send(command.encode("utf-8"))
                if not sock.poll(timeout_ms, zmq.POLLIN):
                    self._reset()
                    raise InstrumentTimeoutError(
                        self.instrument, command, f"no reply within {self.timeout_s:g} s"
                    )
                parts = sock.recv_multipart()
            except zmq.ZMQError as exc:
                self._reset()
                raise ProtocolError(self.instrument, command, f"ZeroMQ error: {exc}") from None
        if len(parts) != 1:
            raise ProtocolError(self.instrument, command, f"reply in {len(parts)} parts")
        try:
            return parts[0].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ProtocolError(
                self.instrument, command, f"reply is not text: {parts[0][:40]!r}"
            ) from None
