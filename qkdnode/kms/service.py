"""The key manager as a service of the site's daemon.

:class:`NetworkService` starts after the site's links: it opens the end-to-end key store
(``node.state_dir / network.store_path``), runs the :class:`KeyManager` over the links,
serves ETSI GS QKD 014 for end-to-end keys on ``network.delivery`` (mutual TLS) together
with the site's status in the shape of ETSI GS QKD 015 (``GET /api/v1/network/qkd_node``)
and the view of the network (``GET /api/v1/network/view``), adds the command ``network``
to each link's control socket and publishes the view on each link's telemetry (topic
``network``) every ``network.status_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web
from pydantic import Field

from qkdnode.bus.commands import CallerInfo, CommandSpec, Content, NoContent
from qkdnode.bus.errors import CommandError, ErrorCode
from qkdnode.config.network import NetworkSection
from qkdnode.delivery.etsi import EtsiApi, EtsiServer, start_etsi_server
from qkdnode.keystore.models import DeliveredKey
from qkdnode.kms.manager import KeyManager
from qkdnode.kms.netstore import NetworkKeyStore
from qkdnode.kms.ports import LinkPort
from qkdnode.kms.status015 import qkd_node
from qkdnode.kms.view import network_view

log = structlog.get_logger(__name__)

STATUS_PATH = "/api/v1/network/qkd_node"
VIEW_PATH = "/api/v1/network/view"


class ServedLinkPort(LinkPort, Protocol):
    """A link that also carries the site's control command and telemetry."""

    @property
    def role(self) -> str:
        """This site's side of the link (transmitter or receiver)."""
        ...

    def add_command(self, spec: CommandSpec) -> None: ...

    def publish(self, topic: str, payload: dict[str, Any]) -> None: ...

    def set_alarm(self, name: str, on: bool, cause: str = "") -> None:
        """Raise (``on``) or clear a named alarm on the link's alarm board."""
        ...


class LinkEnableContent(Content):
    """Content of ``network.link``."""

    link_id: str = Field(min_length=1, max_length=64)
    enabled: bool


