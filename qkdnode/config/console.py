"""``[console]``: the operator web console the node serves itself (docs/console.md).

Nothing listens unless ``listen_host`` is set. Two ways to reach it:

* **mutual TLS** (``tls_cert_file``, ``tls_key_file``, ``client_ca_file`` all set): every
  client presents a certificate of the CA; its CN (or a DNS SAN) must be listed in
  ``operators`` or ``monitors``, which gives its role. Anyone else gets no page at all;
* **local** (none of the three): plain HTTP bound to a loopback address only, every
  client with ``local_role`` (``monitor`` by default: read-only).

Actions (start, stop, calibrate, recover) need the ``operator`` role.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from qkdnode.config.sections import Section


class ConsoleSection(Section):
    """The web console: listener, access and the history it keeps."""

    listen_host: str | None = Field(
        None,
        description="address to bind (None: no console). Without TLS files it must be a "
        "loopback address; wildcards (0.0.0.0, ::) are refused",
    )
    listen_port: int = Field(8080, ge=0, le=65535, description="port (0: any free port)")
    tls_cert_file: Path | None = Field(None, description="server certificate (PEM)")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    client_ca_file: Path | None = Field(
        None, description="CA whose client certificates may connect (mutual TLS)"
    )
    operators: list[str] = Field(
        default_factory=list,
        description="client certificate CNs with the operator role (may start, stop, "
        "calibrate, recover)",
    )
    monitors: list[str] = Field(
        default_factory=list, description="client certificate CNs with the monitor role"
    )
    local_role: Literal["monitor", "operator"] = Field(
        "monitor", description="role of every client of a local (loopback, no TLS) console"
    )
    history_file: Path = Field(
        Path("console-history.sqlite"),
        description="history store, relative to node.state_dir",
    )
    retention_days: float = Field(7.0, gt=0, le=3650, description="history kept, days")
    sample_interval_s: float = Field(
        10.0, ge=0.5, le=3600, description="seconds between two history samples of a link"
    )
    stale_after_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="a page marks a link's data stale after this long without news",
    )

    @field_validator("listen_host")
    @classmethod
    def _listen_host(cls, v: str | None) -> str | None:
        if v is None:
            return None
        host = v.strip().strip("[]")
        if host in ("", "*", "0.0.0.0", "::"):
            raise ValueError(f"wildcard bind {v!r} not allowed: name the interface address")
        return host

    @property
    def enabled(self) -> bool:
        return self.listen_host is not None

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @model_validator(mode="after")
    def _check(self) -> ConsoleSection:
        files = (self.tls_cert_file, self.tls_key_file, self.client_ca_file)
        if any(f is not None for f in files) and not all(f is not None for f in files):
            raise ValueError(
                "console: set tls_cert_file, tls_key_file and client_ca_file together "
                "(mutual TLS), or none of them (local console on a loopback address)"
            )
        both = sorted(set(self.operators) & set(self.monitors))
        if both:
            raise ValueError(f"console: {both} listed as both operators and monitors")
        if self.listen_host is not None and not self.tls and not _loopback(self.listen_host):
            raise ValueError(
                f"console.listen_host = {self.listen_host!r}: without TLS files the console "
                "binds a loopback address only (127.0.0.1, ::1, localhost)"
            )
        if self.tls and not (self.operators or self.monitors):
            raise ValueError(
                "console: with mutual TLS, list the client certificate CNs in operators "
                "or monitors (no one else gets a page)"
            )
        return self


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
