"""The site's key manager: relays end-to-end keys across trusted nodes.

One :class:`KeyManager` per site sees every link of the site (:class:`LinkPort`), talks
to the key managers of its neighbours over each link (:class:`HopChannel`), floods
link-state adverts and relays keys (docs/network.md):

* **Origin** (:meth:`issue`, ETSI enc_keys at this site for a slave registered at
  another site): pick the cheapest path whose every link holds the key
  (:mod:`qkdnode.kms.routing`); take the keys from the first link's store (they *are*
  that link's key: no pad on the first hop), send them on with a tag, and wait for the
  destination's tagged "stored". Only then do the keys go to the master. Any other
  outcome: the keys are forgotten here, a ``cancel`` goes after them, and the next path
  (avoiding the link that failed) is tried with new keys until ``relay_timeout_s``.
* **Hop**: check the tag, read the keys (the named stored keys, or ciphertext XOR the
  named pad), draw as much fresh key of the next link as one-time pad, send on, and hand
  the downstream answer back (tagged again on this link).
* **Destination**: store the keys for the master and slaves (durable) before answering.

A relayed L-bit key costs exactly L bits of every link it crosses (whole stored keys:
rounded up to the link's stored key size per message) plus two 256-bit tag keys per hop
(request and the successful reply). The counts are kept per link (:class:`LinkAccount`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import BaseModel

from qkdnode.config.network import NetworkSection
from qkdnode.keystore.errors import KeyRequestError, KeyStoreError, KeysUnavailableError
from qkdnode.keystore.models import DeliveredKey, EraseReason
from qkdnode.keystore.store import KeyStore
from qkdnode.kms import hopauth
from qkdnode.kms.hops import HopChannel, HopError
from qkdnode.kms.netstore import LandedKey, NetworkKeyStore
from qkdnode.kms.ports import LinkPort
from qkdnode.kms.routing import Edge, Graph, Route, shortest_route
from qkdnode.kms.wire import (
    MAX_PARTS,
    Advert,
    AdvertisedLink,
    CancelRequest,
    CancelResult,
    KmsRequest,
    RelayedKey,
    RelayRequest,
    RelayResult,
)

log = structlog.get_logger(__name__)

#: tags per hop of a successful relay (request, reply)
TAGS_PER_HOP = 2
#: seconds a cancel may take per hop
CANCEL_TIMEOUT_S = 2.0
#: keys whose relay is remembered for a later cancel
ISSUED_REMEMBERED = 10_000
#: paths one enc_keys request tries at most (each failed attempt may have spent key)
MAX_ATTEMPTS = 4


class RelayFailed(KeysUnavailableError):
    """No path delivered the keys in time (ETSI 014: 503)."""


@dataclass
class SiteView:
    """The last advert heard from a site, and when (monotonic seconds)."""

    advert: Advert
    heard_at: float


@dataclass
class RelayStats:
    """What this site's relays did (counts; no key material)."""

    originated: int = 0
    stored: int = 0
    failed: int = 0
    rerouted: int = 0
    forwarded: int = 0
    landed: int = 0
    cancels_sent: int = 0
    relayed_bits: int = 0
    last_reroute_s: float | None = None
    hop_seconds: list[float] = field(default_factory=list)
    #: bits of end-to-end key this site originated and had stored, by link crossed
    bits_by_link: dict[str, int] = field(default_factory=dict)


