"""Benchmarks of the key store and ETSI 014 delivery (medians of repeated runs).

Run: ``python -c "from qkdnode.keystore.bench import run_benchmarks as r; print(r())"``
(or ``qkdnode bench``). Every run uses fresh SQLite files in a temporary directory on the
same file system as ``$TMPDIR``; results depend heavily on its fsync latency.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from qkdnode.keystore.ids import link_id_for
from qkdnode.keystore.models import Pair, Provenance
from qkdnode.keystore.store import KeyStore

_PROV = Provenance(qber=0.02, eps_sec=1e-10, eps_cor=1e-15)
_PAIR = Pair(master="sae-m", slave="sae-s")
_LINK = link_id_for("bench-a", "bench-b")


def _store(d: Path, name: str, side: str = "transmitter") -> KeyStore:
    return KeyStore.open(d / name, link_id=_LINK, side=side, max_key_count=10**7)  # type: ignore[arg-type]


def _bench_store_blocks(d: Path, blocks: int, keys_per_block: int) -> float:
    store = _store(d, f"store-{time.monotonic_ns()}.sqlite")
    data = os.urandom(keys_per_block * 32)
    t0 = time.perf_counter()
    for b in range(blocks):
        store.add_block(b, data, 256, _PROV)
        store.commit_block(b)
    dt = time.perf_counter() - t0
    store.close()
    return blocks * keys_per_block / dt


def _bench_compact(d: Path, keys: int) -> float:
    store = _store(d, f"compact-{time.monotonic_ns()}.sqlite")
    per_block = 2000
    for b in range(max(1, keys // per_block)):
        store.add_block(b, os.urandom(per_block * 32), 256, _PROV)
        store.commit_block(b)
    t0 = time.perf_counter()
    store.compact()
    dt = time.perf_counter() - t0
    store.close()
    return dt


def _bench_take(d: Path, requests: int) -> float:
    store = _store(d, f"take-{time.monotonic_ns()}.sqlite")
    store.add_block(0, os.urandom(requests * 2 * 32), 256, _PROV)
    store.commit_block(0)
    t0 = time.perf_counter()
    for _ in range(requests):
        store.take_keys(_PAIR, 1, 256)
    dt = time.perf_counter() - t0
    store.close()
    return requests / dt


async def _bench_etsi(d: Path, requests: int, concurrency: int) -> float:
    import aiohttp

    from qkdnode.config.sections import DeliverySection, SaeEntry
    from qkdnode.delivery.etsi import start_etsi_server
    from qkdnode.delivery.pki import init_ca, issue_cert
    from qkdnode.delivery.tls import client_context

    pki = d / f"pki-{time.monotonic_ns()}"
    init_ca(pki)
    srv = issue_cert(pki, "kme", server=True, sans=["127.0.0.1"])
    cli = issue_cert(pki, "sae-m")
    store = _store(d, f"etsi-{time.monotonic_ns()}.sqlite")
    store.add_block(0, os.urandom(requests * 2 * 32), 256, _PROV)
    store.commit_block(0)
    cfg = DeliverySection(
        enabled=True,
        tls_cert_file=srv.cert_file,
        tls_key_file=srv.key_file,
        client_ca_file=pki / "ca.crt",
        saes=[
            SaeEntry(sae_id="sae-m", certificate_cn="sae-m"),
            SaeEntry(sae_id="sae-s", certificate_cn="sae-s"),
        ],
        pairs=[("sae-m", "sae-s")],
    )
    server = await start_etsi_server(store, cfg, key_size_bits=256, port=0)
    ssl_ctx = client_context(pki / "ca.crt", cli.cert_file, cli.key_file)
    url = f"{server.url}/api/v1/keys/sae-s/enc_keys"
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=concurrency)
        ) as session:
            async with session.get(url) as r:  # warm up the TLS connection
                await r.read()
            queue = iter(range(requests - 1))

            async def worker() -> None:
                for _ in queue:
                    async with session.get(url) as r:
                        if r.status != 200:
                            raise RuntimeError(f"enc_keys answered {r.status}")
                        await r.read()

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            dt = time.perf_counter() - t0
    finally:
        await server.stop()
        store.close()
    return (requests - 1) / dt


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    """Median keys stored/s, single-key takes/s, ETSI enc_keys requests/s, compaction time."""
    repeats = 1 if quick else 3
    blocks, per_block = (5, 1000) if quick else (20, 2000)
    takes = 100 if quick else 500
    etsi_requests = 100 if quick else 1000
    stored: list[float] = []
    taken: list[float] = []
    etsi: list[float] = []
    compact: list[float] = []
    compact_keys = 20_000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="qkdnode-bench-") as tmp:
        d = Path(tmp)
        for _ in range(repeats):
            stored.append(_bench_store_blocks(d, blocks, per_block))
            taken.append(_bench_take(d, takes))
            etsi.append(asyncio.run(_bench_etsi(d, etsi_requests, 16)))
            compact.append(_bench_compact(d, compact_keys))
    return [
        {
            "name": "keystore.keys_stored_per_s",
            "value": statistics.median(stored),
            "unit": "keys/s",
            "target": ">= 20000 (256-bit keys: 5 Mb/s of final key)",
            "note": f"add_block+commit_block of {per_block}-key blocks, WAL, synchronous=EXTRA",
        },
        {
            "name": "keystore.take_keys_per_s",
            "value": statistics.median(taken),
            "unit": "requests/s",
            "target": ">= 200",
            "note": "one durable transaction per single-key request (fsync bound)",
        },
        {
            "name": "etsi.enc_keys_requests_per_s",
            "value": statistics.median(etsi),
            "unit": "requests/s",
            "target": ">= 200",
            "note": "GET enc_keys (1 key) over mutual TLS, keep-alive, 16 concurrent clients",
        },
        {
            "name": "keystore.compact_s",
            "value": statistics.median(compact),
            "unit": "s",
            "target": "<= 1.0 for 100000 keys",
            "note": f"VACUUM + WAL truncation of a store of {compact_keys} 256-bit keys",
        },
    ]


if __name__ == "__main__":  # pragma: no cover
    for row in run_benchmarks():
        print(row)
