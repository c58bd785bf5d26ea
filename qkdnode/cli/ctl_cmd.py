"""``qkdnode ctl``: talk to running nodes over their control and telemetry sockets.

``qkdnode ctl [--endpoint E] [--server-key FILE] [--client-key NAME] ACTION [--json]``
with ACTION one of ``status``, ``watch``, ``calibrate``, ``sync``, ``start``, ``stop``,
``keys``, ``ping``, ``commands``, ``call``.

A node is named by its control endpoint (``--endpoint``, default tcp://127.0.0.1:5550) or
by its config (``--config``, endpoints from the [bus] section). Its telemetry endpoint is
``--telemetry-endpoint``, else the config's, else the control port + 1 (as in the shipped
configs). ``watch`` takes several nodes (repeat ``--endpoint`` or ``--config``) and shows
one screen per node; it waits for a node that stops or restarts and reconnects.
``calibrate --wait`` and ``sync --wait`` return when the procedure has finished and print
its outcome.

Exit codes: 0 ok (also when the reader of the output went away, as in ``| head``), 1 the
node refused or did not answer, or the procedure waited for failed, 2 usage (bad option
or endpoint, unreadable key file or config).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from qkdnode.bus.errors import BusError, BusTimeout, KeyFileError, RemoteError
from qkdnode.bus.keys import find_client_key
from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from qkdnode.client import Client, Subscription, TelemetryEvent
from qkdnode.config import ConfigError, load_site

DEFAULT_CONTROL = "tcp://127.0.0.1:5550"
DEFAULT_TELEMETRY = "tcp://127.0.0.1:5551"

#: ctl action -> daemon command name
COMMANDS = {
    "status": "status",
    "calibrate": "calibrate",
    "sync": "sync",
    "start": "start",
    "stop": "stop",
    "keys": "keys.get",
    "ping": "ping",
    "commands": "commands",
}

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A bad option or endpoint: reported on one line, exit code 2."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ctl",
        help="control a running node over the bus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="node config: take endpoints from its [bus] section (repeat for watch)",
    )
    p.add_argument(
        "--endpoint",
        action="append",
        default=[],
        help=f"control endpoint (default {DEFAULT_CONTROL}; repeat for watch)",
    )
    p.add_argument(
        "--telemetry-endpoint",
        action="append",
        default=[],
        help=f"telemetry endpoint, one per --endpoint (default: the control port + 1, "
        f"{DEFAULT_TELEMETRY} for the default node)",
    )
    p.add_argument("--server-key", help="node's public key (.pub file or Z85); enables CURVE")
    p.add_argument("--client-key", help="your secret key: NAME or path of NAME.key")
    p.add_argument("--timeout", type=float, default=None, help="reply timeout in s")
    csub = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str, func: Handler, timeout_s: float) -> Any:
        a = csub.add_parser(name, help=help_text)
        a.add_argument("--json", action="store_true", help="machine-readable output")
        a.set_defaults(func=_guarded(func), timeout_default=timeout_s)
        return a

    action("status", "node state and figures", _simple, 5.0)
    action("ping", "check the node answers", _simple, 5.0)
    action("commands", "commands you may call", _simple, 5.0)
    for name, help_text, reply_s, wait_s in (
        ("calibrate", "run the calibration sequence", 600.0, 900.0),
        ("sync", "synchronise with the peer", 120.0, 600.0),
    ):
        a = action(name, help_text, _procedure, reply_s)
        a.add_argument(
            "--wait",
            action="store_true",
            help="wait until the procedure has finished; print its outcome, exit 1 if it failed",
        )
        a.add_argument(
            "--wait-timeout",
            type=float,
            default=wait_s,
            help=f"give up after s (default {wait_s:g})",
        )
    action("start", "start key generation", _simple, 30.0)
    action("stop", "stop key generation", _simple, 30.0)
    keys = action(
        "keys", "retrieve keys (operator): one line per key, key_ID then key (base64)", _keys, 10.0
    )
    keys.add_argument("--number", type=int, default=1, help="how many keys")
    keys.add_argument("--size-bits", type=int, default=256, help="key size in bits")
    call = action("call", "call any command with JSON content", _call, 30.0)
    call.add_argument("command", help="daemon command name")
    call.add_argument("--content", default="{}", help="JSON object")
    watch = action(
        "watch",
        "live view, one screen per node (JSON lines of telemetry when not a terminal)",
        _watch,
        2.0,
    )
    watch.add_argument("--topic", action="append", default=[], help="topic prefix filter")
    watch.add_argument("--count", type=int, default=0, help="exit after N events (0: forever)")
    watch.add_argument(
        "--duration", type=float, default=0.0, help="exit after s seconds (0: forever)"
    )
    watch.add_argument("--idle-timeout", type=float, default=5.0, help="s without data = stale")
    watch.add_argument("--interval", type=float, default=1.0, help="s between status polls")


# ------------------------------------------------------------------ errors and output
def _guarded(func: Handler) -> Handler:
    """One-line errors instead of tracebacks; a closed output pipe ends the command quietly."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            code = func(args)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return code
        except BrokenPipeError:
            _silence_output()
            return EXIT_OK
        except UsageError as exc:
            _say(f"ctl: {exc}")
            return EXIT_USAGE
        except (KeyFileError, ConfigError) as exc:
            _say(f"ctl: {exc}")
            return EXIT_USAGE

    return run


