"""A byte server hosting one simulated instrument on TCP (127.0.0.1) or a pty pair.

* TCP: ``SimServer(handler, mode="tcp", port=0)``; the driver uses ``server.url``
  (``socket://127.0.0.1:PORT``). One client at a time; a new client replaces the old one.
* pty: ``SimServer(handler, mode="pty", link_path=...)``; the driver opens ``link_path``,
  a symlink to the current pty slave (like ``/dev/serial/by-id/...``), so a re-plugged
  device is found again under the same name.

Faults (:meth:`SimServer.inject`) act on the next replies: ``GARBLE`` (well-framed nonsense),
``BAD_CHECKSUM``, ``NO_REPLY``, ``TRUNCATE`` (first half only), ``DROP`` (close the
connection instead of replying; the device stays plugged). :meth:`unplug` closes the
connection and refuses new ones (TCP listener closed, pty symlink removed) until
:meth:`replug`. Instrument state survives unplugging, as on a USB-serial cable pull.
:meth:`power_cycle` switches the instrument off and on: the connection drops and the
instrument comes back at its factory defaults (:meth:`ProtocolHandler.factory_reset`).
"""

from __future__ import annotations

import abc
import contextlib
import enum
import logging
import os
import select
import socket
import threading
import time
import tty
from collections import deque
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class Fault(enum.Enum):
    GARBLE = "garble"
    BAD_CHECKSUM = "bad_checksum"
    NO_REPLY = "no_reply"
    TRUNCATE = "truncate"
    DROP = "drop"


class ProtocolHandler(abc.ABC):
    """The instrument: turns received bytes into reply bytes. Called from one thread."""

    #: Discard a partial request after this much silence (None: never).
    frame_gap_s: float | None = None

    @abc.abstractmethod
    def feed(self, data: bytes) -> list[bytes]:
        """Consume received bytes; return one reply per complete request."""

    @abc.abstractmethod
    def reset_framing(self) -> None:
        """Drop any partial request (new connection, or a gap in the byte stream)."""

    @abc.abstractmethod
    def garble(self, reply: bytes) -> bytes:
        """A well-framed but meaningless version of ``reply``."""

    @abc.abstractmethod
    def corrupt_checksum(self, reply: bytes) -> bytes:
        """``reply`` with a wrong checksum."""

    def factory_reset(self) -> None:
        """Return every setting to its power-on default (:meth:`SimServer.power_cycle`)."""
        raise NotImplementedError(f"{type(self).__name__} does not model a power cycle")


