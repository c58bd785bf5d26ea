"""The site configs of the network demo, built from a :class:`NetworkDemoSpec`.

Each site gets one config in the ``[[links]]`` form: one entry per link it is an end of
(transmitter on the links where it is ``a``, receiver where it is ``b``), each with only
its own side of that link's simulation, and a ``[network]`` section with the map (sites,
links, SAE directory) and its own ETSI 014 KME for end-to-end keys. Also generated per
run: CURVE key pairs (one per site, one for the demo's control client; each site lists
its neighbours as ``peer`` clients and the demo as ``operator``) and a test PKI (a CA, a
server certificate per site KME, a client certificate per SAE).

Where things listen is the :class:`Addressing`'s business: loopback (every daemon on
127.0.0.1, free ports) or network namespaces (peer and fiber endpoints on the
transmitter's address of the link's own veth pair; control, telemetry and ETSI on the
site's management address).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.simlink.satellite_channel import SatelliteChannel, SatelliteChannelParams
from qkdnode.config.site import SiteConfig, parse_site
from qkdnode.demo.config import DemoConfig, RunSection
from qkdnode.demo.network_spec import LinkPasses, NetworkDemoSpec
from qkdnode.demo.nodeconfig import (
    RECEIVER_INSTRUMENTS,
    TRANSMITTER_INSTRUMENTS,
    Endpoints,
    _commissioning,
    _source_targets,
    free_tcp_ports,
    to_toml,
)

CLIENT_NAME = "demo-client"
ETSI_PORT = 9443


@dataclass(frozen=True)
class Addressing:
    """``link_host(link_id)``: the transmitter's address on that link (it binds the peer
    and fiber endpoints); ``mgmt_host(site)``: where the site's control, telemetry and
    ETSI endpoints listen; ``port(key)``: a port for ``key`` (unique per host)."""

    link_host: Callable[[str], str]
    mgmt_host: Callable[[str], str]
    port: Callable[[str], int]

    @classmethod
    def loopback(cls) -> Addressing:
        taken: dict[str, int] = {}

        def port(key: str) -> int:
            if key not in taken:
                used = set(taken.values())
                taken[key] = next(p for p in free_tcp_ports(16) if p not in used)
            return taken[key]

        return cls(lambda _link: "127.0.0.1", lambda _site: "127.0.0.1", port)

    @classmethod
    def namespaces(
        cls, link_host: Callable[[str], str], mgmt_host: Callable[[str], str]
    ) -> Addressing:
        """Fixed ports: every site has addresses of its own."""
        ports: dict[str, int] = {}

        def port(key: str) -> int:
            if key not in ports:
                ports[key] = 20000 + len(ports)
            return ports[key]

        return cls(link_host, mgmt_host, port)


@dataclass(frozen=True)
class LinkEnds:
    """A link's two control endpoints: (transmitter site, endpoint), (receiver, endpoint)."""

    link_id: str
    tx: tuple[str, str]
    rx: tuple[str, str]


@dataclass
class NetworkFiles:
    """What a run generated: each site's config path and parsed config, the links' control
    endpoints, each site's ETSI URL, the PKI and the demo client's CURVE keys."""

    out: Path
    configs: dict[str, Path] = field(default_factory=dict)
    sites: dict[str, SiteConfig] = field(default_factory=dict)
    links: dict[str, LinkEnds] = field(default_factory=dict)
    etsi_urls: dict[str, str] = field(default_factory=dict)
    pki: Path | None = None
    server_public: dict[str, str] = field(default_factory=dict)
    client_keys: tuple[str, Path] | None = None  # (public Z85, secret file)

    def sae_files(self, sae_id: str) -> tuple[Path, Path, Path]:
        """(CA certificate, client certificate, client key) of an SAE."""
        assert self.pki is not None
        return self.pki / "ca.crt", self.pki / f"{sae_id}.crt", self.pki / f"{sae_id}.key"


