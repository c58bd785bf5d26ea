"""What a site knows of the network, as plain data (no key material).

:func:`network_view` reads the key manager: every link of the map with what its two
ends last advertised, this site's links with their local state and key accounting, the
routes it would take now, its SAEs and what they consumed, and the relay counters. The
ETSI GS QKD 015 shape (:mod:`qkdnode.kms.status015`), ``qkdnode ctl network`` and the
telemetry topic ``network`` are all made from it.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from qkdnode.kms import hopauth
from qkdnode.kms.manager import TAGS_PER_HOP, KeyManager


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class LinkEnd(_View):
    site: str
    heard: bool  # a fresh advert of this site names the link
    up: bool
    level_bits: int
    rate_bps: float


class LinkView(_View):
    """One link of the map; ``usable`` when both ends call it up."""

    link_id: str
    a: LinkEnd
    b: LinkEnd
    usable: bool
    avoided: bool  # a relay just failed to cross it


class LocalLinkView(_View):
    """One link of this site, with the key its key manager consumed of it (bits)."""

    link_id: str
    peer: str
    state: str
    usable: bool
    level_bits: int  # what relays may draw here (as advertised): held less the reserves
    held_bits: int  # all available key of this site's side of the link
    rate_bps: float
    relay_out_bits: int
    relay_in_bits: int
    auth_out_bits: int
    auth_in_bits: int
    tags_refused: int


class RouteView(_View):
    destination: str
    path: list[str]
    links: list[str]


class SaeView(_View):
    sae_id: str
    site: str
    local: bool
    consumed_bits: int  # end-to-end key issued to it as master (at this site)


class RelayCounters(_View):
    originated: int
    stored: int
    failed: int
    rerouted: int
    forwarded: int
    landed: int
    cancels_sent: int
    relayed_bits: int
    last_reroute_s: float | None
    median_hop_ms: float | None
    store: dict[str, int]
    bits_by_link: dict[str, int]  # end-to-end key originated here, by link crossed


class NetworkView(_View):
    site: str
    at_unix_s: float
    sites: list[str]
    sites_heard: list[str]
    links: list[LinkView]
    local_links: list[LocalLinkView]
    routes: list[RouteView]
    saes: list[SaeView]
    relays: RelayCounters


def network_view(kms: KeyManager) -> NetworkView:
    """The site's view now (reads the stores: call it in a worker thread)."""
    adverts = kms.fresh_adverts()
    avoided = kms.avoided_links()
    said = {(site, link.link_id): link for site, adv in adverts.items() for link in adv.links}

    def end(site: str, link_id: str) -> LinkEnd:
        link = said.get((site, link_id))
        if link is None:
            return LinkEnd(site=site, heard=False, up=False, level_bits=0, rate_bps=0.0)
        return LinkEnd(
            site=site,
            heard=True,
            up=link.up,
            level_bits=link.level_bits,
            rate_bps=float(link.rate_bps),
        )

    links = []
    for entry in kms.cfg.links:
        a, b = end(entry.a, entry.id), end(entry.b, entry.id)
        links.append(
            LinkView(
                link_id=entry.id,
                a=a,
                b=b,
                usable=a.up and b.up,
                avoided=entry.id in avoided,
            )
        )
    local = []
    for hop in kms.hops.values():
        store = hop.port.store()
        acc = hop.account
        held = store.available_bits() if store is not None else 0
        local.append(
            LocalLinkView(
                link_id=hop.link_id,
                peer=hop.peer,
                state=hop.port.state(),
                usable=hop.port.usable(),
                level_bits=max(0, held - kms.reserve_bits),
                held_bits=held,
                rate_bps=hop.port.rate_bps(),
                relay_out_bits=acc.relay_out,
                relay_in_bits=acc.relay_in,
                auth_out_bits=acc.auth_out,
                auth_in_bits=acc.auth_in,
                tags_refused=acc.tags_refused,
            )
        )
    routes = []
    need = TAGS_PER_HOP * hopauth.TAG_KEY_BITS
    for dest in kms.cfg.sites:
        if dest == kms.me:
            continue
        route = kms.route_to(dest, need)
        if route is not None:
            routes.append(
                RouteView(destination=dest, path=list(route.sites), links=list(route.links))
            )
    consumed = kms.store.consumed_bits_by_master()
    saes = [
        SaeView(
            sae_id=loc.sae_id,
            site=loc.site,
            local=loc.site == kms.me,
            consumed_bits=consumed.get(loc.sae_id, 0),
        )
        for loc in kms.cfg.directory
    ]
    st = kms.stats
    hops = sorted(st.hop_seconds)  # sorted() copies the list whole under the GIL
    return NetworkView(
        site=kms.me,
        at_unix_s=time.time(),
        sites=list(kms.cfg.sites),
        sites_heard=sorted(adverts),
        links=links,
        local_links=local,
        routes=routes,
        saes=saes,
        relays=RelayCounters(
            originated=st.originated,
            stored=st.stored,
            failed=st.failed,
            rerouted=st.rerouted,
            forwarded=st.forwarded,
            landed=st.landed,
            cancels_sent=st.cancels_sent,
            relayed_bits=st.relayed_bits,
            last_reroute_s=st.last_reroute_s,
            median_hop_ms=1000 * hops[len(hops) // 2] if hops else None,
            store=kms.store.counts(),
            bits_by_link=dict(st.bits_by_link),  # copied whole under the GIL
        ),
    )
