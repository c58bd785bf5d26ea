"""How ``qkdnode ctl`` fails: usage errors (exit 2), the node's refusals and bus errors
(exit 1) on one line, and a closed output pipe that ends a command quietly (exit 0)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from qkdnode.bus.errors import BusTimeout, KeyFileError, RemoteError
from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from qkdnode.config import ConfigError

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A bad option or endpoint: reported on one line, exit code 2."""


def guarded(func: Handler) -> Handler:
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
            say(f"ctl: {exc}")
            return EXIT_USAGE
        except (KeyFileError, ConfigError) as exc:
            say(f"ctl: {exc}")
            return EXIT_USAGE

    return run


def say(text: str) -> None:
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
        say("\n".join(lines))
    return EXIT_FAILURE


def bus_error(args: argparse.Namespace, exc: Exception) -> int:
    if isinstance(exc, RemoteError):
        return _print_error(args, exc.to_dict())
    code = "timeout" if isinstance(exc, BusTimeout) else "bus"
    return _print_error(args, {"code": code, "message": str(exc), "details": {}})