def _say(text: str) -> None:
    """A line on stderr (a closed stderr is not an error either)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _silence_output()


def _silence_output() -> None:
    """Point stdout/stderr at /dev/null so the final flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass  # not a real file (tests capture output)
    os.close(devnull)


def _print_error(args: argparse.Namespace, err: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({"error": err}, indent=2, sort_keys=True))
    else:
        lines = [f"error: {err['code']}: {err['message']}"]
        lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(err.get("details", {}).items())]
        _say("\n".join(lines))
    return EXIT_FAILURE


def _bus_error(args: argparse.Namespace, exc: Exception) -> int:
    if isinstance(exc, RemoteError):
        return _print_error(args, exc.to_dict())
    code = "timeout" if isinstance(exc, BusTimeout) else "bus"
    return _print_error(args, {"code": code, "message": str(exc), "details": {}})


# ------------------------------------------------------------------ nodes and endpoints
@dataclass(frozen=True)
class NodeAddr:
    """Where a node answers, and what its config says (when given)."""

    control: str
    telemetry: str | None
    label: str
    max_key_count: int | None = None
    block_detections: int | None = None


_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})")
_IPC = re.compile(r"ipc://\S+")


def check_endpoint(endpoint: str, option: str) -> str:
    """``endpoint`` if it is a connectable tcp://HOST:PORT or ipc://PATH, else UsageError."""
    m = _TCP.fullmatch(endpoint)
    if m is None:
        if _IPC.fullmatch(endpoint):
            return endpoint
        raise UsageError(
            f"bad {option} {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH "
            f"(e.g. {DEFAULT_CONTROL})"
        )
    host, port = m.group("host"), int(m.group("port"))
    if host == "*" or not 0 < port < 65536:
        raise UsageError(
            f"bad {option} {endpoint!r}: need a host name or address and a port 1-65535"
        )
    try:
        socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"bad {option} {endpoint!r}: cannot resolve {host!r} ({exc})") from None
    return endpoint


def _telemetry_of(control: str) -> str | None:
    """The shipped configs put telemetry on the control port + 1."""
    m = _TCP.fullmatch(control)
    if m is None or int(m.group("port")) >= 65535:
        return None
    return f"tcp://{m.group('host')}:{int(m.group('port')) + 1}"


def _nodes(args: argparse.Namespace) -> list[NodeAddr]:
    configs: list[str] = args.config
    controls: list[str] = args.endpoint
    telemetries: list[str] = args.telemetry_endpoint
    if len(configs) > 1 and (controls or telemetries):
        raise UsageError("give several --config or several --endpoint, not both")
    if len(telemetries) > max(1, len(controls)):
        raise UsageError("more --telemetry-endpoint than --endpoint options")
    nodes: list[NodeAddr] = []
    if configs:
        if len(configs) == 1 and len(controls) > 1:
            raise UsageError("one --config with several --endpoint: which is which?")
        for path in configs:
            site = load_site(path)
            if len(site.links) > 1 and (controls or telemetries):
                raise UsageError(
                    f"{path} names {len(site.links)} links: drop --endpoint (every link is "
                    f"addressed), or give the one link's --endpoint without --config"
                )
            for link in site.links:
                cfg = link.cfg
                bus = cfg.bus
                control = controls[0] if controls else bus.control_endpoint
                tel = telemetries[0] if telemetries else bus.telemetry_endpoint
                nodes.append(
                    NodeAddr(
                        check_endpoint(control, "--endpoint"),
                        check_endpoint(tel, "--telemetry-endpoint"),
                        f"{cfg.node.id}/{link.id}" if link.id else cfg.node.id,
                        cfg.keystore.max_key_count,
                        cfg.protocol.block_detections,
                    )
                )
        return nodes
    for i, control in enumerate(controls or [DEFAULT_CONTROL]):
        check_endpoint(control, "--endpoint")
        derived = telemetries[i] if i < len(telemetries) else _telemetry_of(control)
        if derived is not None:
            check_endpoint(derived, "--telemetry-endpoint")
        nodes.append(NodeAddr(control, derived, control))
    return nodes


def _one_node(args: argparse.Namespace) -> NodeAddr:
    nodes = _nodes(args)
    if len(nodes) != 1:
        raise UsageError(f"{args.ctl_command} talks to one node; only watch takes several")
    return nodes[0]


def _keys_of(args: argparse.Namespace) -> Any:
    try:
        return find_client_key(args.client_key) if args.client_key else None
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None


