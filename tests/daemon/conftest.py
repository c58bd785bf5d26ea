"""Helpers to run real node daemons as subprocesses on free loopback ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_config(tmp: Path, role: str, ports: dict[str, int], extra: str = "") -> Path:
    """A node config for ``role`` with every socket on its own free loopback port."""
    base = "transmitter" if role == "transmitter" else "receiver"
    text = (ROOT / "configs" / f"{base}.sim.toml").read_text()
    me = "alice" if role == "transmitter" else "bob"
    text = text.replace(f'state_dir = "state/{me}"', f'state_dir = "{tmp / me}"')
    defaults = (
        {5550: "control", 5551: "telemetry"}
        if role == "transmitter"
        else {5553: "control", 5554: "telemetry"}
    )
    chosen = {port: ports[f"{role}_{name}"] for port, name in defaults.items()}
    chosen |= {5552: ports["peer"], 5560: ports["fiber"]}

    def swap(m: re.Match[str]) -> str:
        return f"tcp://127.0.0.1:{chosen.get(int(m.group(1)), m.group(1))}"

    # One pass over whole port numbers: replacing one endpoint after another would let a
    # free port chosen earlier (say 55523) be rewritten again by a later default (5552).
    text = re.sub(r"tcp://127\.0\.0\.1:(\d+)\b", swap, text)
    path = tmp / f"{me}.toml"
    path.write_text(text + "\n" + extra)
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def wait_event(self, event: str, timeout_s: float = 30.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rec in self.lines():
                if rec.get("event") == event:
                    return rec
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} in log:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)


def start_daemon(config: Path, log_path: Path, env: dict[str, str] | None = None) -> Daemon:
    full_env = {**os.environ, **(env or {})}
    f = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdnode", "run", "--config", str(config), "--log-json"],
        stdout=f,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=str(config.parent),
    )
    return Daemon(proc, log_path)


@pytest.fixture
def ports() -> dict[str, int]:
    names = [
        "transmitter_control",
        "transmitter_telemetry",
        "receiver_control",
        "receiver_telemetry",
        "peer",
        "fiber",
    ]
    return {n: free_port() for n in names}


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
