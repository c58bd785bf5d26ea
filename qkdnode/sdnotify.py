"""A small, honest ``sd_notify`` for a ``Type=notify`` service.

systemd passes the address of its notification socket in ``$NOTIFY_SOCKET``: a file system
path (``/run/systemd/notify``) or an abstract socket (``@/org/freedesktop/systemd1/...``).
A message is one datagram of ``KEY=value`` lines, e.g. ``READY=1\\nSTATUS=calibrating``.

Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op, so the daemon runs the
same code in a terminal and under the service manager. A failed send is logged once per
kind of error and counted in :attr:`SystemdNotifier.send_failures`; it never raises, because
losing a status line must never take a QKD node down. Misuse by the caller (a malformed
field name) does raise :class:`ValueError`.

Watchdog pings should come from the asyncio event loop itself (:func:`run_watchdog`): a
ping from a helper thread would keep a node with a hung loop alive.

Reference: sd_notify(3), systemd.service(5) (``WatchdogSec=``, ``NotifyAccess=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("qkdnode.sdnotify")

_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _socket_address(raw: str) -> str | bytes:
    """Translate a ``$NOTIFY_SOCKET`` value into an ``AF_UNIX`` address."""
    if raw.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of '@'.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    raise ValueError(
        f"unsupported NOTIFY_SOCKET {raw!r} (expected an absolute path or '@abstract')"
    )


def _format_value(value: object) -> str:
    text = ("1" if value else "0") if isinstance(value, bool) else str(value)
    # The protocol is line based: a newline inside a value would start a new field.
    return text.replace("\r", " ").replace("\n", " ")


def format_message(fields: Mapping[str, object]) -> bytes:
    """Encode ``fields`` as one notification datagram (``KEY=value`` lines)."""
    if not fields:
        raise ValueError("a notification needs at least one field")
    lines = []
    for name, value in fields.items():
        if not _FIELD_NAME.match(name):
            raise ValueError(f"invalid sd_notify field name {name!r} (expected e.g. 'STATUS')")
        lines.append(f"{name}={_format_value(value)}")
    return "\n".join(lines).encode()


class SystemdNotifier:
    """Send state notifications to the service manager.

    ``address`` defaults to ``$NOTIFY_SOCKET`` read from ``environ`` (``os.environ`` when
    not given). With ``unset_environment=True`` the variable is removed from ``os.environ``
    so that child processes do not inherit it (as ``sd_notify(unset_environment=1, ...)``).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        raw = address if address is not None else env.get("NOTIFY_SOCKET", "")
        if unset_environment and environ is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        self._raw = raw
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._reported: set[str] = set()
        self.send_failures = 0
        self.sent = 0
        if raw:
            try:
                self._address = _socket_address(raw)
            except ValueError as exc:
                self._report("bad-address", str(exc))

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured (running under systemd)."""
        return self._address is not None

    @property
    def address(self) -> str:
        """``$NOTIFY_SOCKET`` as given ('' when not running under systemd)."""
        return self._raw

    def _report(self, kind: str, message: str) -> None:
        """Log an error once per ``kind``; later occurrences are only counted."""
        self.send_failures += 1
        if kind in self._reported:
            return
        self._reported.add(kind)
        log.warning(
            "sd_notify failed; further errors of this kind are not logged",
            kind=kind,
            error=message,
            notify_socket=self._raw,
        )

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop: if systemd's queue is full, drop the message.
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` fields in one datagram. True when sent (False when disabled
        or when sending failed; the failure is logged once)."""
        message = format_message(fields)
        if self._address is None:
            return False
        try:
            self._socket().sendto(message, self._address)
        except OSError as exc:
            kind = (
                exc.__class__.__name__
                if exc.errno is None
                else (os.strerror(exc.errno) or str(exc.errno))
            )
            self._report(kind, str(exc))
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: the node is really ready to serve (``READY=1``)."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``); call every :func:`watchdog_interval_s`."""
        return self.notify(WATCHDOG=1)

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog timed out (``WATCHDOG=trigger``)."""
        return self.notify(WATCHDOG="trigger")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began (``STOPPING=1``); the hardware is being made safe."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        """Configuration reload began (``RELOADING=1``); send :meth:`ready` when done."""
        return self.notify(RELOADING=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start-up or shutdown step (``EXTEND_TIMEOUT_USEC``)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, round(seconds * 1e6)))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``.

    None when the watchdog is not enabled for this process: ``$WATCHDOG_USEC`` unset,
    zero or malformed, or ``$WATCHDOG_PID`` set to another process's id (the variables
    were inherited by a child).
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1e6


async def run_watchdog(
    notifier: SystemdNotifier,
    interval_s: float | None = None,
    *,
    healthy: Callable[[], bool] | None = None,
) -> None:
    """Ping the watchdog from the event loop until cancelled.

    ``interval_s`` defaults to :func:`watchdog_interval_s`; when the watchdog is disabled
    the coroutine returns at once. With ``healthy`` given, a ping is skipped while it
    returns False, so systemd restarts a node that is alive but stuck.
    """
    if interval_s is None:
        interval_s = watchdog_interval_s()
    if interval_s is None or not notifier.enabled:
        return
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    while True:
        if healthy is None or healthy():
            notifier.watchdog()
        await asyncio.sleep(interval_s)