def _client(args: argparse.Namespace, node: NodeAddr, timeout_s: float | None = None) -> Client:
    timeout = timeout_s if timeout_s is not None else args.timeout
    if timeout is None:
        timeout = args.timeout_default
    try:
        return Client(node.control, args.server_key, _keys_of(args), timeout_s=timeout)
    except (ValueError, KeyFileError) as exc:  # the server key or the endpoint
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--server-key: {exc}") from None


def _subscription(
    args: argparse.Namespace,
    node: NodeAddr,
    client: Client,
    idle_timeout_s: float,
    topics: tuple[str, ...] = (),
) -> Subscription:
    if node.telemetry is None:
        raise UsageError(f"no telemetry endpoint for {node.control}: give --telemetry-endpoint")
    try:
        return Subscription(
            node.telemetry,
            client,
            args.server_key,
            _keys_of(args),
            topics=topics,
            idle_timeout_s=idle_timeout_s,
            snapshot_timeout_s=min(client.timeout_s, 5.0),
            retry_s=max(10.0, 2 * idle_timeout_s),
        )
    except (ValueError, KeyFileError) as exc:
        raise UsageError(str(exc)) from None


# ------------------------------------------------------------------ one request
def _run(
    args: argparse.Namespace,
    command: str,
    content: dict[str, Any],
    render: Callable[[dict[str, Any]], int | None] | None = None,
) -> int:
    node = _one_node(args)
    try:
        with _client(args, node) as client:
            reply = client.request(command, content)
    except BusError as exc:
        return _bus_error(args, exc)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return EXIT_OK
    if render is not None:
        return render(reply) or EXIT_OK
    _print_tree(reply)
    return EXIT_OK


def _print_tree(obj: Any, indent: int = 0, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    pad = "  " * indent
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, dict | list) and value:
                print(f"{pad}{key}:", file=stream)
                _print_tree(value, indent + 1, stream)
            else:
                print(f"{pad}{key}: {_scalar(value)}", file=stream)
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict | list):
                print(f"{pad}-", file=stream)
                _print_tree(item, indent + 1, stream)
            else:
                print(f"{pad}- {_scalar(item)}", file=stream)
    else:
        print(f"{pad}{_scalar(obj)}", file=stream)


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if not isinstance(value, str) else value


def _simple(args: argparse.Namespace) -> int:
    return _run(args, COMMANDS[args.ctl_command], {})


def _keys(args: argparse.Namespace) -> int:
    if args.number < 1 or args.size_bits < 8 or args.size_bits % 8:
        _say("ctl keys: --number must be >= 1 and --size-bits a positive multiple of 8")
        return EXIT_USAGE

    def render(reply: dict[str, Any]) -> int:
        for n, item in enumerate(reply.get("keys", []), 1):
            key_id = item.get("key_ID") if isinstance(item, dict) else None
            if key_id is None:
                _say(f"ctl keys: key {n} of the reply has no key_ID")
                return EXIT_FAILURE
            print(f"{key_id} {item.get('key', '')}")
        return EXIT_OK

    return _run(args, "keys.get", {"number": args.number, "size_bits": args.size_bits}, render)


def _call(args: argparse.Namespace) -> int:
    try:
        content = json.loads(args.content)
    except ValueError as exc:
        raise UsageError(f"call: --content is not JSON: {exc}") from None
    if not isinstance(content, dict):
        raise UsageError("call: --content must be a JSON object")
    return _run(args, args.command, content)


# ------------------------------------------------------------------ calibrate/sync --wait
@dataclass(frozen=True)
class Procedure:
    command: str
    state: str  # the node's state while it runs
    ok_events: frozenset[str]  # state-machine events that end it successfully
    done_flag: str  # status["stats"] flag that is True after a success
    noun: str

    def is_result(self, topic: str) -> bool:
        """Telemetry topics that carry this procedure's results."""
        if self.command == "calibrate":
            return topic == "calibration" or topic.startswith("calibration.")
        return topic in ("sync", "calibration.encoding_compensation") or topic.startswith("sync.")


PROCEDURES = {
    "calibrate": Procedure(
        "calibrate", "CALIBRATING", frozenset({"calibrated"}), "calibrated", "calibration"
    ),
    "sync": Procedure(
        "sync", "SYNCHRONIZING", frozenset({"locked"}), "synchronized", "synchronization"
    ),
}


@dataclass
class Outcome:
    ok: bool
    message: str
    state: str = ""
    event: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self, procedure: Procedure) -> dict[str, Any]:
        return {
            "procedure": procedure.command,
            "ok": self.ok,
            "message": self.message,
            "state": self.state,
            "event": self.event,
            "seconds": round(self.seconds, 3),
            "results": self.results,
            "alarms": self.alarms,
        }


