"""Benchmarks of the key store and ETSI 014 delivery (medians of repeated runs).

Run: ``python -c "from qkdnode.keystore.bench import run_benchmarks as r; print(r())"``
(or ``qkdnode bench``). Every run uses fresh SQLite files in a temporary directory on the
same file system as ``$TMPDIR``; results depend heavily on its fsync latency.

The ETSI rows run everything in this one process, on one asyncio event loop: the KME(s),
their ETSI servers (mutual TLS on loopback) and the SAE clients (aiohttp, keep-alive).
The two-KME row links two :class:`~qkdnode.delivery.keyservice.KeyService` objects
through two real :class:`~qkdnode.bus.peer.PeerChannel` ends (ZeroMQ over loopback TCP,
CURVE), each fed to a :class:`~qkdnode.link.LinkCoordinator` by a reader task as
:mod:`qkdnode.node` does. Info-level logs are off while the benchmarks run (warnings and
errors still go through): the figures are those of the delivery path, not of log output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkdnode.keystore.ids import ID_SEED_BYTES, link_id_for
from qkdnode.keystore.models import KeyState, Provenance
from qkdnode.keystore.store import KeyStore
from qkdnode.log import quiet_logs

if TYPE_CHECKING:
    import aiohttp
    import zmq.asyncio

    from qkdnode.bus.peer import PeerChannel
    from qkdnode.config.sections import DeliverySection
    from qkdnode.delivery.etsi import EtsiServer
    from qkdnode.delivery.keyservice import KeyService
    from qkdnode.link import LinkCoordinator, LinkRequest, Step

_PROV = Provenance(qber=0.02, eps_sec=1e-10, eps_cor=1e-15)
_MASTER, _SLAVE = "sae-m", "sae-s"
_LINK = link_id_for("bench-a", "bench-b")
_KEY_BITS = 256
_KEY_BYTES = _KEY_BITS // 8
_PER_BLOCK = 2000


def _store(d: Path, name: str, side: str = "transmitter") -> KeyStore:
    return KeyStore.open(d / name, link_id=_LINK, side=side, max_key_count=10**7)  # type: ignore[arg-type]


def _block_data(keys: int) -> bytes:
    """A block's final key: the ID seed, then ``keys`` 256-bit keys."""
    return os.urandom(ID_SEED_BYTES + keys * _KEY_BYTES)


def _fill(stores: Sequence[KeyStore], keys: int) -> None:
    """Give every store the same committed blocks, ``keys`` keys in all (the issuer of a
    key is fixed by its index parity: each side may hand out about half of them)."""
    block = 0
    while keys > 0:
        n = min(_PER_BLOCK, keys)
        data = _block_data(n)
        for s in stores:
            s.add_block(block, data, _KEY_BITS, _PROV)
        for s in stores:
            s.commit_block(block)
        keys -= n
        block += 1


# -- key store ------------------------------------------------------------------------------


def _bench_store_blocks(d: Path, blocks: int, keys_per_block: int) -> float:
    store = _store(d, f"store-{time.monotonic_ns()}.sqlite")
    data = _block_data(keys_per_block)
    t0 = time.perf_counter()
    for b in range(blocks):
        store.add_block(b, data, _KEY_BITS, _PROV)
        store.commit_block(b)
    dt = time.perf_counter() - t0
    store.close()
    return blocks * keys_per_block / dt


def _bench_compact(d: Path, keys: int) -> float:
    store = _store(d, f"compact-{time.monotonic_ns()}.sqlite")
    _fill([store], keys)
    t0 = time.perf_counter()
    store.compact()
    dt = time.perf_counter() - t0
    store.close()
    return dt


def _bench_pick_confirm(d: Path, requests: int) -> float:
    """Issuer-side store work of one single-key enc_keys, one after the other:
    ``pick_for_enc`` (no write) then ``confirm_issued`` (one durable transaction)."""
    store = _store(d, f"issue-{time.monotonic_ns()}.sqlite")
    _fill([store], 2 * requests + 2)
    t0 = time.perf_counter()
    for _ in range(requests):
        issued = store.pick_for_enc(1, _KEY_BITS)
        store.confirm_issued(_MASTER, [_SLAVE], issued)
    dt = time.perf_counter() - t0
    store.close()
    return requests / dt


