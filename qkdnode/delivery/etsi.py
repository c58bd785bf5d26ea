"""ETSI GS QKD 014 key delivery: REST over HTTPS with mutual TLS (aiohttp).

SAEs are identified by the CN (or a DNS SAN) of their client certificate, mapped to SAE IDs
by ``DeliverySection.saes``; a certificate on the configured CRL gets no service. An SAE
may use only the pairs in ``DeliverySection.pairs``:

- ``enc_keys`` at this KME: the caller is the pair's master; keys come from
  :meth:`KeyService.issue`, which answers only after the peer KME made the activation
  (key -> master and slaves) durable.
- ``dec_keys`` at this KME: the caller is a slave; :meth:`KeyService.claim` serves only
  keys the peer KME activated for exactly this master and slave.

Every response that is not a success is the ETSI error JSON (``{"message", "details"?}``)
with 400, 401 or 503 as ETSI 014 gives them, or 404/405/413 where HTTP itself applies.
503 answers carry ``Retry-After``. Responses and logs never contain key bytes except the
key container of a successful response.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from qkdnode.config.sections import DeliverySection
from qkdnode.delivery.keyservice import (
    RETRY_AFTER_S,
    NotInStepError,
    PeerUnavailableError,
)
from qkdnode.delivery.openapi import API_PREFIX, OPENAPI_PATH, openapi_json
from qkdnode.delivery.revocation import RevocationChecker
from qkdnode.delivery.tls import peer_common_names, server_context
from qkdnode.keystore.errors import KeyRequestError, KeyStoreError, KeysUnavailableError
from qkdnode.keystore.models import (
    MAX_PARTS_PER_KEY,
    MAX_SLAVES,
    DeliveredKey,
    Pair,
    key_container,
)
from qkdnode.paths import credential_path

log = structlog.get_logger(__name__)

#: largest request body accepted (bytes); larger gets 413
MAX_BODY_BYTES = 256 * 1024


class EtsiError(Exception):
    """An ETSI error response: ``status`` with ``message`` and ``details``."""

    def __init__(
        self,
        status: int,
        message: str,
        details: Sequence[dict[str, Any]] = (),
        *,
        retry: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)
        self.retry = retry


class KeyRequestBody(BaseModel):
    """POST enc_keys body (ETSI 014 §6.2)."""

    model_config = ConfigDict(extra="ignore")

    number: StrictInt = Field(1, ge=1)
    size: StrictInt | None = Field(None, ge=1)
    additional_slave_SAE_IDs: list[StrictStr] = Field(default_factory=list, max_length=64)
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


class KeySource(Protocol):
    """Where an ETSI 014 server's keys come from: a link's :class:`KeyService` (keys of
    one link) or the site's key manager (end-to-end keys relayed across the network).
    Errors as :meth:`KeyService.issue` and :meth:`KeyService.claim` raise them."""

    @property
    def in_step(self) -> bool: ...

    @property
    def max_key_count(self) -> int: ...

    async def issue(
        self, master: str, slaves: Sequence[str], number: int, size_bits: int
    ) -> list[DeliveredKey]: ...

    async def claim(
        self, master: str, slave: str, key_ids: Sequence[uuid.UUID]
    ) -> list[DeliveredKey]: ...

    async def stored_key_count(self, slave: str, size_bits: int) -> int:
        """Keys of ``size_bits`` that enc_keys for ``slave`` could hand out now."""
        ...

    def target_kme_id(self, slave: str) -> str:
        """The KME where ``slave`` fetches its keys (ETSI status ``target_KME_ID``);
        "" for the configured ``peer_kme_id``."""
        ...


class EtsiApi:
    """Request handling, independent of how the server is started."""

    def __init__(
        self,
        service: KeySource,
        cfg: DeliverySection,
        *,
        key_size_bits: int,
        revocation: RevocationChecker | None = None,
    ) -> None:
        self.service = service
        self.cfg = cfg
        self.default_size_bits = key_size_bits
        self.max_size_bits = min(cfg.max_key_size_bits, MAX_PARTS_PER_KEY * key_size_bits)
        self.min_size_bits = min(cfg.min_key_size_bits, key_size_bits)
        self.max_sae_id_count = min(cfg.max_sae_id_count, MAX_SLAVES - 1)
        self.revocation = revocation or RevocationChecker()
        self._cn_to_sae = {s.certificate_cn: s.sae_id for s in cfg.saes}
        self._known_saes = {s.sae_id for s in cfg.saes} | {
            sae for pair in cfg.pairs for sae in pair
        }
        self._pairs = {(m, s) for m, s in cfg.pairs}

    # -- identification ---------------------------------------------------------------------

    def caller(self, request: web.Request) -> str:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if self.revocation.is_revoked(der):
            raise EtsiError(401, "client certificate is revoked")
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

    def _in_step(self) -> None:
        if not self.service.in_step:
            raise EtsiError(
                503, "this KME is synchronising with its peer KME; retry later", retry=True
            )

    # -- handlers -----------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        pair = self._pair(request, "master", request.match_info["slave_SAE_ID"])
        self._in_step()
        stored = await self.service.stored_key_count(pair.slave, self.default_size_bits)
        return web.json_response(
            {
                "source_KME_ID": self.cfg.kme_id,
                "target_KME_ID": self.service.target_kme_id(pair.slave) or self.cfg.peer_kme_id,
                "master_SAE_ID": pair.master,
                "slave_SAE_ID": pair.slave,
                "key_size": self.default_size_bits,
                "stored_key_count": stored,
                "max_key_count": self.service.max_key_count,
                "max_key_per_request": self.cfg.max_key_per_request,
                "max_key_size": self.max_size_bits,
                "min_key_size": self.min_size_bits,
                "max_SAE_ID_count": self.max_sae_id_count,
            }
        )

    async def enc_keys(self, request: web.Request) -> web.Response:
        pair = self._pair(request, "master", request.match_info["slave_SAE_ID"])
        if request.method == "POST":
            body = await self._json(request, KeyRequestBody)
        else:
            body = KeyRequestBody(
                number=_int_query(request, "number", 1, minimum=1),
                size=_opt_int_query(request, "size", minimum=1),
            )
        slaves = [pair.slave]
        for extra in body.additional_slave_SAE_IDs:
            if extra not in self._known_saes:
                raise EtsiError(400, f"unknown SAE ID {extra!r} in additional_slave_SAE_IDs")
            if extra in slaves:
                raise EtsiError(400, f"SAE ID {extra!r} is named twice as a slave")
            if (pair.master, extra) not in self._pairs:
                raise EtsiError(
                    401,
                    f"SAE {pair.master!r} is not authorised for the pair master "
                    f"{pair.master!r} / slave {extra!r}",
                )
            slaves.append(extra)
        if len(body.additional_slave_SAE_IDs) > self.max_sae_id_count:
            raise EtsiError(
                400,
                f"{len(body.additional_slave_SAE_IDs)} additional slave SAE IDs exceed "
                f"max_SAE_ID_count {self.max_sae_id_count}",
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
        self._in_step()
        keys = await self._service_call(self.service.issue(pair.master, slaves, body.number, size))
        log.info(
            "etsi.enc_keys",
            master=pair.master,
            slaves=len(slaves),
            keys=len(keys),
            size_bits=size,
        )
        return web.json_response(key_container(keys))

    async def dec_keys(self, request: web.Request) -> web.Response:
        pair = self._pair(request, "slave", request.match_info["master_SAE_ID"])
        if request.method == "POST":
            ids = [e.key_ID for e in (await self._json(request, KeyIdsBody)).key_IDs]
        else:
            raws = request.query.getall("key_ID", [])
            if len(raws) != 1:
                raise EtsiError(400, "exactly one query parameter key_ID is required")
            try:
                ids = [uuid.UUID(raws[0])]
            except ValueError:
                raise EtsiError(400, f"key_ID {raws[0][:64]!r} is not a UUID") from None
        if len(ids) > self.cfg.max_key_per_request:
            raise EtsiError(
                400,
                f"{len(ids)} key_IDs exceed max_key_per_request {self.cfg.max_key_per_request}",
            )
        self._in_step()
        keys = await self._service_call(self.service.claim(pair.master, pair.slave, ids))
        log.info("etsi.dec_keys", master=pair.master, slave=pair.slave, keys=len(keys))
        return web.json_response(key_container(keys))

    def client_certified(self, request: web.Request) -> None:
        """The caller showed a certificate of the client CA (the TLS layer checked it)
        that is not revoked; it need not be a registered SAE (401 otherwise)."""
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            raise EtsiError(401, "a client certificate is required")
        if self.revocation.is_revoked(der):
            raise EtsiError(401, "client certificate is revoked")

    async def openapi(self, request: web.Request) -> web.Response:
        self.caller(request)
        return web.Response(text=openapi_json(), content_type="application/json")

    # -- helpers ------------------------------------------------------------------------------

    async def _service_call(self, call: Awaitable[list[DeliveredKey]]) -> list[DeliveredKey]:
        try:
            return await call
        except (NotInStepError, PeerUnavailableError, KeysUnavailableError) as exc:
            raise EtsiError(503, str(exc), retry=True) from None
        except KeyRequestError as exc:
            raise EtsiError(400, str(exc)) from None
        except KeyStoreError as exc:
            log.error("etsi.store_error", error=str(exc)[:200])
            raise EtsiError(
                503, "the key store cannot serve this request now", retry=True
            ) from None

    @staticmethod
    async def _json(request: web.Request, model: type[Any]) -> Any:
        raw = await request.read()
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            details = [
                {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "error": e["msg"]}
                for e in exc.errors(include_input=False, include_url=False)
            ]
            raise EtsiError(400, "invalid request body", details) from None


def _int_query(request: web.Request, name: str, default: int, *, minimum: int) -> int:
    value = _opt_int_query(request, name, minimum=minimum)
    return default if value is None else value


def _opt_int_query(request: web.Request, name: str, *, minimum: int) -> int | None:
    raws = request.query.getall(name, [])
    if not raws:
        return None
    if len(raws) > 1:
        raise EtsiError(400, f"query parameter {name} is given {len(raws)} times")
    raw = raws[0]
    if not raw.isascii() or not raw.lstrip("+-").isdigit() or len(raw) > 18:
        raise EtsiError(400, f"query parameter {name} must be an integer, got {raw[:32]!r}")
    value = int(raw)
    if value < minimum:
        raise EtsiError(400, f"query parameter {name} must be >= {minimum}, got {value}")
    return value


def _error_response(
    status: int, message: str, details: Sequence[dict[str, Any]] = ()
) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if details:
        body["details"] = list(details)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


_HTTP_MESSAGES = {
    404: "no such resource",
    405: "method not allowed",
    413: f"request body larger than {MAX_BODY_BYTES} bytes",
}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except EtsiError as exc:
        log.info("etsi.refused", path=request.path[:128], status=exc.status, reason=exc.message)
        return _error_response(exc.status, exc.message, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        log.info("etsi.refused", path=request.path[:128], status=exc.status, reason=message)
        resp = _error_response(exc.status, message)
        if exc.status == 405:
            allow = exc.headers.get("Allow")
            if allow:
                resp.headers["Allow"] = allow
        return resp
    except Exception as exc:
        # Never a traceback or "internal error" to the SAE: the request is refused as a
        # server-side condition (ETSI 014: 503), the cause goes to the log.
        log.error("etsi.unexpected_error", path=request.path[:128], error=type(exc).__name__)
        return _error_response(503, "the KME cannot serve this request now; retry later")


#: more read-only resources a server may offer: (path, handler(api, request))
ExtraRoute = tuple[str, Callable[[EtsiApi, web.Request], Awaitable[web.StreamResponse]]]


def build_app(api: EtsiApi, extra_routes: Sequence[ExtraRoute] = ()) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    keys = f"{API_PREFIX}/keys"
    app.router.add_get(f"{keys}/{{slave_SAE_ID}}/status", api.status)
    app.router.add_get(f"{keys}/{{slave_SAE_ID}}/enc_keys", api.enc_keys)
    app.router.add_post(f"{keys}/{{slave_SAE_ID}}/enc_keys", api.enc_keys)
    app.router.add_get(f"{keys}/{{master_SAE_ID}}/dec_keys", api.dec_keys)
    app.router.add_post(f"{keys}/{{master_SAE_ID}}/dec_keys", api.dec_keys)
    app.router.add_get(OPENAPI_PATH, api.openapi)
    for path, handler in extra_routes:
        app.router.add_get(path, functools.partial(handler, api))
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
    service: KeySource,
    cfg: DeliverySection,
    *,
    key_size_bits: int,
    ssl_context: Any = None,
    revocation: RevocationChecker | None = None,
    host: str | None = None,
    port: int | None = None,
    extra_routes: Sequence[ExtraRoute] = (),
) -> EtsiServer:
    """Start the HTTPS server (mutual TLS). ``ssl_context`` defaults to one built from
    ``cfg.tls_cert_file``/``tls_key_file``/``client_ca_file`` (ValueError if unset);
    ``revocation`` defaults to ``cfg.crl_file`` (none: no revocation check). ``port=0``
    binds a free port."""
    if ssl_context is None:
        if cfg.tls_cert_file is None or cfg.client_ca_file is None:
            raise ValueError(
                "delivery.tls_cert_file and delivery.client_ca_file are required for the "
                "ETSI 014 server (and delivery.tls_key_file or the credential tls.key)"
            )
        # The private key may come as the systemd credential "tls.key".
        key_file = credential_path("tls.key", cfg.tls_key_file)
        ssl_context = server_context(cfg.tls_cert_file, key_file, cfg.client_ca_file)
    if revocation is None:
        revocation = RevocationChecker.from_file(cfg.crl_file, ca_file=cfg.client_ca_file)
    api = EtsiApi(service, cfg, key_size_bits=key_size_bits, revocation=revocation)
    runner = web.AppRunner(build_app(api, extra_routes), access_log=None)
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
