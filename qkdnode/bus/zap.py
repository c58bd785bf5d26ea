"""ZAP handler: which CURVE client keys may connect, and with which role.

One handler per ZeroMQ context (libzmq routes every handshake of a context to the single
``inproc://zeromq.zap.01`` endpoint). Server sockets name a *domain* (``control``,
``telemetry``, ``peer``); each domain has its own allowlist ``{public key: (name, role)}``.
A client whose key is not listed gets ``400`` and the connection is dropped before any
message reaches the application. The ZAP user id of an accepted client is its Z85 public
key; servers map it back to the name and role.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
import zmq
from zmq.utils import z85

from qkdnode.bus.errors import BusError
from qkdnode.bus.sockets import events, make_curve_server, warn_plaintext

if TYPE_CHECKING:
    from qkdnode.config.sections import BusSection

log = structlog.get_logger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


@dataclass(frozen=True)
class Identity:
    name: str
    role: str


class ZapHandler:
    """Authenticate CURVE handshakes of one context against per-domain allowlists."""

    _by_context: ClassVar[dict[int, ZapHandler]] = {}

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self._ctx = ctx
        self.domains: dict[str, dict[bytes, Identity]] = {}
        self._sock: zmq.Socket[Any] | None = None
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.denied = 0

    @classmethod
    def acquire(cls, ctx: zmq.Context[Any]) -> ZapHandler:
        """The handler of ``ctx``, started (bound) on first use. Pair with :meth:`release`."""
        key = int(ctx.underlying)
        handler = cls._by_context.get(key)
        if handler is None:
            handler = cls(ctx)
            cls._by_context[key] = handler
        handler._users += 1
        if handler._sock is None:
            handler._start()
        return handler

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            self._stop()
            ZapHandler._by_context.pop(int(self._ctx.underlying), None)

    def set_domain(self, domain: str, allow: dict[bytes, Identity]) -> None:
        self.domains[domain] = dict(allow)

    def lookup(self, domain: str, user_id: str) -> Identity | None:
        return self.domains.get(domain, {}).get(user_id.encode("ascii", "replace"))

    def _start(self) -> None:
        sock: zmq.Socket[Any] = zmq.Socket(self._ctx, zmq.REP)
        sock.linger = 0
        sock.bind(ZAP_ENDPOINT)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.FD, self._on_readable)
        self._loop.call_soon(self._on_readable)

    def _stop(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.FD)
            self._sock.close(linger=0)
            self._sock = None

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while events(sock) & zmq.POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            sock.send_multipart(self._answer(frames))

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain_b, address_b, _identity, mechanism = frames[:6]
        creds = frames[6:]
        domain = domain_b.decode("utf-8", "replace")
        address = address_b.decode("utf-8", "replace")

        def reply(code: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
            return [b"1.0", request_id, code, text, user, b""]

        if version != b"1.0":
            return reply(b"500", b"unsupported ZAP version")
        allow = self.domains.get(domain)
        if mechanism != b"CURVE" or allow is None or len(creds) != 1 or len(creds[0]) != 32:
            self.denied += 1
            log.warning(
                "bus.zap.denied",
                domain=domain,
                address=address,
                mechanism=mechanism.decode("ascii", "replace"),
                reason="mechanism",
            )
            return reply(b"400", b"CURVE required")
        public_z85 = z85.encode(creds[0])
        ident = allow.get(public_z85)
        if ident is None:
            self.denied += 1
            log.warning(
                "bus.zap.denied",
                domain=domain,
                address=address,
                client_key=public_z85.decode("ascii"),
                reason="unknown key",
            )
            return reply(b"400", b"unknown client key")
        log.info(
            "bus.zap.accepted", domain=domain, address=address, client=ident.name, role=ident.role
        )
        return reply(b"200", b"OK", public_z85)


def allowlist(bus: BusSection, roles: frozenset[str]) -> dict[bytes, Identity]:
    """ZAP allowlist ``{public key: identity}`` of the configured clients with ``roles``."""
    return {
        c.public_key.encode("ascii"): Identity(c.name, c.role)
        for c in bus.clients
        if c.role in roles
    }


def secure_and_bind(
    sock: zmq.Socket[Any],
    ctx: zmq.Context[Any],
    *,
    component: str,
    endpoint: str,
    endpoint_key: str,
    plaintext: bool,
    secret_key: bytes | None,
    missing_key_error: str,
    domain: str,
    allow: dict[bytes, Identity],
) -> ZapHandler | None:
    """Make ``sock`` a CURVE server on ZAP ``domain`` (or warn when ``plaintext``), then
    bind it to ``endpoint``.

    Returns the acquired ZAP handler (None in plaintext); the caller releases it when it
    closes the socket. On failure the socket is closed, the handler released, and
    :class:`BusError` raised: ``missing_key_error`` when no secret key is given,
    ``"<endpoint_key>: cannot bind ..."`` when the bind fails.
    """
    zap: ZapHandler | None = None
    if plaintext:
        warn_plaintext(component, endpoint)
    else:
        if secret_key is None:
            sock.close(linger=0)
            raise BusError(missing_key_error)
        zap = ZapHandler.acquire(ctx)
        zap.set_domain(domain, allow)
        make_curve_server(sock, secret_key, domain)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if zap is not None:
            zap.release()
        raise BusError(f"{endpoint_key}: cannot bind {endpoint}: {exc}") from None
    return zap