def _procedure(args: argparse.Namespace) -> int:
    if not args.wait:
        return _run(args, COMMANDS[args.ctl_command], {})
    proc = PROCEDURES[args.ctl_command]
    node = _one_node(args)
    with _client(args, node) as client:
        sub = _subscription(args, node, client, idle_timeout_s=10.0)
        with sub:
            try:
                before = client.request("status", {}, args.timeout or 5.0)
            except BusError as exc:
                return _bus_error(args, exc)
            _prime(sub)
            base_seq, base_restarts = sub.state.seq, sub.state.restarts
            t0 = time.monotonic()
            try:
                reply = client.request(proc.command, {})
            except BusError as exc:
                return _bus_error(args, exc)
            outcome = _wait_outcome(
                args,
                proc,
                client=client,
                sub=sub,
                before=before,
                reply=reply,
                base_seq=base_seq,
                base_restarts=base_restarts,
                t0=t0,
            )
    outcome.seconds = time.monotonic() - t0
    if args.json:
        print(json.dumps(outcome.as_dict(proc), indent=2, sort_keys=True))
    else:
        _print_outcome(proc, outcome)
    return EXIT_OK if outcome.ok else EXIT_FAILURE


def _prime(sub: Subscription, limit_s: float = 2.0) -> None:
    """Take the snapshot and wait for one live message (the subscription is through)."""
    deadline = time.monotonic() + limit_s
    rx0 = sub.received
    while time.monotonic() < deadline:
        try:
            sub.poll(0.1)
        except BusError:
            return  # no telemetry: the status polls decide
        if not sub.state.needs_snapshot and sub.received > rx0:
            return


def _wait_outcome(
    args: argparse.Namespace,
    proc: Procedure,
    *,
    client: Client,
    sub: Subscription,
    before: dict[str, Any],
    reply: dict[str, Any],
    base_seq: int,
    base_restarts: int,
    t0: float,
) -> Outcome:
    results: dict[str, dict[str, Any]] = {}
    alarms: list[dict[str, Any]] = []
    deadline = t0 + args.wait_timeout
    left_at: float | None = None
    next_status = 0.0
    status: dict[str, Any] = {}
    status_error = ""
    progress = _Progress(proc)
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                why = f"; last status: {status_error}" if status_error else ""
                return Outcome(
                    False,
                    f"no outcome within --wait-timeout {args.wait_timeout:g} s{why}",
                    str(status.get("state", "")),
                    results=results,
                    alarms=alarms,
                )
            try:
                events = sub.poll(0.25)
            except BusError:
                events = []
            if sub.state.restarts > base_restarts:
                return Outcome(False, f"the node restarted during the {proc.noun}", results=results)
            for ev in events:
                if ev.kind == "stale" or (ev.kind == "snapshot" and ev.seq <= base_seq):
                    continue
                payload = ev.payload
                if proc.is_result(ev.topic):
                    results[ev.topic] = payload
                    progress.note(ev.topic, payload)
                elif ev.topic == "alarm":
                    alarms.append(payload)
                elif ev.topic == "state" and str(payload.get("old", "")).upper() == proc.state:
                    event = str(payload.get("event", ""))
                    reason = str(payload.get("reason", ""))
                    ok = event in proc.ok_events
                    msg = reason or (f"{proc.noun} complete" if ok else f"{proc.noun} ended")
                    if not ok and event and event != "failed":  # stopped, peer lost, fault...
                        msg = f"{msg} ({event})"
                    return Outcome(ok, msg, str(payload.get("new", "")), event, results, alarms)
            if now >= next_status:
                next_status = now + 1.0
                try:
                    status = client.request("status", {}, 5.0)
                except BusError as exc:
                    status_error = str(exc)
                    continue  # not answering now: the deadline or a later poll decides
                status_error = ""
                state = str(status.get("state", "")).upper()
                progress.show(state, now - t0)
                if state == proc.state:
                    left_at = None
                elif left_at is None and sub.received:
                    left_at = now  # give the telemetry a moment to tell how it ended
                elif left_at is None or now - left_at > 1.5:  # judge by status
                    out = _outcome_from_status(proc, before, status, reply)
                    out.results, out.alarms = results, alarms
                    return out
    finally:
        progress.clear()


def _outcome_from_status(
    proc: Procedure, before: dict[str, Any], status: dict[str, Any], reply: dict[str, Any]
) -> Outcome:
    stats = status.get("stats") if isinstance(status.get("stats"), dict) else {}
    assert isinstance(stats, dict)
    old_stats = before.get("stats") if isinstance(before.get("stats"), dict) else {}
    assert isinstance(old_stats, dict)
    state = str(status.get("state", ""))
    failures, old_failures = stats.get("failures"), old_stats.get("failures")
    if isinstance(failures, int) and isinstance(old_failures, int) and failures > old_failures:
        return Outcome(False, str(stats.get("last_failure") or f"{proc.noun} failed"), state)
    flag = stats.get(proc.done_flag)
    if flag is True:
        return Outcome(True, f"{proc.noun} complete", state)
    if flag is False:
        return Outcome(False, f"{proc.noun} did not complete (the node is {state})", state)
    if isinstance(reply.get("ok"), bool):  # a node that runs the procedure within the command
        return Outcome(bool(reply["ok"]), str(reply.get("message") or proc.noun), state)
    return Outcome(False, f"the node left {proc.state}; the outcome is unknown", state)


