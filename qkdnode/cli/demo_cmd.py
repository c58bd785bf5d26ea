"""``qkdnode demo``: a transmitter and a receiver over a simulated fiber, end to end.

Examples::

    qkdnode demo                              # 25 km, 30 s, live progress, summary
    qkdnode demo --distance-km 50 --duration 60 --json
    qkdnode demo --eve intercept-resend:0.5   # the error rate shows the attack; no key
    qkdnode demo --sweep 0,25,50,75,100 --duration 20
    qkdnode demo --topology line              # alpha - bravo - charlie, bravo on two links
    qkdnode demo --network configs/network.toml --json   # five sites, relay, a cut link
    qkdnode demo --satellite configs/satellite.toml --json  # satellite downlink passes

Exit codes: 0 keys identical and at least one block distilled (with ``--eve``: or no key
at all), 1 otherwise, 2 bad options or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run a transmitter and a receiver over a simulated fiber and distil keys",
        description="Start two node daemons with simulated hardware, drive them through "
        "calibrate, sync and key exchange, check that both key stores hold identical keys "
        "and compare the key rate with theory (decoy-state GLLP, PLOB bound).",
    )
    p.add_argument("--config", type=Path, default=None, help="demo TOML (see configs/demo.toml)")
    p.add_argument("--distance-km", type=float, default=None, help="fiber length (km)")
    p.add_argument("--duration", type=float, default=None, help="key exchange time (s)")
    p.add_argument("--eve", default=None, metavar="MODE:FRACTION", help="e.g. intercept-resend:0.5")
    p.add_argument("--seed", type=int, default=None, help="seed of the simulated link")
    p.add_argument("--out", type=Path, default=None, help="output directory (default demo-out)")
    p.add_argument(
        "--plaintext",
        action="store_true",
        help="unencrypted bus instead of per-run CURVE keys (debugging only)",
    )
    p.add_argument("--sweep", default=None, metavar="KM,KM,...", help="one run per distance")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    p.add_argument(
        "--topology",
        choices=["pair", "line"],
        default="pair",
        help="pair (default): one link; line: three sites alpha - bravo - charlie from "
        "configs/line, bravo one daemon on two links; alpha is killed and restarted "
        "mid-run (--no-fault: not)",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        default=None,
        help="--topology line: directory of alpha.toml, bravo.toml, charlie.toml "
        "(default: configs/line of the source tree)",
    )
    p.add_argument("--no-fault", action="store_true", help="--topology line: no kill")
    p.add_argument(
        "--network",
        type=Path,
        default=None,
        metavar="FILE",
        help="a trusted-node network (configs/network.toml): one daemon per site, each in "
        "its own network namespace where the host allows it, end-to-end keys over ETSI "
        "014, a link cut mid-run",
    )
    p.add_argument(
        "--satellite",
        type=Path,
        default=None,
        metavar="FILE",
        help="satellite downlink passes (configs/satellite.toml): a satellite transmitter "
        "and a ground-station receiver, one finite-key block per pass, per-pass figures "
        "beside the node's theory",
    )
    p.add_argument(
        "--network-mode",
        choices=["auto", "netns", "loopback"],
        default=None,
        help="--network: netns (root), loopback (any user), auto (default: the file's run.mode)",
    )
    p.set_defaults(func=_run)


def _network(args: argparse.Namespace) -> int:
    from qkdnode.config import ConfigError
    from qkdnode.demo.network_run import run_network
    from qkdnode.demo.network_spec import load_network_spec

    others = [
        f"--{n.replace('_', '-')}"
        for n in ("config", "distance_km", "eve", "seed", "sweep", "config_dir", "duration")
        if getattr(args, n) is not None
    ]
    if others or args.topology != "pair" or args.no_fault:
        print(
            "qkdnode demo: --network takes only --out, --network-mode, --plaintext and "
            f"--json{' (not ' + ', '.join(others) + ')' if others else ''}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        spec = load_network_spec(args.network)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    if args.plaintext:
        spec = spec.model_copy(
            update={"run": spec.run.model_copy(update={"security": "plaintext"})}
        )
    from qkdnode.log import configure_logging

    configure_logging("warning", json=False)
    summary = run_network(
        spec, args.out or spec.run.out_dir, _reporter(args.json), args.network_mode
    )
    if args.json:
        print(summary.to_json_line(), flush=True)
    else:
        print("ok" if summary.ok else f"FAILED: {summary.failure}", flush=True)
    if summary.failure is not None and "namespaces are not available" in summary.failure:
        return EXIT_USAGE
    return EXIT_OK if summary.ok else EXIT_FAILURE


def _line(args: argparse.Namespace) -> int:
    from qkdnode.demo.line import run_line
    from qkdnode.demo.runner import DemoError

    if args.duration is not None and not args.duration > 0:
        print("qkdnode demo: --duration must be > 0 seconds", file=sys.stderr)
        return EXIT_USAGE
    others = [
        f"--{n.replace('_', '-')}"
        for n in ("config", "distance_km", "eve", "seed", "sweep")
        if getattr(args, n) is not None
    ]
    if others:
        print(f"qkdnode demo: --topology line takes no {', '.join(others)}", file=sys.stderr)
        return EXIT_USAGE
    config_dir = args.config_dir or Path(__file__).resolve().parents[2] / "configs" / "line"
    from qkdnode.log import configure_logging

    configure_logging("warning", json=False)
    report = _reporter(args.json)
    try:
        summary = run_line(
            config_dir,
            args.out or Path("demo-out") / "line",
            30.0 if args.duration is None else args.duration,
            not args.no_fault,
            report,
        )
    except DemoError as exc:
        print(f"qkdnode demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(summary.to_json_line(), flush=True)
    else:
        print("ok" if summary.ok else f"FAILED: {summary.failure}", flush=True)
    return EXIT_OK if summary.ok else EXIT_FAILURE


def _reporter(json_mode: bool) -> Any:
    from qkdnode.demo.runner import LiveTerminal, Reporter

    if json_mode:  # stdout carries only the JSON line; progress on a terminal stderr
        return LiveTerminal(sys.stderr) if sys.stderr.isatty() else Reporter()
    return LiveTerminal(sys.stdout, live_updates=sys.stdout.isatty())


def _satellite(args: argparse.Namespace) -> int:
    """``--satellite FILE``: the passes of the file, two daemons."""
    from qkdnode.config import ConfigError
    from qkdnode.demo.satellite_run import format_summary, load_satellite_config, run_satellite

    extra = [
        name
        for name, value in (
            ("--distance-km", args.distance_km),
            ("--duration", args.duration),
            ("--eve", args.eve),
            ("--seed", args.seed),
            ("--sweep", args.sweep),
            ("--network", args.network),
            ("--network-mode", args.network_mode),
            ("--config", args.config),
            ("--config-dir", args.config_dir),
        )
        if value is not None
    ]
    if extra or args.topology != "pair" or args.no_fault:
        print(
            "qkdnode demo: --satellite takes only --out, --plaintext and --json "
            f"(got {', '.join(extra) or '--topology/--no-fault'})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        cfg = load_satellite_config(args.satellite, args.out)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    if args.plaintext:
        cfg = cfg.model_copy(update={"demo": cfg.demo.model_copy(update={"security": "plaintext"})})
    from qkdnode.log import configure_logging

    configure_logging("warning", json=False)
    summary = run_satellite(cfg, _reporter(args.json))
    out = cfg.demo.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(summary.to_json_line() + "\n", "utf-8")
    if args.json:
        if sys.stderr.isatty():
            print(format_summary(summary), file=sys.stderr)
        print(summary.to_json_line(), flush=True)
    else:
        print(format_summary(summary), flush=True)
    return EXIT_OK if summary.ok else EXIT_FAILURE


def _run(args: argparse.Namespace) -> int:
    if args.satellite is not None:
        return _satellite(args)
    if args.network is not None:
        return _network(args)
    if args.network_mode is not None:
        print("qkdnode demo: --network-mode goes with --network", file=sys.stderr)
        return EXIT_USAGE
    if args.topology == "line":
        return _line(args)
    if args.config_dir is not None or args.no_fault:
        print("qkdnode demo: --config-dir and --no-fault go with --topology line", file=sys.stderr)
        return EXIT_USAGE
    from qkdnode.config import ConfigError
    from qkdnode.demo.config import apply_overrides, load_demo_config, parse_eve

    try:
        cfg = load_demo_config(args.config)
        eve = parse_eve(args.eve) if args.eve is not None else None
        if args.duration is not None and not args.duration > 0:
            raise ValueError("--duration must be > 0 seconds")
        cfg = apply_overrides(
            cfg,
            distance_km=args.distance_km,
            duration_s=args.duration,
            seed=args.seed,
            eve=eve,
            out_dir=args.out,
            security="plaintext" if args.plaintext else None,
        )
        distances = None
        if args.sweep is not None:
            from qkdnode.demo.sweep import parse_distances

            distances = parse_distances(args.sweep)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"qkdnode demo: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from qkdnode.log import configure_logging

    configure_logging("warning", json=False)
    if distances is not None:
        return _sweep(cfg, distances, args.json)

    from qkdnode.demo.runner import run_demo, write_result
    from qkdnode.demo.summary import format_summary

    summary = run_demo(cfg, _reporter(args.json))
    write_result(summary, cfg.demo.out_dir.resolve())
    if args.json:
        if sys.stderr.isatty():
            print(format_summary(summary), file=sys.stderr)
        print(summary.to_json_line(), flush=True)
    else:
        print(format_summary(summary), flush=True)
    return EXIT_OK if summary.ok else EXIT_FAILURE


def _sweep(cfg: Any, distances: list[float], json_mode: bool) -> int:
    from qkdnode.demo.sweep import plot_sweep, run_sweep, sweep_table, write_csv

    out = cfg.demo.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = run_sweep(cfg, distances, _reporter(json_mode))
    csv_path = write_csv(results, out / "sweep.csv")
    png_path = plot_sweep(results, cfg, out / "sweep.png")
    table = sweep_table(results)
    stream = sys.stderr if json_mode else sys.stdout
    if not json_mode or sys.stderr.isatty():
        print(table, file=stream)
        print(f"table: {csv_path}\nplot:  {png_path}", file=stream)
    if json_mode:
        line = {
            "sweep": [s.model_dump(mode="json") for s in results],
            "csv": str(csv_path),
            "png": str(png_path),
        }
        print(json.dumps(line, allow_nan=False), flush=True)
    return EXIT_OK if all(s.ok for s in results) else EXIT_FAILURE
