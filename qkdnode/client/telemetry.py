"""Telemetry subscription: snapshot then deltas, with gap detection (Clone pattern).

:class:`CloneState` is the pure bookkeeping (no sockets); :class:`Subscription` (polled),
:func:`subscribe` and :func:`asubscribe` (iterators) drive it with a SUB socket and a
control client for snapshots.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import zmq
import zmq.asyncio

from qkdnode.bus.errors import BusError
from qkdnode.bus.telemetry import HEARTBEAT_TOPIC
from qkdnode.client._common import (
    KeyLike,
    KeyPair,
    client_keypair,
    configure,
    connect,
    server_key,
)
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
    (:meth:`on_message`). ``needs_snapshot`` turns True on a gap, and when the publisher
    restarted (``restarts`` counts those): its sequence numbers start again from 1, so a
    message older in sequence but newer in time than what was applied, or a snapshot
    behind the last sequence number, means a new publisher process.
    """

    seq: int = -1
    needs_snapshot: bool = True
    values: dict[str, TelemetryEvent] = field(default_factory=dict)
    resyncs: int = 0
    restarts: int = 0
    #: publisher time of the newest value applied (snapshot or delta)
    last_ts: float = 0.0
    _buffer: list[TelemetryEvent] = field(default_factory=list)
    _restarted: bool = False

    def apply_snapshot(self, snap: dict[str, Any]) -> list[TelemetryEvent]:
        """Install a snapshot; returns its values then the buffered deltas that follow it."""
        snap_seq = int(snap["seq"])
        items = sorted(snap.get("topics", {}).items(), key=lambda kv: kv[1]["seq"])
        snap_ts = max((float(item["ts"]) for _, item in items), default=0.0)
        restarted = self._restarted or snap_seq < self.seq
        if restarted:
            if not self._restarted:
                self.restarts += 1
            self.values.clear()  # the old process's values are gone with it
            self.last_ts = 0.0
            # buffered messages older than the new process's snapshot came from the old one
            self._buffer = [e for e in self._buffer if e.ts >= snap_ts]
        self._restarted = False
        self.seq = snap_seq
        self.needs_snapshot = False
        self.resyncs += 1
        self.last_ts = max(self.last_ts, snap_ts)
        out = []
        for topic, item in items:
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
        if ev.seq < self.seq and ev.ts > self.last_ts:
            # behind in sequence, ahead in time: the publisher restarted
            self.restarts += 1
            self._restarted = True
            self.needs_snapshot = True
            self._buffer = [] if ev.topic == HEARTBEAT_TOPIC else [ev]
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
        self.last_ts = max(self.last_ts, ev.ts)
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


class Subscription:
    """A telemetry subscription that the caller polls (one thread can watch many nodes).

    :meth:`poll` returns the events received since the previous call: snapshot values,
    live deltas, and a ``stale`` event when nothing (not even a heartbeat) arrived for
    ``idle_timeout_s``. It fetches a snapshot over ``control`` whenever one is needed
    (start, gap, publisher restart, after a stale period). If the node does not answer,
    :meth:`poll` raises the client's error (:class:`BusTimeout`, ...) and keeps the
    subscription: the next snapshot is tried as soon as a telemetry message shows the node
    is back, or after ``retry_s``. The SUB socket reconnects by itself, so a node restart
    only costs a re-snapshot (``state.restarts`` counts them).
    """

    def __init__(
        self,
        telemetry_endpoint: str,
        control: Client,
        server_public_key: KeyLike | None = None,
        client_keys: KeyPair | KeyLike | None = None,
        *,
        topics: tuple[str, ...] = (),
        idle_timeout_s: float = 5.0,
        snapshot_timeout_s: float | None = None,
        retry_s: float | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        ctx = context if context is not None else zmq.Context.instance()
        skey = server_key(server_public_key)
        keys = client_keypair(client_keys) if skey is not None else None
        sock: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
        configure(sock, skey, keys, 16 * 1024 * 1024, 5.0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        connect(sock, telemetry_endpoint)
        self.endpoint = telemetry_endpoint
        self.control = control
        self.topics = topics
        self.idle_timeout_s = idle_timeout_s
        self.snapshot_timeout_s = snapshot_timeout_s
        self.retry_s = idle_timeout_s if retry_s is None else retry_s
        self.state = CloneState()
        #: nothing received for ``idle_timeout_s`` (cleared by the next message)
        self.stale = False
        #: monotonic time of the last message received (heartbeats included)
        self.last_rx = time.monotonic()
        #: messages received (heartbeats included): 0 means the telemetry never came through
        self.received = 0
        self._sock: zmq.Socket[bytes] | None = sock
        self._failed_at: float | None = None
        self._rx_since_failure = False

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _snapshot_due(self) -> bool:
        if not self.state.needs_snapshot:
            return False
        if self._failed_at is None or self._rx_since_failure:
            return True
        return time.monotonic() - self._failed_at >= self.retry_s

    def poll(self, timeout_s: float = 0.1) -> list[TelemetryEvent]:
        """Events received within ``timeout_s`` (fewer waits when a snapshot is fetched)."""
        if self._sock is None:
            raise BusError("subscription is closed")
        out: list[TelemetryEvent] = []
        if self._snapshot_due():
            try:
                snap = self.control.request("snapshot", {}, self.snapshot_timeout_s)
            except Exception:
                self._failed_at = time.monotonic()
                self._rx_since_failure = False
                raise
            self._failed_at = None
            out.extend(self.state.apply_snapshot(snap))
        if self._sock.poll(int(max(0.0, timeout_s) * 1000), zmq.POLLIN):
            self.last_rx = time.monotonic()
            self.stale = False
            self._rx_since_failure = True
            while True:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.received += 1
                ev_in = _decode(frames)
                if ev_in is not None:
                    out.extend(self.state.on_message(ev_in))
        elif time.monotonic() - self.last_rx > self.idle_timeout_s:
            self.last_rx = time.monotonic()
            self.stale = True
            self.state.needs_snapshot = True
            out.append(TelemetryEvent("stale", "", self.state.seq, time.time()))
        return [ev for ev in out if ev.kind == "stale" or _matches(ev.topic, self.topics)]


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
    """Blocking iterator: the snapshot values, then live deltas, re-snapshotting on gaps
    and publisher restarts.

    Yields a ``stale`` event whenever nothing (not even a heartbeat) arrived for
    ``idle_timeout_s``. ``topics`` filters by prefix (client side; sequence checking
    needs the full stream). A snapshot the node does not answer raises the client's error
    out of the iterator; :class:`Subscription` is the form that survives node restarts.
    """
    with Subscription(
        telemetry_endpoint,
        control,
        server_public_key,
        client_keys,
        topics=topics,
        idle_timeout_s=idle_timeout_s,
        context=context,
    ) as sub:
        while True:
            yield from sub.poll(0.1)


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
    connect(sock, telemetry_endpoint)
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