class _Progress:
    """A redrawn line on a terminal's stderr while --wait waits."""

    def __init__(self, proc: Procedure) -> None:
        self.proc = proc
        self.tty = sys.stderr.isatty()
        self.done: list[str] = []
        self.shown = False

    def note(self, topic: str, payload: dict[str, Any]) -> None:
        ok = payload.get("ok", True)
        self.done.append(f"{topic.rsplit('.', 1)[-1]} {'ok' if ok else 'FAILED'}")

    def show(self, state: str, elapsed: float) -> None:
        if not self.tty:
            return
        done = f": {', '.join(self.done)}" if self.done else ""
        sys.stderr.write(f"\r\x1b[K{self.proc.noun}: {state} {_duration(elapsed)}{done}")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _print_outcome(proc: Procedure, out: Outcome) -> None:
    where = f" (node {out.state}" if out.state else " ("
    where += f"{', ' if out.state else ''}after {_duration(out.seconds)})"
    head = f"{proc.noun} {'complete' if out.ok else 'failed'}"
    if out.message.lower().startswith(head.lower()):
        line = out.message + where  # the node's reason already says it
    else:
        line = f"{head}: {out.message}{where}"
    if out.ok:
        print(line)
    else:
        _say(line)
    for topic, payload in out.results.items():
        ok = payload.get("ok", True)
        head = f"{topic}: {'ok' if ok else 'FAILED'}"
        if isinstance(payload.get("duration_s"), int | float):
            head += f" in {_duration(float(payload['duration_s']))}"
        if payload.get("message"):
            head += f": {payload['message']}"
        print(head)
        for key, value in payload.items():
            if key in ("ok", "duration_s", "message", "procedure", "timestamp_utc"):
                continue
            if isinstance(value, str | int | float | bool) or value is None:
                print(f"  {key}: {_scalar(value)}")
    for alarm in out.alarms:
        name = alarm.get("name") or alarm.get("alarm") or "alarm"
        what = f" {alarm['event']}" if isinstance(alarm.get("event"), str) else ""
        text = alarm.get("cause") or alarm.get("message") or ""
        _say(f"alarm {name}{what}: {text}")


# ------------------------------------------------------------------ watch
def render_view(values: dict[str, TelemetryEvent], seq: int, stale: bool, endpoint: str) -> str:
    """The text of the raw telemetry view (one line per topic, newest value)."""
    head = f"qkdnode telemetry  {endpoint}  seq {seq}  {time.strftime('%H:%M:%S')}"
    lines = [head + ("  [STALE: no data]" if stale else ""), "-" * min(100, len(head) + 20)]
    lines += _topic_lines(values)
    return "\n".join(lines) + "\n"


