"""``qkdnode drivers list`` and ``qkdnode drivers probe RESOURCE``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from drivers.errors import DriverConfigError, InstrumentError
from drivers.registry import known_drivers, probe
from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def register(sub: Any) -> None:
    p = sub.add_parser("drivers", help="list instrument drivers or probe a resource")
    dsub = p.add_subparsers(dest="drivers_command", metavar="ACTION", required=True)
    lst = dsub.add_parser("list", help="table of known drivers")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=_list)
    prb = dsub.add_parser(
        "probe", help="open a VISA resource, serial URL, tcp:// endpoint or qutag: and identify it"
    )
    prb.add_argument(
        "resource",
        help="VISA resource (GPIB0::20::INSTR), serial URL/path, tcp://HOST:PORT or qutag[:MODULE]",
    )
    prb.add_argument("--visa-library", default="", help="pyvisa backend, e.g. PATH.yaml@sim")
    prb.add_argument("--timeout-s", type=float, default=2.0, help="per-attempt timeout, seconds")
    prb.add_argument("--json", action="store_true", help="print JSON")
    prb.set_defaults(func=_probe)


def _list(args: argparse.Namespace) -> int:
    drivers = known_drivers()
    rows = [
        {
            "name": n,
            "interface": e.interface,
            "import_path": e.import_path,
            "description": e.description,
        }
        for n, e in drivers.items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    w_name = max(len("DRIVER"), *(len(r["name"]) for r in rows))
    w_if = max(len("INTERFACE"), *(len(r["interface"]) for r in rows))
    print(f"{'DRIVER':<{w_name}}  {'INTERFACE':<{w_if}}  DESCRIPTION")
    for r in rows:
        print(f"{r['name']:<{w_name}}  {r['interface']:<{w_if}}  {r['description']}")
    return EXIT_OK


def _probe(args: argparse.Namespace) -> int:
    try:
        found = probe(args.resource, args.timeout_s, args.visa_library)
    except DriverConfigError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InstrumentError as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        for key, value in found.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            print(f"{key:>18}: {shown}")
    return EXIT_OK
