"""A three-site line alpha - bravo - charlie, as three daemons (configs/line/*.toml).

bravo is one daemon with two links: the receiver of alpha-bravo and the transmitter of
bravo-charlie, each with its own simulated link, state machine, peer channel, key store
and control endpoint. Both links reach EXCHANGING and commit identical keys; SIGKILL of
alpha stops alpha-bravo only (bravo-charlie keeps committing); alpha restarted, the link
alpha-bravo recovers without an operator.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qkdnode.client import BusError, Client
from qkdnode.demo.line import control_endpoints, rewrite_for_run
from tests.daemon.conftest import Daemon, start_daemon

ROOT = Path(__file__).resolve().parents[2]
#: Blocks small enough that each link commits several within the test on 2 loaded cores.
BLOCK_DETECTIONS = 4_000_000
#: Three daemons, two simulated links, on 2 cores: generous; we assert states, never speed.
TIMEOUT_S = 420.0


@dataclass
class Site:
    name: str
    config: Path
    log_dir: Path
    daemon: Daemon | None = None
    starts: int = 0
    clients: dict[str, Client] = field(default_factory=dict)

    def start(self) -> None:
        self.starts += 1
        self.daemon = start_daemon(self.config, self.log_dir / f"{self.name}.{self.starts}.log")

    def close_clients(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(30)
        self.close_clients()


@dataclass
class LinkEnd:
    """One end of a link: the site that runs it and the link's control endpoint there."""

    site: Site
    endpoint: str

    def call(self, command: str) -> dict[str, Any] | None:
        client = self.site.clients.get(self.endpoint)
        if client is None:
            client = self.site.clients[self.endpoint] = Client(self.endpoint, timeout_s=10.0)
        try:
            return client.call(command)
        except BusError:
            return None


def _rewrite(text: str, ports: dict[int, int], state_dir: Path) -> str:
    """The demo's rewrite (free ports, state under the test's directory), small blocks."""
    text = rewrite_for_run(text, ports, state_dir)
    text, n = re.subn(
        r"^block_detections = \d+", f"block_detections = {BLOCK_DETECTIONS}", text, flags=re.M
    )
    assert n >= 1
    return text


@pytest.fixture
def line(tmp_path: Path) -> Iterator[tuple[Site, Site, Site]]:
    ports: dict[int, int] = {}
    sites = []
    for name in ("alpha", "bravo", "charlie"):
        text = (ROOT / "configs" / "line" / f"{name}.toml").read_text()
        path = tmp_path / f"{name}.toml"
        path.write_text(_rewrite(text, ports, tmp_path / "state" / name))
        sites.append(Site(name, path, tmp_path))
    alpha, bravo, charlie = sites
    try:
        yield alpha, bravo, charlie
    finally:
        for s in sites:
            s.close_clients()
            if s.daemon is not None and s.daemon.proc.poll() is None:
                s.daemon.proc.kill()
                s.daemon.proc.wait(30)


def _wait(what: str, check: Callable[[], bool], sites: tuple[Site, ...], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for s in sites:
            if s.daemon is not None and s.daemon.proc.poll() is not None:
                tail = s.daemon.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{s.name} exited ({s.daemon.proc.returncode}):\n{tail}")
        if check():
            return
        time.sleep(1.0)
    tails = "\n".join(
        f"--- {s.name}\n" + s.daemon.log_path.read_text(errors="replace")[-2500:]
        for s in sites
        if s.daemon is not None
    )
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def _count(end: LinkEnd) -> int:
    st = end.call("keys.digest")
    return int(st["count"]) if st else -1


def _in_step(a: LinkEnd, b: LinkEnd, more_than: int = 0) -> bool:
    """Both ends exchanging, with the same committed keys, more than ``more_than``."""
    sa, sb = a.call("status"), b.call("status")
    if not sa or not sb or sa["state"] != "EXCHANGING" or sb["state"] != "EXCHANGING":
        return False
    da, db = a.call("keys.digest"), b.call("keys.digest")
    return bool(da and db and da == db and int(da["count"]) > more_than)


@pytest.mark.slow
def test_a_node_in_the_middle_runs_two_links_and_a_fault_on_one_spares_the_other(
    line: tuple[Site, Site, Site],
) -> None:
    alpha, bravo, charlie = line
    (a_ab,) = control_endpoints(alpha.config)
    b_ab, b_bc = control_endpoints(bravo.config)
    (c_bc,) = control_endpoints(charlie.config)
    ab = (LinkEnd(alpha, a_ab), LinkEnd(bravo, b_ab))
    bc = (LinkEnd(bravo, b_bc), LinkEnd(charlie, c_bc))
    everyone = (alpha, bravo, charlie)
    for s in (charlie, bravo, alpha):
        s.start()

    _wait(
        "both links exchanging with identical keys",
        lambda: _in_step(*ab) and _in_step(*bc),
        everyone,
        TIMEOUT_S,
    )
    st = ab[1].call("status")
    assert st is not None and st["role"] == "receiver" and st["peer_id"] == "alpha"
    st = bc[0].call("status")
    assert st is not None and st["role"] == "transmitter" and st["peer_id"] == "charlie"
    # each link logs under its own name
    bravo_log = bravo.daemon.log_path.read_text() if bravo.daemon else ""
    assert '"link": "alpha-bravo"' in bravo_log and '"link": "bravo-charlie"' in bravo_log

    # SIGKILL alpha: alpha-bravo stops, bravo-charlie goes on committing
    alpha.kill()
    _wait(
        "bravo sees alpha-bravo down",
        lambda: (ab[1].call("status") or {}).get("state") in ("PAUSED", "IDLE"),
        (bravo, charlie),
        120,
    )
    at_kill = _count(ab[1])
    before = _count(bc[0])
    _wait(
        "bravo-charlie commits on",
        lambda: _in_step(*bc, more_than=before),
        (bravo, charlie),
        TIMEOUT_S,
    )
    st = bc[0].call("status")
    assert st is not None and st["healthy"] is True
    assert _count(ab[1]) == at_kill  # nothing committed on the dead link
    # and the operator is told (peer_down, once its grace period has passed)
    _wait(
        "bravo's alpha-bravo link unhealthy",
        lambda: (ab[1].call("status") or {}).get("healthy") is False,
        (bravo, charlie),
        120,
    )
    assert (bc[0].call("status") or {}).get("healthy") is True

    # restart alpha: alpha-bravo comes back by itself (alpha has autostart)
    alpha.start()
    _wait(
        "alpha-bravo recovers and commits",
        lambda: _in_step(*ab, more_than=at_kill),
        everyone,
        TIMEOUT_S,
    )
    # (both ends commit a block one after the other: compare between commits)
    _wait("bravo-charlie still in step", lambda: _in_step(*bc), everyone, 120)

    for s in everyone:
        s.close_clients()
        assert s.daemon is not None
        assert s.daemon.stop(signal.SIGTERM, 60) == 0, s.name
