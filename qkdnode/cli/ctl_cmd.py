"""``qkdnode ctl``: talk to a running node over its control and telemetry sockets.

``qkdnode ctl [--endpoint E] [--server-key FILE] [--client-key NAME] ACTION [--json]``
with ACTION one of ``status``, ``watch``, ``calibrate``, ``sync``, ``start``, ``stop``,
``keys``, ``ping``, ``commands``, ``call``. Exit codes: 0 ok, 1 the node refused or did not
answer, 2 usage (bad option, unreadable key file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from qkdnode.bus.errors import BusError, BusTimeout, KeyFileError, RemoteError
from qkdnode.bus.keys import find_client_key
from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from qkdnode.client import Client, TelemetryEvent, subscribe
from qkdnode.config import ConfigError, load_config

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


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ctl",
        help="control a running node over the bus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="node config: take endpoints from its [bus] section")
    p.add_argument("--endpoint", help=f"control endpoint (default {DEFAULT_CONTROL})")
    p.add_argument("--telemetry-endpoint", help=f"telemetry endpoint (default {DEFAULT_TELEMETRY})")
    p.add_argument("--server-key", help="node's public key (.pub file or Z85); enables CURVE")
    p.add_argument("--client-key", help="your secret key: NAME or path of NAME.key")
    p.add_argument("--timeout", type=float, default=None, help="reply timeout in s")
    csub = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        a: argparse.ArgumentParser = csub.add_parser(name, help=help_text)
        a.add_argument("--json", action="store_true", help="machine-readable output")
        return a

    action("status", "node state and figures").set_defaults(func=_simple, timeout_default=5.0)
    action("ping", "check the node answers").set_defaults(func=_simple, timeout_default=5.0)
    action("commands", "commands you may call").set_defaults(func=_simple, timeout_default=5.0)
    action("calibrate", "run the calibration sequence").set_defaults(
        func=_simple, timeout_default=600.0
    )
    action("sync", "synchronise with the peer").set_defaults(func=_simple, timeout_default=120.0)
    action("start", "start key generation").set_defaults(func=_simple, timeout_default=30.0)
    action("stop", "stop key generation").set_defaults(func=_simple, timeout_default=30.0)
    keys = action("keys", "retrieve keys (operator)")
    keys.add_argument("--number", type=int, default=1, help="how many keys")
    keys.add_argument("--size-bits", type=int, default=256, help="key size in bits")
    keys.set_defaults(func=_keys, timeout_default=10.0)
    call = action("call", "call any command with JSON content")
    call.add_argument("command", help="daemon command name")
    call.add_argument("--content", default="{}", help="JSON object")
    call.set_defaults(func=_call, timeout_default=30.0)
    watch = action("watch", "live telemetry view (JSON lines when not a terminal)")
    watch.add_argument("--topic", action="append", default=[], help="topic prefix filter")
    watch.add_argument("--count", type=int, default=0, help="exit after N events (0: forever)")
    watch.add_argument("--idle-timeout", type=float, default=5.0, help="s without data = stale")
    watch.set_defaults(func=_watch, timeout_default=5.0)


# ------------------------------------------------------------------ helpers
def _endpoints(args: argparse.Namespace) -> tuple[str, str]:
    control, telemetry = DEFAULT_CONTROL, DEFAULT_TELEMETRY
    if args.config:
        bus = load_config(args.config).bus
        control, telemetry = bus.control_endpoint, bus.telemetry_endpoint
    return args.endpoint or control, args.telemetry_endpoint or telemetry


def _client(args: argparse.Namespace) -> Client:
    endpoint, _ = _endpoints(args)
    keys = find_client_key(args.client_key) if args.client_key else None
    timeout = args.timeout if args.timeout is not None else args.timeout_default
    return Client(endpoint, args.server_key, keys, timeout_s=timeout)


def _run(
    args: argparse.Namespace, command: str, content: dict[str, Any], render: Any = None
) -> int:
    try:
        with _client(args) as client:
            reply = client.request(command, content)
    except RemoteError as exc:
        return _error(args, exc.to_dict())
    except BusTimeout as exc:
        return _error(args, {"code": "timeout", "message": str(exc), "details": {}})
    except (KeyFileError, ConfigError, ValueError, OSError) as exc:
        print(f"ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BusError as exc:
        return _error(args, {"code": "bus", "message": str(exc), "details": {}})
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif render is not None:
        render(reply)
    else:
        _print_tree(reply)
    return EXIT_OK


def _error(args: argparse.Namespace, err: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({"error": err}, indent=2, sort_keys=True))
    else:
        print(f"error: {err['code']}: {err['message']}", file=sys.stderr)
        for key, value in sorted(err.get("details", {}).items()):
            print(f"  {key}: {json.dumps(value)}", file=sys.stderr)
    return EXIT_FAILURE


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


# ------------------------------------------------------------------ actions
def _simple(args: argparse.Namespace) -> int:
    return _run(args, COMMANDS[args.ctl_command], {})


def _keys(args: argparse.Namespace) -> int:
    if args.number < 1 or args.size_bits < 8 or args.size_bits % 8:
        print(
            "ctl keys: --number must be >= 1 and --size-bits a positive multiple of 8",
            file=sys.stderr,
        )
        return EXIT_USAGE

    def render(reply: dict[str, Any]) -> None:
        for item in reply.get("keys", []):
            if isinstance(item, dict):
                print(f"{item.get('key_id', '?')} {item.get('key', '')}")

    return _run(args, "keys.get", {"number": args.number, "size_bits": args.size_bits}, render)


def _call(args: argparse.Namespace) -> int:
    try:
        content = json.loads(args.content)
    except ValueError as exc:
        print(f"ctl call: --content is not JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(content, dict):
        print("ctl call: --content must be a JSON object", file=sys.stderr)
        return EXIT_USAGE
    return _run(args, args.command, content)


def render_view(values: dict[str, TelemetryEvent], seq: int, stale: bool, endpoint: str) -> str:
    """The text of the live telemetry view (one line per topic, newest value)."""
    head = f"qkdnode telemetry  {endpoint}  seq {seq}  {time.strftime('%H:%M:%S')}"
    lines = [head + ("  [STALE: no data]" if stale else ""), "-" * min(100, len(head) + 20)]
    width = max((len(t) for t in values), default=5)
    for topic in sorted(values):
        ev = values[topic]
        age = max(0.0, time.time() - ev.ts)
        body = ", ".join(f"{k}={_scalar(v)}" for k, v in ev.payload.items())
        lines.append(f"{topic:<{width}}  {age:6.1f}s  {body}"[:200])
    return "\n".join(lines) + "\n"


def _watch(args: argparse.Namespace) -> int:
    _, telemetry = _endpoints(args)
    tty = sys.stdout.isatty() and not args.json
    values: dict[str, TelemetryEvent] = {}
    seen = 0
    try:
        with _client(args) as client:
            keys = find_client_key(args.client_key) if args.client_key else None
            for ev in subscribe(
                telemetry,
                client,
                args.server_key,
                keys,
                topics=tuple(args.topic),
                idle_timeout_s=args.idle_timeout,
            ):
                stale = ev.kind == "stale"
                if not stale:
                    values[ev.topic] = ev
                if tty:
                    sys.stdout.write(
                        "\x1b[H\x1b[2J" + render_view(values, ev.seq, stale, telemetry)
                    )
                else:
                    sys.stdout.write(
                        json.dumps(
                            {
                                "kind": ev.kind,
                                "topic": ev.topic,
                                "seq": ev.seq,
                                "ts": ev.ts,
                                "payload": ev.payload,
                            }
                        )
                        + "\n"
                    )
                sys.stdout.flush()
                seen += 1
                if args.count and seen >= args.count:
                    break
    except RemoteError as exc:
        return _error(args, exc.to_dict())
    except BusTimeout as exc:
        return _error(args, {"code": "timeout", "message": str(exc), "details": {}})
    except (KeyFileError, ConfigError, ValueError, OSError) as exc:
        print(f"ctl watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BusError as exc:
        return _error(args, {"code": "bus", "message": str(exc), "details": {}})
    return EXIT_OK
