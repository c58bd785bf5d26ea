"""Test helpers: a pinned-message SCPI transport and a scripted byte device on a pty."""

from __future__ import annotations

import os
import select
import shutil
import threading
import time
import tty
from pathlib import Path

from drivers.transports.base import InProcessTransport
from drivers.transports.visa import SIM_DIR


def sim_copy(tmp_path: Path, yaml_name: str) -> str:
    """visa_library string for a private copy of a shipped definition (fresh state)."""
    dst = tmp_path / yaml_name
    shutil.copy(SIM_DIR / yaml_name, dst)
    return f"{dst}@sim"


class ExpectedProtocolTransport(InProcessTransport):
    """PyMeasure-style pinned exchange: each entry is (sent message, reply or None)."""

    def __init__(self, pairs: list[tuple[str, str | None]]) -> None:
        super().__init__()
        self.instrument = "expected"
        self._pairs = list(pairs)

    def _next(self, command: str) -> str | None:
        assert self._pairs, f"unexpected extra message {command!r}"
        expected, reply = self._pairs.pop(0)
        assert command == expected, f"sent {command!r}, expected {expected!r}"
        return reply

    def write(self, command: str) -> None:
        reply = self._next(command)
        assert reply is None, f"{command!r} was written but the script has a reply {reply!r}"

    def query(self, command: str) -> str:
        reply = self._next(command)
        assert reply is not None, f"{command!r} was queried but the script has no reply"
        return reply

    def assert_done(self) -> None:
        assert not self._pairs, f"messages never sent: {self._pairs}"


class ScriptedPtyDevice:
    """Plays a device on the master side of a pty: expects exact request bytes, answers
    scripted reply bytes. ``path`` is the slave the driver opens."""

    def __init__(self, script: list[tuple[bytes, bytes]]) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.script = list(script)
        self.received: list[bytes] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read_exact(self, n: int, timeout_s: float = 3.0) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout_s
        while len(buf) < n and time.monotonic() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.05)
            if r:
                buf += os.read(self.master, n - len(buf))
        return buf

    def _run(self) -> None:
        for expected, reply in self.script:
            got = self._read_exact(len(expected))
            self.received.append(got)
            if got != expected:
                self.errors.append(f"got {got!r}, expected {expected!r}")
                return
            os.write(self.master, reply)

    def finish(self) -> None:
        """Assert every exchange happened exactly and nothing is left over either way."""
        self._thread.join(timeout=5)
        assert not self.errors, self.errors
        assert len(self.received) == len(self.script), "script not fully played"
        r, _, _ = select.select([self.master], [], [], 0.05)
        assert not r, f"driver sent extra bytes: {os.read(self.master, 1024)!r}"
        os.close(self.master)
        os.close(self.slave)
