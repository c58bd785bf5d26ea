"""Which nodes ``qkdnode ctl`` talks to: endpoints from the options or a node's config,
checked before use, and the control client and telemetry subscription opened on them."""

from __future__ import annotations

import argparse
import re
import socket
from dataclasses import dataclass
from typing import Any

from qkdnode.bus.errors import KeyFileError
from qkdnode.bus.keys import find_client_key
from qkdnode.cli.ctl_errors import UsageError
from qkdnode.client import Client, Subscription
from qkdnode.config import load_site

DEFAULT_CONTROL = "tcp://127.0.0.1:5550"
DEFAULT_TELEMETRY = "tcp://127.0.0.1:5551"


@dataclass(frozen=True)
class NodeAddr:
    """Where a node answers, and what its config says (when given)."""

    control: str
    telemetry: str | None
    label: str
    max_key_count: int | None = None
    block_detections: int | None = None


_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})")
_IPC = re.compile(r"ipc://\S+")


def check_endpoint(endpoint: str, option: str) -> str:
    """``endpoint`` if it is a connectable tcp://HOST:PORT or ipc://PATH, else UsageError."""
    m = _TCP.fullmatch(endpoint)
    if m is None:
        if _IPC.fullmatch(endpoint):
            return endpoint
        raise UsageError(
            f"bad {option} {endpoint!r}: expected tcp://HOST:PORT or ipc://PATH "
            f"(e.g. {DEFAULT_CONTROL})"
        )
    host, port = m.group("host"), int(m.group("port"))
    if host == "*" or not 0 < port < 65536:
        raise UsageError(
            f"bad {option} {endpoint!r}: need a host name or address and a port 1-65535"
        )
    try:
        socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"bad {option} {endpoint!r}: cannot resolve {host!r} ({exc})") from None
    return endpoint


def _telemetry_of(control: str) -> str | None:
    """The shipped configs put telemetry on the control port + 1."""
    m = _TCP.fullmatch(control)
    if m is None or int(m.group("port")) >= 65535:
        return None
    return f"tcp://{m.group('host')}:{int(m.group('port')) + 1}"


def node_addrs(args: argparse.Namespace) -> list[NodeAddr]:
    configs: list[str] = args.config
    controls: list[str] = args.endpoint
    telemetries: list[str] = args.telemetry_endpoint
    if len(configs) > 1 and (controls or telemetries):
        raise UsageError("give several --config or several --endpoint, not both")
    if len(telemetries) > max(1, len(controls)):
        raise UsageError("more --telemetry-endpoint than --endpoint options")
    nodes: list[NodeAddr] = []
    if configs:
        if len(configs) == 1 and len(controls) > 1:
            raise UsageError("one --config with several --endpoint: which is which?")
        for path in configs:
            site = load_site(path)
            if len(site.links) > 1 and (controls or telemetries):
                raise UsageError(
                    f"{path} names {len(site.links)} links: drop --endpoint (every link is "
                    f"addressed), or give the one link's --endpoint without --config"
                )
            for link in site.links:
                cfg = link.cfg
                bus = cfg.bus
                control = controls[0] if controls else bus.control_endpoint
                tel = telemetries[0] if telemetries else bus.telemetry_endpoint
                nodes.append(
                    NodeAddr(
                        check_endpoint(control, "--endpoint"),
                        check_endpoint(tel, "--telemetry-endpoint"),
                        f"{cfg.node.id}/{link.id}" if link.id else cfg.node.id,
                        cfg.keystore.max_key_count,
                        cfg.protocol.block_detections,
                    )
                )
        return nodes
    for i, control in enumerate(controls or [DEFAULT_CONTROL]):
        check_endpoint(control, "--endpoint")
        derived = telemetries[i] if i < len(telemetries) else _telemetry_of(control)
        if derived is not None:
            check_endpoint(derived, "--telemetry-endpoint")
        nodes.append(NodeAddr(control, derived, control))
    return nodes


def one_node(args: argparse.Namespace) -> NodeAddr:
    nodes = node_addrs(args)
    if len(nodes) != 1:
        raise UsageError(f"{args.ctl_command} talks to one node; only watch takes several")
    return nodes[0]


def _keys_of(args: argparse.Namespace) -> Any:
    try:
        return find_client_key(args.client_key) if args.client_key else None
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None


def open_client(args: argparse.Namespace, node: NodeAddr, timeout_s: float | None = None) -> Client:
    timeout = timeout_s if timeout_s is not None else args.timeout
    if timeout is None:
        timeout = args.timeout_default
    try:
        return Client(node.control, args.server_key, _keys_of(args), timeout_s=timeout)
    except (ValueError, KeyFileError) as exc:  # the server key or the endpoint
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--server-key: {exc}") from None


def open_subscription(
    args: argparse.Namespace,
    node: NodeAddr,
    client: Client,
    idle_timeout_s: float,
    topics: tuple[str, ...] = (),
) -> Subscription:
    if node.telemetry is None:
        raise UsageError(f"no telemetry endpoint for {node.control}: give --telemetry-endpoint")
    try:
        return Subscription(
            node.telemetry,
            client,
            args.server_key,
            _keys_of(args),
            topics=topics,
            idle_timeout_s=idle_timeout_s,
            snapshot_timeout_s=min(client.timeout_s, 5.0),
            retry_s=max(10.0, 2 * idle_timeout_s),
        )
    except (ValueError, KeyFileError) as exc:
        raise UsageError(str(exc)) from None
