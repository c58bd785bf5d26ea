"""``qkdnode ctl`` as an operator uses it: key IDs, one-line errors, closed pipes, ``watch``
across node restarts and several nodes, ``calibrate/sync --wait``.

Most tests talk to :class:`FakeNode`, a real control server and telemetry publisher on
fixed loopback ports whose commands behave like the daemon's (upper-case states, the
``state`` telemetry with ``event`` and ``reason``, ``stats`` in ``status``, ``key_ID`` in
``keys.get``), so that it can be stopped and started again on the same ports. The last
test runs a real transmitter/receiver pair.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio
from pydantic import BaseModel, ConfigDict

from qkdnode.bus.commands import CallerInfo, CommandSpec, CommandTable
from qkdnode.bus.control import ControlServer
from qkdnode.bus.errors import CommandError
from qkdnode.bus.telemetry import TelemetryPublisher
from qkdnode.cli import ctl_cmd
from qkdnode.cli.ctl_nodes import NodeAddr
from qkdnode.cli.ctl_render import NodeScreen, render_node
from qkdnode.client import TelemetryEvent
from qkdnode.config.sections import BusSection
from tests.daemon.conftest import Daemon, free_port, node_config, start_daemon

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- a node-shaped server
class AnyContent(BaseModel):
    model_config = ConfigDict(extra="allow")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class FakeNode:
    """Commands and telemetry shaped like the daemon's, on ``control_port``/``telemetry_port``."""

    def __init__(
        self,
        lt: LoopThread,
        control_port: int,
        telemetry_port: int,
        *,
        incarnation: int = 1,
        procedure_ok: bool = True,
        telemetry_hz: float = 0.0,
        node_id: str = "alice",
    ) -> None:
        self.lt = lt
        self.control = f"tcp://127.0.0.1:{control_port}"
        self.telemetry_endpoint = f"tcp://127.0.0.1:{telemetry_port}"
        self.incarnation = incarnation
        self.procedure_ok = procedure_ok
        self.telemetry_hz = telemetry_hz
        self.node_id = node_id
        self.state = "IDLE"
        self.state_since = time.time()
        self.key_reply: list[dict[str, Any]] | None = None
        self.stats: dict[str, Any] = {
            "calibrated": False,
            "synchronized": False,
            "failures": 0,
            "last_failure": "",
            "secret_bits": 0,
            "qber": None,
            "auth_key_balance_bits": 262144,
            "last_block": {},
        }
        self.tasks: list[asyncio.Task[Any]] = []

    # --------------------------------------------------------- life cycle
    def start(self) -> FakeNode:
        self.lt.run(self._start())
        return self

    def stop(self) -> None:
        self.lt.run(self._stop())

    async def _start(self) -> None:
        bus = BusSection(
            control_endpoint=self.control,
            telemetry_endpoint=self.telemetry_endpoint,
            allow_plaintext=True,
            plaintext_role="operator",
        )
        self.ctx = zmq.asyncio.Context()
        self.pub = TelemetryPublisher(self.ctx, bus, None, heartbeat_interval_s=0.2)
        self.server = ControlServer(
            self.ctx, bus, self._table(), lambda: self.state, None, telemetry=self.pub
        )
        await self.pub.start()
        await self.server.start()
        self._set("CONNECTING", "start", "daemon started")
        self._set("IDLE", "connected", "instruments connected, peer reachable")
        if self.telemetry_hz:
            self.tasks.append(asyncio.create_task(self._rates()))

    async def _stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.stop()
        await self.pub.stop()
        self.ctx.destroy(linger=0)

    async def _rates(self) -> None:
        n = 0
        while True:
            n += 1
            self.pub.publish("rates", {"n": n, "incarnation": self.incarnation})
            await asyncio.sleep(1.0 / self.telemetry_hz)

    def _set(self, new: str, event: str, reason: str) -> None:
        old, self.state = self.state, new
        self.state_since = time.time()
        self.pub.publish("state", {"old": old, "new": new, "event": event, "reason": reason})

    # --------------------------------------------------------- commands
    def _table(self) -> CommandTable:
        def spec(name: str, handler: Any, role: str = "operator") -> CommandSpec:
            return CommandSpec(name, handler, None, role, AnyContent)  # type: ignore[arg-type]

        return CommandTable(
            [
                spec("status", self._status, "monitor"),
                spec("keys.get", self._keys),
                spec("calibrate", self._procedure("CALIBRATING", "calibrated")),
                spec("sync", self._procedure("SYNCHRONIZING", "locked")),
            ]
        )

    async def _status(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {
            "state": self.state,
            "role": "transmitter",
            "node_id": self.node_id,
            "peer_id": "bob",
            "healthy": True,
            "peer_connected": True,
            "stats": dict(self.stats),
            "keystore": {"available": 250, "pending": 0, "reserved": 0, "delivered": 3},
        }

    async def _keys(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        if self.key_reply is not None:
            return {"keys": self.key_reply}
        n = int(content.get("number", 1))
        return {
            "keys": [
                {"key_ID": str(uuid.uuid4()), "key": base64.b64encode(os.urandom(32)).decode()}
                for _ in range(n)
            ]
        }

    def _procedure(self, running: str, ok_event: str) -> Any:
        async def handler(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
            if self.state != "IDLE":
                raise CommandError("not now", code="refused", details={"state": self.state})
            self._set(running, running.lower()[:9], f"operator {caller.name}")
            self.tasks.append(asyncio.create_task(self._run(running, ok_event)))
            return {"state": self.state}

        return handler

    async def _run(self, running: str, ok_event: str) -> None:
        await asyncio.sleep(0.3)
        if running == "CALIBRATING":
            self.pub.publish(
                "calibration.modulator",
                {"procedure": "modulator", "ok": True, "duration_s": 0.2, "v_pi_v": 3.7},
            )
        await asyncio.sleep(0.2)
        if not self.procedure_ok:
            why = "no light at the power meter"
            self.stats["failures"] += 1
            noun = "calibration" if running == "CALIBRATING" else "synchronization"
            self.stats["last_failure"] = f"{noun} failed: {why}"  # the daemon's wording
            self.pub.publish("alarm", {"alarm": "calibration_failed", "message": why})
            self._set("IDLE", "failed", self.stats["last_failure"])
            return
        if running == "CALIBRATING":
            self.stats["calibrated"] = True
            self._set("IDLE", ok_event, "calibration complete")
        else:
            self.stats["synchronized"] = True
            self.pub.publish("sync", {"locked": True, "offset_ps": 12.5})
            self._set("IDLE", ok_event, "clock locked")


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def fake(lt: LoopThread) -> Iterator[Callable[..., FakeNode]]:
    started: list[FakeNode] = []

    def _make(control_port: int = 0, telemetry_port: int = 0, **kw: Any) -> FakeNode:
        node = FakeNode(lt, control_port or free_port(), telemetry_port or free_port(), **kw)
        started.append(node.start())
        return node

    yield _make
    for node in started:
        with contextlib.suppress(Exception):
            node.stop()


def endpoints(node: FakeNode) -> list[str]:
    return ["--endpoint", node.control, "--telemetry-endpoint", node.telemetry_endpoint]


def run_ctl(capsys: Any, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``qkdnode ctl ARGV`` in-process (the CLI's parser and handlers)."""
    parser = argparse.ArgumentParser(prog="qkdnode")
    ctl_cmd.register(parser.add_subparsers(dest="command"))
    capsys.readouterr()
    try:
        args = parser.parse_args(["ctl", *argv])
        code = args.func(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def qkdnode_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qkdnode", *args]


# ---------------------------------------------------------------- keys: key_ID
def test_keys_prints_the_key_ID_of_each_key(capsys: Any, fake: Callable[..., FakeNode]) -> None:
    node = fake()
    r = run_ctl(capsys, [*endpoints(node), "keys", "--number", "3"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        key_id, key = line.split()
        assert str(uuid.UUID(key_id)) == key_id  # the ETSI key_ID, not "?"
        assert len(base64.b64decode(key)) == 32
    node.key_reply = [{"key": base64.b64encode(b"x" * 32).decode()}]  # no key_ID
    r = run_ctl(capsys, [*endpoints(node), "keys"])
    assert r.returncode == 1 and "key_ID" in r.stderr and "?" not in r.stdout


# ---------------------------------------------------------------- errors and pipes
@pytest.mark.parametrize(
    "argv",
    [
        ["--endpoint", "foo", "status"],
        ["--endpoint", "tcp://127.0.0.1", "status"],
        ["--endpoint", "tcp://127.0.0.1:99999", "ping"],
        ["--endpoint", "udp://127.0.0.1:5550", "status"],
        ["--endpoint", "tcp://127.0.0.1:5550", "--telemetry-endpoint", "nope", "watch"],
        ["--endpoint", "tcp://127.0.0.1:5550", "--endpoint", "tcp://127.0.0.1:5553", "status"],
    ],
)
def test_bad_endpoint_is_a_one_line_usage_error(argv: list[str]) -> None:
    r = subprocess.run(qkdnode_cmd("ctl", *argv), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("ctl: ")


def test_bad_endpoint_in_the_client_library_names_it() -> None:
    from qkdnode.client import Client

    with pytest.raises(ValueError, match="'foo'"):
        Client("foo")


def _assert_quiet_end(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stderr is not None
    code = proc.wait(30)
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "BrokenPipe" not in err, err
    assert code == 0, (code, err)


def test_closed_output_pipe_ends_quietly(fake: Callable[..., FakeNode]) -> None:
    node = fake(telemetry_hz=50)
    # `qkdnode ctl status | head -1` where head has already gone
    proc = subprocess.Popen(
        qkdnode_cmd("ctl", *endpoints(node), "status"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _assert_quiet_end(proc)
    # `qkdnode ctl watch | head -2`
    proc = subprocess.Popen(
        qkdnode_cmd("ctl", *endpoints(node), "watch", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["kind"] == "snapshot"
    proc.stdout.readline()
    proc.stdout.close()
    _assert_quiet_end(proc)


# ---------------------------------------------------------------- watch: restarts
class Lines:
    """The JSON lines of a running ``ctl watch``, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(json.loads(line))

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                item = self.q.get(timeout=0.1)
            except queue.Empty:
                assert self.proc.poll() is None, f"watch exited: {self.proc.returncode}"
                continue
            self.seen.append(item)
            if pred(item):
                return item
        raise AssertionError(f"not seen in {timeout_s} s; last lines: {self.seen[-8:]}")


def _incarnation(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("topic") == "rates" and e["payload"].get("incarnation") == n


def test_clone_state_sees_a_publisher_restart() -> None:
    from qkdnode.client import CloneState

    def ev(topic: str, seq: int, ts: float, **payload: Any) -> TelemetryEvent:
        return TelemetryEvent("delta", topic, seq, ts, payload)

    st = CloneState()
    st.apply_snapshot({"seq": 50, "topics": {"a": {"seq": 50, "ts": 100.0, "payload": {"n": 1}}}})
    # a heartbeat queued before the snapshot: behind in sequence and in time, no restart
    assert st.on_message(ev("_hb", 40, 99.0)) == [] and not st.needs_snapshot
    # a new process: sequence numbers from 1 again, later in time
    assert st.on_message(ev("a", 1, 200.0, n=2)) == []
    assert st.needs_snapshot and st.restarts == 1
    out = st.apply_snapshot(
        {"seq": 1, "topics": {"a": {"seq": 1, "ts": 200.0, "payload": {"n": 2}}}}
    )
    assert [(e.kind, e.seq, e.payload) for e in out] == [("snapshot", 1, {"n": 2})]
    assert st.restarts == 1 and not st.needs_snapshot
    assert [e.seq for e in st.on_message(ev("b", 2, 201.0))] == [2]
    # after an outage: a snapshot behind the last sequence number is a restart too
    st.needs_snapshot = True
    assert st.apply_snapshot({"seq": 0, "topics": {}}) == []
    assert st.restarts == 2 and st.values == {}


@pytest.mark.system  # restarts a node twice (~13 s): make test keeps the other watch tests
def test_watch_survives_node_restarts(fake: Callable[..., FakeNode]) -> None:
    cport, tport = free_port(), free_port()
    node = fake(cport, tport, telemetry_hz=10)
    proc = subprocess.Popen(
        qkdnode_cmd("ctl", *endpoints(node), "watch", "--json", "--idle-timeout", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(proc)
    try:
        lines.wait_for(lambda e: e["kind"] == "delta" and _incarnation(1)(e))
        # a restart that takes a while (longer than a reply timeout): the node is gone,
        # then back with new sequence numbers
        node.stop()
        gone = lines.wait_for(lambda e: e["kind"] in ("unreachable", "stale"))
        assert proc.poll() is None, gone
        time.sleep(6)
        assert proc.poll() is None, "watch gave up while the node was away"
        node = fake(cport, tport, incarnation=2, telemetry_hz=10)
        lines.wait_for(_incarnation(2))
        assert any(e["kind"] == "unreachable" for e in lines.seen)
        assert any(e["kind"] in ("reconnected", "restarted") for e in lines.seen)
        # a quick restart, within the idle timeout: sequence numbers start again from 1
        node.stop()
        node = fake(cport, tport, incarnation=3, telemetry_hz=10)
        lines.wait_for(_incarnation(3))
        assert proc.poll() is None
        assert any(e["kind"] == "restarted" for e in lines.seen)
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert "waiting for it to come back" in err  # said so, on stderr too


def test_watch_several_nodes_tags_each_line(capsys: Any, fake: Callable[..., FakeNode]) -> None:
    a, b = fake(telemetry_hz=20), fake(telemetry_hz=20, node_id="bob")
    r = run_ctl(capsys, [*endpoints(a), *endpoints(b), "watch", "--json", "--count", "30"])
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert {e["node"] for e in events} == {a.control, b.control}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_draws_one_screen_per_node(
    monkeypatch: Any, fake: Callable[..., FakeNode], capsys: Any
) -> None:
    a, b = fake(telemetry_hz=20), fake(telemetry_hz=20, node_id="bob")
    b.stats.update(qber=0.0142, secret_bits=1_000_000)
    b.stats["last_block"] = {"block_id": 7, "final_key_bits": 1_092_488, "qber_z": 0.0142}
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stdout", tty)
    r = run_ctl(capsys, [*endpoints(a), *endpoints(b), "watch", "--count", "60"])
    assert r.returncode == 0, r.stderr
    screen = tty.getvalue().rsplit("\x1b[H\x1b[2J", 1)[-1]
    heads = [line for line in screen.splitlines() if line.startswith("== ")]
    assert len(heads) == 2 and "alice" in heads[0] and "bob" in heads[1], screen
    assert screen.count("state        IDLE for ") == 2, screen
    assert "#7: 1,092,488 secret bits, QBER Z 1.42 %" in screen
    assert "QBER         1.42 %" in screen
    assert screen.count("auth balance 262,144 bits") == 2
    assert screen.count("key store    250 keys available") == 2


# ---------------------------------------------------------------- the screen of one node
def _screen(status: dict[str, Any], **kw: Any) -> list[str]:
    now = 1_800_000_000.0
    addr = kw.pop("addr", NodeAddr("tcp://h:5550", "tcp://h:5551", "tcp://h:5550"))
    sc = NodeScreen(addr, status=status, status_at=now - 1, connected=True, **kw)
    return render_node(sc, now)


def test_node_screen_shows_what_the_status_reports() -> None:
    now = 1_800_000_000.0
    status = {
        "state": "EXCHANGING",
        "role": "receiver",
        "node_id": "bob",
        "healthy": False,
        "peer_connected": True,
        "peer_id": "alice",
        "state_since": now - 125,
        "seconds_since_last_block": 3.0,
        "keystore_fill_ratio": 0.42,
        "keystore": {"available": 42_000, "reserved": 5},
        "stats": {
            "secret_key_rate_bps": 152_000.0,
            "qber": 0.0146,
            "auth_key_balance_bits": 184_704,
            "detections_read": 27_000_000,
            "detections": 16_000_000,
            "blocks_ok": 2,
            "last_block": {"block_id": 1, "final_key_bits": 1_000_000, "qber_z": 0.0146},
        },
        "alarms": [
            {
                "name": "qber_high",
                "severity": "major",
                "since": now - 60,
                "cause": "error rate 0.0512 above warning 0.04",
            },
        ],
    }
    addr = NodeAddr("tcp://h:5553", "tcp://h:5554", "bob", 100_000, 8_000_000)
    text = "\n".join(_screen(status, addr=addr))
    assert "== bob (receiver)" in text
    assert "state        EXCHANGING for 2m05s" in text and "UNHEALTHY" in text
    assert "last block   #1 4.0 s ago: 1,000,000 secret bits, QBER Z 1.46 %, blocks 2 ok" in text
    assert "key rate     152 kbit/s" in text
    assert "QBER         1.46 %" in text
    assert "key store    42,000 keys available  fill 42.0 %" in text
    assert "auth balance 184,704 bits" in text
    assert "block filling: 3,000,000 / 8,000,000 detections (38%)" in text
    assert "1 block in post-processing" in text
    assert "alarms       MAJOR qber_high since " in text and "error rate 0.0512" in text
    status["alarms"] = []
    assert "alarms       none" in "\n".join(_screen(status))


def test_node_screen_progress_of_a_calibration() -> None:
    now = 1_800_000_000.0
    values = {
        "state": TelemetryEvent(
            "delta", "state", 5, now - 20, {"old": "IDLE", "new": "CALIBRATING"}
        ),
        "calibration.modulator": TelemetryEvent(
            "delta", "calibration.modulator", 6, now - 15, {"ok": True}
        ),
        "calibration.old": TelemetryEvent("delta", "calibration.old", 2, now - 900, {"ok": True}),
        "scan": TelemetryEvent("delta", "scan", 7, now - 1, {"done": 12, "total": 48}),
    }
    text = "\n".join(_screen({"state": "CALIBRATING", "stats": {}}, values=values))
    assert "state        CALIBRATING for 20.0 s" in text
    assert "calibration running for 20.0 s; done: modulator ok" in text
    assert "old" not in text  # a result from before this calibration
    assert "scan 12 / 48 (25 %)" in text


def test_node_screen_of_an_unreachable_node() -> None:
    now = 1_800_000_000.0
    addr = NodeAddr("tcp://h:5550", "tcp://h:5551", "alice")
    sc = NodeScreen(addr, connected=False, down_since=now - 12, down_reason="no answer")
    sc.notices.append("node restarted at 12:00:01")
    text = "\n".join(render_node(sc, now))
    assert "UNREACHABLE for 12.0 s: no answer; waiting for it to come back" in text
    assert "node restarted at 12:00:01" in text


# ---------------------------------------------------------------- calibrate/sync --wait
def test_calibrate_wait_prints_the_outcome(capsys: Any, fake: Callable[..., FakeNode]) -> None:
    node = fake()
    r = run_ctl(capsys, [*endpoints(node), "calibrate", "--wait"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("calibration complete (node IDLE, after ")
    assert "calibration.modulator: ok in 0.2 s" in r.stdout and "v_pi_v: 3.7" in r.stdout
    assert node.state == "IDLE" and node.stats["calibrated"]


def test_calibrate_wait_fails_with_the_reason(capsys: Any, fake: Callable[..., FakeNode]) -> None:
    node = fake(procedure_ok=False)
    r = run_ctl(capsys, [*endpoints(node), "calibrate", "--wait"])
    assert r.returncode == 1
    assert r.stderr.startswith("calibration failed: no light at the power meter (node IDLE")
    r = run_ctl(capsys, [*endpoints(node), "calibrate", "--wait", "--json"])
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["ok"] is False and out["event"] == "failed"
    assert out["alarms"] and out["state"] == "IDLE"


def test_sync_wait_json(capsys: Any, fake: Callable[..., FakeNode]) -> None:
    node = fake()
    r = run_ctl(capsys, [*endpoints(node), "sync", "--wait", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["event"] == "locked" and out["state"] == "IDLE"
    assert out["results"]["sync"]["locked"] is True


@pytest.mark.system  # waits out a calibration (~7 s): make test-system
def test_wait_without_telemetry_judges_by_status(
    capsys: Any, fake: Callable[..., FakeNode]
) -> None:
    node = fake()
    dead = f"tcp://127.0.0.1:{free_port()}"
    argv = ["--endpoint", node.control, "--telemetry-endpoint", dead, "sync", "--wait"]
    r = run_ctl(capsys, argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("synchronization complete (node IDLE")
    node.procedure_ok = False
    node.state = "IDLE"
    r = run_ctl(capsys, argv)
    assert r.returncode == 1
    assert r.stderr.startswith("synchronization failed: no light at the power meter")


def test_wait_refused_command(capsys: Any, fake: Callable[..., FakeNode]) -> None:
    node = fake()
    node.state = "EXCHANGING"
    r = run_ctl(capsys, [*endpoints(node), "calibrate", "--wait"])
    assert r.returncode == 1 and "refused" in r.stderr


# ---------------------------------------------------------------- against a real pair
@pytest.mark.system  # a real pair of daemons (~18 s): make test-system
def test_real_pair_wait_and_watch(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    names = [
        "transmitter_control",
        "transmitter_telemetry",
        "receiver_control",
        "receiver_telemetry",
        "peer",
        "fiber",
    ]
    ports = {n: free_port() for n in names}
    fast = "\n[calibration]\nintegration_time_s = 0.05\n"
    tx_cfg = node_config(tmp_path, "transmitter", ports)
    rx_cfg = node_config(tmp_path, "receiver", ports, extra=fast)
    daemons: list[Daemon] = []
    try:
        daemons.append(start_daemon(tx_cfg, tmp_path / "tx.log"))
        daemons.append(start_daemon(rx_cfg, tmp_path / "rx.log"))
        for d in daemons:
            d.wait_event("daemon_ready", 60)
        tx = ["--config", str(tx_cfg)]
        deadline = time.monotonic() + 30
        while json.loads(run_ctl(capsys, [*tx, "status", "--json"]).stdout)["state"] != "IDLE":
            assert time.monotonic() < deadline, "the pair did not connect"
            time.sleep(0.5)
        r = run_ctl(capsys, [*tx, "calibrate", "--wait"])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "calibration complete" in r.stdout and "calibration.modulator: ok" in r.stdout
        r = run_ctl(capsys, [*tx, "sync", "--wait", "--json"])
        out = json.loads(r.stdout)
        assert r.returncode == 0 and out["ok"] and out["event"] == "locked", out
        assert out["results"]["sync"]["locked"] is True
        # both nodes on one screen each, with what their status reports
        tty = FakeTTY()
        monkeypatch.setattr(sys, "stdout", tty)
        r = run_ctl(capsys, [*tx, "--config", str(rx_cfg), "watch", "--duration", "3"])
        monkeypatch.undo()
        assert r.returncode == 0, r.stderr
        screen = tty.getvalue().rsplit("\x1b[H\x1b[2J", 1)[-1]
        heads = [line for line in screen.splitlines() if line.startswith("== ")]
        assert heads[0].startswith("== alice (transmitter)"), screen
        assert heads[1].startswith("== bob (receiver)"), screen
        assert screen.count("state        IDLE for ") == 2, screen
        assert screen.count("auth balance ") == 2 and screen.count("key store ") == 2
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
