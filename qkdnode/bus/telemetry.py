"""Telemetry: a PUB socket with topic frames, sequence numbers and a last-value cache.

Clone pattern (zguide ch. 5): every published message carries a global sequence number;
the publisher keeps the last message of each topic; a late joiner subscribes first,
fetches ``snapshot`` over the control socket (last value per topic + current sequence),
drops deltas it already has, then applies the rest. A gap in sequence numbers means lost
messages: fetch a new snapshot. A heartbeat on topic ``_hb`` (carrying the current
sequence, not consuming one) lets subscribers detect both a silent publisher and a lost
tail message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from qkdnode.bus.commands import CallerInfo, CommandSpec
from qkdnode.bus.envelope import PROTOCOL_VERSION
from qkdnode.bus.sockets import bound_endpoint
from qkdnode.bus.zap import ZapHandler, allowlist, secure_and_bind
from qkdnode.config.sections import BusSection

log = structlog.get_logger(__name__)

TELEMETRY_DOMAIN = "telemetry"
HEARTBEAT_TOPIC = "_hb"
TOPIC_RE = re.compile(r"^[a-z][a-z0-9_.\-]{0,127}$")

#: Topics the daemon publishes (documented in docs/protocol.md); others are allowed.
STANDARD_TOPICS = (
    "state",
    "alarm",
    "block",
    "progress",
    "rates",
    "peer",
    "sync",
)


#: An in-process listener of every published delta: ``(topic, seq, ts, payload)``.
TelemetryListener = Callable[[str, int, float, dict[str, Any]], None]


class TelemetryPublisher:
    """Publish ``(topic, payload)`` deltas; answer ``snapshot`` for late joiners.

    :meth:`publish` never blocks (a PUB socket drops messages for subscribers that fall
    behind, which they detect as a sequence gap). Call it from the event loop thread.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        bus_config: BusSection,
        secret_key: bytes | None,
        *,
        heartbeat_interval_s: float | None = None,
    ) -> None:
        self._ctx = ctx
        self._bus = bus_config
        self._secret = secret_key
        self._hb_s = heartbeat_interval_s or bus_config.heartbeat_interval_s
        self._sock: zmq.Socket[bytes] | None = None
        self._zap: ZapHandler | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self.seq = 0
        self._last: dict[str, dict[str, Any]] = {}
        self.endpoint: str = bus_config.telemetry_endpoint
        self.sent = 0
        #: in-process listeners (the site's web console); one that raises is logged and
        #: does not stop the others or the publication
        self.listeners: list[TelemetryListener] = []

    async def start(self) -> None:
        if self._sock is not None:
            return
        sock: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.PUB)
        sock.linger = 0
        sock.sndhwm = 10_000
        self._zap = secure_and_bind(
            sock,
            self._ctx,
            component="telemetry",
            endpoint=self._bus.telemetry_endpoint,
            endpoint_key="bus.telemetry_endpoint",
            plaintext=self._bus.allow_plaintext,
            secret_key=self._secret,
            missing_key_error="bus.server_secret_key_file: telemetry needs a CURVE secret key",
            domain=TELEMETRY_DOMAIN,
            allow=allowlist(self._bus, frozenset({"monitor", "operator"})),
        )
        self._sock = sock
        self.endpoint = bound_endpoint(sock)
        self._hb_task = asyncio.create_task(self._heartbeats(), name="telemetry-heartbeat")
        log.info("bus.telemetry.publishing", endpoint=self.endpoint)

    async def stop(self) -> None:
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
            self._hb_task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._zap is not None:
            self._zap.release()
            self._zap = None

    def publish(self, topic: str, payload: dict[str, Any]) -> int:
        """Publish one delta; returns its sequence number. Raises ValueError/TypeError for a
        bad topic name or a payload that is not a JSON object."""
        if not TOPIC_RE.match(topic):
            raise ValueError(f"telemetry topic {topic!r:.80} must match {TOPIC_RE.pattern}")
        if not isinstance(payload, dict):
            raise TypeError(f"telemetry payload of {topic!r} must be a dict")
        seq = self.seq + 1
        ts = time.time()
        body = json.dumps(
            {"v": PROTOCOL_VERSION, "seq": seq, "ts": ts, "topic": topic, "payload": payload},
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        self.seq = seq
        self._last[topic] = {"seq": seq, "ts": ts, "payload": payload}
        self._send([topic.encode(), body])
        for listener in list(self.listeners):
            try:
                listener(topic, seq, ts, payload)
            except Exception as exc:
                log.warning("telemetry_listener_failed", topic=topic, error=str(exc))
        return seq

    def snapshot(self) -> dict[str, Any]:
        """Last value of each topic and the sequence number it is consistent with."""
        return {"v": PROTOCOL_VERSION, "seq": self.seq, "topics": dict(self._last)}

    def command_spec(self) -> CommandSpec:
        async def _snapshot(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
            return self.snapshot()

        return CommandSpec(
            "snapshot", _snapshot, None, "monitor", None, "telemetry last values + sequence"
        )

    def _send(self, frames: list[bytes]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
            self.sent += 1
        except zmq.ZMQError:
            pass  # PUB drops rather than blocks; subscribers see the gap

    def heartbeat(self) -> None:
        body = json.dumps(
            {
                "v": PROTOCOL_VERSION,
                "seq": self.seq,
                "ts": time.time(),
                "topic": HEARTBEAT_TOPIC,
                "payload": {},
            },
            separators=(",", ":"),
        ).encode()
        self._send([HEARTBEAT_TOPIC.encode(), body])

    async def _heartbeats(self) -> None:
        while True:
            self.heartbeat()
            await asyncio.sleep(self._hb_s)
