"""Bus benchmarks: control round trip, request throughput, peer bulk transfer.

``run_benchmarks(quick)`` returns ``{"name", "value", "unit", "target", "note"}`` dicts,
each value the median over repeated runs. Servers and clients run in separate processes
(``python -m qkdnode.bus.bench WORKER ...``) as in production. The control rows are the
real daemon's (:mod:`qkdnode.bus.daemonbench`: CURVE, ``status``, beside bare ZeroMQ
echoes of the same run); :func:`bench_control` measures the development server
(plaintext, ``ping``) for client developers.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import zmq

from qkdnode.client import Client

MiB = 1 << 20


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _ready(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("benchmark helper process did not start")
    info: dict[str, Any] = json.loads(line)
    return info


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def _rtt(endpoint: str, n: int, command: str = "ping") -> list[float]:
    out: list[float] = []
    with Client(endpoint, timeout_s=5) as c:
        for _ in range(200):
            c.request(command)
        for _ in range(n):
            t0 = time.perf_counter()
            c.request(command)
            out.append(time.perf_counter() - t0)
    return out


def _raw_rtt(n: int) -> list[float]:
    proc = _spawn("qkdnode.bus.bench", "raw-echo")
    try:
        endpoint = _ready(proc)["endpoint"]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        out = []
        for i in range(n + 200):
            t0 = time.perf_counter()
            sock.send_multipart([b"", b"x" * 100])
            sock.recv_multipart()
            if i >= 200:
                out.append(time.perf_counter() - t0)
        sock.close()
        ctx.term()
        return out
    finally:
        _stop(proc)


def bench_control(quick: bool) -> list[dict[str, Any]]:
    n, reps = (300, 1) if quick else (5000, 5)
    server = _spawn(
        "qkdnode.bus.devserver", "--plaintext", "--telemetry-hz", "100", "--rate-limit", "1e6"
    )
    try:
        endpoint = _ready(server)["control"]
        p50s, p99s = [], []
        for _ in range(reps):
            samples = _rtt(endpoint, n)
            p50s.append(_pct(samples, 0.5) * 1e6)
            p99s.append(_pct(samples, 0.99) * 1e6)
        curve_note = "plaintext, devserver subprocess, telemetry 100 msg/s, command 'ping'"
        tp = _throughput(endpoint, 4, 0.5 if quick else 3.0, 1 if quick else 3)
    finally:
        _stop(server)
    raw = [_pct(_raw_rtt(n), 0.5) * 1e6 for _ in range(reps)]
    return [
        {
            "name": "bus.control_rtt_p50",
            "value": round(statistics.median(p50s), 1),
            "unit": "us",
            "target": "<= 100",
            "note": curve_note,
        },
        {
            "name": "bus.control_rtt_p99",
            "value": round(statistics.median(p99s), 1),
            "unit": "us",
            "target": "<= 1000",
            "note": curve_note,
        },
        {
            "name": "bus.raw_zmq_rtt_p50",
            "value": round(statistics.median(raw), 1),
            "unit": "us",
            "target": "floor",
            "note": "bare pyzmq DEALER->ROUTER echo between two processes",
        },
        {
            "name": "bus.control_throughput",
            "value": round(tp),
            "unit": "req/s",
            "target": ">= 20000",
            "note": "4 client processes, 64 requests in flight each",
        },
    ]


def _throughput(endpoint: str, clients: int, seconds: float, reps: int) -> float:
    results = []
    for _ in range(reps):
        procs = [
            _spawn("qkdnode.bus.bench", "load-client", endpoint, str(seconds))
            for _ in range(clients)
        ]
        total = 0.0
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 30)
            total += float(json.loads(out.strip().splitlines()[-1])["rate"])
        results.append(total)
    return statistics.median(results)


def bench_peer(quick: bool, curve: bool) -> dict[str, Any]:
    frames, reps = (32, 1) if quick else (512, 3)
    rates = []
    for _ in range(reps):
        rx = _spawn("qkdnode.bus.bench", "peer-rx", str(frames), "curve" if curve else "plain")
        try:
            info = _ready(rx)
            rates.append(asyncio.run(_peer_send(info, frames)))
            out, _ = rx.communicate(timeout=60)
        finally:
            if rx.poll() is None:
                _stop(rx)
    return {
        "name": f"bus.peer_bulk_{'curve' if curve else 'plaintext'}",
        "value": round(statistics.median(rates), 1),
        "unit": "MB/s",
        "target": ">= 500",
        "note": f"{frames} x 1 MiB frames, receiver in another process, until all acked",
    }


async def _peer_send(info: dict[str, Any], frames: int) -> float:
    import zmq.asyncio

    from qkdnode.bus.peer import PeerChannel
    from qkdnode.config.sections import BusSection

    curve = info["curve"]
    bus = BusSection(
        peer_endpoint=info["endpoint"],
        allow_plaintext=not curve,
        peer_public_key=info["rx_public"] if curve else None,
    )
    ctx = zmq.asyncio.Context()
    ch = PeerChannel(ctx, bus, "receiver", info["tx_secret"].encode() if curve else None)
    await ch.start()
    try:
        await ch.wait_connected(10)
        payload = os.urandom(MiB)
        t0 = time.perf_counter()
        for i in range(frames):
            await ch.send("bulk", {"i": i}, [payload])
        done = await ch.recv(60)
        assert done.kind == "done"
        return frames * MiB / (time.perf_counter() - t0) / 1e6
    finally:
        await ch.stop()
        ctx.term()


def run_benchmarks(quick: bool = False) -> list[dict[str, Any]]:
    from qkdnode.log import configure_logging

    configure_logging("warning")
    from qkdnode.bus.daemonbench import bench_daemon_control

    results = bench_daemon_control(quick)
    results.append(bench_peer(quick, curve=False))
    results.append(bench_peer(quick, curve=True))
    return results


# ---------------------------------------------------------------------- workers
def _worker_raw_echo() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:0")
    print(json.dumps({"endpoint": sock.getsockopt_string(zmq.LAST_ENDPOINT)}), flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


def _worker_load_client(endpoint: str, seconds: float) -> None:
    from qkdnode.bus.envelope import request_bytes

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    window, sent, got = 64, 0, 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while True:
        while sent - got < window:
            sock.send_multipart([b"", request_bytes(f"l{sent}", "ping", {})])
            sent += 1
        sock.recv_multipart()
        got += 1
        if time.perf_counter() > deadline:
            break
    print(json.dumps({"rate": got / (time.perf_counter() - t0)}), flush=True)


def _worker_peer_rx(frames: int, mode: str) -> None:
    import zmq.asyncio

    from qkdnode.bus.keys import generate_keypair
    from qkdnode.bus.peer import PeerChannel
    from qkdnode.config.sections import BusSection

    curve = mode == "curve"
    tx_pub, tx_sec = generate_keypair()
    rx_pub, rx_sec = generate_keypair()

    async def main() -> None:
        bus = BusSection(
            peer_endpoint="tcp://127.0.0.1:0",
            allow_plaintext=not curve,
            peer_public_key=tx_pub.decode() if curve else None,
        )
        ctx = zmq.asyncio.Context()
        # the benchmark process sends: this one binds as "transmitter" (ROUTER)
        ch = PeerChannel(ctx, bus, "transmitter", rx_sec if curve else None)
        await ch.start()
        print(
            json.dumps(
                {
                    "endpoint": ch.endpoint,
                    "curve": curve,
                    "rx_public": rx_pub.decode(),
                    "tx_secret": tx_sec.decode(),
                }
            ),
            flush=True,
        )
        for _ in range(frames):
            await ch.recv(60)
        await ch.send("done", {}, [])
        await asyncio.sleep(0.2)
        await ch.stop()
        ctx.term()

    asyncio.run(main())


if __name__ == "__main__":
    from qkdnode.log import configure_logging

    configure_logging("warning")
    worker, *rest = sys.argv[1:]
    if worker == "raw-echo":
        _worker_raw_echo()
    elif worker == "load-client":
        _worker_load_client(rest[0], float(rest[1]))
    elif worker == "peer-rx":
        _worker_peer_rx(int(rest[0]), rest[1])
    else:
        print(json.dumps(run_benchmarks(quick=worker == "quick"), indent=1))