class SimServer:
    """Runs a :class:`ProtocolHandler` in a background thread."""

    def __init__(
        self,
        handler: ProtocolHandler,
        mode: str = "tcp",
        port: int = 0,
        link_path: str | None = None,
    ) -> None:
        if mode not in ("tcp", "pty"):
            raise ValueError(f"mode must be 'tcp' or 'pty', not {mode!r}")
        if mode == "pty" and not link_path:
            raise ValueError("pty mode needs link_path (the stable name drivers open)")
        self.handler = handler
        self.mode = mode
        self.link_path = link_path
        self._port = port
        self._lock = threading.RLock()  # a handler may inject a fault from feed()
        self._faults: deque[Fault] = deque()
        self._stop = threading.Event()
        self._plugged = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self.requests_seen = 0

    # --- public control ------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.mode == "tcp":
            return f"socket://127.0.0.1:{self._port}"
        assert self.link_path is not None
        return self.link_path

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> SimServer:
        self._plug()
        self._thread = threading.Thread(target=self._run, name="serialsim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._unplug_io()

    def inject(self, fault: Fault, count: int = 1) -> None:
        with self._lock:
            self._faults.extend([fault] * count)

    def unplug(self) -> None:
        with self._lock:
            self._plugged.clear()
            self._unplug_io()

    def replug(self) -> None:
        with self._lock:
            self._plug()

    def power_cycle(self, off_s: float = 0.0) -> None:
        """Switch the instrument off for ``off_s`` and on again: the connection drops
        (as :meth:`unplug`), pending faults are forgotten and every setting returns to
        its factory default."""
        self.unplug()
        with self._lock:
            self._faults.clear()
            self.handler.factory_reset()
        if off_s > 0:
            time.sleep(off_s)
        self.replug()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- plumbing ------------------------------------------------------------------

    def _plug(self) -> None:
        if self.mode == "tcp":
            lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The old listener is released only when the server thread's select() on it
            # returns (at most 20 ms): a replug right after an unplug waits for that.
            deadline = time.monotonic() + 1.0
            while True:
                try:
                    lst.bind(("127.0.0.1", self._port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        lst.close()
                        raise
                    time.sleep(0.01)
            lst.listen(1)
            self._port = lst.getsockname()[1]
            self._listener = lst
        else:
            master, slave = os.openpty()
            tty.setraw(slave)
            self._master, self._slave = master, slave
            assert self.link_path is not None
            tmp = f"{self.link_path}.tmp{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(os.ttyname(slave), tmp)
            os.replace(tmp, self.link_path)
        self.handler.reset_framing()
        self._plugged.set()

    def _unplug_io(self) -> None:
        for sock in (self._conn, self._listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._conn = self._listener = None
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        if self.mode == "pty" and self.link_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.link_path)

    def _drop_connection(self) -> None:
        """Close the current connection but stay plugged (TCP: accept again; pty: new pair)."""
        if self.mode == "tcp":
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.close()
                self._conn = None
        else:
            for fd in (self._master, self._slave):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._master = self._slave = None
            self._plug()
        self.handler.reset_framing()

    def _readable(self) -> list[Any]:
        if self.mode == "tcp":
            return [s for s in (self._listener, self._conn) if s is not None]
        return [self._master] if self._master is not None else []

    def _run(self) -> None:
        last_rx = time.monotonic()
        while not self._stop.is_set():
            if not self._plugged.wait(0.05):
                continue
            with self._lock:
                fds = self._readable()
            if not fds:
                time.sleep(0.01)
                continue
            try:
                ready, _, _ = select.select(fds, [], [], 0.02)
            except (OSError, ValueError):
                continue  # a descriptor was closed by unplug(); loop picks up the new set
            gap = self.handler.frame_gap_s
            if gap is not None and time.monotonic() - last_rx > gap:
                self.handler.reset_framing()
            with self._lock:
                for fd in ready:
                    if self.mode == "tcp" and fd is self._listener and self._listener is not None:
                        conn, _ = self._listener.accept()
                        if self._conn is not None:
                            self._conn.close()
                        self._conn = conn
                        self.handler.reset_framing()
                        continue
                    data = self._recv()
                    if data is None:
                        continue
                    last_rx = time.monotonic()
                    for reply in self.handler.feed(data):
                        self.requests_seen += 1
                        self._send_reply(reply)

    def _recv(self) -> bytes | None:
        try:
            if self.mode == "tcp":
                if self._conn is None:
                    return None
                data = self._conn.recv(4096)
                if not data:
                    self._conn.close()
                    self._conn = None
                    return None
                return data
            if self._master is None:
                return None
            return os.read(self._master, 4096)
        except OSError:
            return None

    def _send_reply(self, reply: bytes) -> None:
        fault = self._faults.popleft() if self._faults else None
        if fault is Fault.NO_REPLY:
            return
        if fault is Fault.DROP:
            self._drop_connection()
            return
        if fault is Fault.GARBLE:
            reply = self.handler.garble(reply)
        elif fault is Fault.BAD_CHECKSUM:
            reply = self.handler.corrupt_checksum(reply)
        elif fault is Fault.TRUNCATE:
            reply = reply[: max(1, len(reply) // 2)]
        try:
            if self.mode == "tcp":
                if self._conn is not None:
                    self._conn.sendall(reply)
            elif self._master is not None:
                os.write(self._master, reply)
        except OSError:
            log.debug("reply lost: peer gone", exc_info=True)
