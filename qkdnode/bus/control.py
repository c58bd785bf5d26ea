"""The control server: a ROUTER socket answering versioned requests from DEALER clients.

Pipeline of one message (each step refuses with a structured error, never raises):
per-client rate limit -> frame shape and size -> JSON -> envelope (version, type,
fields) -> command allowlist -> caller role -> content model -> node state -> handler.
Every message that reaches the JSON parser gets exactly one reply (an unexpected failure
anywhere after it is answered with ``internal``). Refusals are logged at most once per
client per :data:`REFUSAL_LOG_INTERVAL_S`, with the number of refusals not logged.

The socket is read edge-triggered from the event loop (``add_reader`` on the ZeroMQ FD),
draining queued messages in batches; handlers that finish without awaiting are run
inline (see :mod:`qkdnode.bus.eager`), others as tasks, so a slow command never blocks
the others.

With ``bus.monitor_endpoint`` set, the server also runs the monitor endpoint
(:mod:`qkdnode.bus.monitor`): a second socket whose thread answers ``status`` and
``alarms`` from snapshots this server re-takes on the loop (periodically, after every
operator command, and when :meth:`ControlServer.monitor_changed` is called).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
import zmq
from pydantic import ValidationError

from qkdnode.bus.commands import CallerInfo, CommandSpec, CommandTable, NoContent
from qkdnode.bus.eager import start_eager
from qkdnode.bus.envelope import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    EnvelopeError,
    IdMaker,
    RequestEnvelope,
    error_bytes,
    field_errors,
    parse_request,
    reply_bytes,
)
from qkdnode.bus.errors import CommandError, ErrorCode
from qkdnode.bus.monitor import REFRESHES_PER_MAX_AGE, SNAPSHOT_COMMANDS, MonitorServer
from qkdnode.bus.ratelimit import TokenBuckets
from qkdnode.bus.sockets import bound_endpoint, receive_capped, set_heartbeat
from qkdnode.bus.zap import ZapHandler, allowlist, secure_and_bind
from qkdnode.config.sections import BusSection

log = structlog.get_logger(__name__)

CONTROL_DOMAIN = "control"
MAX_FRAMES = 8
BATCH = 256
#: A client's refusals are logged at most once per this many seconds.
REFUSAL_LOG_INTERVAL_S = 10.0
_EMPTY = b""
# plain ints: enum look-ups cost more than the calls themselves on the hot path
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


class _Throttle:
    """Log a given event key at most once per ``period_s``."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}

    def ok(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.period_s:
            self._last[key] = now
            return True
        return False


class _Origin:
    """Where a message came from: the connection's routing id (replies go there) and,
    with CURVE, the client's public key (Z85). ``client`` keys the rate limit and the
    refusal log: the public key when known, else the connection."""

    __slots__ = ("client", "identity", "user_id")

    def __init__(self, identity: bytes, user_id: str | None) -> None:
        self.identity = identity
        self.user_id = user_id
        self.client = user_id.encode() if user_id else identity


class _RefusalLog:
    """Which refusals to log: at most one per client per ``interval_s``; the others are
    counted and the count is logged with the client's next logged refusal."""

    def __init__(self, interval_s: float, max_clients: int = 10_000) -> None:
        self.interval_s = interval_s
        self.max_clients = max_clients
        self._clients: dict[bytes, list[float]] = {}  # key -> [last logged, suppressed]

    def admit(self, client: bytes) -> int | None:
        """None: do not log (counted). Otherwise: log, with this many refusals suppressed
        since the last one logged for ``client``."""
        now = time.monotonic()
        entry = self._clients.get(client)
        if entry is None:
            if len(self._clients) >= self.max_clients:
                self._evict(now)
            self._clients[client] = [now, 0.0]
            return 0
        if now - entry[0] >= self.interval_s:
            suppressed = int(entry[1])
            entry[0], entry[1] = now, 0.0
            return suppressed
        entry[1] += 1
        return None

    def _evict(self, now: float) -> None:
        stale = [k for k, (t, _) in self._clients.items() if now - t >= self.interval_s]
        for k in stale:
            del self._clients[k]
        if len(self._clients) >= self.max_clients:
            self._clients.clear()


class ControlServer:
    """Request/reply server of the daemon (see docs/protocol.md, "Control socket")."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        bus_config: BusSection,
        commands: CommandTable,
        get_state: Callable[[], str],
        secret_key: bytes | None,
        *,
        telemetry: Any = None,
        server_name: str = "qkdnode",
        refusal_log_interval_s: float = REFUSAL_LOG_INTERVAL_S,
    ) -> None:
        self._ctx = ctx
        self._bus = bus_config
        self._commands = commands
        self._get_state = get_state
        self._secret = secret_key
        self._server_name = server_name
        self._sock: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._zap: ZapHandler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = IdMaker("s")
        self._limits = TokenBuckets(bus_config.client_rate_limit_per_s)
        self._throttle = _Throttle()
        self._refusal_log = _RefusalLog(refusal_log_interval_s)
        self._recheck_scheduled = False
        self._plaintext = bus_config.allow_plaintext
        self._plain_caller = CallerInfo("plaintext", bus_config.plaintext_role, None)
        self.stats: Counter[str] = Counter()
        self._builtins: dict[str, CommandSpec] = {
            "ping": CommandSpec(
                "ping", self._ping, None, "monitor", NoContent, "liveness and protocol check"
            ),
            "commands": CommandSpec(
                "commands",
                self._list_commands,
                None,
                "monitor",
                NoContent,
                "every command with its role, states, content schema and error codes",
            ),
        }
        if telemetry is not None and "snapshot" not in commands:
            spec = telemetry.command_spec()
            self._builtins[spec.name] = spec
        self.endpoint: str = bus_config.control_endpoint
        self._monitor: MonitorServer | None = None
        self._monitor_zap: ZapHandler | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        #: The monitor endpoint actually bound (None when ``bus.monitor_endpoint`` is unset).
        self.monitor_endpoint: str | None = None

    # ----------------------------------------------------------------- life cycle
    async def start(self) -> None:
        if self._sock is not None:
            return
        self._loop = asyncio.get_running_loop()
        sock = self._router_socket()
        self._zap = secure_and_bind(
            sock,
            self._ctx,
            component="control",
            endpoint=self._bus.control_endpoint,
            endpoint_key="bus.control_endpoint",
            plaintext=self._plaintext,
            secret_key=self._secret,
            missing_key_error=(
                "bus.server_secret_key_file: a CURVE secret key is required "
                "unless bus.allow_plaintext is true"
            ),
            domain=CONTROL_DOMAIN,
            allow=allowlist(self._bus, frozenset({"monitor", "operator"})),
        )
        self._sock = sock
        self.endpoint = bound_endpoint(sock)
        self._loop.add_reader(sock.FD, self._on_readable)
        self._loop.call_soon(self._on_readable)
        log.info(
            "bus.control.listening",
            endpoint=self.endpoint,
            curve=not self._plaintext,
            commands=len(self._commands),
        )
        if self._bus.monitor_endpoint is not None:
            try:
                self._start_monitor(self._bus.monitor_endpoint)
            except BaseException:
                await self.stop()
                raise

    def _router_socket(self) -> zmq.Socket[bytes]:
        """A ROUTER with the options both command sockets share (frame size cap, queue
        depths, heartbeats); not yet secured or bound."""
        sock: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self._bus.max_control_frame_bytes)
        sock.sndhwm = 100_000
        sock.rcvhwm = 100_000
        set_heartbeat(sock, self._bus.heartbeat_interval_s, self._bus.heartbeat_liveness)
        return sock

    def _start_monitor(self, endpoint: str) -> None:
        sock = self._router_socket()
        self._monitor_zap = secure_and_bind(
            sock,
            self._ctx,
            component="monitor",
            endpoint=endpoint,
            endpoint_key="bus.monitor_endpoint",
            plaintext=self._plaintext,
            secret_key=self._secret,
            missing_key_error=(
                "bus.server_secret_key_file: a CURVE secret key is required "
                "unless bus.allow_plaintext is true"
            ),
            domain=CONTROL_DOMAIN,
            allow=allowlist(self._bus, frozenset({"monitor", "operator"})),
        )
        self.monitor_endpoint = bound_endpoint(sock)
        monitor = MonitorServer(
            sock,
            [spec for n in SNAPSHOT_COMMANDS if (spec := self._commands.get(n)) is not None],
            max_age_s=self._bus.monitor_max_age_s,
            max_frame_bytes=self._bus.max_control_frame_bytes,
            limits=self._limits,
            caller_of=self._caller,
            plaintext=self._plaintext,
        )
        monitor.refresh()
        monitor.start()
        self._monitor = monitor
        self._monitor_task = asyncio.create_task(self._refresh_monitor(), name="monitor-refresh")
        log.info(
            "bus.monitor.listening",
            endpoint=self.monitor_endpoint,
            curve=not self._plaintext,
            commands=monitor.commands,
            max_age_s=monitor.max_age_s,
        )

    async def _refresh_monitor(self) -> None:
        interval_s = self._bus.monitor_max_age_s / REFRESHES_PER_MAX_AGE
        while self._monitor is not None:
            await asyncio.sleep(interval_s)
            self.monitor_changed()

    def monitor_changed(self) -> None:
        """Re-take the monitor endpoint's snapshots now (something they show changed);
        no-op without a monitor endpoint. Event loop thread only."""
        if self._monitor is not None:
            self._monitor.refresh()

    async def stop(self) -> None:
        await self._stop_monitor()
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.FD)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        sock.close(linger=0)
        if self._zap is not None:
            self._zap.release()
            self._zap = None
        log.info("bus.control.stopped", endpoint=self.endpoint)

    async def _stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        task, self._monitor_task = self._monitor_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if monitor is not None:
            monitor.request_stop()  # even if this coroutine is cancelled while it waits
            await asyncio.to_thread(monitor.stop)
            log.info("bus.monitor.stopped", endpoint=self.monitor_endpoint)
        if self._monitor_zap is not None:
            self._monitor_zap.release()
            self._monitor_zap = None

    @property
    def running(self) -> bool:
        return self._sock is not None

    async def invoke(
        self, name: str, content: dict[str, Any], caller: CallerInfo
    ) -> dict[str, Any]:
        """Run command ``name`` in-process for ``caller`` (the site's web console), with
        the checks a request on the socket gets: allowlist, role, content model, node
        state. Raises :class:`CommandError` with the same codes as an error reply."""
        spec = self._builtins.get(name) or self._commands.get(name)
        if spec is None:
            raise CommandError(
                f"unknown command {name!r}",
                code=ErrorCode.UNKNOWN_COMMAND,
                details={"field": "command"},
            )
        if not spec.role_allows(caller.role):
            raise CommandError(
                f"command {name!r} requires role {spec.role!r}; "
                f"client {caller.name!r} has role {caller.role!r}",
                code=ErrorCode.FORBIDDEN,
                details={"field": "command", "required_role": spec.role, "role": caller.role},
            )
        try:
            checked = spec.content_model.model_validate(content).model_dump()
        except ValidationError as exc:
            errors = field_errors(exc, "content.")
            raise CommandError(
                "invalid content field(s): " + ", ".join(e["field"] for e in errors),
                code=ErrorCode.INVALID_CONTENT,
                details={"field": errors[0]["field"], "errors": errors},
            ) from None
        if spec.allowed_states is not None:
            state = self._current_state()
            if state not in spec.allowed_states:
                allowed = sorted(spec.allowed_states)
                raise CommandError(
                    f"command {name!r} is not allowed in state {state!r} "
                    f"(allowed: {', '.join(allowed)})",
                    code=ErrorCode.NOT_ALLOWED_IN_STATE,
                    details={"field": "command", "state": state, "allowed_states": allowed},
                )
        self.stats["requests"] += 1
        return await spec.handler(checked, caller)

    def add_command(self, spec: CommandSpec) -> None:
        """Serve one more command (a site service's, such as the key manager's
        ``network``); ValueError if the name is taken."""
        if spec.name in self._builtins or spec.name in self._commands:
            raise ValueError(f"command {spec.name!r} is already served")
        self._commands.add(spec)

    # ----------------------------------------------------------------- receiving
    def _on_readable(self) -> None:
        self._recheck_scheduled = False
        sock = self._sock
        if sock is None:
            return
        budget = BATCH
        while budget > 0:
            try:
                if not sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                    return
                self._receive_one(sock)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if self._throttle.ok("zmq"):
                    log.warning("bus.control.socket_error", error=str(exc))
                return
            except Exception:  # never let one message kill the reader
                self.stats["internal"] += 1
                log.exception("bus.control.unexpected")
            budget -= 1
        self._schedule_recheck()

    def _schedule_recheck(self) -> None:
        if not self._recheck_scheduled and self._loop is not None:
            self._recheck_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _receive_one(self, sock: zmq.Socket[bytes]) -> None:
        """Read every frame of one message (keeping at most MAX_FRAMES) and handle it."""
        frames, count, user_id = receive_capped(
            sock, first_flags=_NOBLOCK, plaintext=self._plaintext, max_frames=MAX_FRAMES
        )
        self._handle(frames, count, user_id)

    def _caller(self, user_id: str | None) -> CallerInfo | None:
        if self._plaintext:
            return self._plain_caller
        if not user_id or self._zap is None:
            return None
        ident = self._zap.lookup(CONTROL_DOMAIN, user_id)
        if ident is None:
            return None
        return CallerInfo(ident.name, ident.role, user_id)

    def _handle(self, frames: list[bytes], count: int, user_id: str | None) -> None:
        self.stats["messages"] += 1
        origin = _Origin(frames[0], user_id)
        verdict = self._limits.take(origin.client)
        if verdict < 0:
            self.stats["dropped_flood"] += 1
            return
        if count != 3 or frames[1] != _EMPTY:
            self._refuse(
                origin,
                None,
                None,
                ErrorCode.BAD_FRAMES,
                f"expected 2 frames (empty delimiter, JSON envelope), got {count - 1}",
                {
                    "field": "frames",
                    "frames": count - 1,
                    "delimiter_empty": len(frames) > 1 and frames[1] == _EMPTY,
                },
            )
            return
        body = frames[2]
        if len(body) > self._bus.max_control_frame_bytes:
            self._refuse(
                origin,
                None,
                None,
                ErrorCode.TOO_LARGE,
                "message frame exceeds bus.max_control_frame_bytes",
                {
                    "field": "frames[1]",
                    "bytes": len(body),
                    "limit": self._bus.max_control_frame_bytes,
                },
            )
            return
        try:
            env = parse_request(body)
        except EnvelopeError as exc:
            self._refuse(origin, exc.parent_id, exc.command, exc.code, exc.message, exc.details)
            return
        except Exception:  # a parser bug: the message is still answered, once
            self._unexpected(origin, None, None)
            return
        try:
            self._serve(origin, env, verdict)
        except Exception:
            self._unexpected(origin, env.id, env.command)

    def _unexpected(self, origin: _Origin, parent_id: str | None, command: str | None) -> None:
        self.stats["internal"] += 1
        log.exception("bus.control.unexpected", command=command)
        self._refuse(
            origin,
            parent_id,
            command,
            ErrorCode.INTERNAL,
            "the server failed to process the request",
            {"field": "(server)"},
        )

    def _serve(self, origin: _Origin, env: RequestEnvelope, verdict: int) -> None:
        if verdict == 0:
            self._refuse(
                origin,
                env.id,
                env.command,
                ErrorCode.RATE_LIMITED,
                "too many requests; slow down",
                {"limit_per_s": self._limits.rate},
            )
            return
        caller = self._caller(origin.user_id)
        if caller is None:
            self._refuse(
                origin,
                env.id,
                env.command,
                ErrorCode.FORBIDDEN,
                "caller is not authenticated",
                {"field": "(connection)"},
            )
            return
        if env.type == "heartbeat":
            self.stats["heartbeats"] += 1
            self._send(origin, reply_bytes(self._ids(), env.id, None, {}, "heartbeat"))
            return
        self._dispatch(origin, env, caller)

    # ----------------------------------------------------------------- dispatching
    def _dispatch(self, origin: _Origin, env: RequestEnvelope, caller: CallerInfo) -> None:
        name = env.command or ""
        spec = self._builtins.get(name) or self._commands.get(name)
        if spec is None:
            self._refuse(
                origin,
                env.id,
                name,
                ErrorCode.UNKNOWN_COMMAND,
                f"unknown command {name!r}",
                {"field": "command"},
            )
            return
        if not spec.role_allows(caller.role):
            self._refuse(
                origin,
                env.id,
                name,
                ErrorCode.FORBIDDEN,
                f"command {name!r} requires role {spec.role!r}; "
                f"client {caller.name!r} has role {caller.role!r}",
                {"field": "command", "required_role": spec.role, "role": caller.role},
            )
            return
        try:
            content = spec.content_model.model_validate(env.content).model_dump()
        except ValidationError as exc:
            errors = field_errors(exc, "content.")
            self._refuse(
                origin,
                env.id,
                name,
                ErrorCode.INVALID_CONTENT,
                "invalid content field(s): " + ", ".join(e["field"] for e in errors),
                {"field": errors[0]["field"], "errors": errors},
            )
            return
        if spec.allowed_states is not None:
            state = self._current_state()
            if state not in spec.allowed_states:
                allowed = sorted(spec.allowed_states)
                self._refuse(
                    origin,
                    env.id,
                    name,
                    ErrorCode.NOT_ALLOWED_IN_STATE,
                    f"command {name!r} is not allowed in state {state!r} "
                    f"(allowed: {', '.join(allowed)})",
                    {"field": "command", "state": state, "allowed_states": allowed},
                )
                return
        if len(self._tasks) >= self._bus.max_inflight_requests:
            self._refuse(
                origin,
                env.id,
                name,
                ErrorCode.BUSY,
                "too many requests in progress",
                {"limit": self._bus.max_inflight_requests},
            )
            return
        self.stats["requests"] += 1
        try:
            done, result, task = start_eager(spec.handler(content, caller))
        except BaseException as exc:  # handler errors become replies
            self._handler_failed(origin, env, exc)
            return
        if done:
            self._reply(origin, env, result)
            return
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, origin, env))

    def _task_done(self, task: asyncio.Task[Any], origin: _Origin, env: RequestEnvelope) -> None:
        self._tasks.discard(task)
        if self._sock is None or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._handler_failed(origin, env, exc)
        else:
            self._reply(origin, env, task.result())
        self._schedule_recheck()

    def _handler_failed(self, origin: _Origin, env: RequestEnvelope, exc: BaseException) -> None:
        self._after_command(env)
        if isinstance(exc, CommandError):
            self._refuse(origin, env.id, env.command, exc.code, exc.message, exc.details)
            return
        if not isinstance(exc, Exception):
            raise exc
        log.error(
            "bus.control.handler_failed",
            command=env.command,
            error_type=type(exc).__name__,
            exc_info=exc,
        )
        self._refuse(
            origin,
            env.id,
            env.command,
            ErrorCode.INTERNAL,
            f"command {env.command!r} failed: {type(exc).__name__}",
            {"field": "command"},
        )

    def _after_command(self, env: RequestEnvelope) -> None:
        """An operator command may have changed what the monitor snapshots show: re-take
        them before its answer leaves, so its caller never reads an older one."""
        if self._monitor is not None:
            spec = self._commands.get(env.command or "")
            if spec is not None and spec.role == "operator":
                self.monitor_changed()

    def _reply(self, origin: _Origin, env: RequestEnvelope, result: Any) -> None:
        self._after_command(env)
        if not isinstance(result, dict):
            self._refuse(
                origin,
                env.id,
                env.command,
                ErrorCode.INTERNAL,
                f"command {env.command!r} returned {type(result).__name__}, not an object",
                {"field": "content"},
            )
            return
        try:
            payload = reply_bytes(self._ids(), env.id, env.command, result)
        except Exception:  # TypeError, ValueError (NaN), RecursionError
            self._refuse(
                origin,
                env.id,
                env.command,
                ErrorCode.INTERNAL,
                f"command {env.command!r} returned a non-JSON value",
                {"field": "content"},
            )
            return
        self._send(origin, payload)

    def _refuse(  # noqa: PLR0917
        self,
        origin: _Origin,
        parent_id: str | None,
        command: str | None,
        code: str,
        message: str,
        details: dict[str, Any],
    ) -> None:
        self.stats[f"error.{code}"] += 1
        self._log_refusal(origin, command, str(code), message, details)
        self._send(origin, error_bytes(self._ids(), parent_id, command, code, message, details))

    def _log_refusal(
        self, origin: _Origin, command: str | None, code: str, message: str, details: Any
    ) -> None:
        """Log a refusal unless this client had one logged less than an interval ago."""
        suppressed = self._refusal_log.admit(origin.client)
        if suppressed is None:
            self.stats["refusals_not_logged"] += 1
            return
        log.warning(
            "bus.control.refused",
            client=self._client_name(origin),
            code=code,
            command=command,
            reason=message,
            field=details.get("field") if isinstance(details, dict) else None,
            suppressed=suppressed,
            interval_s=self._refusal_log.interval_s,
        )

    def _client_name(self, origin: _Origin) -> str:
        """The client in log lines: its config name (CURVE), else its connection."""
        if origin.user_id is None:
            return f"plaintext:{origin.identity.hex()}"
        caller = self._caller(origin.user_id)
        return caller.name if caller is not None else f"unlisted:{origin.user_id[:8]}"

    def _send(self, origin: _Origin, payload: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.send(origin.identity, _SNDMORE | _NOBLOCK)
            sock.send(_EMPTY, _SNDMORE | _NOBLOCK)
            sock.send(payload, _NOBLOCK)
        except zmq.ZMQError:
            self.stats["send_failed"] += 1

    def _current_state(self) -> str:
        try:
            return str(self._get_state())
        except Exception:
            log.exception("bus.control.get_state_failed")
            return "unknown"

    # ----------------------------------------------------------------- built-ins
    async def _ping(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {
            "pong": True,
            "server": self._server_name,
            "state": self._current_state(),
            "protocol_versions": sorted(SUPPORTED_VERSIONS),
            "protocol_version": PROTOCOL_VERSION,
            "caller": {"name": caller.name, "role": caller.role},
        }

    def specs(self) -> list[CommandSpec]:
        """Every command this server answers: the built-ins, then the command table."""
        return [*self._builtins.values(), *self._commands]

    async def _list_commands(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {"commands": [spec.describe(caller.role) for spec in self.specs()]}
