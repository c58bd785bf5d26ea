"""``qkdnode calibration truth``: the calibration chain against the simulator's hidden truth.

For each seed the simulated link draws both boxes' hardware truths, the calibration
procedures run on it, and every estimate is compared with its truth in units of its
stated standard uncertainty (:mod:`qkdnode.procedures.truth_check`). Prints the worst
``|error| / u`` per quantity, or with ``--json`` the summary and every row.

Exit codes: 0 every truth within its stated interval, 1 a miss (a stated uncertainty too
small) or a calibration that failed, 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def register(sub: Any) -> None:
    p = sub.add_parser(
        "calibration", help="calibration procedures on the simulated link (truth check)"
    )
    csub = p.add_subparsers(dest="calibration_command", metavar="ACTION", required=True)
    truth = csub.add_parser(
        "truth",
        help="run the calibration chain over seeds of drawn hardware truths and compare",
        description="Run the calibration chain on simulated links with randomly drawn "
        "hardware truths and report each estimate's error in units of its stated "
        "uncertainty.",
    )
    truth.add_argument("--seeds", type=int, default=20, help="number of seeds (default 20)")
    truth.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    truth.add_argument("--json", action="store_true", help="summary and rows as JSON")
    truth.set_defaults(func=_truth)


def _fmt(x: float | None, spec: str) -> str:
    width = int(spec.split(".", maxsplit=1)[0])
    return "-".rjust(width) if x is None else format(x, spec)


def _truth(args: argparse.Namespace) -> int:
    from qkdnode.procedures.common import COVERAGE_FACTOR, CalibrationError
    from qkdnode.procedures.truth_check import check_seed, summarize

    if args.seeds < 1 or args.first_seed < 0:
        print("calibration truth: --seeds must be >= 1 and --first-seed >= 0", file=sys.stderr)
        return EXIT_USAGE
    rows = []
    failed: list[str] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        try:
            rows += check_seed(seed)
        except (CalibrationError, RuntimeError) as exc:
            failed.append(f"seed {seed}: {exc}")
    summary = summarize(rows)
    misses = sum(s.misses for s in summary)
    if args.json:
        print(
            json.dumps(
                {
                    "coverage_factor": COVERAGE_FACTOR,
                    "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
                    "failed": failed,
                    "summary": [s.model_dump() for s in summary],
                    "rows": [r.model_dump() for r in rows],
                },
                indent=1,
            )
        )
    else:
        print(
            f"{'quantity':14s} {'rows':>5s} {'max|err|/u':>11s} {'max|err|':>11s} "
            f"{'median u':>11s} {'unit':5s} misses"
        )
        for s in summary:
            print(
                f"{s.quantity:14s} {s.rows:5d} {_fmt(s.max_abs_z, '11.2f')} "
                f"{_fmt(s.max_abs_error, '11.3g')} "
                f"{_fmt(s.median_standard_uncertainty, '11.3g')} {s.unit:5s} {s.misses}"
            )
        print(
            f"{args.seeds} seeds, intervals of +/-{COVERAGE_FACTOR:g} u: {misses} truths "
            "outside their interval (rows without a point value: bounds only)"
        )
        for f in failed:
            print(f"FAILED {f}", file=sys.stderr)
    return EXIT_OK if misses == 0 and not failed else EXIT_FAILURE
