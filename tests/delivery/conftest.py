from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from qkdnode.config.sections import DeliverySection, SaeEntry
from qkdnode.delivery import EtsiServer, start_etsi_server
from qkdnode.delivery.pki import init_ca, issue_cert
from qkdnode.delivery.tls import client_context
from qkdnode.keystore import DeliveryNotice, KeyStore, Provenance, link_id_for

LINK = link_id_for("alice", "bob")
PROV = Provenance(qber=0.03, eps_sec=1e-10, eps_cor=1e-15)
KEY_SIZE_BITS = 256
SAES = ["sae-m", "sae-s", "sae-x", "sae-y"]
PAIRS = [("sae-m", "sae-s"), ("sae-x", "sae-y")]


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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d)
    for kme in ("kme-a", "kme-b"):
        issue_cert(d, kme, server=True, sans=["127.0.0.1", "localhost"])
    for cn in [*SAES, "stranger"]:
        issue_cert(d, cn)
    rogue = tmp_path_factory.mktemp("rogue")
    init_ca(rogue, common_name="rogue CA")
    issue_cert(rogue, "sae-m")  # right CN, wrong CA
    return Pki(d, rogue)


def delivery_cfg(
    pki: Pki, kme: str, kme_id: str, peer_kme_id: str, **kw: object
) -> DeliverySection:
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
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class Kmes:
    a: EtsiServer
    b: EtsiServer
    store_a: KeyStore
    store_b: KeyStore
    pki: Pki
    data: dict[int, bytes] = field(default_factory=dict)
    relay: bool = True
    notices: list[DeliveryNotice] = field(default_factory=list)

    def session(self, cn: str | None, *, rogue: bool = False) -> aiohttp.ClientSession:
        conn = aiohttp.TCPConnector(ssl=self.pki.client(cn, rogue=rogue), limit=300)
        return aiohttp.ClientSession(connector=conn)

    def add_blocks(self, first: int, count: int, keys_per_block: int) -> None:
        for b in range(first, first + count):
            data = os.urandom(keys_per_block * KEY_SIZE_BITS // 8)
            self.data[b] = data
            for s in (self.store_a, self.store_b):
                s.add_block(b, data, KEY_SIZE_BITS, PROV)
            for s in (self.store_a, self.store_b):
                s.commit_block(b)


@asynccontextmanager
async def running_kmes(
    pki: Pki, tmp: Path, *, relay: bool = True, max_key_count: int = 100_000, **cfg_kw: object
) -> AsyncIterator[Kmes]:
    store_a = KeyStore.open(
        tmp / "a.sqlite", link_id=LINK, side="transmitter", max_key_count=max_key_count
    )
    store_b = KeyStore.open(
        tmp / "b.sqlite", link_id=LINK, side="receiver", max_key_count=max_key_count
    )
    holder: dict[str, Kmes] = {}

    def relay_to(target: KeyStore):  # type: ignore[no-untyped-def]
        async def send(notice: DeliveryNotice) -> None:
            kmes = holder["k"]
            kmes.notices.append(notice)
            if kmes.relay:
                # the peer channel: serialised, then applied on the other node
                wire = notice.model_dump_json()
                await asyncio.to_thread(
                    target.apply_notice, DeliveryNotice.model_validate_json(wire)
                )

        return send

    cfg_a = delivery_cfg(pki, "kme-a", "KME-A", "KME-B", **cfg_kw)
    cfg_b = delivery_cfg(pki, "kme-b", "KME-B", "KME-A", **cfg_kw)
    a = await start_etsi_server(
        store_a, cfg_a, key_size_bits=KEY_SIZE_BITS, on_delivery=relay_to(store_b), port=0
    )
    b = await start_etsi_server(
        store_b, cfg_b, key_size_bits=KEY_SIZE_BITS, on_delivery=relay_to(store_a), port=0
    )
    kmes = Kmes(a, b, store_a, store_b, pki, relay=relay)
    holder["k"] = kmes
    try:
        yield kmes
    finally:
        await a.stop()
        await b.stop()
        store_a.close()
        store_b.close()
