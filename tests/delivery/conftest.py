"""Two ETSI GS QKD 014 servers over a :class:`KmePair`, with mutual TLS on loopback.

KME A serves the transmitter's :class:`KeyService` (it issues the even-indexed keys of
each block), KME B the receiver's (odd-indexed keys). The two key services talk through
the in-memory peer channel of ``kme_pair``; a test can cut it (``kme_a.connected =
False``) or drop replies (``kme_b.drop_replies = {"activate"}``). Each SAE is an aiohttp
client with its own certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkdnode.config.sections import DeliverySection, SaeEntry
from qkdnode.delivery import EtsiServer, start_etsi_server
from qkdnode.delivery.pki import init_ca, issue_cert
from qkdnode.delivery.revocation import RevocationChecker
from qkdnode.delivery.tls import client_context
from qkdnode.keystore import KeyStore
from qkdnode.keystore.ids import ID_SEED_BYTES

from .kme_pair import PROV, Kme, KmePair

KEY_SIZE_BITS = 256
KEY_BYTES = KEY_SIZE_BITS // 8
# sae-m is the master of three pairs (for additional_slave_SAE_IDs), sae-x/sae-y another pair
SAES = ["sae-m", "sae-s", "sae-s2", "sae-s3", "sae-x", "sae-y"]
PAIRS = [("sae-m", "sae-s"), ("sae-m", "sae-s2"), ("sae-m", "sae-s3"), ("sae-x", "sae-y")]
#: the one dec_keys refusal for every ID a slave cannot have (docs/key-delivery.md)
UNKNOWN = "is unknown, already delivered, or not issued to this SAE pair"


def unknown_message(key_id: str) -> str:
    return f"key_ID {key_id} {UNKNOWN}"


@dataclass
class Pki:
    dir: Path
    rogue_dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def client(self, cn: str | None, *, rogue: bool = False) -> ssl.SSLContext:
        if cn is None:
            return client_context(self.ca)
        d = self.rogue_dir if rogue else self.dir
        return client_context(self.ca, d / f"{cn}.crt", d / f"{cn}.key")


def make_pki(d: Path, rogue: Path, extra_cns: tuple[str, ...] = ()) -> Pki:
    """A CA with the two KME server certificates, one client certificate per SAE (plus
    ``stranger``, registered nowhere, and ``extra_cns``), and a rogue CA that issued a
    certificate with sae-m's CN."""
    init_ca(d)
    for kme in ("kme-a", "kme-b"):
        issue_cert(d, kme, server=True, sans=["127.0.0.1", "localhost"])
    for cn in [*SAES, "stranger", *extra_cns]:
        issue_cert(d, cn)
    init_ca(rogue, common_name="rogue CA")
    issue_cert(rogue, "sae-m")  # right CN, wrong CA
    return Pki(d, rogue)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("rogue"))


def delivery_cfg(pki: Pki, kme: str, kme_id: str, peer_kme_id: str, **kw: Any) -> DeliverySection:
    return DeliverySection(
        enabled=True,
        listen_host="127.0.0.1",
        kme_id=kme_id,
        peer_kme_id=peer_kme_id,
        tls_cert_file=pki.dir / f"{kme}.crt",
        tls_key_file=pki.dir / f"{kme}.key",
        client_ca_file=pki.ca,
        saes=[SaeEntry(sae_id=s, certificate_cn=s) for s in SAES],
        pairs=PAIRS,
        **kw,
    )