def _topic_lines(values: dict[str, TelemetryEvent], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    width = max((len(t) for t in values), default=5)
    lines = []
    for topic in sorted(values):
        ev = values[topic]
        age = max(0.0, now - ev.ts)
        body = ", ".join(f"{k}={_scalar(v)}" for k, v in ev.payload.items())
        lines.append(f"{topic:<{width}}  {age:6.1f}s  {body}"[:200])
    return lines


@dataclass
class NodeScreen:
    """What ``watch`` knows about one node; :func:`render_node` draws it."""

    addr: NodeAddr
    status: dict[str, Any] | None = None
    status_at: float = 0.0  # wall time of ``status``
    values: dict[str, TelemetryEvent] = field(default_factory=dict)
    connected: bool = False
    down_since: float | None = None  # wall time
    down_reason: str = ""
    telemetry_stale: bool = False
    restarts: int = 0
    notices: deque[str] = field(default_factory=lambda: deque(maxlen=3))
    measured_rate_bps: float | None = None
    error: str = ""


def render_node(screen: NodeScreen, now: float, topics: tuple[str, ...] = ()) -> list[str]:
    """The lines of one node's screen: state and age, last block, key rate, QBER, key store
    fill, authentication balance, alarms, progress; only the fields the node reports."""
    st = screen.status or {}
    stats = st.get("stats") if isinstance(st.get("stats"), dict) else {}
    assert isinstance(stats, dict)
    name = str(st.get("node_id") or screen.addr.label)
    role = f" ({st['role']})" if st.get("role") else ""
    tel = f"  telemetry {screen.addr.telemetry}" if screen.addr.telemetry else ""
    lines = [f"== {name}{role}  control {screen.addr.control}{tel}"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<13}{text}")

    if not screen.connected:
        since = screen.down_since or now
        why = f": {screen.down_reason}" if screen.down_reason else ""
        row(
            "connection",
            f"UNREACHABLE for {_duration(now - since)}{why}; waiting for it to come back",
        )
    if screen.error:
        row("error", screen.error)
    for notice in screen.notices:
        row("notice", notice)
    if not st:
        return lines
    state = str(st.get("state", "?"))
    age = _state_age(st, screen.values, now, screen.status_at)
    extras = []
    if "peer_connected" in st:
        peer = st.get("peer_id") or "peer"
        extras.append(f"peer {peer} {'connected' if st['peer_connected'] else 'DOWN'}")
    if "healthy" in st:
        extras.append("healthy" if st["healthy"] else "UNHEALTHY")
    if screen.telemetry_stale:
        extras.append("telemetry silent")
    stale_status = now - screen.status_at
    if not screen.connected or stale_status > 10:
        extras.append(f"status from {_duration(stale_status)} ago")
    row("state", f"{state}{f' for {age}' if age else ''}   {'   '.join(extras)}".rstrip())
    block = _block_line(st, stats, screen.values, now, screen.status_at)
    if block:
        row("last block", block)
    rate = _first_number(stats.get("secret_key_rate_bps"))  # live, running exchange included
    if rate:
        row("key rate", _rate(rate))
    elif screen.measured_rate_bps is not None:
        row("key rate", f"{_rate(screen.measured_rate_bps)} (secret bits counted here)")
    elif state == "EXCHANGING":
        row("key rate", "measuring...")
    qber = _first_number(st.get("qber"), stats.get("qber"))
    if qber is not None:
        row("QBER", f"{qber * 100:.2f} %")
    store = _store_line(st, screen.addr)
    if store:
        row("key store", store)
    auth = _first_number(st.get("auth_key_balance_bits"), stats.get("auth_key_balance_bits"))
    if auth is not None:
        row("auth balance", f"{int(auth):,} bits")
    for text in _progress_lines(
        state, st=st, stats=stats, values=screen.values, addr=screen.addr, now=now
    ):
        row("progress", text)
    alarms = st.get("alarms")
    if isinstance(alarms, list):
        if not alarms:
            row("alarms", "none")
        for alarm in alarms:
            row("alarms" if alarm is alarms[0] else "", _alarm_line(alarm, now))
    elif "alarm" in screen.values:  # a node that does not list its active alarms
        ev = screen.values["alarm"]
        text = ev.payload.get("cause") or ev.payload.get("message") or ""
        kind = ev.payload.get("name") or ev.payload.get("alarm") or "?"
        what = f" {ev.payload['event']}" if isinstance(ev.payload.get("event"), str) else ""
        row("last alarm", f"{kind}{what} {_duration(now - ev.ts)} ago: {text}")
    if topics:
        shown = {t: e for t, e in screen.values.items() if t.startswith(topics)}
        lines += ["  " + line for line in _topic_lines(shown, now)]
    return lines


def _first_number(*values: Any) -> float | None:
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def _state_age(
    st: dict[str, Any], values: dict[str, TelemetryEvent], now: float, status_at: float
) -> str:
    since = st.get("state_since")
    if isinstance(since, int | float) and since > 0:
        return _duration(now - float(since))
    ev = values.get("state")
    if ev is not None and str(ev.payload.get("new", "")) == str(st.get("state")):
        return _duration(now - ev.ts)
    return ""


def _block_line(
    st: dict[str, Any],
    stats: dict[str, Any],
    values: dict[str, TelemetryEvent],
    now: float,
    status_at: float,
) -> str:
    last = stats.get("last_block") if isinstance(stats.get("last_block"), dict) else {}
    assert isinstance(last, dict)
    ev = values.get("block")
    info: dict[str, Any] = dict(last)
    age: float | None = None
    ev_id, last_id = (ev.payload.get("block_id") if ev else None), last.get("block_id")
    if ev is not None and (
        not last
        or ev_id == last_id
        or (isinstance(ev_id, int) and isinstance(last_id, int) and ev_id > last_id)
    ):
        # telemetry is newer than the last status poll, or tells the same block's outcome
        info = {**last, **ev.payload} if ev_id == last_id else dict(ev.payload)
        age = now - ev.ts
    since = st.get("seconds_since_last_block")
    if isinstance(since, int | float):
        age = float(since) + max(0.0, now - status_at)
    if not info:
        return f"none yet ({_duration(age)} without a block)" if age is not None else ""
    parts = [f"#{info.get('block_id', '?')}"]
    if isinstance(info.get("ok"), bool):
        parts.append("ok" if info["ok"] else "ABORTED")
    if age is not None:
        parts.append(f"{_duration(age)} ago")
    text = " ".join(parts)
    figures = []
    if isinstance(info.get("final_key_bits"), int | float):
        figures.append(f"{int(info['final_key_bits']):,} secret bits")
    qz, qx = info.get("qber_z"), info.get("qber_x")
    if isinstance(qz, int | float):
        q = f"QBER Z {qz * 100:.2f} %"
        if isinstance(qx, int | float):
            q += f" X {qx * 100:.2f} %"
        figures.append(q)
    counts = [
        f"{int(stats[k]):,} {label}"
        for k, label in (("blocks_ok", "ok"), ("blocks_aborted", "aborted"))
        if isinstance(stats.get(k), int) and stats[k]
    ]
    if counts:
        figures.append("blocks " + " / ".join(counts))
    return text + (": " + ", ".join(figures) if figures else "")


def _store_line(st: dict[str, Any], addr: NodeAddr) -> str:
    counts = st.get("keystore") if isinstance(st.get("keystore"), dict) else {}
    assert isinstance(counts, dict)
    fill = _first_number(st.get("keystore_fill_ratio"))
    available = counts.get("available")
    if fill is None and isinstance(available, int) and addr.max_key_count:
        fill = available / addr.max_key_count
    parts = []
    if isinstance(available, int):
        parts.append(f"{available:,} keys available")
    if fill is not None:
        parts.append(f"fill {fill * 100:.1f} %")
    others = [f"{k} {v:,}" for k, v in counts.items() if k != "available" and isinstance(v, int)]
    if others and parts:
        parts.append("(" + ", ".join(others) + ")")
    return "  ".join(parts)


def _progress_lines(
    state: str,
    *,
    st: dict[str, Any],
    stats: dict[str, Any],
    values: dict[str, TelemetryEvent],
    addr: NodeAddr,
    now: float,
) -> list[str]:
    out = []
    state_ev = values.get("state")
    entered = _first_number(st.get("state_since"))
    if entered is None and state_ev is not None and state_ev.payload.get("new") == state:
        entered = state_ev.ts
    if state in ("CALIBRATING", "SYNCHRONIZING"):
        noun = "calibration" if state == "CALIBRATING" else "synchronization"
        done = [
            f"{t.removeprefix('calibration.')} {'ok' if e.payload.get('ok', True) else 'FAILED'}"
            for t, e in sorted(values.items(), key=lambda kv: kv[1].seq)
            if (t.startswith("calibration") or t.startswith("sync"))
            and (entered is None or e.ts >= entered)
        ]
        running = f" for {_duration(now - entered)}" if entered is not None else ""
        out.append(f"{noun} running{running}" + (f"; done: {', '.join(done)}" if done else ""))
    if state == "EXCHANGING":
        # receiver: detections read but not yet in a finished block = the blocks being
        # processed (whole blocks) + the block filling up
        read, used = stats.get("detections_read"), stats.get("detections")
        if isinstance(read, int) and isinstance(used, int) and read > used:
            ahead = read - used
            size = addr.block_detections
            if size:
                waiting, filling = divmod(ahead, size)
                text = f"block filling: {filling:,} / {size:,} detections ({filling / size:.0%})"
                if waiting:
                    text += f", {waiting} block{'s' if waiting > 1 else ''} in post-processing"
                out.append(text)
            else:
                out.append(f"{ahead:,} detections read, not yet in a finished block")
    for topic, ev in sorted(values.items()):
        if now - ev.ts > 60:
            continue
        p = ev.payload
        done_n, total = p.get("done"), p.get("total")
        frac = _first_number(p.get("fraction"), p.get("progress"))
        if isinstance(done_n, int | float) and isinstance(total, int | float) and total > 0:
            out.append(f"{topic} {done_n:g} / {total:g} ({100 * done_n / total:.0f} %)")
        elif frac is not None and 0 <= frac <= 1:
            out.append(f"{topic} {frac * 100:.0f} %")
    return out


def _alarm_line(alarm: Any, now: float) -> str:
    if not isinstance(alarm, dict):
        return str(alarm)
    sev = str(alarm.get("severity", "")).upper()
    name = alarm.get("name", "?")
    since = alarm.get("since")
    when = ""
    if isinstance(since, int | float):
        when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}"
        when += f" ({_duration(now - since)})"
    cause = alarm.get("cause") or ""
    return f"{sev + ' ' if sev else ''}{name}{when}{': ' + cause if cause else ''}"


