"""Telemetry subscription: snapshot then deltas, with gap detection (Clone pattern).

:class:`CloneState` is the pure bookkeeping (no sockets); :func:`subscribe` and
:func:`asubscribe` drive it with a SUB socket and a control client for snapshots.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import zmq
import zmq.asyncio

from qkdnode.bus.telemetry import HEARTBEAT_TOPIC
from qkdnode.client._common import KeyLike, KeyPair, client_keypair, configure, server_key
from qkdnode.client.aio import AsyncClient
from qkdnode.client.sync import Client

EventKind = Literal["snapshot", "delta", "stale"]


@dataclass(frozen=True)
class TelemetryEvent:
    """One telemetry value. ``kind`` is ``snapshot`` (from a snapshot), ``delta`` (live)
    or ``stale`` (no message, not even a heartbeat, for ``idle_timeout_s``)."""

    kind: EventKind
    topic: str
    seq: int
    ts: float
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class CloneState:
    """Sequence bookkeeping of one subscriber.

    Feed it the snapshot (:meth:`apply_snapshot`) and every received message
    (:meth:`on_message`). ``needs_snapshot`` turns True on a gap.
    """

    seq: int = -1
    needs_snapshot: bool = True
    values: dict[str, TelemetryEvent] = field(default_factory=dict)
    resyncs: int = 0
    _buffer: list[TelemetryEvent] = field(default_factory=list)

    def apply_snapshot(self, snap: dict[str, Any]) -> list[TelemetryEvent]:
        """Install a snapshot; returns its values then the buffered deltas that follow it."""
        self.seq = int(snap["seq"])
        self.needs_snapshot = False
        self.resyncs += 1
        out = []
        for topic, item in sorted(snap.get("topics", {}).items(), key=lambda kv: kv[1]["seq"]):
            ev = TelemetryEvent(
                "snapshot", topic, int(item["seq"]), float(item["ts"]), dict(item["payload"])
            )
            self.values[topic] = ev
            out.append(ev)
        buffered, self._buffer = self._buffer, []
        for ev in buffered:
            out.extend(self.on_message(ev))
        return out

    def on_message(self, ev: TelemetryEvent) -> list[TelemetryEvent]:
        """Process one received message; returns the events to hand to the user."""
        if self.needs_snapshot:
            if ev.topic != HEARTBEAT_TOPIC:
                self._buffer.append(ev)
                del self._buffer[:-10_000]
            return []
        if ev.topic == HEARTBEAT_TOPIC:
            if ev.seq > self.seq:  # we missed the tail
                self.needs_snapshot = True
            return []
        if ev.seq <= self.seq:
            return []  # already covered by the snapshot
        if ev.seq != self.seq + 1:
            self.needs_snapshot = True
            self._buffer = [ev]
            return []
        self.seq = ev.seq
        self.values[ev.topic] = ev
        return [ev]


def _decode(frames: list[bytes]) -> TelemetryEvent | None:
    if len(frames) != 2:
        return None
    try:
        body = json.loads(frames[1])
        return TelemetryEvent(
            "delta",
            str(body["topic"]),
            int(body["seq"]),
            float(body["ts"]),
            dict(body.get("payload") or {}),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _matches(topic: str, prefixes: tuple[str, ...]) -> bool:
    return not prefixes or topic.startswith(prefixes)


def subscribe(
    telemetry_endpoint: str,
    control: Client,
    server_public_key: KeyLike | None = None,
    client_keys: KeyPair | KeyLike | None = None,
    *,
    topics: tuple[str, ...] = (),
    idle_timeout_s: float = 5.0,
    context: zmq.Context[Any] | None = None,
) -> Generator[TelemetryEvent, None, None]:
    """Blocking iterator: the snapshot values, then live deltas, re-snapshotting on gaps.

    Yields a ``stale`` event whenever nothing (not even a heartbeat) arrived for
    ``idle_timeout_s``. ``topics`` filters by prefix (client side; sequence checking
    needs the full stream).
    """
    ctx = context if context is not None else zmq.Context.instance()
    skey = server_key(server_public_key)
    keys = client_keypair(client_keys) if skey is not None else None
    sock: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    configure(sock, skey, keys, 16 * 1024 * 1024, 5.0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(telemetry_endpoint)
    state = CloneState()
    last_rx = time.monotonic()
    try:
        while True:
            if state.needs_snapshot:
                for ev in state.apply_snapshot(control.request("snapshot")):
                    if _matches(ev.topic, topics):
                        yield ev
            if sock.poll(100, zmq.POLLIN):
                last_rx = time.monotonic()
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    ev_in = _decode(frames)
                    if ev_in is None:
                        continue
                    for ev in state.on_message(ev_in):
                        if _matches(ev.topic, topics):
                            yield ev
            elif time.monotonic() - last_rx > idle_timeout_s:
                last_rx = time.monotonic()
                yield TelemetryEvent("stale", "", state.seq, time.time())
                state.needs_snapshot = True
    finally:
        sock.close(linger=0)


async def asubscribe(
    telemetry_endpoint: str,
    control: AsyncClient,
    server_public_key: KeyLike | None = None,
    client_keys: KeyPair | KeyLike | None = None,
    *,
    topics: tuple[str, ...] = (),
    idle_timeout_s: float = 5.0,
    context: zmq.asyncio.Context | None = None,
) -> AsyncGenerator[TelemetryEvent, None]:
    """asyncio version of :func:`subscribe`."""
    ctx = context if context is not None else zmq.asyncio.Context.instance()
    skey = server_key(server_public_key)
    keys = client_keypair(client_keys) if skey is not None else None
    sock = ctx.socket(zmq.SUB)
    configure(sock, skey, keys, 16 * 1024 * 1024, 5.0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(telemetry_endpoint)
    state = CloneState()
    try:
        while True:
            if state.needs_snapshot:
                for ev in state.apply_snapshot(await control.request("snapshot")):
                    if _matches(ev.topic, topics):
                        yield ev
            if await sock.poll(timeout=int(idle_timeout_s * 1000)):
                frames = await sock.recv_multipart()
                ev_in = _decode(frames)
                if ev_in is None:
                    continue
                for ev in state.on_message(ev_in):
                    if _matches(ev.topic, topics):
                        yield ev
            else:
                yield TelemetryEvent("stale", "", state.seq, time.time())
                state.needs_snapshot = True
    finally:
        sock.close(linger=0)
