"""The ``qkdnode`` command line: one entry point, one module per subcommand.

Each module in :data:`COMMAND_MODULES` defines ``register(subparsers)`` which adds its
subcommand and sets ``func`` (``args -> int`` exit code) with ``set_defaults``.
A subcommand too large for one module keeps its parts beside it: ``ctl_cmd`` registers
``qkdnode ctl``, whose actions live in the ``ctl_*`` modules.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from qkdnode import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

COMMAND_MODULES: list[str] = [
    "qkdnode.cli.pki_cmd",
    "qkdnode.cli.run_cmd",
    "qkdnode.cli.drivers_cmd",
    "qkdnode.cli.config_cmd",
    "qkdnode.cli.health_cmd",
    "qkdnode.cli.demo_cmd",
    "qkdnode.cli.bench_cmd",
    "qkdnode.cli.ctl_cmd",
    "qkdnode.cli.keys_cmd",
    "qkdnode.cli.calibration_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdnode",
        description="Control daemon for the transmitter and receiver of a QKD link.",
    )
    parser.add_argument("--version", action="version", version=f"qkdnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