class NetworkKeySource:
    """ETSI 014 over the key manager (:class:`qkdnode.delivery.etsi.KeySource`)."""

    def __init__(self, kms: KeyManager) -> None:
        self.kms = kms

    @property
    def in_step(self) -> bool:
        return True  # each relay checks its own path

    @property
    def max_key_count(self) -> int:
        return self.kms.cfg.delivery.max_key_per_request

    async def issue(
        self, master: str, slaves: Sequence[str], number: int, size_bits: int
    ) -> list[DeliveredKey]:
        """Runs to its end even if the HTTP request goes away: keys stored at the far
        end for a master who never got them are cancelled there."""
        task = asyncio.create_task(self.kms.issue(master, slaves, number, size_bits))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._abandoned)
            raise

    def _abandoned(self, task: asyncio.Task[list[DeliveredKey]]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        self.kms.cancel_issued([k.key_id for k in task.result()])

    async def claim(
        self, master: str, slave: str, key_ids: Sequence[uuid.UUID]
    ) -> list[DeliveredKey]:
        return await self.kms.claim(master, slave, key_ids)

    async def stored_key_count(self, slave: str, size_bits: int) -> int:
        dest = self.kms.cfg.site_of(slave)
        if dest is None or dest == self.kms.me:
            return 0
        return await asyncio.to_thread(self.kms.capacity_keys, dest, size_bits)

    def target_kme_id(self, slave: str) -> str:
        return self.kms.cfg.site_of(slave) or ""


class NetworkService:
    """The site's key manager, started and stopped by the daemon."""

    def __init__(
        self,
        site: str,
        cfg: NetworkSection,
        state_dir: Path,
        ports: Callable[[], Sequence[ServedLinkPort]],
    ) -> None:
        self.site = site
        self.cfg = cfg
        self.state_dir = state_dir
        self._ports = ports
        self.kms: KeyManager | None = None
        self.etsi: EtsiServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started_at = time.time()
        self._roles: dict[str, str] = {}

    async def start(self) -> None:
        ports = list(self._ports())
        self._started_at = time.time()
        self._roles = {p.link_id: p.role for p in ports}
        path = self.cfg.store_path
        if not path.is_absolute():
            path = self.state_dir / path
        store = await asyncio.to_thread(NetworkKeyStore.open, path)
        self.kms = KeyManager(self.site, self.cfg, ports, store)
        await self.kms.start()
        spec = CommandSpec(
            "network",
            self._cmd_network,
            None,
            "monitor",
            NoContent,
            "the key management network as this site sees it (links, levels, routes, relays)",
        )
        toggle = CommandSpec(
            "network.link",
            self._cmd_link,
            None,
            "operator",
            LinkEnableContent,
            "take one of this site's links out of the key management network, or back in",
            (ErrorCode.INVALID_CONTENT,),
        )
        for port in ports:
            for command in (spec, toggle):
                with contextlib.suppress(ValueError):
                    port.add_command(command)
        if self.cfg.delivery.enabled:
            self.etsi = await start_etsi_server(
                NetworkKeySource(self.kms),
                self.cfg.delivery,
                key_size_bits=self.cfg.key_size_bits,
                extra_routes=[(STATUS_PATH, self._http_status), (VIEW_PATH, self._http_view)],
            )
        self._tasks.append(asyncio.create_task(self._publish_loop(ports), name="kms-status"))
        self._tasks.append(asyncio.create_task(self._watch_loop(ports), name="kms-watch"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.etsi is not None:
            with contextlib.suppress(Exception):
                await self.etsi.stop()
        if self.kms is not None:
            await self.kms.stop()

    async def view(self) -> dict[str, Any]:
        assert self.kms is not None
        v = await asyncio.to_thread(network_view, self.kms)
        return v.model_dump(mode="json")

    async def _cmd_network(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return await self.view()

    async def _cmd_link(self, content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        assert self.kms is not None
        link_id = str(content["link_id"])
        try:
            await self.kms.set_enabled(link_id, bool(content["enabled"]))
        except KeyError:
            raise CommandError(
                f"link_id: this site has no link {link_id!r} (it has {sorted(self.kms.hops)})",
                code=ErrorCode.INVALID_CONTENT,
            ) from None
        log.info("kms.link_toggled", link=link_id, enabled=content["enabled"], by=caller.name)
        return {"link_id": link_id, "enabled": content["enabled"]}

    async def _http_status(self, api: EtsiApi, request: web.Request) -> web.Response:
        api.client_certified(request)
        assert self.kms is not None
        v = await asyncio.to_thread(network_view, self.kms)
        return web.json_response(qkd_node(v, started_at_unix_s=self._started_at, roles=self._roles))

    async def _http_view(self, api: EtsiApi, request: web.Request) -> web.Response:
        api.client_certified(request)
        return web.json_response(await self.view())

    async def _watch_loop(self, ports: Sequence[ServedLinkPort]) -> None:
        """``network_unreachable`` on every link of the site while some site of the map
        has had no route for ``unreachable_alarm_s``."""
        assert self.kms is not None
        since: dict[str, float] = {}
        active = False
        while True:
            await asyncio.sleep(self.cfg.advert_interval_s)
            now = time.monotonic()
            try:
                lost = await asyncio.to_thread(self.kms.unreachable_sites)
            except Exception as exc:
                log.warning("kms.watch_failed", error=str(exc)[:200])
                continue
            since = {site: since.get(site, now) for site in lost}
            overdue = sorted(s for s, t in since.items() if now - t >= self.cfg.unreachable_alarm_s)
            if overdue or active:
                cause = f"no route to site(s) {', '.join(overdue)}" if overdue else ""
                for port in ports:
                    with contextlib.suppress(Exception):
                        port.set_alarm("network_unreachable", bool(overdue), cause)
                active = bool(overdue)

    async def _publish_loop(self, ports: Sequence[ServedLinkPort]) -> None:
        while True:
            await asyncio.sleep(self.cfg.status_interval_s)
            try:
                payload = await self.view()
            except Exception as exc:
                log.warning("kms.view_failed", error=str(exc)[:200])
                continue
            for port in ports:
                with contextlib.suppress(Exception):
                    port.publish("network", payload)