# -- ETSI 014 -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pki:
    ca: Path
    kme_a: tuple[Path, Path]
    kme_b: tuple[Path, Path]
    master: tuple[Path, Path]
    slave: tuple[Path, Path]


def _make_pki(d: Path) -> _Pki:
    from qkdnode.delivery.pki import init_ca, issue_cert

    pki = d / "pki"
    init_ca(pki)
    certs = {
        cn: issue_cert(pki, cn, server=cn.startswith("kme"), sans=["127.0.0.1"])
        for cn in ("kme-a", "kme-b")
    }
    certs.update({cn: issue_cert(pki, cn) for cn in (_MASTER, _SLAVE)})
    pair = {cn: (f.cert_file, f.key_file) for cn, f in certs.items()}
    return _Pki(pki / "ca.crt", pair["kme-a"], pair["kme-b"], pair[_MASTER], pair[_SLAVE])


def _delivery(pki: _Pki, server: tuple[Path, Path], kme_id: str, peer_id: str) -> DeliverySection:
    from qkdnode.config.sections import DeliverySection, SaeEntry

    return DeliverySection(
        enabled=True,
        kme_id=kme_id,
        peer_kme_id=peer_id,
        tls_cert_file=server[0],
        tls_key_file=server[1],
        client_ca_file=pki.ca,
        saes=[
            SaeEntry(sae_id=_MASTER, certificate_cn=_MASTER),
            SaeEntry(sae_id=_SLAVE, certificate_cn=_SLAVE),
        ],
        pairs=[(_MASTER, _SLAVE)],
    )


def _session(pki: _Pki, client: tuple[Path, Path], concurrency: int) -> aiohttp.ClientSession:
    """An SAE's HTTPS client: its certificate, keep-alive, ``concurrency`` connections."""
    import aiohttp

    from qkdnode.delivery.tls import client_context

    ssl_ctx = client_context(pki.ca, client[0], client[1])
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=concurrency))


async def _serve_peer_request(service: KeyService, req: LinkRequest) -> dict[str, Any]:
    """The key-service steps of a node's link handler (as ``ExchangeSession.serve``)."""
    from qkdnode.link import LinkError

    if req.step == "activate":
        return await service.serve_activate(req.args)
    if req.step == "release":
        return await service.serve_release(req.args)
    if req.step == "notice":
        return await service.serve_notice(req.args)
    if req.step == "keysync":
        return {"summary": (await service.serve_sync(req.args)).model_dump(mode="json")}
    raise LinkError(f"step {req.step!r} is not served by this benchmark")


async def _run_workers(requests: int, concurrency: int, one: Any) -> float:
    """Run ``one()`` ``requests`` times on ``concurrency`` workers; returns seconds."""
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def _bench_etsi_enc(d: Path, pki: _Pki, requests: int, concurrency: int) -> float:
    """enc_keys at one KME whose peer KME is answered in process (no peer channel)."""
    from qkdnode.delivery.etsi import start_etsi_server
    from qkdnode.delivery.keyservice import KeyService
    from qkdnode.link import LinkError, LinkRequest

    tag = time.monotonic_ns()
    tx = _store(d, f"enc-a-{tag}.sqlite", "transmitter")
    rx = _store(d, f"enc-b-{tag}.sqlite", "receiver")
    _fill([tx, rx], 2 * (requests + concurrency) + 2)

    async def unreachable(step: Step, timeout_s: float, **args: Any) -> dict[str, Any]:
        raise LinkError("this benchmark's peer KME sends nothing")

    peer = KeyService(rx, unreachable, lambda: True)

    async def direct(step: Step, timeout_s: float, **args: Any) -> dict[str, Any]:
        return await _serve_peer_request(peer, LinkRequest(rid=0, step=step, args=args))

    service = KeyService(tx, direct, lambda: True)
    await service.sync()
    server = await start_etsi_server(
        service, _delivery(pki, pki.kme_a, "KME-A", "KME-B"), key_size_bits=_KEY_BITS, port=0
    )
    url = f"{server.url}/api/v1/keys/{_SLAVE}/enc_keys"
    body = {"number": 1, "size": _KEY_BITS}
    try:
        async with _session(pki, pki.master, concurrency) as master:

            async def one() -> None:
                async with master.post(url, json=body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"enc_keys answered {r.status}: {await r.text()}")
                    await r.read()

            await _run_workers(concurrency, concurrency, one)  # open the TLS connections
            dt = await _run_workers(requests, concurrency, one)
    finally:
        await server.stop()
        await service.close()
        await peer.close()
        tx.close()
        rx.close()
    return requests / dt


