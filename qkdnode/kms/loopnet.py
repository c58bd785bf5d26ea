"""Key managers of several sites in one process, over real peer channels (ZeroMQ on
loopback) and real key stores (SQLite), the links' keys put in by hand: the relay without
the photons, for the benchmark (:mod:`qkdnode.kms.bench`) and the tests.

Each link is a transmitter/receiver pair of :class:`PeerChannel` (plaintext: loopback
only) and a pair of :class:`KeyStore` holding the same blocks (what the link's
post-processing would have stored, :meth:`LoopNet.fill`). :class:`ChannelPort` is a
:class:`qkdnode.kms.ports.LinkPort` over them; a link may be cut (:meth:`Link.cut`: its
channels stop). Never used by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from qkdnode.bus.commands import CommandSpec
from qkdnode.bus.errors import PeerDisconnected, PeerTimeout
from qkdnode.bus.peer import PeerChannel
from qkdnode.config.network import NetworkDeliverySection, NetworkSection
from qkdnode.config.sections import BusSection
from qkdnode.keystore.models import Provenance, Side
from qkdnode.keystore.store import KeyStore
from qkdnode.kms.manager import KeyManager
from qkdnode.kms.netstore import NetworkKeyStore
from qkdnode.kms.ports import LostSink, MessageSink
from qkdnode.kms.service import NetworkService

PROV = Provenance(qber=0.02, eps_sec=1e-10, eps_cor=1e-15)
KEY_SIZE_BITS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChannelPort:
    """A link end: a started :class:`PeerChannel` and the link's store on this side."""

    def __init__(
        self, link_id: str, peer_site: str, channel: PeerChannel, store: KeyStore, role: str
    ):
        self.role = role
        #: what a site service added to this link's control socket, and published on it
        self.commands: dict[str, CommandSpec] = {}
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.alarms: dict[str, str] = {}
        self._link_id = link_id
        self._peer_site = peer_site
        self.channel = channel
        self._store = store
        self.in_step = True
        self.rate = 1000.0
        self._sink: MessageSink | None = None
        self._lost: LostSink | None = None
        self._reader = asyncio.create_task(self._read())

    @property
    def link_id(self) -> str:
        return self._link_id

    @property
    def peer_site(self) -> str:
        return self._peer_site

    def store(self) -> KeyStore | None:
        return self._store

    def usable(self) -> bool:
        return self.channel.connected and self.in_step

    def rate_bps(self) -> float:
        return self.rate

    def state(self) -> str:
        return "EXCHANGING" if self.usable() else "PAUSED"

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[bytes]) -> None:
        await self.channel.send(kind, header, list(buffers))

    def add_command(self, spec: CommandSpec) -> None:
        self.commands[spec.name] = spec

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.published.append((topic, payload))

    def set_alarm(self, name: str, on: bool, cause: str = "") -> None:
        if on:
            self.alarms[name] = cause
        else:
            self.alarms.pop(name, None)

    def attach(self, on_message: MessageSink, on_lost: LostSink) -> None:
        self._sink, self._lost = on_message, on_lost

    async def _read(self) -> None:
        while True:
            try:
                msg = await self.channel.recv(1.0)
            except PeerTimeout:
                continue
            except PeerDisconnected as exc:
                if self._lost is not None:
                    self._lost(str(exc))
                continue
            if msg.kind.startswith("kms.") and self._sink is not None:
                self._sink(msg.kind, msg.header, msg.buffers)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.channel.stop()


@dataclass
class Link:
    id: str
    a: str
    b: str
    port_a: ChannelPort
    port_b: ChannelPort

    def ports(self) -> tuple[ChannelPort, ChannelPort]:
        return self.port_a, self.port_b

    async def cut(self) -> None:
        """The classical channel stops (both ends' channels close)."""
        for p in self.ports():
            p.in_step = False
            await p.channel.stop()


