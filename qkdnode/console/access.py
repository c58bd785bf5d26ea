"""Who may see and do what on the console.

* Role of a client: with mutual TLS, the CN (or a DNS SAN) of its certificate, looked up
  in ``console.operators`` and ``console.monitors``; a certificate of the CA that is in
  neither list gets ``403`` and an empty body. A client without a certificate fails the
  TLS handshake (no HTTP at all). On a local console (loopback, no TLS) every client has
  ``console.local_role``.
* Reading is open to both roles; an action (POST) needs the ``operator`` role and a
  request a foreign page cannot forge: the per-process token of the page in the
  ``X-Console-Token`` header (a cross-site page cannot read it, nor send a custom header
  without a CORS pre-flight, which the console never grants), an ``Origin`` (when sent)
  equal to the console's own, and a JSON body.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from qkdnode.config.console import ConsoleSection
from qkdnode.console.models import Role
from qkdnode.delivery.tls import peer_common_names

TOKEN_HEADER = "X-Console-Token"

#: headers on every answer
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Access:
    """The access rules of one console (its config and its token)."""

    def __init__(self, cfg: ConsoleSection, token: str | None = None) -> None:
        self.cfg = cfg
        self.token = token or secrets.token_urlsafe(32)
        self._roles: dict[str, Role] = {cn: "monitor" for cn in cfg.monitors}
        self._roles.update({cn: "operator" for cn in cfg.operators})

    def role_of(self, request: web.Request) -> Role | None:
        """The client's role, None when it has none."""
        if not self.cfg.tls:
            return self.cfg.local_role
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        for name in peer_common_names(peercert):
            role = self._roles.get(name)
            if role is not None:
                return role
        return None

    def role(self, request: web.Request) -> Role:
        """The role of a client the middleware let through (monitor if none)."""
        return self.role_of(request) or "monitor"

    def action_refusal(self, request: web.Request, role: Role) -> str | None:
        """Why the POST ``request`` may not act (None: it may)."""
        if role != "operator":
            return f"actions need the operator role; this client has {role!r}"
        sent = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(sent.encode(), self.token.encode()):
            return f"missing or wrong {TOKEN_HEADER} header (reload the page)"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return f"cross-origin request from {origin[:100]!r} refused"
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"request from a {site[:40]} page refused"
        if request.content_type != "application/json":
            return "actions take a JSON body (Content-Type: application/json)"
        return None

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        role = self.role_of(request)
        if role is None:
            return _secured(web.Response(status=403))
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = web.Response(status=exc.status, text=exc.text, headers=exc.headers)
        return _secured(response)


def _secured(response: web.StreamResponse) -> web.StreamResponse:
    if not response.prepared:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response