@dataclass
class _Kme:
    """One KME of the two-KME benchmark."""

    store: KeyStore
    zctx: zmq.asyncio.Context
    peer: PeerChannel
    link: LinkCoordinator
    service: KeyService
    server: EtsiServer | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.service.close()
        await self.peer.stop()
        self.zctx.destroy(linger=0)
        self.store.close()


async def _peer_reader(peer: PeerChannel, link: LinkCoordinator) -> None:
    """Feed ``link.*`` messages of the peer channel to the coordinator (as node.py)."""
    from qkdnode.bus.errors import PeerDisconnected, PeerTimeout
    from qkdnode.link import LINK_PREFIX

    while True:
        try:
            msg = await peer.recv(1.0)
        except PeerTimeout:
            continue
        except PeerDisconnected as exc:
            link.fail_pending(f"peer disconnected: {exc}")
            continue
        if msg.kind.startswith(LINK_PREFIX):
            link.on_message(msg.kind, msg.header)


def _kme(store: KeyStore, role: str, endpoint: str, secret: bytes, peer_public: bytes) -> _Kme:
    import zmq.asyncio

    from qkdnode.bus.peer import PeerChannel
    from qkdnode.config.sections import BusSection
    from qkdnode.delivery.keyservice import KeyService
    from qkdnode.link import LinkCoordinator

    bus = BusSection(peer_endpoint=endpoint, peer_public_key=peer_public.decode("ascii"))
    zctx = zmq.asyncio.Context()  # one per KME, as in two daemons
    peer = PeerChannel(zctx, bus, role, secret)  # type: ignore[arg-type]

    async def send(kind: str, header: dict[str, Any]) -> None:
        await peer.send(kind, header, [])

    link = LinkCoordinator(send)
    service = KeyService(store, link.request, lambda: peer.connected)

    async def handler(req: LinkRequest) -> dict[str, Any]:
        return await _serve_peer_request(service, req)

    link.handler = handler
    return _Kme(store, zctx, peer, link, service)


@contextlib.asynccontextmanager
async def _kme_pair(d: Path, pki: _Pki, keys: int) -> AsyncIterator[tuple[_Kme, _Kme]]:
    """KME A (transmitter node: binds the peer channel, initiates the key-ID sync) and
    KME B (receiver node), in step, each with its ETSI server on a free loopback port."""
    import zmq

    from qkdnode.delivery.etsi import start_etsi_server

    tag = time.monotonic_ns()
    tx = _store(d, f"rt-a-{tag}.sqlite", "transmitter")
    rx = _store(d, f"rt-b-{tag}.sqlite", "receiver")
    _fill([tx, rx], keys)
    a_public, a_secret = zmq.curve_keypair()
    b_public, b_secret = zmq.curve_keypair()
    kmes: list[_Kme] = []
    try:
        a = _kme(tx, "transmitter", "tcp://127.0.0.1:0", a_secret, b_public)
        kmes.append(a)
        await a.peer.start()
        b = _kme(rx, "receiver", a.peer.endpoint, b_secret, a_public)
        kmes.append(b)
        await b.peer.start()
        for k in kmes:
            k.tasks.append(asyncio.create_task(_peer_reader(k.peer, k.link)))
        await asyncio.gather(a.peer.wait_connected(10.0), b.peer.wait_connected(10.0))
        await a.service.sync()  # the transmitter's key-ID sync puts both in step
        if not b.service.in_step:
            raise RuntimeError("KME B is not in step after the key-ID sync")
        a.server = await start_etsi_server(
            a.service, _delivery(pki, pki.kme_a, "KME-A", "KME-B"), key_size_bits=_KEY_BITS, port=0
        )
        b.server = await start_etsi_server(
            b.service, _delivery(pki, pki.kme_b, "KME-B", "KME-A"), key_size_bits=_KEY_BITS, port=0
        )
        yield a, b
    finally:
        for k in reversed(kmes):
            await k.close()
        for s in (tx, rx):
            with contextlib.suppress(Exception):
                s.close()