@dataclass
class LoopNet:
    """Sites, links and key managers; ``kms[site]``."""

    links: dict[str, Link]
    kms: dict[str, KeyManager]
    stores: dict[tuple[str, str], KeyStore]  # (link id, site) -> store
    ctx: zmq.asyncio.Context
    tmp: Path
    blocks: dict[str, int] = field(default_factory=dict)
    services: dict[str, NetworkService] = field(default_factory=dict)

    def ports_of(self, site: str) -> list[ChannelPort]:
        return [
            p
            for link in self.links.values()
            for p, end in ((link.port_a, link.a), (link.port_b, link.b))
            if end == site
        ]

    def store(self, link_id: str, site: str) -> KeyStore:
        return self.stores[(link_id, site)]

    def fill(self, link_id: str, keys: int) -> None:
        """Put one more block of ``keys`` 256-bit keys (half each side's) on the link."""
        link = self.links[link_id]
        block = self.blocks.get(link_id, 0) + 1
        self.blocks[link_id] = block
        final = os.urandom(32 + keys * KEY_SIZE_BITS // 8)
        for site in (link.a, link.b):
            s = self.store(link_id, site)
            s.add_block(block, final, KEY_SIZE_BITS, PROV)
            s.commit_block(block)

    async def wait_routes(self, timeout_s: float = 10.0) -> None:
        """Until every site has heard every other site's advert."""
        async with asyncio.timeout(timeout_s):
            while not all(len(k.fresh_adverts()) == len(self.kms) for k in self.kms.values()):
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        for service in self.services.values():
            await service.stop()
        for site, k in self.kms.items():
            if site not in self.services:
                await k.stop()
        for link in self.links.values():
            for p in link.ports():
                await p.close()
        for s in self.stores.values():
            s.close()
        self.ctx.destroy(linger=0)


def network_section(
    sites: Sequence[str],
    links: Sequence[tuple[str, str, str]],
    directory: dict[str, str],
    costs: dict[str, float] | None = None,
    **overrides: Any,
) -> NetworkSection:
    """The ``[network]`` section of a loop network (fast adverts: 0.2 s)."""
    costs = costs or {}
    return NetworkSection.model_validate(
        {
            "sites": list(sites),
            "links": [{"id": i, "a": a, "b": b, "cost": costs.get(i, 1.0)} for i, a, b in links],
            "directory": [{"sae_id": s, "site": site} for s, site in directory.items()],
            "advert_interval_s": 0.2,
            "advert_ttl_s": 1.5,
            "relay_timeout_s": 5.0,
            **overrides,
        }
    )


async def build(
    tmp: Path,
    sites: Sequence[str],
    links: Sequence[tuple[str, str, str]],
    directory: dict[str, str],
    *,
    keys_per_link: int = 200,
    services: Callable[[str], NetworkDeliverySection] | None = None,
    costs: dict[str, float] | None = None,
    **overrides: Any,
) -> LoopNet:
    """Start a network: per link a peer channel pair (``a`` binds) and two filled stores."""
    ctx = zmq.asyncio.Context()
    cfg = network_section(sites, links, directory, costs, **overrides)
    built: dict[str, Link] = {}
    stores: dict[tuple[str, str], KeyStore] = {}
    for link_id, a, b in links:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        bus = BusSection(
            allow_plaintext=True,
            peer_endpoint=endpoint,
            heartbeat_interval_s=0.2,
            heartbeat_liveness=3,
        )
        ch_a = PeerChannel(ctx, bus, "transmitter", None)
        ch_b = PeerChannel(ctx, bus, "receiver", None)
        await ch_a.start()
        await ch_b.start()
        sides: tuple[tuple[str, Side], ...] = ((a, "transmitter"), (b, "receiver"))
        for site, side in sides:
            stores[(link_id, site)] = KeyStore.open(
                tmp / site / f"{link_id}.sqlite", link_id=link_id, side=side
            )
        built[link_id] = Link(
            link_id,
            a,
            b,
            ChannelPort(link_id, b, ch_a, stores[(link_id, a)], "transmitter"),
            ChannelPort(link_id, a, ch_b, stores[(link_id, b)], "receiver"),
        )
    for link in built.values():
        for p in link.ports():
            await p.channel.wait_connected(5.0)
    net = LoopNet(built, {}, stores, ctx, tmp)
    for link_id in built:
        if keys_per_link:
            net.fill(link_id, keys_per_link)
    for site in sites:
        ports = net.ports_of(site)
        if services is not None:
            site_cfg = cfg.model_copy(update={"delivery": services(site)})
            service = NetworkService(site, site_cfg, tmp / site, functools.partial(list, ports))
            await service.start()
            net.services[site] = service
            assert service.kms is not None
            net.kms[site] = service.kms
            continue
        store = NetworkKeyStore.open(tmp / site / "network.sqlite")
        net.kms[site] = KeyManager(site, cfg, ports, store)
        await net.kms[site].start()
    return net
