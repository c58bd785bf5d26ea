"""The real daemon's control path beside bare ZeroMQ echoes, measured in one run.

:func:`bench_daemon_control` starts a simulated transmitter daemon (``qkdnode run``) with
CURVE on, its telemetry publisher running and five monitor clients listed with keys of
their own, waits for ``daemon_ready``, then alternates, repetition by repetition:

- ``status`` round trips from the blocking :class:`~qkdnode.client.Client` (CURVE), at
  most 4000 per second (below the default per-client rate limit), on the control socket
  (the event loop's path) and on the monitor endpoint (``bus.monitor_endpoint``: a
  thread answering from a snapshot at most ``bus.monitor_max_age_s`` old);
- bare pyzmq DEALER -> ROUTER echoes (100-byte frame, a Python echo loop in another
  process, paced alike), plaintext and CURVE: the floor set by ZeroMQ, loopback and one Python call
  per message at each end;
- ``status`` throughput from 4 client processes, each with its own key (the per-client
  rate limit of the configuration applies to each), 64 requests in flight each; only
  ``reply`` answers count, an ``error`` answer (or a request left unanswered, as the
  rate limit does to a flood) makes the row fail; on each of the two sockets.

Rows are medians over the repetitions; the ratio rows are medians of the per-repetition
ratios, so slow phases of a shared machine hit both sides of a ratio alike.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from qkdnode.bus.keys import generate_keypair
from qkdnode.bus.sockets import make_curve_client
from qkdnode.client import Client

#: Client processes of the throughput row, each with its own CURVE key.
LOAD_CLIENTS = 4
#: Requests each load client keeps in flight.
LOAD_WINDOW = 64
#: Seconds the daemon may take to log ``daemon_ready`` (a cold numba cache compiles).
READY_TIMEOUT_S = 240.0
_WARMUP = 200
#: Sequential round trips start at most this often: one client stays below the
#: configuration's per-client rate limit (bus.client_rate_limit_per_s, 5000/s by default).
PACE_S = 1 / 4000


@dataclass(frozen=True)
class BenchDaemon:
    """A running benchmark daemon: its process, control and monitor endpoints and client
    keys."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    endpoint: str
    server_public: bytes
    client_keys: tuple[tuple[bytes, bytes], ...]
    ready_s: float
    monitor_endpoint: str


def start_daemon(
    out_dir: Path, clients: int = LOAD_CLIENTS + 1, env: dict[str, str] | None = None
) -> BenchDaemon:
    """Write a CURVE config for a simulated transmitter under ``out_dir``, start
    ``qkdnode run`` on it (``env``: extra environment variables) and wait for
    ``daemon_ready``; ``ready_s`` is the time from the process start to that log line.

    Raises RuntimeError (with the log's tail) if the daemon exits or is not ready within
    :data:`READY_TIMEOUT_S`; the process is killed then.
    """
    from qkdnode.demo.config import apply_overrides, load_demo_config
    from qkdnode.demo.nodeconfig import (
        CurveKeys,
        Endpoints,
        free_tcp_ports,
        node_config_dict,
        to_toml,
    )

    cfg = apply_overrides(load_demo_config(None), security="curve", out_dir=out_dir)
    ep = Endpoints.allocate()
    keys = CurveKeys.generate(out_dir / "keys")
    data = node_config_dict(cfg, "transmitter", out_dir, ep, keys)
    data["node"]["log_level"] = "info"
    monitor_endpoint = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    data["bus"]["monitor_endpoint"] = monitor_endpoint
    pairs = tuple(generate_keypair() for _ in range(clients))
    data["bus"]["clients"] += [
        {"name": f"bench{i}", "public_key": pub.decode(), "role": "monitor"}
        for i, (pub, _) in enumerate(pairs)
    ]
    path = out_dir / "alice.toml"
    path.write_text(to_toml(data), "utf-8")
    log_path = out_dir / "alice.log"
    t0 = time.perf_counter()
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qkdnode", "run", "--config", str(path), "--log-json"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(out_dir),
            env={**os.environ, **(env or {})},
        )
    try:
        wait_for_event(proc, log_path, "daemon_ready", READY_TIMEOUT_S)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return BenchDaemon(
        proc,
        log_path,
        ep.tx_control,
        keys.tx_public.encode(),
        pairs,
        time.perf_counter() - t0,
        monitor_endpoint,
    )


