"""``qkdnode bench``: run every stage benchmark and the end-to-end demo figure.

Prints a table (stage, benchmark, median, unit, target, pass/fail), writes JSON
(``--json-out``, default ``OUT/bench.json``) and with ``--write-docs`` rewrites
``docs/performance.md`` with the table and the machine it ran on.

Exit codes: 0 every benchmark ran (targets missed are reported, and fail the run only
with ``--strict``), 1 a benchmark module failed, 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qkdnode.cli import EXIT_FAILURE, EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run all benchmarks; table, JSON and docs/performance.md",
        description="Run the stage benchmarks (simulation, sifting, reconciliation, privacy "
        "amplification, authentication, bus, key store, procedures) and an end-to-end demo.",
    )
    p.add_argument("--quick", action="store_true", help="fast run (a few seconds per stage)")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--json-out", type=Path, default=None, help="JSON file (default OUT/bench.json)")
    p.add_argument(
        "--write-docs",
        nargs="?",
        const=Path("docs/performance.md"),
        default=None,
        type=Path,
        metavar="FILE",
        help="rewrite docs/performance.md (or FILE) with the table and machine info",
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end demo run")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="MODULE",
        help="run only these bench modules (repeatable, e.g. qkdnode.bus.bench)",
    )
    p.add_argument(
        "--keep-up",
        type=int,
        default=0,
        metavar="N",
        help="run only the 0 km keep-up rows: N demo runs in the production configuration, "
        "each followed by one with numba's kernels (medians; about 4 minutes per N)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from qkdnode.benchmarks import (
        BENCH_MODULES,
        KEPT_MARKER,
        command_line,
        markdown,
        run_all,
        text_table,
    )
    from qkdnode.log import configure_logging

    configure_logging("warning", json=False)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    modules = tuple(args.only) if args.only else BENCH_MODULES

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = run_all(
        quick=args.quick,
        out_dir=out,
        end_to_end=not args.no_e2e,
        modules=modules,
        command=command_line(),
        progress=progress,
        keep_up_runs=max(0, args.keep_up),
    )
    print(text_table(report), flush=True)
    json_path: Path = args.json_out or out / "bench.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", "utf-8")
    print(f"JSON: {json_path}")
    if args.write_docs is not None:
        docs: Path = args.write_docs
        docs.parent.mkdir(parents=True, exist_ok=True)
        kept = ""
        if docs.exists():  # hand-written sections below the marker survive a rewrite
            old_text = docs.read_text("utf-8")
            at = old_text.find(KEPT_MARKER)
            kept = "\n" + old_text[at:] if at >= 0 else ""
        docs.write_text(markdown(report) + kept, "utf-8")
        print(f"docs: {docs}")
    if report.failed:
        return EXIT_FAILURE
    if args.strict and any(r.passed is False for r in report.rows):
        return EXIT_FAILURE
    return EXIT_OK