class KeyManager:
    """The key manager of site ``me`` over its links ``ports``."""

    def __init__(
        self,
        me: str,
        cfg: NetworkSection,
        ports: Sequence[LinkPort],
        store: NetworkKeyStore,
    ) -> None:
        self.me = me
        self.cfg = cfg
        self.store = store
        self.hops: dict[str, HopChannel] = {
            p.link_id: HopChannel(me, p, self._serve, self._heard) for p in ports
        }
        self.views: dict[str, SiteView] = {}
        self.stats = RelayStats()
        self._seq = time.time_ns() // 1_000_000
        self._avoid: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: the relays of recently issued keys (key ID -> relay ID, route), to cancel them
        #: should their master never get them
        self._issued: OrderedDict[uuid.UUID, tuple[uuid.UUID, Route]] = OrderedDict()
        #: links an operator took out of the key management network at this site
        #: (ETSI 015 ``qkdl_enable`` false): advertised down, never used for a relay
        self.disabled: set[str] = set()

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._spawn(self._advertise_loop(), "kms-adverts")
        self._spawn(self._expire_loop(), "kms-expiry")
        log.info("kms.started", site=self.me, links=sorted(self.hops))

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for hop in self.hops.values():
            await hop.close()
        self.store.close()
        log.info("kms.stopped", site=self.me)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` in the background until it ends or the manager stops."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- adverts and the graph ---------------------------------------------------------------

    def own_advert(self) -> Advert:
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        links = []
        for hop in self.hops.values():
            store = hop.port.store()
            held = store.available_bits() if store is not None else 0
            level = max(0, held - self.reserve_bits)  # what relays may draw
            links.append(
                AdvertisedLink(
                    link_id=hop.link_id,
                    peer=hop.peer,
                    up=self.link_up(hop),
                    level_bits=level,
                    rate_bps=max(0.0, hop.port.rate_bps()),
                )
            )
        return Advert(origin=self.me, seq=self._seq, links=links)

    @property
    def reserve_bits(self) -> int:
        """Key of each link a relay leaves behind: for tags, and for the link's own
        ETSI 014 pairs."""
        return self.cfg.reserve_auth_bits + self.cfg.reserve_local_bits

    def link_up(self, hop: HopChannel) -> bool:
        """The link carries relays from this site: usable and not disabled here."""
        return hop.link_id not in self.disabled and hop.port.usable()

    async def set_enabled(self, link_id: str, enabled: bool) -> None:
        """Take a link of this site out of the key management network, or back in; the
        change is advertised at once. KeyError if the site has no such link."""
        if link_id not in self.hops:
            raise KeyError(link_id)
        if enabled:
            self.disabled.discard(link_id)
        else:
            self.disabled.add(link_id)
        log.info("kms.link_enabled" if enabled else "kms.link_disabled", link=link_id)
        advert = await asyncio.to_thread(self.own_advert)
        self.views[self.me] = SiteView(advert, time.monotonic())
        await self._flood(advert, None)

    async def _advertise_loop(self) -> None:
        while True:
            try:
                advert = await asyncio.to_thread(self.own_advert)
                self.views[self.me] = SiteView(advert, time.monotonic())
                await self._flood(advert, None)
            except Exception as exc:
                log.warning("kms.advert_failed", error=str(exc)[:200])
            await asyncio.sleep(self.cfg.advert_interval_s)

    async def _flood(self, advert: Advert, came_from: str | None) -> None:
        for hop in self.hops.values():
            if hop.link_id == came_from or not hop.port.usable():
                continue
            with contextlib.suppress(Exception):
                await hop.advertise(advert)

    def _heard(self, hop: HopChannel, advert: Advert) -> None:
        if advert.origin == self.me or advert.origin not in self.cfg.sites:
            return
        known = self.views.get(advert.origin)
        fresh = known is not None and time.monotonic() - known.heard_at <= self.cfg.advert_ttl_s
        if known is not None and fresh and known.advert.seq >= advert.seq:
            return  # seen already (or older); a site whose clock stepped back is heard
            # again once its last advert has aged out
        self.views[advert.origin] = SiteView(advert, time.monotonic())
        self._spawn(self._flood(advert, hop.link_id), "kms-flood")

    def fresh_adverts(self) -> dict[str, Advert]:
        """The adverts heard within ``advert_ttl_s``. Safe from a worker thread: it reads
        a snapshot (``list`` of a dict's items is taken whole under the GIL)."""
        now = time.monotonic()
        return {
            site: v.advert
            for site, v in list(self.views.items())
            if now - v.heard_at <= self.cfg.advert_ttl_s
        }

    def graph(self) -> Graph:
        """Edges X -> Y for every link both ends' fresh adverts call up; the map's links
        only (an advert cannot invent a link)."""
        adverts = self.fresh_adverts()
        known = {link.id: {link.a, link.b} for link in self.cfg.links}
        cost = {link.id: link.cost for link in self.cfg.links}
        said: dict[tuple[str, str], AdvertisedLink] = {}
        for site, adv in adverts.items():
            for link in adv.links:
                if known.get(link.link_id) == {site, link.peer}:
                    said[(site, link.link_id)] = link
        g = Graph(sites=set(self.cfg.sites))
        for (site, link_id), link in said.items():
            other = said.get((link.peer, link_id))
            if link.up and other is not None and other.up:
                g.add(
                    Edge(
                        site,
                        link.peer,
                        link_id,
                        link.level_bits,
                        float(link.rate_bps),
                        cost[link_id],
                    )
                )
        return g

    def avoided_links(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(link for link, until in list(self._avoid.items()) if until > now)

    # -- origin ---------------------------------------------------------------------------------

    def destination_of(self, slaves: Sequence[str]) -> str:
        sites = {self.cfg.site_of(s) for s in slaves}
        if None in sites:
            raise KeyRequestError("a slave SAE is not in the network directory")
        if len(sites) != 1:
            raise KeyRequestError("all slave SAEs of one request must be at the same site")
        site = sites.pop()
        assert site is not None
        if site == self.me:
            raise KeyRequestError(
                f"slave SAE is at this site ({self.me}): no relay is needed or made"
            )
        return site

    def route_to(self, dest: str, bits: int) -> Route | None:
        need = bits + TAGS_PER_HOP * hopauth.TAG_KEY_BITS
        return shortest_route(
            self.graph(),
            self.me,
            dest,
            need_bits=need,
            avoid=self.avoided_links(),
            max_hops=self.cfg.max_hops,
        )

    def unreachable_sites(self) -> list[str]:
        """The sites of the map no relay could reach now (not even an empty one)."""
        return [
            site for site in self.cfg.sites if site != self.me and self.route_to(site, 0) is None
        ]

    def capacity_keys(self, dest: str, size_bits: int) -> int:
        """How many keys of ``size_bits`` one relay to ``dest`` could carry now (the
        least level along the route, less the tags)."""
        route = self.route_to(dest, size_bits)
        if route is None:
            return 0
        g = self.graph()
        levels = [
            e.level_bits
            for a, b in zip(route.sites, route.sites[1:], strict=False)
            if (e := g.edge(a, b)) is not None
        ]
        spare = min(levels, default=0) - TAGS_PER_HOP * hopauth.TAG_KEY_BITS
        return max(0, spare // size_bits)

    async def issue(
        self, master: str, slaves: Sequence[str], number: int, size_bits: int
    ) -> list[DeliveredKey]:
        """End-to-end keys for ``master`` and ``slaves`` (at one other site), returned
        only once their site stored them. Raises ``KeyRequestError`` (400) or
        ``RelayFailed``/``KeysUnavailableError`` (503)."""
        if size_bits <= 0 or size_bits % 8 or number <= 0:
            raise KeyRequestError("number and size must be positive, size a multiple of 8")
        dest = self.destination_of(slaves)
        bits = number * size_bits
        deadline = time.monotonic() + self.cfg.relay_timeout_s
        self.stats.originated += 1
        failures: list[str] = []
        first_failure_at: float | None = None
        while True:
            route = self.route_to(dest, bits)
            if route is None:
                self.stats.failed += 1
                why = "; ".join(failures[-3:]) or "no link is up with enough key on every hop"
                raise RelayFailed(f"no path to site {dest} can carry {bits} bits now ({why})")
            budget = deadline - time.monotonic()
            if budget <= 0 or len(failures) >= MAX_ATTEMPTS:
                self.stats.failed += 1
                raise RelayFailed(
                    f"relay to site {dest} failed on {len(failures)} paths in "
                    f"{self.cfg.relay_timeout_s - budget:.1f} s ({'; '.join(failures[-3:])})"
                )
            try:
                keys = await self._originate(
                    route,
                    master=master,
                    slaves=slaves,
                    number=number,
                    size_bits=size_bits,
                    budget_s=budget,
                )
            except HopError as exc:
                failures.append(f"{exc.failure}: {exc}")
                if first_failure_at is None:
                    first_failure_at = time.monotonic()
                continue
            if first_failure_at is not None:
                self.stats.rerouted += 1
                self.stats.last_reroute_s = time.monotonic() - first_failure_at
            self.stats.stored += 1
            self.stats.relayed_bits += bits
            return keys

    async def _originate(
        self,
        route: Route,
        *,
        master: str,
        slaves: Sequence[str],
        number: int,
        size_bits: int,
        budget_s: float,
    ) -> list[DeliveredKey]:
        hop = self.hops[route.links[0]]
        store = hop.port.store()
        if store is None:
            self._fail_link(route.links[0])
            raise HopError("no_key", f"link {route.links[0]}: key store not open")
        bits = number * size_bits
        relay_id = uuid.uuid4()
        try:
            parts = await self._draw(store, bits)
        except KeyStoreError as exc:
            self._fail_link(route.links[0])
            raise HopError("no_key", f"link {route.links[0]}: {exc}") from None
        material = b"".join(k for _, k in parts)
        hop.account.relay_out += len(material) * 8
        # a relay that stalls on a hop fails in time for another path to be tried
        budget_s = min(budget_s, self.cfg.hop_timeout_s * route.hops)
        key_ids = [uuid.uuid4() for _ in range(number)]
        size = size_bits // 8
        delivered = [
            DeliveredKey(kid, size_bits, material[i * size : (i + 1) * size])
            for i, kid in enumerate(key_ids)
        ]
        req = RelayRequest(
            relay_id=relay_id,
            origin=self.me,
            destination=route.sites[-1],
            path=list(route.sites),
            hop=1,
            master=master,
            slaves=list(slaves),
            mode="key",
            keys=[RelayedKey(key_ID=k, size_bits=size_bits) for k in key_ids],
            parts=[kid for kid, _ in parts],
            budget_s=round(max(budget_s - self.cfg.hop_margin_s, 0.1), 3),
        )
        t0 = time.monotonic()
        outcome = "failed"
        try:
            result = await self._ask(hop, req, [], budget_s)
            if result.stored:
                outcome = "stored"
                for link_id in route.links:
                    self.stats.bits_by_link[link_id] = (
                        self.stats.bits_by_link.get(link_id, 0) + bits
                    )
                for kid in key_ids:
                    self._issued[kid] = (relay_id, route)
                while len(self._issued) > ISSUED_REMEMBERED:
                    self._issued.popitem(last=False)
                self.stats.hop_seconds.append((time.monotonic() - t0) / route.hops)
                del self.stats.hop_seconds[:-1000]
                log.info(
                    "kms.relayed",
                    relay_id=str(relay_id),
                    destination=route.sites[-1],
                    path=list(route.sites),
                    keys=number,
                    bits=bits,
                    seconds=round(time.monotonic() - t0, 4),
                )
                return delivered
            failed_link = result.failed_link or route.links[0]
            self._fail_link(failed_link)
            raise HopError(result.failure or "refused", result.message or "relay refused")
        finally:
            if outcome != "stored":
                # the keys are forgotten here; the destination may hold them (a lost
                # "stored"): cancel them there, and no master ever sees their IDs
                del delivered, material
                self._spawn_cancel(relay_id, route, key_ids)
            await self._record(
                relay_id,
                role="origin",
                peer_site=route.sites[-1],
                master=master,
                keys=number,
                bits=bits,
                path=route.sites,
                outcome=outcome,
            )

    async def _draw(self, store: KeyStore, bits: int) -> list[tuple[uuid.UUID, bytes]]:
        """Draw and erase ``bits`` of this site's side of a link for a relay, above the
        reserves; ``KeyStoreError`` when the link holds too little."""
        return await asyncio.to_thread(
            store.consume_own,
            bits,
            EraseReason.RELAYED,
            max_parts=MAX_PARTS,
            keep_bits=self.reserve_bits,
        )

    async def _record(self, relay_id: uuid.UUID, **fields: Any) -> None:
        """Record a relay's outcome; a record the disk refuses is logged, never fatal
        (the relay's keys are already where they belong)."""
        try:
            await asyncio.to_thread(self.store.record_relay, relay_id, **fields)
        except Exception as exc:
            log.error("kms.record_failed", relay_id=str(relay_id), error=str(exc)[:200])

    async def _ask(
        self, hop: HopChannel, req: RelayRequest, buffers: list[bytes], budget_s: float
    ) -> RelayResult:
        """Send a relay request on ``hop``; the downstream result, believed only with a
        good tag when it says "stored". A hop that fails is named in the result."""
        try:
            reply = await hop.request(req, buffers, budget_s)
        except HopError as exc:
            self._fail_link(hop.link_id)
            return RelayResult(
                relay_id=req.relay_id,
                stored=False,
                failure=exc.failure,
                failed_link=hop.link_id,
                message=str(exc)[:512],
            )
        body = reply.model.body
        if not isinstance(body, RelayResult):
            return RelayResult(
                relay_id=req.relay_id,
                stored=False,
                failure="refused",
                failed_link=hop.link_id,
                message=f"site {hop.peer}: {reply.model.error or 'no result'}"[:512],
            )
        if body.stored and not await hop.verified(reply):
            return RelayResult(
                relay_id=body.relay_id,
                stored=False,
                failure="refused",
                failed_link=hop.link_id,
                message=f"site {hop.peer}: the reply's tag does not verify",
            )
        return body

    def _fail_link(self, link_id: str) -> None:
        if self.cfg.avoid_failed_s > 0:
            self._avoid[link_id] = time.monotonic() + self.cfg.avoid_failed_s

    # -- hop and destination ------------------------------------------------------------------

    async def _serve(
        self, hop: HopChannel, req: KmsRequest, buffers: list[bytes]
    ) -> tuple[BaseModel, list[bytes]]:
        body = req.body
        if body.hop >= len(body.path) or body.path[body.hop] != self.me:
            raise HopError("refused", f"this is site {self.me}, not hop {body.hop} of the path")
        if body.path[body.hop - 1] != hop.peer:
            raise HopError("refused", f"hop {body.hop - 1} of the path is not site {hop.peer}")
        if body.path[-1] != body.destination or body.path[0] != body.origin:
            raise HopError("refused", "path does not run from origin to destination")
        if isinstance(body, CancelRequest):
            return await self._serve_cancel(body), []
        return await self._serve_relay(hop, body, buffers), []

    async def _serve_relay(
        self, hop: HopChannel, req: RelayRequest, buffers: list[bytes]
    ) -> RelayResult:
        if hop.link_id in self.disabled:
            raise HopError("link_down", f"link {hop.link_id} is disabled at site {self.me}")
        store = hop.port.store()
        bits = sum(k.size_bits for k in req.keys)
        nbytes = bits // 8
        if len(set(req.path)) != len(req.path):
            raise HopError("refused", "a site appears twice in the path")
        if req.mode == "otp" and (len(buffers) != 1 or len(buffers[0]) != nbytes):
            raise HopError("refused", f"mode otp needs one buffer of {nbytes} bytes")
        if store is None:
            raise HopError("no_key", f"link {hop.link_id}: key store not open")
        try:
            material = await asyncio.to_thread(store.consume_named, req.parts, EraseReason.RELAYED)
        except KeyStoreError as exc:
            raise HopError("refused", f"link {hop.link_id}: {exc}") from None
        hop.account.relay_in += len(material) * 8
        if len(material) < nbytes:
            raise HopError("refused", f"the named keys hold {len(material)} bytes, not {nbytes}")
        plain = (
            material[:nbytes] if req.mode == "key" else hopauth.xor(buffers[0], material[:nbytes])
        )
        del material
        if req.destination == self.me:
            return await self._land(req, plain)
        return await self._forward(req, plain)

    async def _land(self, req: RelayRequest, plain: bytes) -> RelayResult:
        elsewhere = [s for s in req.slaves if self.cfg.site_of(s) != self.me]
        if elsewhere:
            return RelayResult(
                relay_id=req.relay_id,
                stored=False,
                failure="refused",
                message=f"slave SAE {elsewhere[0]!r} is not registered at site {self.me}",
            )
        keys = []
        at = 0
        for k in req.keys:
            n = k.size_bits // 8
            keys.append(LandedKey(k.key_ID, k.size_bits, plain[at : at + n]))
            at += n
        try:
            await asyncio.to_thread(
                self.store.land,
                req.relay_id,
                origin=req.origin,
                master=req.master,
                slaves=req.slaves,
                keys=keys,
                ttl_s=self.cfg.key_ttl_s,
            )
        except KeyStoreError as exc:
            log.error("kms.land_failed", relay_id=str(req.relay_id), error=str(exc)[:200])
            return RelayResult(
                relay_id=req.relay_id, stored=False, failure="store_failed", message=str(exc)
            )
        self.stats.landed += 1
        log.info(
            "kms.landed",
            relay_id=str(req.relay_id),
            origin=req.origin,
            keys=len(keys),
            bits=len(plain) * 8,
        )
        await self._record(
            req.relay_id,
            role="destination",
            peer_site=req.origin,
            master=req.master,
            keys=len(keys),
            bits=len(plain) * 8,
            path=req.path,
            outcome="stored",
        )
        return RelayResult(relay_id=req.relay_id, stored=True)

    def _next_hop(self, site: str) -> HopChannel | None:
        for hop in self.hops.values():
            if hop.peer == site and self.link_up(hop):
                return hop
        for hop in self.hops.values():
            if hop.peer == site and hop.link_id not in self.disabled:
                return hop
        return None

    async def _forward(self, req: RelayRequest, plain: bytes) -> RelayResult:
        t0 = time.monotonic()
        nxt_site = req.path[req.hop + 1]
        hop = self._next_hop(nxt_site)
        if hop is None:
            return RelayResult(
                relay_id=req.relay_id,
                stored=False,
                failure="link_down",
                message=f"site {self.me} has no link to {nxt_site}",
            )
        store = hop.port.store()
        try:
            if store is None:
                raise KeysUnavailableError("key store not open")
            pad = await self._draw(store, len(plain) * 8)
        except KeyStoreError as exc:
            self._fail_link(hop.link_id)
            return RelayResult(
                relay_id=req.relay_id,
                stored=False,
                failure="no_key",
                failed_link=hop.link_id,
                message=f"link {hop.link_id}: {exc}"[:512],
            )
        pad_bytes = b"".join(k for _, k in pad)
        hop.account.relay_out += len(pad_bytes) * 8
        cipher = hopauth.xor(plain, pad_bytes[: len(plain)])
        del pad_bytes, plain
        hops_left = len(req.path) - 1 - req.hop
        budget = min(
            float(req.budget_s) - (time.monotonic() - t0), self.cfg.hop_timeout_s * hops_left
        )
        nxt = req.model_copy(
            update={
                "hop": req.hop + 1,
                "mode": "otp",
                "parts": [kid for kid, _ in pad],
                "budget_s": round(max(budget - self.cfg.hop_margin_s, 0.1), 3),
            }
        )
        self.stats.forwarded += 1
        result = await self._ask(hop, nxt, [cipher], max(budget, 0.1))
        await self._record(
            req.relay_id,
            role="hop",
            peer_site=req.destination,
            master=req.master,
            keys=len(req.keys),
            bits=len(cipher) * 8,
            path=req.path,
            outcome="stored" if result.stored else "failed",
        )
        return result

    # -- cancel ---------------------------------------------------------------------------------

    def cancel_issued(self, key_ids: Sequence[uuid.UUID]) -> None:
        """Cancel keys whose relay succeeded but whose master never got them (the
        request went away): the destination erases them."""
        by_relay: dict[uuid.UUID, tuple[Route, list[uuid.UUID]]] = {}
        for kid in key_ids:
            known = self._issued.pop(kid, None)
            if known is not None:
                by_relay.setdefault(known[0], (known[1], []))[1].append(kid)
        for relay_id, (route, ids) in by_relay.items():
            log.info("kms.issue_abandoned", relay_id=str(relay_id), keys=len(ids))
            self._spawn_cancel(relay_id, route, ids)

    def _spawn_cancel(self, relay_id: uuid.UUID, route: Route, key_ids: list[uuid.UUID]) -> None:
        req = CancelRequest(
            relay_id=relay_id,
            origin=self.me,
            destination=route.sites[-1],
            path=list(route.sites),
            hop=1,
            key_IDs=key_ids,
        )
        self.stats.cancels_sent += 1
        self._spawn(self._send_cancel(req), "kms-cancel")

    async def _send_cancel(self, req: CancelRequest) -> None:
        hop = self._next_hop(req.path[req.hop])
        if hop is None:
            return
        with contextlib.suppress(HopError):
            await hop.request(req, [], CANCEL_TIMEOUT_S, tagged=False)

    async def _serve_cancel(self, req: CancelRequest) -> CancelResult:
        if req.destination == self.me:
            n = await asyncio.to_thread(self.store.cancel, req.relay_id, req.key_IDs)
            log.info("kms.cancelled", relay_id=str(req.relay_id), erased=n)
            return CancelResult(relay_id=req.relay_id, erased=n)
        nxt = req.model_copy(update={"hop": req.hop + 1})
        await self._send_cancel(nxt)
        return CancelResult(relay_id=req.relay_id, erased=0)

    # -- upkeep ---------------------------------------------------------------------------------

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            try:
                n = await asyncio.to_thread(self.store.erase_expired)
                if n:
                    log.info("kms.expired", keys=n)
            except Exception as exc:
                log.warning("kms.expiry_failed", error=str(exc)[:200])

    # -- ETSI delivery at this site -------------------------------------------------------------

    async def claim(
        self, master: str, slave: str, key_ids: Sequence[uuid.UUID]
    ) -> list[DeliveredKey]:
        claimed = await asyncio.to_thread(self.store.claim, master, slave, key_ids)
        return claimed.keys
