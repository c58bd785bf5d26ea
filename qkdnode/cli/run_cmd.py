"""``qkdnode run --config FILE``: run the node daemon in the foreground."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qkdnode.cli import EXIT_USAGE
from qkdnode.config import ConfigError, load_site


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the node daemon (foreground; systemd Type=notify aware)",
        description="Run the node daemon until SIGTERM/SIGINT. Exits 2 on an invalid "
        "configuration, 1 on a runtime failure.",
    )
    p.add_argument(
        "--config",
        default=None,
        help="node config (TOML); a bare name is looked up in $CONFIGURATION_DIRECTORY",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.add_argument("--log-json", action="store_true", help="JSON log lines even on a terminal")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from qkdnode.log import configure_logging
    from qkdnode.paths import PathResolutionError, config_path

    try:
        path = config_path(args.config)
    except PathResolutionError as exc:
        print(f"qkdnode run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        site = load_site(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    from qkdnode.cli.config_cmd import site_problems

    problems = site_problems(site)
    if problems:  # the same checks as `qkdnode config check`, before anything starts
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.log_level or site.log_level, json=True if args.log_json else None)
    from qkdnode.daemon import Daemon, ProcessControl, run_daemon
    from qkdnode.node import Node

    process = ProcessControl()
    links = [Node(link.cfg, str(path), process, link.id) for link in site.links]
    daemon = Daemon(links, site.id, process)
    if site.network is not None:
        from qkdnode.kms.service import NetworkService
        from qkdnode.node_port import NodeLinkPort

        def ports() -> list[NodeLinkPort]:
            return [NodeLinkPort(node) for node in links if node in daemon.running]

        daemon.services.append(NetworkService(site.id, site.network, site.state_dir, ports))
    if site.console.enabled:  # after the key manager: its `network` command is then served
        from qkdnode.console.service import ConsoleService
        from qkdnode.node_port import NodeLinkPort

        def console_ports() -> list[NodeLinkPort]:
            return [NodeLinkPort(node) for node in links if node in daemon.running]

        daemon.services.append(
            ConsoleService(
                site.id,
                site.console,
                site.state_dir,
                console_ports,
                network=site.network is not None,
            )
        )
    return run_daemon(daemon)
