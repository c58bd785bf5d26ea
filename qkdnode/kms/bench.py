"""Benchmarks of the trusted-node relay (medians of repeated runs).

Run: ``python -c "from qkdnode.kms.bench import run_benchmarks as r; print(r())"`` (or
``qkdnode bench``). Five key managers A - B - C - D - E run in this one process on one
asyncio loop (:mod:`qkdnode.kms.loopnet`): real peer channels (ZeroMQ over loopback TCP),
real key stores (SQLite, WAL, ``synchronous=EXTRA``, fresh files in ``$TMPDIR``), links
filled with key by hand (no photons). Every hop draws and erases its pad and two tag
keys durably, so the figures are bound by the file system's fsync latency.

The one-hop relay (A -> B) is the floor the four-hop relay (A -> E) is set against in the
same run: the added latency per hop is the difference of their medians over three.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from qkdnode.kms.loopnet import LoopNet, build
from qkdnode.log import quiet_logs

SITES = ["A", "B", "C", "D", "E"]
LINKS = [("A-B", "A", "B"), ("B-C", "B", "C"), ("C-D", "C", "D"), ("D-E", "D", "E")]
SAES = {"sae-a": "A", "sae-b": "B", "sae-e": "E"}


async def _latencies(net: LoopNet, slave: str, n: int, number: int) -> list[float]:
    out = []
    kms = net.kms["A"]
    for _ in range(n):
        t0 = time.perf_counter()
        await kms.issue("sae-a", [slave], number, 256)
        out.append(time.perf_counter() - t0)
    return out


async def _concurrent(net: LoopNet, slave: str, n: int, concurrency: int) -> float:
    """Relays per second with ``concurrency`` requests in flight."""
    kms = net.kms["A"]
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await kms.issue("sae-a", [slave], 1, 256)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def _run_once(d: Path, n: int) -> dict[str, float]:
    net = await build(d, SITES, LINKS, SAES, keys_per_link=40 * n + 2000)
    try:
        await net.wait_routes()
        one = await _latencies(net, "sae-b", n, 1)
        four = await _latencies(net, "sae-e", n, 1)
        batch = await _latencies(net, "sae-e", max(5, n // 10), 64)
        conc = await _concurrent(net, "sae-e", n, 8)
    finally:
        await net.close()
    m1, m4 = statistics.median(one), statistics.median(four)
    return {
        "one_hop_ms": 1000 * m1,
        "four_hop_ms": 1000 * m4,
        "per_hop_ms": 1000 * (m4 - m1) / 3,
        "four_hop_per_s": 1 / m4,
        "four_hop_batch_keys_per_s": 64 / statistics.median(batch),
        "four_hop_concurrent_per_s": conc,
    }


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    repeats = 1 if quick else 3
    n = 40 if quick else 200
    runs: list[dict[str, float]] = []
    with quiet_logs(), tempfile.TemporaryDirectory(prefix="qkdnode-bench-kms-") as tmp:
        for i in range(repeats):
            runs.append(asyncio.run(_run_once(Path(tmp) / str(i), n)))

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return [
        {
            "name": "kms.relay_4hop_per_s",
            "value": med("four_hop_per_s"),
            "unit": "relays/s",
            "target": ">= 10",
            "note": f"A -> E over 4 hops, one 256-bit key per relay, one after the other "
            f"(median of {n}); the keys are stored at E before the origin returns them",
        },
        {
            "name": "kms.relay_4hop_latency",
            "value": med("four_hop_ms"),
            "unit": "ms",
            "target": "<= 200",
            "note": f"one-hop relay A -> B in the same run: {med('one_hop_ms'):.1f} ms "
            f"(ratio {med('four_hop_ms') / med('one_hop_ms'):.2f})",
        },
        {
            "name": "kms.relay_added_latency_per_hop",
            "value": med("per_hop_ms"),
            "unit": "ms",
            "target": "<= 50",
            "note": "(4-hop median - 1-hop median) / 3: a pad drawn and erased, two tag keys "
            "drawn and erased, a ZeroMQ round trip",
        },
        {
            "name": "kms.relay_4hop_keys_per_s_batched",
            "value": med("four_hop_batch_keys_per_s"),
            "unit": "keys/s",
            "target": ">= 500",
            "note": "64 keys of 256 bits per enc_keys request: one relay message per hop",
        },
        {
            "name": "kms.relay_4hop_per_s_concurrent",
            "value": med("four_hop_concurrent_per_s"),
            "unit": "relays/s",
            "target": ">= 10",
            "note": "8 relays in flight at once, one key each",
        },
    ]
