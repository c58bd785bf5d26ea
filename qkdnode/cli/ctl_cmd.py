"""``qkdnode ctl``: talk to running nodes over their control and telemetry sockets.

``qkdnode ctl [--endpoint E] [--server-key FILE] [--client-key NAME] ACTION [--json]``
with ACTION one of ``status``, ``watch``, ``calibrate``, ``sync``, ``start``, ``stop``,
``keys``, ``network``, ``ping``, ``commands``, ``call``.

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
from typing import Any

from qkdnode.cli.ctl_errors import Handler, guarded
from qkdnode.cli.ctl_network import network_action
from qkdnode.cli.ctl_nodes import DEFAULT_CONTROL, DEFAULT_TELEMETRY
from qkdnode.cli.ctl_requests import call_action, keys_action, simple_action
from qkdnode.cli.ctl_wait import procedure_action
from qkdnode.cli.ctl_watch import watch_action


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
        a.set_defaults(func=guarded(func), timeout_default=timeout_s)
        return a

    action("status", "node state and figures", simple_action, 5.0)
    action("ping", "check the node answers", simple_action, 5.0)
    action("commands", "commands you may call", simple_action, 5.0)
    for name, help_text, reply_s, wait_s in (
        ("calibrate", "run the calibration sequence", 600.0, 900.0),
        ("sync", "synchronise with the peer", 120.0, 600.0),
    ):
        a = action(name, help_text, procedure_action, reply_s)
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
    action(
        "network",
        "the key management network as this site sees it (links, levels, routes)",
        network_action,
        10.0,
    )
    action("start", "start key generation", simple_action, 30.0)
    action("stop", "stop key generation", simple_action, 30.0)
    keys = action(
        "keys",
        "retrieve keys (operator): one line per key, key_ID then key (base64)",
        keys_action,
        10.0,
    )
    keys.add_argument("--number", type=int, default=1, help="how many keys")
    keys.add_argument("--size-bits", type=int, default=256, help="key size in bits")
    call = action("call", "call any command with JSON content", call_action, 30.0)
    call.add_argument("command", help="daemon command name")
    call.add_argument("--content", default="{}", help="JSON object")
    watch = action(
        "watch",
        "live view, one screen per node (JSON lines of telemetry when not a terminal)",
        watch_action,
        2.0,
    )
    watch.add_argument("--topic", action="append", default=[], help="topic prefix filter")
    watch.add_argument("--count", type=int, default=0, help="exit after N events (0: forever)")
    watch.add_argument(
        "--duration", type=float, default=0.0, help="exit after s seconds (0: forever)"
    )
    watch.add_argument("--idle-timeout", type=float, default=5.0, help="s without data = stale")
    watch.add_argument("--interval", type=float, default=1.0, help="s between status polls")