def _duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def _rate(bps: float) -> str:
    for unit, scale in (("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


#: ``notify(kind, message)``: a connection change of one node ("unreachable", ...)
Notify = Callable[[str, str], None]


class _NodeWatch:
    """One node of ``watch``: its client, its telemetry subscription and its screen."""

    def __init__(self, args: argparse.Namespace, addr: NodeAddr, notify: Notify) -> None:
        self.args = args
        self.notify = notify
        self.client = _client(args, addr)
        try:
            self.sub = _subscription(args, addr, self.client, args.idle_timeout, tuple(args.topic))
        except BaseException:
            self.client.close()
            raise
        self.screen = NodeScreen(addr)
        self.next_status = 0.0
        self.samples: deque[tuple[float, float]] = deque()

    def close(self) -> None:
        self.sub.close()
        self.client.close()

    def poll(self, timeout_s: float) -> list[TelemetryEvent]:
        """Telemetry events; refreshes the status and tells ``notify`` of connection changes."""
        sc = self.screen
        restarts, resyncs = self.sub.state.restarts, self.sub.state.resyncs
        try:
            events = self.sub.poll(timeout_s)
        except RemoteError:
            raise  # refused (role, key): waiting would not help
        except BusError as exc:
            self._down(f"no answer ({exc})")
            events = []
        else:
            if self.sub.state.resyncs > resyncs:  # the node answered a snapshot
                self._up()
        if self.sub.state.restarts > restarts:
            sc.restarts = self.sub.state.restarts
            sc.status = None
            self.samples.clear()
            self._notice(f"node restarted at {time.strftime('%H:%M:%S')}", "restarted")
        sc.telemetry_stale = self.sub.stale
        sc.values = dict(self.sub.state.values)
        now = time.monotonic()
        if now >= self.next_status:
            self._refresh_status()
        return events

    def _refresh_status(self) -> None:
        sc = self.screen
        # a node that does not answer is asked less often, with a shorter timeout (the
        # other nodes' screens wait meanwhile); its telemetry coming back is noticed sooner
        interval = self.args.interval if sc.connected else max(self.args.interval, 3.0)
        self.next_status = time.monotonic() + interval
        try:
            status = self.client.request("status", {}, 2.0 if sc.connected else 0.5)
        except RemoteError as exc:
            sc.error = f"status refused: {exc}"
            return
        except BusError as exc:
            self._down(f"no answer ({exc})")
            return
        sc.error = ""
        sc.status, sc.status_at = status, time.time()
        self._up()
        self._measure(status)

    def _measure(self, status: dict[str, Any]) -> None:
        stats = status.get("stats")
        bits = stats.get("secret_bits") if isinstance(stats, dict) else None
        if not isinstance(bits, int | float):
            return
        now = time.monotonic()
        if self.samples and bits < self.samples[-1][1]:
            self.samples.clear()  # counters reset (new exchange session)
        self.samples.append((now, float(bits)))
        while len(self.samples) > 2 and now - self.samples[0][0] > 60:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        busy = status.get("state") == "EXCHANGING"
        self.screen.measured_rate_bps = (bits - b0) / (now - t0) if busy and now - t0 >= 5 else None

    def _down(self, reason: str) -> None:
        sc = self.screen
        sc.down_reason = reason
        if sc.connected or sc.down_since is None:
            sc.connected = False
            sc.down_since = time.time()
            self.notify("unreachable", f"{sc.addr.label}: {reason}; waiting for it to come back")

    def _up(self) -> None:
        sc = self.screen
        if sc.connected:
            return
        was_down = sc.down_since is not None
        sc.connected, sc.down_since, sc.down_reason = True, None, ""
        if was_down:
            self._notice(f"reconnected at {time.strftime('%H:%M:%S')}", "reconnected")

    def _notice(self, text: str, kind: str) -> None:
        self.screen.notices.append(text)
        self.notify(kind, f"{self.screen.addr.label}: {text}")


def _watch(args: argparse.Namespace) -> int:
    nodes = _nodes(args)
    for node in nodes:
        if node.telemetry is None:
            raise UsageError(f"no telemetry endpoint for {node.control}: give --telemetry-endpoint")
    tty = sys.stdout.isatty() and not args.json
    multi = len(nodes) > 1

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def notifier(label: str) -> Notify:
        def notify(kind: str, message: str) -> None:
            if tty:
                return  # the node's screen shows it
            _say(f"ctl watch: {message}")
            emit({"kind": kind, "node": label, "message": message, "ts": time.time()})

        return notify

    watches: list[_NodeWatch] = []
    try:
        for node in nodes:
            watches.append(_NodeWatch(args, node, notifier(node.label)))
        seen = 0
        next_draw = 0.0
        end = time.monotonic() + args.duration if args.duration > 0 else None
        while end is None or time.monotonic() < end:
            for w in watches:
                for ev in w.poll(0.25 / len(watches)):
                    seen += 1
                    if not tty:
                        line: dict[str, Any] = {
                            "kind": ev.kind,
                            "topic": ev.topic,
                            "seq": ev.seq,
                            "ts": ev.ts,
                            "payload": ev.payload,
                        }
                        if multi:
                            line["node"] = w.screen.addr.label
                        emit(line)
                    if args.count and seen >= args.count:
                        return EXIT_OK
            if tty and time.monotonic() >= next_draw:
                next_draw = time.monotonic() + 0.5
                _draw(watches, tuple(args.topic))
        if tty:
            _draw(watches, tuple(args.topic))
        return EXIT_OK
    except RemoteError as exc:
        return _bus_error(args, exc)
    finally:
        for w in watches:
            w.close()


def _draw(watches: list[_NodeWatch], topics: tuple[str, ...]) -> None:
    now = time.time()
    text = [f"qkdnode ctl watch  {time.strftime('%Y-%m-%d %H:%M:%S')}  (Ctrl-C to quit)"]
    for w in watches:
        text += ["", *render_node(w.screen, now, topics)]
    sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(text) + "\n")
    sys.stdout.flush()
