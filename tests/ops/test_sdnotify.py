"""SystemdNotifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from qkdnode.sdnotify import SystemdNotifier, format_message, run_watchdog, watchdog_interval_s


class FakeManager:
    """The receiving end of NOTIFY_SOCKET: a bound SOCK_DGRAM socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def recv(self, timeout_s: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(4096)
        fields = {}
        for line in data.decode().split("\n"):
            key, _, value = line.partition("=")
            fields[key] = value
        return fields

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[FakeManager]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield FakeManager(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[FakeManager]:
    name = f"qkdnode-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        yield FakeManager(sock, "@" + name)
    finally:
        sock.close()


def test_ready_status_watchdog_stopping_reach_the_socket(manager: FakeManager) -> None:
    with SystemdNotifier(environ={"NOTIFY_SOCKET": manager.address}) as n:
        assert n.enabled
        assert n.ready("keys flowing")
        assert manager.recv() == {"READY": "1", "STATUS": "keys flowing"}
        assert n.status("calibrating: modulator bias")
        assert manager.recv() == {"STATUS": "calibrating: modulator bias"}
        assert n.watchdog()
        assert manager.recv() == {"WATCHDOG": "1"}
        assert n.stopping()
        assert manager.recv() == {"STOPPING": "1"}
        assert n.extend_timeout(2.5)
        assert manager.recv() == {"EXTEND_TIMEOUT_USEC": "2500000"}
        assert n.sent == 5
        assert n.send_failures == 0


def test_abstract_socket_address(abstract_manager: FakeManager) -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": abstract_manager.address})
    assert n.notify(READY=1, MAINPID=os.getpid())
    assert abstract_manager.recv() == {"READY": "1", "MAINPID": str(os.getpid())}
    n.close()


def test_reads_notify_socket_from_process_environment(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    n = SystemdNotifier(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ  # children do not inherit it
    assert n.ready()
    assert manager.recv() == {"READY": "1"}


def test_newline_in_status_cannot_inject_a_field(manager: FakeManager) -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": manager.address})
    n.status("peer lost\nREADY=1")
    assert manager.recv() == {"STATUS": "peer lost READY=1"}


def test_invalid_field_name_is_a_programming_error(manager: FakeManager) -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": manager.address})
    with pytest.raises(ValueError, match="field name"):
        n.notify(status="lowercase")
    with pytest.raises(ValueError):
        format_message({})
    assert not manager.pending()


def test_no_op_without_notify_socket(tmp_path: Path) -> None:
    n = SystemdNotifier(environ={})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.send_failures == 0


def test_send_error_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": str(missing)})
    with capture_logs() as logs:
        for _ in range(5):
            assert n.watchdog() is False
    assert n.send_failures == 5
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert str(missing) in warnings[0]["notify_socket"]


def test_recovers_when_the_socket_appears(tmp_path: Path) -> None:
    path = tmp_path / "late"
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": str(path)})
    assert n.ready() is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        assert n.ready() is True
        assert FakeManager(sock, str(path)).recv() == {"READY": "1"}
    finally:
        sock.close()


def test_unsupported_address_is_reported_not_raised() -> None:
    with capture_logs() as logs:
        n = SystemdNotifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False
    assert any("unsupported NOTIFY_SOCKET" in e.get("error", "") for e in logs)


def test_watchdog_interval_is_half_the_timeout() -> None:
    pid = str(os.getpid())
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "abc"}) is None
    # Inherited by a child: the watchdog belongs to another process.
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_run_watchdog_pings_from_the_loop_and_skips_while_unhealthy(
    manager: FakeManager,
) -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": manager.address})
    healthy = {"ok": True}

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(run_watchdog(n, 0.02, healthy=lambda: healthy["ok"]))
        await asyncio.sleep(0.15)
        pings_healthy = n.sent
        healthy["ok"] = False
        await asyncio.sleep(0.03)  # let a ping in flight finish
        before = n.sent
        await asyncio.sleep(0.15)
        after = n.sent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pings_healthy, after - before

    pings, while_unhealthy = asyncio.run(scenario())
    assert pings >= 3
    assert while_unhealthy == 0
    assert manager.recv() == {"WATCHDOG": "1"}


def test_run_watchdog_returns_when_disabled() -> None:
    n = SystemdNotifier(environ={})
    asyncio.run(asyncio.wait_for(run_watchdog(n, 0.01), timeout=1))
