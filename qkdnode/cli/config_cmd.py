"""``qkdnode config check FILE`` and ``qkdnode config schema``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qkdnode.cli import EXIT_OK, EXIT_USAGE
from qkdnode.config import ConfigError, NodeConfig, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="validate a node config or print its schema")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate a node config file")
    check.add_argument("file", help="node config (TOML)")
    check.add_argument("--json", action="store_true", help="print the validated config as JSON")
    check.set_defaults(func=_check)
    schema = csub.add_parser("schema", help="print the JSON Schema of node config files")
    schema.set_defaults(func=_schema)


def _check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(cfg.model_dump_json(indent=2))
    else:
        print(
            f"{args.file}: ok ({cfg.node.role} {cfg.node.id!r}, {len(cfg.instruments)} instruments)"
        )
    return EXIT_OK


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(NodeConfig.model_json_schema(), indent=2))
    return EXIT_OK
