"""``[network]``: the key management network a site belongs to (trusted-node relay).

Every site of a network carries the same map (sites, links, where each SAE is) and its
own key manager settings::

    [network]
    sites = ["alpha", "bravo", "charlie"]
    links = [
        { id = "alpha-bravo", a = "alpha", b = "bravo" },
        { id = "bravo-charlie", a = "bravo", b = "charlie" },
    ]
    directory = [                       # which SAE is registered at which site
        { sae_id = "sae-a", site = "alpha" },
        { sae_id = "sae-c", site = "charlie" },
    ]

    [network.delivery]                  # this site's ETSI 014 KME for end-to-end keys
    enabled = true
    listen_port = 9443
    kme_id = "KME-alpha"
    tls_cert_file = "..."  ...          # as [delivery] of a link
    saes = [{ sae_id = "sae-a", certificate_cn = "sae-a" }]
    pairs = [["sae-a", "sae-c"], ["sae-c", "sae-a"]]

The site's own ``[[links]]`` must be links of the map, with the peer the map names.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from qkdnode.config.sections import DeliverySection, Section

_NAME = r"^[A-Za-z0-9_.-]+$"


class NetworkLink(Section):
    id: str = Field(min_length=1, max_length=64, pattern=_NAME)
    a: str = Field(min_length=1, max_length=64, pattern=_NAME)
    b: str = Field(min_length=1, max_length=64, pattern=_NAME)
    cost: float = Field(
        1.0, gt=0, le=1000, description="routing cost of a hop over this link (a backup: more)"
    )


class SaeLocation(Section):
    sae_id: str = Field(min_length=1, max_length=256)
    site: str = Field(min_length=1, max_length=64, pattern=_NAME)


class NetworkDeliverySection(DeliverySection):
    """``[network.delivery]``: a link's ``[delivery]`` for end-to-end keys. ``saes`` are
    the SAEs registered at this site (by certificate); ``pairs`` may name SAEs anywhere in
    the network (the directory says where)."""

    pairs_listed_here: ClassVar[bool] = False


class NetworkSection(Section):
    """The network map and this site's key manager (docs/network.md)."""

    enabled: bool = True
    sites: list[str] = Field(min_length=2, max_length=256)
    links: list[NetworkLink] = Field(min_length=1, max_length=1024)
    directory: list[SaeLocation] = Field(default_factory=list)
    delivery: NetworkDeliverySection = Field(default_factory=NetworkDeliverySection)
    store_path: Path = Field(
        Path("network.sqlite"), description="end-to-end key store, relative to node.state_dir"
    )
    key_ttl_s: float = Field(3600.0, gt=0, description="time to live of a relayed key")
    key_size_bits: int = Field(
        256,
        ge=8,
        le=65536,
        multiple_of=8,
        description="size of an end-to-end key when enc_keys names none (ETSI key_size)",
    )
    reserve_auth_bits: int = Field(
        16384,
        ge=0,
        description="key of each link relays leave for the tags of the relay messages",
    )
    reserve_local_bits: int = Field(
        0,
        ge=0,
        description="key of each link relays leave for the link's own ETSI 014 pairs",
    )
    relay_timeout_s: float = Field(
        10.0, gt=0, le=300, description="how long enc_keys tries to relay (all paths)"
    )
    hop_timeout_s: float = Field(
        1.5,
        gt=0,
        le=60,
        description="a relay may take this long per hop still to go before the hop that "
        "sent it gives up (then another path is tried)",
    )
    hop_margin_s: float = Field(
        0.5, gt=0, le=10, description="each hop answers this much before its caller gives up"
    )
    max_hops: int = Field(8, ge=1, le=16)
    advert_interval_s: float = Field(1.0, gt=0, le=60)
    advert_ttl_s: float = Field(
        4.0, gt=0, le=600, description="a site unheard of for this long has its links down"
    )
    avoid_failed_s: float = Field(
        10.0, ge=0, le=600, description="a link a relay could not cross is avoided this long"
    )
    unreachable_alarm_s: float = Field(
        30.0,
        gt=0,
        le=86400,
        description="network_unreachable: raised when a site has had no route this long",
    )
    status_interval_s: float = Field(
        5.0, gt=0, le=600, description="period of the network status on telemetry"
    )

    @model_validator(mode="after")
    def _consistent(self) -> NetworkSection:
        problems: list[str] = []
        sites = set(self.sites)
        if len(sites) != len(self.sites):
            problems.append("sites: a site is named twice")
        seen: set[str] = set()
        for i, link in enumerate(self.links):
            if link.id in seen:
                problems.append(f"links[{i}].id: link {link.id!r} is named twice")
            seen.add(link.id)
            for end in ("a", "b"):
                if getattr(link, end) not in sites:
                    problems.append(
                        f"links[{i}].{end}: site {getattr(link, end)!r} is not in sites"
                    )
            if link.a == link.b:
                problems.append(f"links[{i}]: a link joins two different sites")
        located: set[str] = set()
        for i, loc in enumerate(self.directory):
            if loc.site not in sites:
                problems.append(f"directory[{i}].site: site {loc.site!r} is not in sites")
            if loc.sae_id in located:
                problems.append(f"directory[{i}].sae_id: SAE {loc.sae_id!r} is placed twice")
            located.add(loc.sae_id)
        for i, (master, slave) in enumerate(self.delivery.pairs):
            for what, sae in (("master", master), ("slave", slave)):
                if sae not in located:
                    problems.append(
                        f"delivery.pairs[{i}]: {what} SAE {sae!r} is not in the directory"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def site_of(self, sae_id: str) -> str | None:
        for loc in self.directory:
            if loc.sae_id == sae_id:
                return loc.site
        return None
