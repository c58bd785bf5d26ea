"""ETSI GS QKD 014 key delivery: REST over HTTPS with mutual TLS (aiohttp).

SAEs are identified by the CN (or a DNS SAN) of their client certificate, mapped to SAE IDs
by ``DeliverySection.saes``; an SAE may use only the pairs in ``DeliverySection.pairs``:

- ``enc_keys`` at this KME: the caller is the pair's master; keys come from
  :meth:`KeyStore.take_keys` (this node's half of each block).
- ``dec_keys`` at this KME: the caller is the pair's slave; it redeems the IDs the master got
  from the peer KME's enc_keys (:meth:`KeyStore.claim_keys`).

After each delivery ``on_delivery`` gets the :class:`DeliveryNotice` for the peer KME (the
daemon sends it over the authenticated peer channel). Responses and logs never contain key
bytes except the key container of a successful response.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qkdnode.config.sections import DeliverySection
from qkdnode.delivery.openapi import API_PREFIX, OPENAPI_PATH, openapi_json
from qkdnode.delivery.tls import peer_common_names, server_context
from qkdnode.keystore.errors import KeyRequestError, KeysUnavailableError
from qkdnode.keystore.models import DeliveredKey, DeliveryNotice, KeyState, Pair, key_container
from qkdnode.keystore.store import KeyStore

log = structlog.get_logger(__name__)

NoticeCallback = Callable[[DeliveryNotice], Awaitable[None] | None]
_NOTICE_POLL_S = 0.01
#: how long a response may wait for ``on_delivery`` (the notice is then recovered by the
#: next summary exchange)
NOTICE_TIMEOUT_S = 2.0


class EtsiError(Exception):
    """An ETSI error response: ``status`` with ``message`` and ``details``."""

    def __init__(self, status: int, message: str, details: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)


class KeyRequestBody(BaseModel):
    """POST enc_keys body (ETSI 014 §6.2)."""

    model_config = ConfigDict(extra="ignore")

    number: int = Field(1, ge=1)
    size: int | None = None
    additional_slave_SAE_IDs: list[str] = Field(default_factory=list)
    extension_mandatory: list[dict[str, Any]] = Field(default_factory=list)
    extension_optional: list[dict[str, Any]] = Field(default_factory=list)


class KeyIdEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_ID: uuid.UUID
    key_ID_extension: dict[str, Any] | None = None


class KeyIdsBody(BaseModel):
    """POST dec_keys body (ETSI 014 §6.4)."""

    model_config = ConfigDict(extra="ignore")

    key_IDs: list[KeyIdEntry] = Field(min_length=1)


class EtsiApi:
    """Request handling, independent of how the server is started."""

    def __init__(
        self,
        store: KeyStore,
        cfg: DeliverySection,
        *,
        key_size_bits: int,
        on_delivery: NoticeCallback | None = None,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.default_size_bits = key_size_bits
        self.max_size_bits = min(cfg.max_key_size_bits, key_size_bits)
        self.min_size_bits = min(cfg.min_key_size_bits, self.max_size_bits)
        self.on_delivery = on_delivery
        self._cn_to_sae = {s.certificate_cn: s.sae_id for s in cfg.saes}
        self._known_saes = {s.sae_id for s in cfg.saes} | {
            sae for pair in cfg.pairs for sae in pair
        }
        self._pairs = {(m, s) for m, s in cfg.pairs}

    # -- identification ---------------------------------------------------------------------

    def caller(self, request: web.Request) -> str:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        for name in peer_common_names(peercert):
            sae = self._cn_to_sae.get(name)
            if sae is not None:
                return sae
        raise EtsiError(401, "client certificate does not identify a registered SAE")

    def _pair(self, request: web.Request, role: Literal["master", "slave"], other: str) -> Pair:
        caller = self.caller(request)
        if other not in self._known_saes:
            raise EtsiError(400, f"unknown SAE ID {other!r}")
        pair = (
            Pair(master=caller, slave=other)
            if role == "master"
            else Pair(master=other, slave=caller)
        )
        if (pair.master, pair.slave) not in self._pairs:
            raise EtsiError(
                401,
                f"SAE {caller!r} is not authorised for the pair master {pair.master!r} / "
                f"slave {pair.slave!r}",
            )
        return pair

    # -- handlers -----------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        pair = self._pair(request, "master", request.match_info["slave_SAE_ID"])
        stored = await asyncio.to_thread(self.store.available_for_enc, self.min_size_bits)
        return web.json_response(
            {
                "source_KME_ID": self.cfg.kme_id,
                "target_KME_ID": self.cfg.peer_kme_id,
                "master_SAE_ID": pair.master,
                "slave_SAE_ID": pair.slave,
                "key_size": self.default_size_bits,
                "stored_key_count": stored,
                "max_key_count": self.store.max_key_count,
                "max_key_per_request": self.cfg.max_key_per_request,
                "max_key_size": self.max_size_bits,
                "min_key_size": self.min_size_bits,
                "max_SAE_ID_count": 0,
            }
        )

    async def enc_keys(self, request: web.Request) -> web.Response:
        pair = self._pair(request, "master", request.match_info["slave_SAE_ID"])
        if request.method == "POST":
            body = await self._json(request, KeyRequestBody)
        else:
            body = KeyRequestBody(
                number=_int_query(request, "number", 1), size=_opt_int_query(request, "size")
            )
        for extra in body.additional_slave_SAE_IDs:
            if extra not in self._known_saes:
                raise EtsiError(400, f"unknown SAE ID {extra!r} in additional_slave_SAE_IDs")
        if body.additional_slave_SAE_IDs:
            raise EtsiError(
                400, "additional_slave_SAE_IDs is not supported by this KME (max_SAE_ID_count 0)"
            )
        if body.extension_mandatory:
            names = sorted({k for ext in body.extension_mandatory for k in ext})
            raise EtsiError(
                400,
                "mandatory extension not supported",
                [{"extension_mandatory_unsupported": names}],
            )
        size = self.default_size_bits if body.size is None else body.size
        if size % 8:
            raise EtsiError(400, f"size {size} bits is not a multiple of 8")
        if not self.min_size_bits <= size <= self.max_size_bits:
            raise EtsiError(
                400,
                f"size {size} bits is out of range [{self.min_size_bits}, {self.max_size_bits}]",
            )
        if body.number > self.cfg.max_key_per_request:
            raise EtsiError(
                400,
                f"number {body.number} exceeds max_key_per_request {self.cfg.max_key_per_request}",
            )
        keys = await self._store_call(self.store.take_keys, pair, body.number, size)
        await self._announce(self.store.notice(pair, "enc", keys))
        log.info(
            "etsi.enc_keys", master=pair.master, slave=pair.slave, keys=len(keys), size_bits=size
        )
        return web.json_response(key_container(keys))

    async def dec_keys(self, request: web.Request) -> web.Response:
        pair = self._pair(request, "slave", request.match_info["master_SAE_ID"])
        if request.method == "POST":
            ids = [e.key_ID for e in (await self._json(request, KeyIdsBody)).key_IDs]
        else:
            raw = request.query.get("key_ID")
            if raw is None:
                raise EtsiError(400, "query parameter key_ID is required")
            try:
                ids = [uuid.UUID(raw)]
            except ValueError:
                raise EtsiError(400, f"key_ID {raw!r} is not a UUID") from None
        if len(ids) > self.cfg.max_key_per_request:
            raise EtsiError(
                400,
                f"{len(ids)} key_IDs exceed max_key_per_request {self.cfg.max_key_per_request}",
            )
        await self._wait_for_peer_notice(ids)
        keys = await self._store_call(
            self.store.claim_keys, pair, ids, require_reserved=self.cfg.require_peer_notice
        )
        await self._announce(self.store.notice(pair, "dec", keys))
        log.info("etsi.dec_keys", master=pair.master, slave=pair.slave, keys=len(keys))
        return web.json_response(key_container(keys))

    async def openapi(self, request: web.Request) -> web.Response:
        self.caller(request)
        return web.Response(text=openapi_json(), content_type="application/json")

    # -- helpers ------------------------------------------------------------------------------

    async def _wait_for_peer_notice(self, ids: Sequence[uuid.UUID]) -> None:
        """Give the peer's delivery notice (which binds keys to their pair) time to arrive."""
        deadline = time.monotonic() + self.cfg.peer_notice_wait_s
        while time.monotonic() < deadline:
            infos = await asyncio.to_thread(lambda: [self.store.key_info(i) for i in ids])
            if not any(
                info is not None and info.state in (KeyState.AVAILABLE, KeyState.PENDING)
                for info in infos
            ):
                return
            await asyncio.sleep(_NOTICE_POLL_S)

    async def _store_call(
        self, fn: Callable[..., list[DeliveredKey]], *args: Any, **kw: Any
    ) -> list[DeliveredKey]:
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except KeysUnavailableError as exc:
            raise EtsiError(503, str(exc)) from None
        except KeyRequestError as exc:
            raise EtsiError(400, str(exc)) from None

    async def _announce(self, notice: DeliveryNotice) -> None:
        if self.on_delivery is None or not notice.entries:
            return
        try:
            result = self.on_delivery(notice)
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, NOTICE_TIMEOUT_S)
        except Exception as exc:
            # The keys are delivered and durable; the peer learns of them at the next
            # summary exchange. Never fail the SAE's request for this.
            log.warning("etsi.notice_failed", error=type(exc).__name__)

    @staticmethod
    async def _json(request: web.Request, model: type[Any]) -> Any:
        try:
            raw = await request.read()
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            details = [
                {"field": ".".join(str(p) for p in e["loc"]), "error": e["msg"]}
                for e in exc.errors(include_input=False, include_url=False)
            ]
            raise EtsiError(400, "invalid request body", details) from None


