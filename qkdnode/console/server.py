"""The console's HTTP(S) server: pages, JSON, CSV, server-sent events and actions.

Routes (every one behind :class:`~qkdnode.console.access.Access`):

====================================  ===============================================
``GET /``                             the overview page
``GET /links/{link}``                 a link's page (history plots, blocks, calibrations)
``GET /alarms``                       the alarm list (raise/clear history)
``GET /network``                      the network map (a site with ``[network]``)
``GET /static/{name}``                the page's script, style and the vendored uPlot
``GET /api/overview``                 :class:`~qkdnode.console.models.Overview`
``GET /api/links/{link}/series``      ``hours`` (24), ``max_points`` (2000): a Series
``GET /api/links/{link}/blocks``      ``limit`` (200): the last blocks with provenance
``GET /api/links/{link}/events``      calibration results and sync locks
``GET /api/links/{link}/plots``       the procedures with a saved calibration plot
``GET /api/links/{link}/plots/{p}.png``  the latest plot of procedure ``p``
``GET /api/links/{link}/export.csv``  ``table`` (samples, blocks, alarms, events), ``hours``
``GET /api/alarms``                   ``hours`` (168): alarm events, newest first
``GET /api/network``                  the key management network view (404 without one)
``GET /api/events``                   the live stream (``text/event-stream``)
``POST /api/links/{link}/actions/{a}``  start, stop, calibrate, recover (operator only)
====================================  ===============================================

Errors are JSON ``{"message": ...}`` with 400 (bad argument), 403 (role, CSRF), 404,
409 (the link refused the action in its state) or 503 (too many live pages).
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web

from qkdnode.bus.commands import CallerInfo
from qkdnode.bus.errors import CommandError, ErrorCode
from qkdnode.config.console import ConsoleSection
from qkdnode.console.access import TOKEN_HEADER, Access
from qkdnode.console.history import DEFAULT_MAX_POINTS, TABLES, HistoryStore
from qkdnode.console.live import KEEPALIVE_S, LiveHub, TooManySubscribers, sse_frame
from qkdnode.console.models import LinkRow, Overview, Role
from qkdnode.console.ports import ConsoleLink
from qkdnode.delivery.tls import peer_common_names, server_context

log = structlog.get_logger(__name__)

ACTIONS = ("start", "stop", "calibrate", "recover")
#: files served under /static/ (and their types)
STATIC: dict[str, str] = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "LICENSE.uPlot.txt": "text/plain",
}
PAGES = ("overview", "link", "alarms", "network")
PROCEDURE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_HOURS = 24.0 * 3650


class ConsoleService(Protocol):
    """What the server reads of the console (``qkdnode.console.service.ConsoleService``)."""

    site: str
    cfg: ConsoleSection
    network: bool
    links: dict[str, ConsoleLink]
    rows: dict[str, LinkRow]
    hub: LiveHub
    history: HistoryStore | None

    def overview(self, role: Role | None) -> Overview: ...

    async def refresh(self) -> list[LinkRow]: ...

    async def act(self, link: str, action: str, caller: CallerInfo) -> dict[str, Any]: ...

    async def network_now(self) -> dict[str, Any] | None: ...


@dataclass
class ConsoleServer:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


def _static_bytes() -> dict[str, bytes]:
    root = resources.files("qkdnode.console") / "static"
    return {name: (root / name).read_bytes() for name in STATIC}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def _float_query(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise web.HTTPBadRequest(text=f"{name} must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


class ConsoleApp:
    """Handlers over one :class:`ConsoleService`."""

    def __init__(self, service: ConsoleService, access: Access) -> None:
        self.service = service
        self.access = access
        self.static = _static_bytes()

    def _store(self) -> HistoryStore:
        store = self.service.history
        if store is None:
            raise web.HTTPServiceUnavailable(text="the console is stopping")
        return store

    def _link(self, request: web.Request) -> str:
        link = request.match_info["link"]
        if link not in self.service.links:
            raise web.HTTPNotFound(text=f"no link {link[:64]!r} on this node")
        return link

    # -- pages --------------------------------------------------------------------------

    def _page(self, request: web.Request, page: str, title: str, link: str = "") -> web.Response:
        svc = self.service
        e = html.escape
        nav = [("/", "Overview"), ("/alarms", "Alarms")]
        if svc.network:
            nav.append(("/network", "Network"))
        links = "".join(
            f'<a href="{e(href)}"{" aria-current=page" if href == request.path else ""}>'
            f"{e(text)}</a>"
            for href, text in nav
        )
        body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="console-token" content="{e(self.access.token)}">
<title>{e(title)} · {e(svc.site)} · qkdnode</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/uPlot.min.css">
<link rel="stylesheet" href="/static/console.css">
</head><body data-page="{e(page)}" data-link="{e(link)}" data-site="{e(svc.site)}"
 data-role="{e(self.access.role(request))}" data-stale-after-s="{svc.cfg.stale_after_s:g}">
<header><span class="site">qkdnode · {e(svc.site)}</span><nav>{links}</nav>
<span id="live" class="live" role="status" aria-live="polite">connecting…</span>
<span class="role">role: {e(self.access.role(request))}</span></header>
<main id="app"><h1>{e(title)}</h1><p class="muted">loading…</p></main>
<script src="/static/uPlot.iife.min.js"></script>
<script src="/static/console.js"></script>
</body></html>
"""
        return web.Response(text=body, content_type="text/html")

    async def overview_page(self, request: web.Request) -> web.Response:
        return self._page(request, "overview", "Overview")

    async def link_page(self, request: web.Request) -> web.Response:
        link = self._link(request)
        return self._page(request, "link", f"Link {link}", link)

    async def alarms_page(self, request: web.Request) -> web.Response:
        return self._page(request, "alarms", "Alarms")

    async def network_page(self, request: web.Request) -> web.Response:
        if not self.service.network:
            return _error(404, "this node is not a site of a key management network")
        return self._page(request, "network", "Network")

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            return _error(404, "no such file")
        return web.Response(
            body=self.static[name],
            content_type=STATIC[name],
            headers={"Cache-Control": "max-age=3600"},
        )

    # -- JSON ---------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        if not self.service.rows:
            await self.service.refresh()
        return web.json_response(
            self.service.overview(self.access.role(request)).model_dump(mode="json")
        )

    async def series(self, request: web.Request) -> web.Response:
        link = self._link(request)
        hours = _float_query(request, "hours", 24.0, 0.001, MAX_HOURS)
        points = int(_float_query(request, "max_points", DEFAULT_MAX_POINTS, 2, 100_000))
        now = time.time()
        store = self._store()
        series = await asyncio.to_thread(store.series, link, now - hours * 3600.0, now, points)
        return web.json_response(series.model_dump(mode="json"))

    async def blocks(self, request: web.Request) -> web.Response:
        link = self._link(request)
        limit = int(_float_query(request, "limit", 200, 1, 5000))
        hours = _float_query(request, "hours", 24.0, 0.001, MAX_HOURS)
        store = self._store()
        rows = await asyncio.to_thread(store.blocks, link, time.time() - hours * 3600.0, limit)
        return web.json_response({"blocks": [b.model_dump(mode="json") for b in rows]})

    async def events(self, request: web.Request) -> web.Response:
        link = self._link(request)
        hours = _float_query(request, "hours", 24.0 * 7, 0.001, MAX_HOURS)
        store = self._store()
        rows = await asyncio.to_thread(
            store.events,
            link,
            ("sync", "sync.acquired", "calibration."),
            time.time() - hours * 3600.0,
            500,
        )
        return web.json_response({"events": [e.model_dump(mode="json") for e in rows]})

    def _plots(self, link: str) -> dict[str, Path]:
        folder = self.service.links[link].calibration_dir()
        if folder is None or not folder.is_dir():
            return {}
        return {
            p.stem: p
            for p in sorted(folder.glob("*.png"))
            if PROCEDURE_RE.match(p.stem) and not p.stem.endswith("tmp")
        }

    async def plots(self, request: web.Request) -> web.Response:
        link = self._link(request)
        found = await asyncio.to_thread(self._plots, link)
        return web.json_response(
            {"plots": [{"procedure": p, "mtime_s": f.stat().st_mtime} for p, f in found.items()]}
        )

    async def plot(self, request: web.Request) -> web.Response:
        link = self._link(request)
        name = request.match_info["procedure"]
        path = (await asyncio.to_thread(self._plots, link)).get(name)
        if path is None:
            return _error(404, f"no saved plot of {name[:64]!r}")
        data = await asyncio.to_thread(path.read_bytes)
        return web.Response(body=data, content_type="image/png")

    async def export_csv(self, request: web.Request) -> web.Response:
        link = self._link(request)
        table = request.query.get("table", "samples")
        if table not in TABLES:
            return _error(400, f"table must be one of {', '.join(TABLES)}, got {table[:40]!r}")
        hours = _float_query(request, "hours", 24.0, 0.001, MAX_HOURS)
        now = time.time()
        store = self._store()
        text = await asyncio.to_thread(
            store.export_csv,
            table,  # type: ignore[arg-type]
            link,
            now - hours * 3600.0,
            now,
        )
        name = f"{self.service.site}-{link}-{table}.csv"
        return web.Response(
            text=text,
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    async def alarms(self, request: web.Request) -> web.Response:
        hours = _float_query(request, "hours", 24.0 * 7, 0.001, MAX_HOURS)
        store = self._store()
        rows = await asyncio.to_thread(store.alarms, time.time() - hours * 3600.0, 2000)
        active = [
            {"link": r.link, **a.model_dump(mode="json")}
            for r in self.service.rows.values()
            for a in r.alarms
        ]
        return web.json_response(
            {"active": active, "events": [a.model_dump(mode="json") for a in rows]}
        )

    async def network(self, request: web.Request) -> web.Response:
        view = await self.service.network_now()
        if view is None:
            return _error(404, "this node is not a site of a key management network")
        return web.json_response(view)

    # -- live ---------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.StreamResponse:
        try:
            sub = self.service.hub.subscribe()
        except TooManySubscribers as exc:
            return _error(503, str(exc))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            hello = self.service.overview(self.access.role(request)).model_dump(mode="json")
            await response.write(b"retry: 2000\n" + sse_frame("overview", hello))
            while True:
                frame = await sub.next(KEEPALIVE_S)
                if frame is None:  # fell behind: the page reconnects
                    break
                await response.write(frame)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            sub.close()
        return response

    # -- actions ------------------------------------------------------------------------

    async def action(self, request: web.Request) -> web.Response:
        link = self._link(request)
        name = request.match_info["action"]
        if name not in ACTIONS:
            return _error(404, f"no action {name[:40]!r} (actions: {', '.join(ACTIONS)})")
        who = self.access.role(request)
        refusal = self.access.action_refusal(request, who)
        if refusal is not None:
            log.warning("console.action_refused", link=link, action=name, reason=refusal)
            return _error(403, refusal)
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        names = peer_common_names(peer)
        caller = CallerInfo(f"console:{names[0] if names else 'local'}", who)
        try:
            result = await self.service.act(link, name, caller)
        except CommandError as exc:
            status = 403 if exc.code == ErrorCode.FORBIDDEN else 409
            return web.json_response({"message": str(exc), "code": str(exc.code)}, status=status)
        return web.json_response({"ok": True, **result})


def build_console_app(service: ConsoleService, access: Access) -> web.Application:
    h = ConsoleApp(service, access)
    app = web.Application(middlewares=[access.middleware], client_max_size=16 * 1024)
    r = app.router
    r.add_get("/", h.overview_page)
    r.add_get("/links/{link}", h.link_page)
    r.add_get("/alarms", h.alarms_page)
    r.add_get("/network", h.network_page)
    r.add_get("/static/{name}", h.static_file)
    r.add_get("/api/overview", h.overview)
    r.add_get("/api/links/{link}/series", h.series)
    r.add_get("/api/links/{link}/blocks", h.blocks)
    r.add_get("/api/links/{link}/events", h.events)
    r.add_get("/api/links/{link}/export.csv", h.export_csv)
    r.add_get("/api/links/{link}/plots", h.plots)
    r.add_get("/api/links/{link}/plots/{procedure}.png", h.plot)
    r.add_get("/api/alarms", h.alarms)
    r.add_get("/api/network", h.network)
    r.add_get("/api/events", h.live)
    r.add_post("/api/links/{link}/actions/{action}", h.action)
    return app


async def start_console_server(service: ConsoleService, access: Access | None = None) -> Any:
    """Bind ``console.listen_host:listen_port`` (TLS when configured). OSError when the
    port is taken, ``ssl.SSLError``/OSError for unreadable TLS files."""
    cfg = service.cfg
    assert cfg.listen_host is not None, "console.listen_host not set"
    access = access or Access(cfg)
    ssl_ctx = None
    if cfg.tls:
        assert cfg.tls_cert_file and cfg.tls_key_file and cfg.client_ca_file
        ssl_ctx = server_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.client_ca_file)
    app = build_console_app(service, access)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(
        runner, cfg.listen_host, cfg.listen_port, ssl_context=ssl_ctx, reuse_address=True
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = cfg.listen_port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            port = int(address[1])
            break
    host = f"[{cfg.listen_host}]" if ":" in cfg.listen_host else cfg.listen_host
    scheme = "https" if ssl_ctx is not None else "http"
    return ConsoleServer(runner, f"{scheme}://{host}:{port}")


__all__ = ["ACTIONS", "PAGES", "TOKEN_HEADER", "ConsoleApp", "build_console_app"]