async def _bench_etsi_round_trip(d: Path, pki: _Pki, round_trips: int, concurrency: int) -> float:
    """Round trips/s: POST enc_keys (1 key, 256 bits) at KME A as the master SAE, then
    POST dec_keys with the returned key_ID at KME B as the slave SAE; bytes compared."""
    async with _kme_pair(d, pki, 2 * (round_trips + concurrency) + 2) as (a, b):
        assert a.server is not None and b.server is not None
        enc_url = f"{a.server.url}/api/v1/keys/{_SLAVE}/enc_keys"
        dec_url = f"{b.server.url}/api/v1/keys/{_MASTER}/dec_keys"
        enc_body = {"number": 1, "size": _KEY_BITS}
        async with (
            _session(pki, pki.master, concurrency) as master,
            _session(pki, pki.slave, concurrency) as slave,
        ):

            async def one() -> None:
                async with master.post(enc_url, json=enc_body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"enc_keys answered {r.status}: {await r.text()}")
                    enc = (await r.json())["keys"][0]
                dec_body = {"key_IDs": [{"key_ID": enc["key_ID"]}]}
                async with slave.post(dec_url, json=dec_body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"dec_keys answered {r.status}: {await r.text()}")
                    dec = (await r.json())["keys"][0]
                key = base64.b64decode(enc["key"])
                if (
                    dec["key_ID"] != enc["key_ID"]
                    or base64.b64decode(dec["key"]) != key
                    or len(key) != _KEY_BYTES
                ):
                    raise RuntimeError("dec_keys at KME B returned other bytes than enc_keys at A")

            await _run_workers(concurrency, concurrency, one)  # open the TLS connections
            dt = await _run_workers(round_trips, concurrency, one)
        # The delivery notices B sent A: every issued key must be erased at A in the end.
        for _ in range(500):
            if not a.store.counts()[KeyState.DELIVERED.value]:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("KME A still holds delivered keys: delivery notices were lost")
    return round_trips / dt


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    """Median keys stored/s, issue cycles/s, ETSI enc_keys requests/s, ETSI enc+dec round
    trips/s between two KMEs, compaction time."""
    repeats = 1 if quick else 3
    blocks, per_block = (5, 1000) if quick else (20, 2000)
    issues = 100 if quick else 500
    etsi_requests = 200 if quick else 2000
    round_trips = 200 if quick else 2000
    concurrency = 16
    compact_keys = 20_000 if quick else 100_000
    stored: list[float] = []
    issued: list[float] = []
    enc: list[float] = []
    rt: list[float] = []
    compact: list[float] = []
    with quiet_logs(), tempfile.TemporaryDirectory(prefix="qkdnode-bench-") as tmp:
        d = Path(tmp)
        pki = _make_pki(d)
        for _ in range(repeats):
            stored.append(_bench_store_blocks(d, blocks, per_block))
            issued.append(_bench_pick_confirm(d, issues))
            enc.append(asyncio.run(_bench_etsi_enc(d, pki, etsi_requests, concurrency)))
            rt.append(asyncio.run(_bench_etsi_round_trip(d, pki, round_trips, concurrency)))
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
            "name": "keystore.pick_confirm_per_s",
            "value": statistics.median(issued),
            "unit": "requests/s",
            "target": ">= 200",
            "note": "issuer store only, one request after the other: pick_for_enc (1 key, "
            "no write) + confirm_issued (one durable transaction, fsync bound)",
        },
        {
            "name": "etsi.enc_keys_requests_per_s",
            "value": statistics.median(enc),
            "unit": "requests/s",
            "target": ">= 200",
            "note": f"POST enc_keys (1 key, 256 bits) at one KME over mutual TLS, keep-alive, "
            f"{concurrency} concurrent clients; the peer's activation is answered in process "
            "by a second KeyService and store (durable activate there, no peer channel)",
        },
        {
            "name": "etsi.enc_dec_round_trips_per_s",
            "value": statistics.median(rt),
            "unit": "round trips/s",
            "target": ">= 300",
            "note": f"{concurrency} concurrent SAE clients (aiohttp, keep-alive, mutual TLS): "
            "POST enc_keys (1 key, 256 bits) at KME A as master, then POST dec_keys of that "
            "key_ID at KME B as slave, bytes compared; two KMEs with own SQLite stores "
            "linked by a CURVE peer channel over loopback TCP (activate, then notice), all "
            "in one process and one event loop",
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
