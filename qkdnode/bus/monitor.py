"""The monitor endpoint: read-only commands answered from a thread of their own.

A second CURVE ROUTER socket (``bus.monitor_endpoint``, off unless configured) answers
``status``, ``alarms`` and heartbeats without the event loop: a thread does blocking
``recv``/``send`` on it, as a bare ZeroMQ echo would, and answers each command from a
snapshot of its reply that the event loop publishes (see docs/protocol.md, "Monitor
endpoint"). The loop re-runs the commands' handlers every ``bus.monitor_max_age_s / 5``
seconds, after every command the control socket served and on every state change; a
snapshot older than ``bus.monitor_max_age_s`` is never served (``not_ready`` instead), and
every reply says how old its snapshot is (``content.snapshot.age_s``).

Security is the control socket's: the same ZAP domain and allowlist (an unlisted key or a
plaintext client never completes the handshake), the same per-client rate limit (one
bucket per key across both sockets), the same envelope checks, the same roles. Commands
other than the snapshot ones are refused with ``unknown_command`` whatever the caller's
role: nothing reached through this socket changes the node.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
from pydantic import ValidationError

from qkdnode.bus.commands import CallerInfo, CommandSpec, NoContent
from qkdnode.bus.eager import start_eager
from qkdnode.bus.envelope import (
    PROTOCOL_VERSION,
    EnvelopeError,
    IdMaker,
    dumps,
    error_bytes,
    field_errors,
    parse_canonical,
    parse_request,
    reply_bytes,
)
from qkdnode.bus.errors import ErrorCode
from qkdnode.bus.ratelimit import TokenBuckets
from qkdnode.bus.sockets import receive_capped

log = structlog.get_logger(__name__)

#: Commands the monitor endpoint may serve: read-only, caller-independent, no content.
SNAPSHOT_COMMANDS: tuple[str, ...] = ("status", "alarms")
#: The snapshot is re-taken this many times per ``bus.monitor_max_age_s``.
REFRESHES_PER_MAX_AGE = 5
#: The thread checks for a stop request at least this often (receive timeout).
STOP_POLL_MS = 100
_MAX_FRAMES = 8
_EMPTY = b""
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
#: The caller the snapshot's handlers run for (they do not depend on the caller).
_SNAPSHOT_CALLER = CallerInfo("monitor-snapshot", "monitor", None)


@dataclass(frozen=True)
class Snapshot:
    """One command's reply content, JSON-encoded once by the event loop.

    ``body`` is the encoded object without its braces (b"" for ``{}``); ``taken_mono_s``
    is ``time.monotonic()`` and ``taken_ts`` the Unix time (s) when the handler ran."""

    body: bytes
    taken_mono_s: float
    taken_ts: float


class SnapshotError(ValueError):
    """A command cannot be served from a snapshot (wrong role, content or state rule)."""


def check_snapshot_spec(spec: CommandSpec) -> None:
    """Raise :class:`SnapshotError` unless ``spec`` is servable from a snapshot: role
    ``monitor``, no content, allowed in every state."""
    if spec.role != "monitor" or spec.allowed_states is not None:
        raise SnapshotError(
            f"command {spec.name!r} cannot be a monitor snapshot: it needs role monitor "
            f"and any state (has role {spec.role!r}, states {spec.allowed_states})"
        )
    if spec.content_model is not NoContent:
        raise SnapshotError(f"command {spec.name!r} takes content: it cannot be a snapshot")


class MonitorServer:
    """The thread and socket of the monitor endpoint (see the module docstring).

    The event loop calls :meth:`refresh`; the thread only reads what it publishes (one
    dict, replaced whole). ``caller_of`` maps a ZAP user id (Z85 public key, None in
    plaintext) to the caller, as the control server does; ``limits`` is the control
    server's rate limiter, shared so that a client's budget spans both sockets.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        specs: Iterable[CommandSpec],
        *,
        max_age_s: float,
        max_frame_bytes: int,
        limits: TokenBuckets,
        caller_of: Callable[[str | None], CallerInfo | None],
        plaintext: bool,
    ) -> None:
        self._sock = sock
        self._specs = {s.name: s for s in specs}
        for spec in self._specs.values():
            check_snapshot_spec(spec)
        self.max_age_s = max_age_s
        self._max_frame = max_frame_bytes
        self._limits = limits
        self._caller_of = caller_of
        self._plaintext = plaintext
        self._snapshots: dict[str, Snapshot] = {}
        self._ids = IdMaker("m")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-monitor", daemon=True)
        self._refresh_failed: set[str] = set()
        self._last_refusal_log = 0.0
        self._max_age_text = repr(float(max_age_s)).encode()
        self.stats: Counter[str] = Counter()

    @property
    def commands(self) -> list[str]:
        return sorted(self._specs)

    # ----------------------------------------------------------------- event loop side
    def refresh(self) -> None:
        """Re-run every snapshot command's handler and publish the encoded replies.
        Event loop thread only. A handler that raises or suspends is skipped (its last
        snapshot ages until it is refused); the failure is logged once per command."""
        fresh = dict(self._snapshots)
        for name, spec in self._specs.items():
            try:
                done, result, task = start_eager(spec.handler({}, _SNAPSHOT_CALLER))
                if not done:
                    assert task is not None
                    task.cancel()
                    raise RuntimeError("handler suspended: a snapshot must be synchronous")
                if not isinstance(result, dict) or "snapshot" in result:
                    raise TypeError("handler must return an object without a 'snapshot' key")
                encoded = dumps(result)
            except Exception as exc:
                if name not in self._refresh_failed:
                    self._refresh_failed.add(name)
                    log.error(
                        "bus.monitor.snapshot_failed",
                        command=name,
                        error_type=type(exc).__name__,
                        error=str(exc),
                    )
                continue
            self._refresh_failed.discard(name)
            fresh[name] = Snapshot(encoded[1:-1], time.monotonic(), time.time())
        self._snapshots = fresh  # one reference swap: the thread sees old or new, whole

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop (it closes the socket within about
        :data:`STOP_POLL_MS` ms); does not wait."""
        self._stopping.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait for it (at most ``timeout_s``)."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ----------------------------------------------------------------- the thread
    def _run(self) -> None:
        sock = self._sock
        sock.rcvtimeo = STOP_POLL_MS
        try:
            while not self._stopping.is_set():
                try:
                    self._receive_one(sock)
                except zmq.Again:
                    continue
                except zmq.ZMQError as exc:
                    log.warning("bus.monitor.socket_error", error=str(exc))
                    time.sleep(0.01)
                except Exception:  # never let one message kill the thread
                    self.stats["internal"] += 1
                    log.exception("bus.monitor.unexpected")
        finally:
            sock.close(linger=0)

    def _receive_one(self, sock: zmq.Socket[bytes]) -> None:
        frames, count, user_id = receive_capped(
            sock, first_flags=0, plaintext=self._plaintext, max_frames=_MAX_FRAMES
        )
        self._handle(frames, count, user_id)

    def _handle(self, frames: list[bytes], count: int, user_id: str | None) -> None:
        self.stats["messages"] += 1
        identity = frames[0]
        client = user_id.encode() if user_id else identity
        verdict = self._limits.take(client)
        if verdict < 0:
            self.stats["dropped_flood"] += 1
            return
        if count != 3 or frames[1] != _EMPTY:
            self._refuse(
                identity,
                None,
                None,
                ErrorCode.BAD_FRAMES,
                f"expected 2 frames (empty delimiter, JSON envelope), got {count - 1}",
                {"field": "frames", "frames": count - 1},
            )
            return
        body = frames[2]
        if len(body) > self._max_frame:
            self._refuse(
                identity,
                None,
                None,
                ErrorCode.TOO_LARGE,
                "message frame exceeds bus.max_control_frame_bytes",
                {"field": "frames[1]", "bytes": len(body), "limit": self._max_frame},
            )
            return
        canonical = parse_canonical(body)
        content: dict[str, Any] = {}
        if canonical is not None:
            parent_id, mtype, command = canonical
        else:
            try:
                env = parse_request(body)
            except EnvelopeError as exc:
                self._refuse(
                    identity, exc.parent_id, exc.command, exc.code, exc.message, exc.details
                )
                return
            parent_id, mtype, command, content = env.id, env.type, env.command, env.content
        if verdict == 0:
            self._refuse(
                identity,
                parent_id,
                command,
                ErrorCode.RATE_LIMITED,
                "too many requests; slow down",
                {"limit_per_s": self._limits.rate},
            )
            return
        caller = self._caller_of(user_id)
        if caller is None:
            self._refuse(
                identity,
                parent_id,
                command,
                ErrorCode.FORBIDDEN,
                "caller is not authenticated",
                {"field": "(connection)"},
            )
            return
        if mtype == "heartbeat":
            self.stats["heartbeats"] += 1
            self._send(identity, reply_bytes(self._ids(), parent_id, None, {}, "heartbeat"))
            return
        self._answer(identity, parent_id, command or "", content, caller, canonical is not None)

    def _answer(  # noqa: PLR0917
        self,
        identity: bytes,
        parent_id: str,
        name: str,
        content: dict[str, Any],
        caller: CallerInfo,
        canonical: bool,
    ) -> None:
        spec = self._specs.get(name)
        if spec is None:
            self._refuse(
                identity,
                parent_id,
                name,
                ErrorCode.UNKNOWN_COMMAND,
                f"command {name!r} is not served on the monitor endpoint "
                "(read-only snapshots only); send it to the control endpoint",
                {"field": "command", "served": self.commands},
            )
            return
        if not spec.role_allows(caller.role):
            self._refuse(
                identity,
                parent_id,
                name,
                ErrorCode.FORBIDDEN,
                f"command {name!r} requires role {spec.role!r}; "
                f"client {caller.name!r} has role {caller.role!r}",
                {"field": "command", "required_role": spec.role, "role": caller.role},
            )
            return
        if content:
            try:
                spec.content_model.model_validate(content)
            except ValidationError as exc:
                errors = field_errors(exc, "content.")
                self._refuse(
                    identity,
                    parent_id,
                    name,
                    ErrorCode.INVALID_CONTENT,
                    "invalid content field(s): " + ", ".join(e["field"] for e in errors),
                    {"field": errors[0]["field"], "errors": errors},
                )
                return
        snap = self._snapshots.get(name)
        age_s = time.monotonic() - snap.taken_mono_s if snap is not None else None
        if snap is None or age_s is None or age_s > self.max_age_s:
            self._refuse(
                identity,
                parent_id,
                name,
                ErrorCode.NOT_READY,
                f"no snapshot of {name!r} younger than bus.monitor_max_age_s "
                f"({self.max_age_s:g} s): the node is busy; retry, or ask the control "
                "endpoint",
                {"field": "command", "age_s": age_s, "max_age_s": self.max_age_s},
            )
            return
        self.stats["requests"] += 1
        if canonical:  # the id and the command hold no character JSON escapes
            head = b'{"v":%d,"id":"%s","type":"reply","ts":%r,"parent_id":"%s","command":"%s"' % (
                PROTOCOL_VERSION,
                self._ids().encode(),
                time.time(),
                parent_id.encode(),
                name.encode(),
            )
        else:
            head = dumps(
                {
                    "v": PROTOCOL_VERSION,
                    "id": self._ids(),
                    "type": "reply",
                    "ts": time.time(),
                    "parent_id": parent_id,
                    "command": name,
                }
            )[:-1]
        stamp = b'{"snapshot":{"taken_ts":%r,"age_s":%.6f,"max_age_s":%s}' % (
            snap.taken_ts,
            age_s,
            self._max_age_text,
        )
        sep = b"," if snap.body else b""
        self._send(identity, b"".join((head, b',"content":', stamp, sep, snap.body, b"}}")))

    def _refuse(  # noqa: PLR0917
        self,
        identity: bytes,
        parent_id: str | None,
        command: str | None,
        code: str,
        message: str,
        details: dict[str, Any],
    ) -> None:
        self.stats[f"error.{code}"] += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:  # a flood of refusals is not a flood of logs
            self._last_refusal_log = now
            log.warning("bus.monitor.refused", code=str(code), command=command, reason=message)
        self._send(identity, error_bytes(self._ids(), parent_id, command, code, message, details))

    def _send(self, identity: bytes, payload: bytes) -> None:
        try:
            self._sock.send(identity, _SNDMORE | _NOBLOCK)
            self._sock.send(_EMPTY, _SNDMORE | _NOBLOCK)
            self._sock.send(payload, _NOBLOCK)
        except zmq.ZMQError:
            self.stats["send_failed"] += 1
