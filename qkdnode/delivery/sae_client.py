"""A small ETSI GS QKD 014 client (an SAE's side): status, enc_keys, dec_keys over HTTPS
with a client certificate. Standard library only (``urllib``, ``ssl``).

Used by ``qkdnode demo --network`` and the tests; an integrator's own client needs no
more than this (docs/key-delivery.md, docs/network.md)."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdnode.delivery.tls import client_context


class EtsiClientError(Exception):
    """A non-200 answer (``status``, the ETSI ``message``) or no answer (``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SaeKey:
    """A key as an SAE receives it (bytes never in ``repr``)."""

    key_id: uuid.UUID
    key: bytes = field(repr=False)


class EtsiClient:
    """``url``: the KME's base URL (``https://host:port``). Certificates as PEM files."""

    def __init__(
        self,
        url: str,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        if not url.startswith("https://"):
            raise ValueError(f"an ETSI 014 KME URL starts with https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._ctx: ssl.SSLContext = client_context(ca_file, cert_file, key_file)

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 (https only: checked in __init__)
            f"{self.url}{path}",
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"} if body is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._ctx) as rep:  # noqa: S310
                out: dict[str, Any] = json.loads(rep.read())
                return out
        except urllib.error.HTTPError as exc:
            try:
                message = str(json.loads(exc.read()).get("message", exc.reason))
            except (ValueError, OSError):
                message = str(exc.reason)
            raise EtsiClientError(exc.code, message) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise EtsiClientError(0, f"{self.url}: {getattr(exc, 'reason', exc)}") from None

    def status(self, slave: str) -> dict[str, Any]:
        return self._call(f"/api/v1/keys/{slave}/status")

    def enc_keys(self, slave: str, number: int = 1, size_bits: int | None = None) -> list[SaeKey]:
        body: dict[str, Any] = {"number": number}
        if size_bits is not None:
            body["size"] = size_bits
        return _keys(self._call(f"/api/v1/keys/{slave}/enc_keys", body))

    def dec_keys(self, master: str, key_ids: list[uuid.UUID]) -> list[SaeKey]:
        body = {"key_IDs": [{"key_ID": str(k)} for k in key_ids]}
        return _keys(self._call(f"/api/v1/keys/{master}/dec_keys", body))

    def get(self, path: str) -> dict[str, Any]:
        """Any other read-only resource of the KME (e.g. ``/api/v1/network/qkd_node``)."""
        return self._call(path)


def _keys(container: dict[str, Any]) -> list[SaeKey]:
    return [SaeKey(uuid.UUID(k["key_ID"]), base64.b64decode(k["key"])) for k in container["keys"]]