def wait_for_event(
    proc: subprocess.Popen[bytes], log_path: Path, event: str, timeout_s: float
) -> dict[str, Any]:
    """The first JSON log record of ``event``; RuntimeError if the process exits first
    or ``timeout_s`` passes (the message holds the log's tail)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        text = log_path.read_text("utf-8", "replace")
        for line in text[seen:].splitlines():
            if f'"{event}"' in line:
                try:
                    rec: dict[str, Any] = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("event") == event:
                    return rec
        seen = text.rfind("\n") + 1
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log_path.read_text("utf-8", "replace")[-3000:]
    raise RuntimeError(f"daemon logged no {event!r} (exit code {proc.poll()}):\n{tail}")


def stop_daemon(daemon: BenchDaemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait(10)


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def _paced(exchange: Any, n: int) -> list[float]:
    """Round-trip times (seconds) of ``n`` calls of ``exchange`` after a warm-up, one
    started every :data:`PACE_S` at most (sleeping in between)."""
    out: list[float] = []
    for i in range(n + _WARMUP):
        t0 = time.perf_counter()
        exchange()
        t1 = time.perf_counter()
        if i >= _WARMUP:
            out.append(t1 - t0)
        rest = PACE_S - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)  # not a busy wait: the machine's cores are the daemon's too
    return out


def status_rtts_s(daemon: BenchDaemon, n: int, monitor: bool = False) -> list[float]:
    """``n`` sequential ``status`` round trips (seconds) after a warm-up, CURVE, on the
    control socket or (``monitor``) the monitor endpoint."""
    endpoint = daemon.monitor_endpoint if monitor else daemon.endpoint
    with Client(endpoint, daemon.server_public, daemon.client_keys[0], 10.0) as c:
        return _paced(lambda: c.request("status"), n)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qkdnode.bus.daemonbench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def echo_rtts_s(n: int, curve: bool) -> list[float]:
    """``n`` bare DEALER -> ROUTER echo round trips (seconds) against a Python echo loop
    in another process, plaintext or CURVE (no ZAP handler: any key is accepted)."""
    proc = _spawn("echo", "curve" if curve else "plain")
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("echo helper did not start")
        info = json.loads(line)
        ctx: zmq.Context[Any] = zmq.Context()
        sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if curve:
            pub, sec = generate_keypair()
            make_curve_client(sock, info["public"].encode(), pub, sec)
        sock.connect(info["endpoint"])
        payload = [b"", b"x" * 100]

        def echo() -> None:
            sock.send_multipart(payload)
            sock.recv_multipart()

        out = _paced(echo, n)
        sock.close()
        ctx.term()
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def status_throughput(
    daemon: BenchDaemon, seconds: float, monitor: bool = False
) -> tuple[float, int]:
    """(``status`` replies per second summed over :data:`LOAD_CLIENTS` processes, error
    answers). Each process uses its own key (``client_keys[1:]``); control socket or
    (``monitor``) monitor endpoint. On the monitor endpoint each process sends at most
    1 / :data:`PACE_S` requests per second: the endpoint answers one client faster than
    the per-client rate limit (5000/s by default) lets it ask."""
    procs = [
        _spawn(
            "load",
            daemon.monitor_endpoint if monitor else daemon.endpoint,
            daemon.server_public.decode(),
            pub.decode(),
            sec.decode(),
            str(seconds),
            str(1 / PACE_S if monitor else 0.0),
        )
        for pub, sec in daemon.client_keys[1 : LOAD_CLIENTS + 1]
    ]
    total, errors = 0.0, 0
    for p in procs:
        out, err = p.communicate(timeout=seconds + 60)
        lines = out.strip().splitlines()
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"load client failed: {err[-2000:]}")
        res = json.loads(lines[-1])
        total += float(res["rate"])
        errors += int(res["errors"])
    return total, errors


def bench_daemon_control(quick: bool) -> list[dict[str, Any]]:
    """The rows described in the module docstring."""
    n, reps, seconds = (300, 1, 0.5) if quick else (3000, 5, 3.0)
    p50: list[float] = []
    p99: list[float] = []
    m50: list[float] = []
    m99: list[float] = []
    plain: list[float] = []
    curve: list[float] = []
    ratio_curve: list[float] = []
    ratio_plain: list[float] = []
    ratio_monitor: list[float] = []
    tput: list[float] = []
    mtput: list[float] = []
    errors: list[int] = []
    merrors: list[int] = []
    with tempfile.TemporaryDirectory(prefix="qkdnode-busbench-") as tmp:
        daemon = start_daemon(Path(tmp))
        try:
            for _ in range(reps):
                st = status_rtts_s(daemon, n)
                ec = _pct(echo_rtts_s(n, curve=True), 0.5) * 1e6
                mt = status_rtts_s(daemon, n, monitor=True)
                ep = _pct(echo_rtts_s(n, curve=False), 0.5) * 1e6
                s50 = _pct(st, 0.5) * 1e6
                ms50 = _pct(mt, 0.5) * 1e6
                p50.append(s50)
                p99.append(_pct(st, 0.99) * 1e6)
                m50.append(ms50)
                m99.append(_pct(mt, 0.99) * 1e6)
                plain.append(ep)
                curve.append(ec)
                ratio_curve.append(s50 / ec)
                ratio_plain.append(s50 / ep)
                ratio_monitor.append(ms50 / ec)
                rate, errs = status_throughput(daemon, seconds)
                tput.append(rate)
                mrate, merrs = status_throughput(daemon, seconds, monitor=True)
                mtput.append(mrate)
                errors.append(errs)
                merrors.append(merrs)
        finally:
            stop_daemon(daemon)
    med = statistics.median
    where = (
        f"real daemon (simulated transmitter, CURVE, telemetry publisher on), "
        f"command 'status', blocking client; median of {reps} x {n}"
    )
    mwhere = (
        f"as above on bus.monitor_endpoint (thread, snapshot <= 0.5 s old); median of {reps} x {n}"
    )
    return [
        {
            "name": "bus.daemon_status_rtt_p50",
            "value": round(med(p50), 1),
            "unit": "us",
            "target": "-",
            "note": where,
        },
        {
            "name": "bus.daemon_status_rtt_p99",
            "value": round(med(p99), 1),
            "unit": "us",
            "target": "<= 1000",
            "note": where,
        },
        {
            "name": "bus.daemon_status_monitor_rtt_p50",
            "value": round(med(m50), 1),
            "unit": "us",
            "target": "-",
            "note": mwhere,
        },
        {
            "name": "bus.daemon_status_monitor_rtt_p99",
            "value": round(med(m99), 1),
            "unit": "us",
            "target": "<= 1000",
            "note": mwhere,
        },
        {
            "name": "bus.echo_rtt_p50_plaintext",
            "value": round(med(plain), 1),
            "unit": "us",
            "target": "floor",
            "note": "bare pyzmq DEALER->ROUTER echo, 100 B, Python echo loop in another "
            "process; same run",
        },
        {
            "name": "bus.echo_rtt_p50_curve",
            "value": round(med(curve), 1),
            "unit": "us",
            "target": "floor",
            "note": "as above with CURVE; same run",
        },
        {
            "name": "bus.daemon_status_over_echo_curve",
            "value": round(med(ratio_curve), 2),
            "unit": "x",
            "target": "-",
            "note": "daemon status p50 (control socket) / bare CURVE echo p50, median of "
            "per-repetition ratios",
        },
        {
            "name": "bus.daemon_status_monitor_over_echo_curve",
            "value": round(med(ratio_monitor), 2),
            "unit": "x",
            "target": "<= 1.3",
            "note": "daemon status p50 (monitor endpoint) / bare CURVE echo p50, median of "
            "per-repetition ratios",
        },
        {
            "name": "bus.daemon_status_over_echo_plaintext",
            "value": round(med(ratio_plain), 2),
            "unit": "x",
            "target": "-",
            "note": "daemon status p50 (CURVE) / bare plaintext echo p50, same run",
        },
        {
            "name": "bus.daemon_status_throughput",
            "value": round(med(tput)),
            "unit": "req/s",
            "target": ">= 10000" if sum(errors) == 0 else "error answers",
            "note": f"{LOAD_CLIENTS} client processes with distinct CURVE keys, "
            f"{LOAD_WINDOW} requests in flight each, {seconds:g} s per repetition; "
            f"error answers: {sum(errors)}",
        },
        {
            "name": "bus.daemon_status_monitor_throughput",
            "value": round(med(mtput)),
            "unit": "req/s",
            "target": ">= 10000" if sum(merrors) == 0 else "error answers",
            "note": f"as above on bus.monitor_endpoint, each client paced to at most "
            f"{1 / PACE_S:g}/s (below the per-client rate limit); "
            f"error answers: {sum(merrors)}",
        },
    ]


# ---------------------------------------------------------------------- workers
def _worker_echo(mode: str) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    public = b""
    if mode == "curve":
        public, secret = generate_keypair()
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    print(json.dumps({"endpoint": endpoint, "public": public.decode()}), flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


def _worker_load(  # noqa: PLR0917
    endpoint: str, server: str, pub: str, sec: str, seconds: float, max_rate_per_s: float
) -> None:
    from qkdnode.bus.envelope import request_bytes

    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.linger = 0
    make_curve_client(sock, server.encode(), pub.encode(), sec.encode())
    sock.connect(endpoint)
    # one request first: the CURVE handshake is not part of the rate
    sock.send_multipart([b"", request_bytes("w", "status", {})])
    sock.recv_multipart()
    # a flooding client's excess is dropped unanswered: wait for no reply for ever
    sock.rcvtimeo = 1000
    sent = got = errors = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        allowed = (
            (time.perf_counter() - t0) * max_rate_per_s if max_rate_per_s > 0 else float("inf")
        )
        while sent - got < LOAD_WINDOW and sent < allowed:
            sock.send_multipart([b"", request_bytes(f"l{sent}", "status", {})])
            sent += 1
        if sent == got:  # paced out: nothing in flight
            time.sleep(0.0005)
            continue
        try:
            reply = sock.recv_multipart()[-1]
        except zmq.Again:
            errors += sent - got  # never answered
            break
        got += 1
        if b'"type":"reply"' not in reply[:120]:
            errors += 1
        if time.perf_counter() > deadline:
            break
    rate = (got - min(errors, got)) / (time.perf_counter() - t0)
    print(json.dumps({"rate": rate, "errors": errors}), flush=True)
    os._exit(0)  # replies still in flight need not be drained


if __name__ == "__main__":
    worker, *rest = sys.argv[1:]
    if worker == "echo":
        _worker_echo(rest[0])
    elif worker == "load":
        _worker_load(rest[0], rest[1], rest[2], rest[3], float(rest[4]), float(rest[5]))
    else:
        print(json.dumps(bench_daemon_control(quick=worker == "quick"), indent=1))