def _link_demo(
    spec: NetworkDemoSpec,
    index: int,
    length_km: float,
    satellite: SatelliteChannelParams | None = None,
) -> DemoConfig:
    """One link's physics: the shared [link] (``satellite_link`` for a satellite link),
    its own length (or passes) and protocol seeds."""
    base = spec.satellite_link if satellite is not None and spec.satellite_link else spec.link
    link = base.model_copy(
        update={
            "transmitter_seed": 1000 + 2 * index,
            "receiver_seed": 1001 + 2 * index,
            "fiber": base.fiber.model_copy(update={"length_km": length_km}),
            "satellite": satellite,
        }
    )
    return DemoConfig(
        demo=RunSection(log_level=spec.run.log_level),
        link=link,
        protocol=spec.protocol,
        keystore=spec.keystore,
    )


def _passes(sat: LinkPasses, now: float) -> SatelliteChannelParams:
    """The link's passes on the wall clock: ``passes`` of them, the first
    ``first_rise_after_s`` after ``now``, ``gap_s`` apart."""
    probe = SatelliteChannelParams(orbit=sat.orbit, time_scale=sat.time_scale)
    rises = tuple(
        now + sat.first_rise_after_s + k * (probe.pass_duration_s + sat.gap_s)
        for k in range(sat.passes)
    )
    return SatelliteChannelParams(orbit=sat.orbit, rises_unix_s=rises, time_scale=sat.time_scale)


def _instruments(role: str, link_id: str) -> dict[str, Any]:
    table = TRANSMITTER_INSTRUMENTS if role == "transmitter" else RECEIVER_INSTRUMENTS
    return {name: {**inst, "resource": link_id} for name, inst in table.items()}


