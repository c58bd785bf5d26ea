"""A node that hosts several links: the ``[[links]]`` form of a node config.

A site (a trusted node in the middle of a line, a data centre on several links) runs one
daemon for all its links. Its config names the node once and each link in a
``[[links]]`` entry::

    [node]
    id = "bravo"                  # the node's name, as its peers know it
    state_dir = "state/bravo"     # each link keeps its state in state_dir/<link id>
    log_level = "info"

    [[links]]
    id = "alpha-bravo"            # the link's name (log field ``link``, state directory)
    role = "receiver"             # this node's side of the link
    peer_id = "alpha"             # the node at the other end
    # then the sections of a one-link config, for this link only:
    # [links.bus], [links.source], [links.instruments.NAME], [links.protocol],
    # [links.keystore], [links.simulation], ... (each as in a one-link config)

    [[links]]
    id = "bravo-charlie"
    role = "transmitter"
    peer_id = "charlie"
    autostart = true
    ...

Sections of a one-link config other than ``[instruments]`` and ``[simulation]`` may also
stand at the top level (``[bus]``, ``[protocol]``, ``[keystore]``, ``[metrics]``,
``[delivery]``, ``[alarms]``, ...): they are defaults for every link, and a link's own
table overrides them key by key (so the node's CURVE keys, clients and limits are written
once, each link giving its own endpoints).

Each link is checked as a whole one-link config (errors name ``links[N].<key>``), then
the links against each other: no two links may bind the same endpoint or port, or share a
simulated fiber. A one-link config (``[node]`` with ``role`` and ``peer_id``, no
``[[links]]``) is a site with one link and runs as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from qkdnode.config.console import ConsoleSection
from qkdnode.config.loader import ConfigError, format_validation_error, parse_config, read_toml
from qkdnode.config.model import NodeConfig
from qkdnode.config.network import NetworkSection
from qkdnode.config.sections import Section

_NAME = r"^[A-Za-z0-9_.-]+$"
#: one-link sections that may stand at the top level of a node with links: defaults for
#: every link (a link's own table overrides them key by key)
SHARED_SECTIONS = frozenset(
    {
        "bus",
        "protocol",
        "calibration",
        "sync",
        "keystore",
        "delivery",
        "metrics",
        "alarms",
        "tracking",
        "polarization",
        "source",
    }
)
#: sections that belong to one link only (its hardware and its simulated side)
PER_LINK_ONLY = frozenset({"instruments", "simulation"})
#: keys of a ``[[links]]`` entry that go to the link's ``[node]`` section
_LINK_NODE_KEYS = ("role", "peer_id", "autostart")


class SiteNodeSection(Section):
    """``[node]`` of a config with ``[[links]]``: what the node's links share."""

    id: str = Field(min_length=1, max_length=64, pattern=_NAME)
    state_dir: Path = Field(
        Path("state"),
        description="state directory; each link keeps its own under state_dir/<link id>",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class LinkConfig:
    """One link of a node: its name ("" for a one-link config) and its whole config as a
    one-link node would have it (``cfg.node.state_dir`` is the link's own)."""

    id: str
    cfg: NodeConfig


@dataclass(frozen=True)
class SiteConfig:
    """A node and its links. ``multi``: written with ``[[links]]`` (log lines then carry
    the link's name, and each link has a state directory of its own)."""

    id: str
    log_level: str
    links: tuple[LinkConfig, ...]
    multi: bool
    #: the key management network the site belongs to (``[network]``), if any
    network: NetworkSection | None = None
    state_dir: Path = Path("state")
    #: the site's web console (``[console]``; off unless it names a listen_host)
    console: ConsoleSection = field(default_factory=ConsoleSection)

    @classmethod
    def single(cls, cfg: NodeConfig) -> SiteConfig:
        return cls(
            cfg.node.id,
            cfg.node.log_level,
            (LinkConfig("", cfg),),
            multi=False,
            state_dir=cfg.node.state_dir,
            console=cfg.console,
        )


def is_site(data: dict[str, Any]) -> bool:
    """Whether parsed TOML is in the ``[[links]]`` form."""
    return "links" in data


def parse_site(data: dict[str, Any], source: str = "<config>") -> SiteConfig:
    """Validate a config in either form. Raises :class:`ConfigError` naming each
    problem's key path (``links[1].bus.control_endpoint: ...``)."""
    if not is_site(data):
        if "network" in data:
            raise ConfigError(
                source,
                [
                    "network: a site of a key management network names its links: "
                    "write its link as a [[links]] entry"
                ],
            )
        return SiteConfig.single(parse_config(data, source))
    problems: list[str] = []
    shared: dict[str, Any] = {}
    network: NetworkSection | None = None
    console = ConsoleSection()
    for key, value in data.items():
        if key in ("node", "links"):
            continue
        if key == "network":
            network = _parse_network(value, problems)
            continue
        if key == "console":
            console = _parse_console(value, problems)
            continue
        if key in PER_LINK_ONLY:
            problems.append(
                f"{key}: belongs to one link: put it in that link's entry ([links.{key}])"
            )
        elif key not in SHARED_SECTIONS:
            problems.append(
                f"{key}: unknown key (not part of the schema; see `qkdnode config schema`)"
            )
        elif not isinstance(value, dict):
            problems.append(f"{key}: must be a table")
        else:
            shared[key] = value
    try:
        node = SiteNodeSection.model_validate(data.get("node", {}))
    except ValidationError as exc:
        raise ConfigError(
            source, [f"node.{p}" for p in format_validation_error(exc)] + problems
        ) from None
    entries = data["links"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(source, ["links: needs one or more [[links]] tables"])
    links: list[LinkConfig] = []
    for i, entry in enumerate(entries):
        where = f"links[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table ([[links]])")
            continue
        link = _parse_link(node, _with_defaults(shared, entry), where, problems)
        if link is not None:
            links.append(link)
    if not problems:
        problems.extend(_clashes(links, network, console))
    if not problems and network is not None and network.enabled:
        problems.extend(_network_fit(node.id, links, network))
    if problems:
        raise ConfigError(source, problems)
    return SiteConfig(
        node.id,
        node.log_level,
        tuple(links),
        multi=True,
        network=network if network is not None and network.enabled else None,
        state_dir=node.state_dir,
        console=console,
    )


def _parse_console(value: Any, problems: list[str]) -> ConsoleSection:
    if not isinstance(value, dict):
        problems.append("console: must be a table")
        return ConsoleSection()
    try:
        return ConsoleSection.model_validate(value)
    except ValidationError as exc:
        problems.extend(f"console.{p}" for p in format_validation_error(exc))
        return ConsoleSection()


def _parse_network(value: Any, problems: list[str]) -> NetworkSection | None:
    if not isinstance(value, dict):
        problems.append("network: must be a table")
        return None
    try:
        return NetworkSection.model_validate(value)
    except ValidationError as exc:
        for line in format_validation_error(exc):
            if line.startswith("(top level): "):
                problems.extend(
                    f"network.{p}" for p in line.removeprefix("(top level): ").split("; ")
                )
            else:
                problems.append(f"network.{line}")
        return None


def _network_fit(site: str, links: list[LinkConfig], net: NetworkSection) -> list[str]:
    """The site's place in the map: it is one of the sites, its links are links of the
    map with the peers the map names, its SAEs are placed at it."""
    out: list[str] = []
    if site not in net.sites:
        out.append(f"network.sites: this node {site!r} is not one of the sites")
    by_id = {link.id: link for link in net.links}
    for i, link in enumerate(links):
        entry = by_id.get(link.id)
        if entry is None:
            out.append(f"links[{i}].id: link {link.id!r} is not in network.links")
            continue
        ends = {entry.a, entry.b}
        if ends != {site, link.cfg.node.peer_id}:
            out.append(
                f"links[{i}]: network.links names {link.id!r} between {entry.a!r} and "
                f"{entry.b!r}, this entry joins {site!r} and {link.cfg.node.peer_id!r}"
            )
    for i, sae in enumerate(net.delivery.saes):
        placed = net.site_of(sae.sae_id)
        if placed != site:
            out.append(
                f"network.delivery.saes[{i}]: SAE {sae.sae_id!r} is registered here but the "
                f"directory places it at {placed!r}"
            )
    return out


def _with_defaults(shared: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` over the node's shared sections: the link's own keys win, table by table
    (a link's ``[links.bus]`` keeps the shared ``[bus]`` keys it does not set)."""
    out = dict(entry)
    for key, defaults in shared.items():
        own = entry.get(key)
        if isinstance(own, dict):
            out[key] = _merged(defaults, own)
        elif own is None:
            out[key] = dict(defaults)
        # else: the link's own (invalid) value stays, for validation to name
    return out


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_link(
    node: SiteNodeSection, entry: dict[str, Any], where: str, problems: list[str]
) -> LinkConfig | None:
    link_id = entry.get("id")
    if not isinstance(link_id, str) or not link_id:
        problems.append(f"{where}.id: required key is missing (the link's name)")
        return None
    if len(link_id) > 64 or not _name_ok(link_id):
        problems.append(f"{where}.id: letters, digits, '_', '.', '-' only (1-64), got {link_id!r}")
        return None
    if "node" in entry:
        problems.append(
            f"{where}.node: a link takes role, peer_id and autostart directly in its entry"
        )
        return None
    if "console" in entry:
        problems.append(f"{where}.console: the console is the node's: write [console] once")
        return None
    node_keys = {k: entry[k] for k in _LINK_NODE_KEYS if k in entry}
    body = {k: v for k, v in entry.items() if k != "id" and k not in _LINK_NODE_KEYS}
    data = {
        "node": {
            "id": node.id,
            "state_dir": str(node.state_dir / link_id),
            "log_level": node.log_level,
            **node_keys,
        },
        **body,
    }
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        for line in format_validation_error(exc):
            # the link's [node] keys are the entry's own keys
            line = line.removeprefix("node.")
            if line.startswith("(top level): "):
                problems.append(f"{where}: {line.removeprefix('(top level): ')}")
            else:
                problems.append(f"{where}.{line}")
        return None
    return LinkConfig(link_id, cfg)


def _name_ok(name: str) -> bool:
    return re.fullmatch(_NAME, name) is not None


def _clashes(
    links: list[LinkConfig],
    network: NetworkSection | None = None,
    console: ConsoleSection | None = None,
) -> list[str]:
    """What two links of one node may not share: a link name, an endpoint or port either
    binds, a simulated fiber, a simulated instrument left without its link's name."""
    out: list[str] = []
    seen: dict[str, str] = {}

    def claim(value: str, where: str) -> None:
        if value in seen:
            out.append(f"{where}: {value} is also {seen[value]}")
        else:
            seen[value] = where

    for i, link in enumerate(links):
        w = f"links[{i}]"
        cfg = link.cfg
        claim(f"link {link.id!r}", f"{w}.id")
        claim(cfg.bus.control_endpoint, f"{w}.bus.control_endpoint")
        claim(cfg.bus.telemetry_endpoint, f"{w}.bus.telemetry_endpoint")
        if cfg.bus.monitor_endpoint is not None:
            claim(cfg.bus.monitor_endpoint, f"{w}.bus.monitor_endpoint")
        if cfg.node.role == "transmitter":  # the transmitter binds the peer endpoint
            claim(cfg.bus.peer_endpoint, f"{w}.bus.peer_endpoint")
        if cfg.metrics.enabled:
            claim(f"port {cfg.metrics.listen_port}", f"{w}.metrics.listen_port")
        if cfg.delivery.enabled:
            claim(f"port {cfg.delivery.listen_port}", f"{w}.delivery.listen_port")
        sim = cfg.simulation
        if sim is not None and sim.enabled:
            claim(sim.fiber_endpoint, f"{w}.simulation.fiber_endpoint")
    if console is not None and console.enabled:
        claim(f"port {console.listen_port}", "console.listen_port")
    if network is not None and network.enabled and network.delivery.enabled:
        claim(f"port {network.delivery.listen_port}", "network.delivery.listen_port")
    simulated = [(i, link) for i, link in enumerate(links) if _simulated(link.cfg)]
    if len(simulated) > 1:
        for i, link in simulated:
            for name, inst in link.cfg.instruments.items():
                if inst.driver.startswith("sim_") and inst.resource != link.id:
                    out.append(
                        f"links[{i}].instruments.{name}.resource: this node simulates several "
                        f"links; a simulated instrument names its link: set "
                        f"resource = {link.id!r}"
                    )
    return out


def _simulated(cfg: NodeConfig) -> bool:
    return cfg.simulation is not None and cfg.simulation.enabled


def load_site(path: str | Path) -> SiteConfig:
    """Read and validate a node config in either form (one link, or ``[[links]]``)."""
    return parse_site(read_toml(path), str(path))