def _int_query(request: web.Request, name: str, default: int) -> int:
    value = _opt_int_query(request, name)
    return default if value is None else value


def _opt_int_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise EtsiError(400, f"query parameter {name} must be an integer, got {raw!r}") from None


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except EtsiError as exc:
        log.info("etsi.refused", path=request.path, status=exc.status, reason=exc.message)
        body: dict[str, Any] = {"message": exc.message}
        if exc.details:
            body["details"] = exc.details
        return web.json_response(body, status=exc.status)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.error("etsi.internal_error", path=request.path, error=type(exc).__name__)
        return web.json_response({"message": "internal error"}, status=500)


def build_app(api: EtsiApi) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=1024 * 1024)
    keys = f"{API_PREFIX}/keys"
    app.router.add_get(f"{keys}/{{slave_SAE_ID}}/status", api.status)
    app.router.add_get(f"{keys}/{{slave_SAE_ID}}/enc_keys", api.enc_keys)
    app.router.add_post(f"{keys}/{{slave_SAE_ID}}/enc_keys", api.enc_keys)
    app.router.add_get(f"{keys}/{{master_SAE_ID}}/dec_keys", api.dec_keys)
    app.router.add_post(f"{keys}/{{master_SAE_ID}}/dec_keys", api.dec_keys)
    app.router.add_get(OPENAPI_PATH, api.openapi)
    return app


