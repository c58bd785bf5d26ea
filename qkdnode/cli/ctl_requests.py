"""The ``qkdnode ctl`` actions that are one request to one node: ``status``, ``ping``,
``commands``, ``start``, ``stop``, ``keys``, ``call`` (and ``calibrate``/``sync`` without
``--wait``); the reply printed as JSON or as an indented tree."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from qkdnode.bus.errors import BusError
from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from qkdnode.cli.ctl_errors import UsageError, bus_error, say
from qkdnode.cli.ctl_format import print_tree
from qkdnode.cli.ctl_nodes import one_node, open_client

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


def run_request(
    args: argparse.Namespace,
    command: str,
    content: dict[str, Any],
    render: Callable[[dict[str, Any]], int | None] | None = None,
) -> int:
    node = one_node(args)
    try:
        with open_client(args, node) as client:
            reply = client.request(command, content)
    except BusError as exc:
        return bus_error(args, exc)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return EXIT_OK
    if render is not None:
        return render(reply) or EXIT_OK
    print_tree(reply)
    return EXIT_OK


def simple_action(args: argparse.Namespace) -> int:
    return run_request(args, COMMANDS[args.ctl_command], {})


def keys_action(args: argparse.Namespace) -> int:
    if args.number < 1 or args.size_bits < 8 or args.size_bits % 8:
        say("ctl keys: --number must be >= 1 and --size-bits a positive multiple of 8")
        return EXIT_USAGE

    def render(reply: dict[str, Any]) -> int:
        for n, item in enumerate(reply.get("keys", []), 1):
            key_id = item.get("key_ID") if isinstance(item, dict) else None
            if key_id is None:
                say(f"ctl keys: key {n} of the reply has no key_ID")
                return EXIT_FAILURE
            print(f"{key_id} {item.get('key', '')}")
        return EXIT_OK

    return run_request(
        args, "keys.get", {"number": args.number, "size_bits": args.size_bits}, render
    )


def call_action(args: argparse.Namespace) -> int:
    try:
        content = json.loads(args.content)
    except ValueError as exc:
        raise UsageError(f"call: --content is not JSON: {exc}") from None
    if not isinstance(content, dict):
        raise UsageError("call: --content must be a JSON object")
    return run_request(args, args.command, content)
