"""TLS contexts of the ETSI 014 server (mutual TLS) and of test clients."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path) -> ssl.SSLContext:
    """TLS >= 1.2 server context that requires a client certificate signed by the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cafile=client_ca_file)
    return ctx


def client_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """Client context trusting ``ca_file``, presenting ``cert_file`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=ca_file)
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def peer_common_names(peercert: dict[str, Any] | None) -> list[str]:
    """The subject CNs, then the DNS SANs, of a peer certificate (``getpeercert()`` form)."""
    if not peercert:
        return []
    names = [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    names += [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    return names