@dataclass
class Kmes:
    """KME A (transmitter node) and KME B (receiver node) of one link, both serving."""

    pair: KmePair
    a: EtsiServer
    b: EtsiServer
    pki: Pki
    #: block ID -> the block's key bytes (the final key without its ID seed)
    data: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def kme_a(self) -> Kme:
        return self.pair.tx

    @property
    def kme_b(self) -> Kme:
        return self.pair.rx

    @property
    def store_a(self) -> KeyStore:
        return self.pair.tx.store

    @property
    def store_b(self) -> KeyStore:
        return self.pair.rx.store

    def server(self, node: str) -> EtsiServer:
        return self.a if node == "a" else self.b

    def url(self, node: str, sae: str, what: str) -> str:
        """``https://.../api/v1/keys/<sae>/<what>`` at KME ``node`` ("a" or "b")."""
        return f"{self.server(node).url}/api/v1/keys/{sae}/{what}"

    def session(self, cn: str | None, *, rogue: bool = False) -> aiohttp.ClientSession:
        conn = aiohttp.TCPConnector(ssl=self.pki.client(cn, rogue=rogue), limit=300)
        return aiohttp.ClientSession(connector=conn)

    def add_blocks(self, count: int, keys_per_block: int) -> list[int]:
        """``count`` blocks of ``keys_per_block`` keys of KEY_SIZE_BITS, stored and
        committed on both nodes (as ``KmePair.add_blocks``, but the bytes are kept)."""
        added = []
        for _ in range(count):
            seed_and_keys = os.urandom(ID_SEED_BYTES + keys_per_block * KEY_BYTES)
            b = self.pair.next_block
            self.pair.next_block += 1
            for kme in (self.kme_a, self.kme_b):
                kme.store.add_block(b, seed_and_keys, KEY_SIZE_BITS, PROV)
            for kme in (self.kme_a, self.kme_b):
                kme.store.commit_block(b)
            self.data[b] = seed_and_keys[ID_SEED_BYTES:]
            added.append(b)
        return added

    def key(self, block: int, index: int) -> bytes:
        """The stored key ``index`` of ``block``."""
        return self.data[block][index * KEY_BYTES : (index + 1) * KEY_BYTES]

    def all_keys(self) -> list[bytes]:
        return [self.key(b, i) for b in self.data for i in range(len(self.data[b]) // KEY_BYTES)]

    async def sync(self) -> None:
        """The key-ID synchronisation (the transmitter initiates it); both in step."""
        await self.pair.sync()
        assert self.kme_a.service.in_step and self.kme_b.service.in_step

    def reconnect(self) -> None:
        for kme in (self.kme_a, self.kme_b):
            kme.connected = True
            kme.drop_replies.clear()


@asynccontextmanager
async def running_kmes(
    pki: Pki,
    tmp: Path,
    *,
    sync: bool = True,
    activation_timeout_s: float = 10.0,
    key_ttl_s: float = 3600.0,
    revocation_a: RevocationChecker | None = None,
    revocation_b: RevocationChecker | None = None,
    **cfg_kw: Any,
) -> AsyncIterator[Kmes]:
    """Both KMEs serving on free loopback ports; in step unless ``sync=False``."""
    pair = KmePair(tmp, key_ttl_s=key_ttl_s, activation_timeout_s=activation_timeout_s)
    servers: list[EtsiServer] = []
    try:
        cfg_a = delivery_cfg(pki, "kme-a", "KME-A", "KME-B", **cfg_kw)
        cfg_b = delivery_cfg(pki, "kme-b", "KME-B", "KME-A", **cfg_kw)
        a = await start_etsi_server(
            pair.tx.service, cfg_a, key_size_bits=KEY_SIZE_BITS, revocation=revocation_a, port=0
        )
        servers.append(a)
        b = await start_etsi_server(
            pair.rx.service, cfg_b, key_size_bits=KEY_SIZE_BITS, revocation=revocation_b, port=0
        )
        servers.append(b)
        kmes = Kmes(pair, a, b, pki)
        if sync:
            await kmes.sync()
        yield kmes
    finally:
        for server in servers:
            await server.stop()
        for kme in (pair.tx, pair.rx):
            await kme.service.close()
        # requests still being served on the in-memory channel (e.g. a release whose
        # reply can never come back) end before the stores close
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for t in others:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*others, return_exceptions=True)
        pair.close()


def run(pki: Pki, tmp: Path, scenario: Callable[[Kmes], Any], **kw: Any) -> None:
    """Run ``async scenario(kmes)`` against two fresh KMEs."""

    async def main() -> None:
        async with running_kmes(pki, tmp, **kw) as k:
            await scenario(k)

    asyncio.run(main())


# -- HTTP helpers -----------------------------------------------------------------------------


def _check_error(status: int, headers: Any, body: Any) -> None:
    """The error contract: every non-200 is the ETSI error JSON, 503 with Retry-After."""
    if status == 200:
        return
    assert headers.get("Content-Type", "").startswith("application/json"), (status, body)
    assert isinstance(body, dict) and isinstance(body.get("message"), str), body
    assert set(body) <= {"message", "details"}, body
    if status == 503:
        assert headers.get("Retry-After", "").isdigit(), dict(headers)


async def call(
    s: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers); error bodies are checked against the contract."""
    async with s.request(method, url, **kw) as r:
        body = await r.json(content_type=None)
        _check_error(r.status, r.headers, body)
        return r.status, body, dict(r.headers)


async def get(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    st, body, _ = await call(s, "GET", url, **kw)
    return st, body


async def post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, dict[str, Any]]:
    st, out, _ = await call(s, "POST", url, json=body)
    return st, out


def ids_body(ids: list[str]) -> dict[str, Any]:
    return {"key_IDs": [{"key_ID": i} for i in ids]}


async def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Until ``cond()`` holds (background notices and releases arrive)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