@dataclass
class EtsiServer:
    """A running ETSI 014 server; ``port`` is the bound port (useful with port 0)."""

    runner: web.AppRunner
    api: EtsiApi
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        log.info("etsi.stopped", port=self.port)


async def start_etsi_server(
    store: KeyStore,
    cfg: DeliverySection,
    *,
    key_size_bits: int,
    ssl_context: Any = None,
    on_delivery: NoticeCallback | None = None,
    host: str | None = None,
    port: int | None = None,
) -> EtsiServer:
    """Start the HTTPS server (mutual TLS). ``ssl_context`` defaults to one built from
    ``cfg.tls_cert_file``/``tls_key_file``/``client_ca_file`` (ValueError if unset).
    ``port=0`` binds a free port."""
    if ssl_context is None:
        if cfg.tls_cert_file is None or cfg.tls_key_file is None or cfg.client_ca_file is None:
            raise ValueError(
                "delivery.tls_cert_file, delivery.tls_key_file and delivery.client_ca_file "
                "are required for the ETSI 014 server"
            )
        ssl_context = server_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.client_ca_file)
    api = EtsiApi(store, cfg, key_size_bits=key_size_bits, on_delivery=on_delivery)
    runner = web.AppRunner(build_app(api), access_log=None)
    await runner.setup()
    bind_host = cfg.listen_host if host is None else host
    site = web.TCPSite(
        runner, bind_host, cfg.listen_port if port is None else port, ssl_context=ssl_context
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    addresses = runner.addresses
    bound = addresses[0][1] if addresses else (port or cfg.listen_port)
    log.info("etsi.started", host=bind_host, port=bound, kme_id=cfg.kme_id)
    return EtsiServer(runner=runner, api=api, host=bind_host, port=int(bound))
