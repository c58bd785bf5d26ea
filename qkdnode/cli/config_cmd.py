"""``qkdnode config check FILE`` and ``qkdnode config schema``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkdnode.cli import EXIT_OK, EXIT_USAGE
from qkdnode.config import ConfigError, NodeConfig, SiteConfig, load_site


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="validate a node config or print its schema")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate a node config file")
    check.add_argument("file", help="node config (TOML)")
    check.add_argument("--json", action="store_true", help="print the validated config as JSON")
    check.add_argument(
        "--root",
        type=Path,
        default=None,
        help="look for the files the config names under this directory (a system image "
        "being prepared), as `systemd-analyze --root` does",
    )
    check.set_defaults(func=_check)
    schema = csub.add_parser("schema", help="print the JSON Schema of node config files")
    schema.set_defaults(func=_schema)


def _check(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    problems = site_problems(site, root=args.root)
    if problems:
        for problem in problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        if site.multi:
            links = {link.id: link.cfg.model_dump(mode="json") for link in site.links}
            print(json.dumps({"node": site.id, "links": links}, indent=2))
        else:
            print(site.links[0].cfg.model_dump_json(indent=2))
        return EXIT_OK
    for link in site.links:
        cfg = link.cfg
        name = f"link {link.id!r}: " if site.multi else ""
        peer = f" with {cfg.node.peer_id!r}" if site.multi else ""
        print(
            f"{args.file}: ok ({name}{cfg.node.role} {cfg.node.id!r}{peer}, "
            f"{len(cfg.instruments)} instruments)"
        )
    return EXIT_OK


def site_problems(site: SiteConfig, *, root: Path | None = None) -> list[str]:
    """:func:`runtime_problems` of every link, named ``links[N].<key>`` in a node with
    several links."""
    out: list[str] = []
    for i, link in enumerate(site.links):
        prefix = f"links[{i}]." if site.multi else ""
        out.extend(prefix + p for p in runtime_problems(link.cfg, root=root))
    console = site.console
    for key, path in (
        ("console.tls_cert_file", console.tls_cert_file),
        ("console.tls_key_file", console.tls_key_file),
        ("console.client_ca_file", console.client_ca_file),
    ):
        if path is None or not console.enabled:
            continue
        real = root / path.relative_to(path.anchor) if root and path.is_absolute() else path
        if not real.is_file():
            out.append(f"{key}: {path} does not exist")
        elif not os.access(real, os.R_OK):
            out.append(f"{key}: {path} is not readable by this user")
    return out


def runtime_problems(cfg: NodeConfig, *, root: Path | None = None) -> list[str]:
    """What ``qkdnode run`` would refuse that the schema alone cannot see, each as
    ``<config key>: <what is wrong>``: unknown drivers, missing or malformed key and
    certificate files, CURVE keys missing with plaintext off, state and store directories
    the process cannot write. Credentials passed by systemd ($CREDENTIALS_DIRECTORY) count.
    ``root``: absolute paths are looked up under this directory (messages name them as
    configured)."""
    from drivers.registry import known_drivers
    from qkdnode.bus.keys import credentials_dir, load_secret_key

    out: list[str] = []
    drivers = known_drivers()
    for name, inst in cfg.instruments.items():
        if inst.driver not in drivers:
            out.append(
                f"instruments.{name}.driver: unknown driver {inst.driver!r} "
                "(see `qkdnode drivers list`)"
            )

    def credential(name: str) -> Path | None:
        d = credentials_dir()
        return d / name if d is not None and (d / name).is_file() else None

    def under_root(path: Path) -> Path:
        if root is None or not path.is_absolute():
            return path
        return root / path.relative_to(path.anchor)

    def readable(key: str, path: Path | None, what: str, *, credential: bool = False) -> None:
        if path is None:
            return
        real = path if credential else under_root(path)
        if not real.is_file():
            out.append(f"{key}: {what} {path} does not exist")
        elif not os.access(real, os.R_OK):
            out.append(f"{key}: {what} {path} is not readable by this user")

    bus = cfg.bus
    if not bus.allow_plaintext:
        secret_cred = credential("curve.key") if bus.server_secret_key_file is None else None
        secret = bus.server_secret_key_file or secret_cred
        if secret is None:
            out.append(
                "bus.server_secret_key_file: plaintext is off and no CURVE secret key is "
                "configured (set the file or pass the credential curve.key)"
            )
        else:
            readable(
                "bus.server_secret_key_file",
                secret,
                "CURVE secret key",
                credential=secret_cred is not None,
            )
            real = secret if secret_cred is not None else under_root(secret)
            if real.is_file() and os.access(real, os.R_OK):
                try:
                    load_secret_key(real)
                except (ValueError, OSError) as exc:
                    out.append(f"bus.server_secret_key_file: {exc}")
        if bus.peer_public_key is None:
            out.append("bus.peer_public_key: plaintext is off and the peer's key is not set")
    sim = cfg.simulation is not None and cfg.simulation.enabled
    if not sim and cfg.protocol.auth_psk_file is None and credential("auth.psk") is None:
        out.append(
            "protocol.auth_psk_file: no pre-shared authentication secret (set the file or "
            "pass the credential auth.psk)"
        )
    readable("protocol.auth_psk_file", cfg.protocol.auth_psk_file, "pre-shared secret")
    psk_problem = _psk_problem(cfg, under_root)
    if psk_problem:
        out.append(f"protocol.auth_psk_file: {psk_problem}")
    d = cfg.delivery
    if d.enabled:
        for key, path, what in (
            ("delivery.tls_cert_file", d.tls_cert_file, "certificate"),
            ("delivery.client_ca_file", d.client_ca_file, "client CA file"),
        ):
            if path is None:
                out.append(f"{key}: required with delivery.enabled")
            readable(key, path, what)
        key_cred = credential("tls.key") if d.tls_key_file is None else None
        key_file = d.tls_key_file or key_cred
        if key_file is None:
            out.append(
                "delivery.tls_key_file: required with delivery.enabled (or the credential tls.key)"
            )
        readable(
            "delivery.tls_key_file", key_file, "TLS private key", credential=key_cred is not None
        )
        readable("delivery.crl_file", d.crl_file, "CRL")
    out.extend(_directory_problems(cfg, under_root))
    return out


def _directory_problems(cfg: NodeConfig, under_root: Callable[[Path], Path]) -> list[str]:
    from qkdnode.paths import state_dir as resolve_state_dir

    out = []
    state = resolve_state_dir(cfg.node.state_dir)
    store = cfg.keystore.path if cfg.keystore.path.is_absolute() else state / cfg.keystore.path
    for key, configured in (("node.state_dir", state), ("keystore.path", store.parent)):
        directory = under_root(configured)
        probe = directory
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent  # the first existing ancestor must let us create it
        if not probe.is_dir():
            out.append(f"{key}: {probe} is not a directory")
        elif not os.access(probe, os.W_OK | os.X_OK):
            what = "directory" if probe == directory else f"directory {directory}: parent"
            out.append(f"{key}: {what} {probe} is not writable by this user")
    return out


def _psk_problem(cfg: NodeConfig, under_root: Callable[[Path], Path]) -> str | None:
    """What is wrong with the pre-shared authentication secret, if its file is there: too
    short to authenticate the first blocks (the daemon would refuse it at start-up)."""
    from qkdnode.paths import PathResolutionError, credential_path
    from qkdnode.postproc.auth import min_psk_bytes

    try:
        path = credential_path("auth.psk", cfg.protocol.auth_psk_file)
        configured = path == cfg.protocol.auth_psk_file
        size = (under_root(path) if configured else path).stat().st_size
    except (PathResolutionError, OSError):
        return None  # not configured or not readable here: the daemon reports it at start
    need = min_psk_bytes()
    if size >= need:
        return None
    return (
        f"pre-shared secret {path} holds {size} bytes, need at least {need} bytes "
        f"(same random bytes on both nodes, e.g. head -c 4096 /dev/urandom)"
    )


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(NodeConfig.model_json_schema(), indent=2))
    return EXIT_OK
