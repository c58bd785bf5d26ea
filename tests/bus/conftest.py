"""Fixtures: key pairs, an in-process control server on a background loop, and the
devserver as a real subprocess. All sockets on 127.0.0.1 with kernel-chosen ports."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from qkdnode.bus.commands import CommandTable
from qkdnode.bus.control import ControlServer
from qkdnode.bus.devserver import DevNode
from qkdnode.bus.keys import generate_keypair
from qkdnode.bus.telemetry import TelemetryPublisher
from qkdnode.config.sections import BusSection, CurveClient
from qkdnode.node_commands import NodeCommands

LOOP = "tcp://127.0.0.1:0"


@dataclass
class Keys:
    server: tuple[bytes, bytes]
    operator: tuple[bytes, bytes]
    monitor: tuple[bytes, bytes]
    stranger: tuple[bytes, bytes]

    def clients(self) -> list[CurveClient]:
        return [
            CurveClient(name="alice", role="operator", public_key=self.operator[0].decode()),
            CurveClient(name="bob", role="monitor", public_key=self.monitor[0].decode()),
        ]


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(generate_keypair(), generate_keypair(), generate_keypair(), generate_keypair())


class LoopThread:
    """An asyncio loop in a daemon thread, so blocking clients can run in the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def _do() -> Any:
            return fn()

        return self.run(_do())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class InProc:
    lt: LoopThread
    server: ControlServer
    pub: TelemetryPublisher
    node: DevNode
    ctx: zmq.asyncio.Context
    bus: BusSection
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint


@pytest.fixture
def start_inproc(keys: Keys) -> Iterator[Callable[..., InProc]]:
    started: list[InProc] = []

    def _start(curve: bool = False, table: CommandTable | None = None, **bus_kw: Any) -> InProc:
        """A server on a background loop; plaintext callers are operators unless
        ``plaintext_role`` says otherwise (the configuration default is monitor)."""
        bus_kw.setdefault("plaintext_role", "operator")
        lt = LoopThread()
        bus = BusSection(
            control_endpoint=LOOP,
            telemetry_endpoint=LOOP,
            allow_plaintext=not curve,
            clients=keys.clients(),
            **bus_kw,
        )
        secret = keys.server[1] if curve else None

        async def _up() -> InProc:
            ctx = zmq.asyncio.Context()
            pub = TelemetryPublisher(ctx, bus, secret, heartbeat_interval_s=0.2)
            node = DevNode(pub)
            server = ControlServer(
                ctx, bus, table or node.table(), lambda: node.state, secret, telemetry=pub
            )
            await pub.start()
            await server.start()
            return InProc(lt, server, pub, node, ctx, bus)

        inproc: InProc = lt.run(_up())
        started.append(inproc)
        return inproc

    yield _start
    for ip in started:

        async def _down(ip: InProc = ip) -> None:
            await ip.server.stop()
            await ip.pub.stop()
            ip.ctx.term()

        ip.lt.run(_down())
        ip.lt.close()


@dataclass
class DevProc:
    proc: subprocess.Popen[str]
    control: str
    telemetry: str

    def alive(self) -> bool:
        return self.proc.poll() is None


def spawn_devserver(*args: str) -> DevProc:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdnode.bus.devserver", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError("devserver did not start")
    info = json.loads(line)
    return DevProc(proc, info["control"], info["telemetry"])


@pytest.fixture
def devserver() -> Iterator[Callable[..., DevProc]]:
    procs: list[DevProc] = []

    def _spawn(*args: str) -> DevProc:
        dp = spawn_devserver(*args)
        procs.append(dp)
        return dp

    yield _spawn
    for dp in procs:
        if dp.alive():
            dp.proc.terminate()
            try:
                dp.proc.wait(5)
            except subprocess.TimeoutExpired:
                dp.proc.kill()
                dp.proc.wait()


def raw_dealer(
    endpoint: str, curve: tuple[bytes, tuple[bytes, bytes]] | None = None
) -> zmq.Socket[bytes]:
    """A bare DEALER for sending hand-made (malformed) frames.

    Sends give up after 2 s (``zmq.Again``) instead of blocking: a DEALER whose
    only peer refused its handshake has no pipe left to queue on.
    """
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = 2000
    if curve is not None:
        server_pub, (pub, sec) = curve
        sock.curve_serverkey = server_pub
        sock.curve_publickey = pub
        sock.curve_secretkey = sec
    sock.connect(endpoint)
    return sock


def recv_json(sock: zmq.Socket[bytes], timeout_ms: int = 3000) -> dict[str, Any]:
    assert sock.poll(timeout_ms), "no reply"
    frames = sock.recv_multipart()
    assert frames[0] == b""
    reply: dict[str, Any] = json.loads(frames[1])
    return reply


REPO = Path(__file__).resolve().parents[2]


def sim_node(state_dir: Path, role: str = "transmitter") -> Any:
    """A daemon ``Node`` built from ``configs/<role>.sim.toml`` (not started): its
    ``NodeCommands(node).table()`` is the daemon's real command table."""
    from qkdnode.config import load_config
    from qkdnode.node import Node

    path = REPO / "configs" / f"{role}.sim.toml"
    cfg = load_config(path)
    node_section = cfg.node.model_copy(update={"state_dir": state_dir})
    return Node(cfg.model_copy(update={"node": node_section}), str(path))


def daemon_specs(state_dir: Path) -> list[Any]:
    """Every command the daemon's control server answers (built-ins included)."""
    node = sim_node(state_dir)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        bus = node.cfg.bus
        server = ControlServer(
            ctx,
            bus,
            NodeCommands(node).table(),
            lambda: "IDLE",
            None,
            telemetry=TelemetryPublisher(ctx, bus, None),
        )
        return server.specs()
    finally:
        ctx.term()