def write_network_configs(spec: NetworkDemoSpec, out: Path, addr: Addressing) -> NetworkFiles:
    """Write keys, PKI and one config per site under ``out``; validate each config."""
    from qkdnode.bus.keys import write_keypair
    from qkdnode.delivery.pki import init_ca, issue_cert

    out.mkdir(parents=True, exist_ok=True)
    files = NetworkFiles(out)
    curve = spec.run.security == "curve"
    keys_dir = out / "keys"
    if curve:
        for name in [*spec.sites, CLIENT_NAME]:
            _, pub = write_keypair(keys_dir, name, overwrite=True)
            files.server_public[name] = pub.read_text("ascii").strip()
        files.client_keys = (files.server_public[CLIENT_NAME], keys_dir / f"{CLIENT_NAME}.key")
    pki = out / "pki"
    if not (pki / "ca.crt").exists():
        init_ca(pki, common_name="qkdnode network demo CA")
    files.pki = pki
    for site in spec.sites:
        issue_cert(pki, f"kme-{site}", server=True, sans=[addr.mgmt_host(site), "localhost"])
    for sae in spec.saes:
        issue_cert(pki, sae.sae_id)

    entries: dict[str, list[dict[str, Any]]] = {s: [] for s in spec.sites}
    now = time.time()
    for i, link in enumerate(spec.links):
        channel = _passes(link.satellite, now) if link.satellite is not None else None
        demo = _link_demo(spec, i, link.length_km, channel)
        host = addr.link_host(link.id)
        ep = Endpoints(
            tx_control=f"tcp://{addr.mgmt_host(link.a)}:{addr.port(f'{link.a}/{link.id}/c')}",
            tx_telemetry=f"tcp://{addr.mgmt_host(link.a)}:{addr.port(f'{link.a}/{link.id}/t')}",
            rx_control=f"tcp://{addr.mgmt_host(link.b)}:{addr.port(f'{link.b}/{link.id}/c')}",
            rx_telemetry=f"tcp://{addr.mgmt_host(link.b)}:{addr.port(f'{link.b}/{link.id}/t')}",
            peer=f"tcp://{host}:{addr.port(f'{link.id}/peer')}",
            fiber=f"tcp://{host}:{addr.port(f'{link.id}/fiber')}",
        )
        files.links[link.id] = LinkEnds(link.id, (link.a, ep.tx_control), (link.b, ep.rx_control))
        for role, site, peer in (("transmitter", link.a, link.b), ("receiver", link.b, link.a)):
            tx = role == "transmitter"
            bus: dict[str, Any] = {
                "control_endpoint": ep.tx_control if tx else ep.rx_control,
                "telemetry_endpoint": ep.tx_telemetry if tx else ep.rx_telemetry,
                "peer_endpoint": ep.peer,
            }
            if curve:
                bus["peer_public_key"] = files.server_public[peer]
            side = demo.link.transmitter_side() if tx else demo.link.receiver_side()
            entry: dict[str, Any] = {
                "id": link.id,
                "role": role,
                "peer_id": peer,
                "instruments": _instruments(role, link.id),
                "bus": bus,
                "simulation": {
                    "enabled": True,
                    "fiber_endpoint": ep.fiber,
                    role: side.model_dump(mode="json"),
                },
            }
            if tx:
                entry["autostart"] = True
                entry["source"] = _source_targets(demo)
                entry["calibration"] = _commissioning(demo)
            if channel is not None and link.satellite is not None:
                entry["passes"] = {
                    "windows": [
                        {"rise_unix_s": r, "set_unix_s": e}
                        for r, e in SatelliteChannel(channel).windows_unix_s()
                    ],
                    "orbit": link.satellite.orbit.model_dump(mode="json"),
                    "time_scale": link.satellite.time_scale,
                }
                entry["sync"] = spec.satellite_sync.model_dump(mode="json", exclude_none=True)
                entry["calibration"] = {
                    **spec.satellite_calibration.model_dump(mode="json", exclude_unset=True),
                    **entry.get("calibration", {}),
                }
                if tx:
                    entry["source"] = _source_targets(demo)
            entries[site].append(entry)

    for site in spec.sites:
        neighbours = sorted(
            {
                link.b if link.a == site else link.a
                for link in spec.links
                if site in (link.a, link.b)
            }
        )
        site_bus: dict[str, Any] = {"allow_plaintext": not curve}
        if curve:
            site_bus["server_secret_key_file"] = str(keys_dir / f"{site}.key")
            site_bus["clients"] = [
                {
                    "name": CLIENT_NAME,
                    "public_key": files.server_public[CLIENT_NAME],
                    "role": "operator",
                },
                *(
                    {"name": n, "public_key": files.server_public[n], "role": "peer"}
                    for n in neighbours
                ),
            ]
        else:
            site_bus["plaintext_role"] = "operator"
        etsi_port = addr.port(f"{site}/etsi")
        local_saes = [s.sae_id for s in spec.saes if s.site == site]
        data: dict[str, Any] = {
            "node": {
                "id": site,
                "state_dir": str((out / "state" / site).resolve()),
                "log_level": spec.run.log_level,
            },
            "bus": site_bus,
            "protocol": spec.protocol.model_dump(mode="json", exclude_none=True),
            "keystore": spec.keystore.model_dump(mode="json", exclude_none=True),
            "network": {
                "sites": list(spec.sites),
                "links": [
                    {"id": link.id, "a": link.a, "b": link.b, "cost": link.cost}
                    for link in spec.links
                ],
                "directory": [{"sae_id": s.sae_id, "site": s.site} for s in spec.saes],
                "delivery": {
                    "enabled": True,
                    "listen_host": addr.mgmt_host(site),
                    "listen_port": etsi_port,
                    "kme_id": site,
                    "tls_cert_file": str(pki / f"kme-{site}.crt"),
                    "tls_key_file": str(pki / f"kme-{site}.key"),
                    "client_ca_file": str(pki / "ca.crt"),
                    "saes": [{"sae_id": s, "certificate_cn": s} for s in local_saes],
                    "pairs": [list(p) for p in spec.pairs],
                },
            },
            "links": entries[site],
        }
        path = out / f"{site}.toml"
        path.write_text(
            f"# Generated by `qkdnode demo --network`: site {site}.\n" + to_toml(data), "utf-8"
        )
        files.configs[site] = path
        files.sites[site] = parse_site(data, str(path))
        files.etsi_urls[site] = f"https://{addr.mgmt_host(site)}:{etsi_port}"
    return files
