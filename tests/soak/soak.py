"""``make soak``: a transmitter/receiver pair of real daemons run for a long time (default
one hour) on the simulated 25 km link with polarisation drift, metrics on, and a fault
injected every few minutes in rotation (fiber cut, detector disconnect, SIGKILL of the
receiver, SIGKILL of the transmitter). It reports, as JSON on the last line:

- RSS of both daemons after their first committed block and at the end (growth in %),
- blocks committed and aborted, with the abort causes,
- alarms raised and cleared (from the logs), and those still active at the end,
- whether both key stores are identical after a final stop,
- the faults injected and how long the pair took to commit a block again.

RSS growth is measured for every process lifetime of at least 15 minutes (a killed daemon
starts afresh): from the largest RSS of its first third (at most 10 minutes: bounded
buffers such as the receiver's queue of detection blocks fill then) to the median of its
last ten samples. Exit status 0 when: RSS growth < 5 %, no
block aborted without a stated cause, the key stores are identical, every alarm cleared,
and every fault recovered. Usage::

    python -m tests.soak.soak [--duration 3600] [--fault-interval 300] [--seed 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.daemon.conftest import free_port
from tests.system.conftest import START_TIMEOUT_S, Node, Pair, make_pair

#: the rotation: each daemon is killed once per cycle, so it lives about half an hour at
#: the default interval (long enough to measure its memory)
FAULTS = (
    "fiber_cut",
    "detector_disconnect",
    "kill_receiver",
    "fiber_cut",
    "detector_disconnect",
    "kill_transmitter",
)
HOLD_S = 8.0


def rss_kib(node: Node) -> int | None:
    if node.daemon is None or node.daemon.proc.poll() is not None:
        return None
    try:
        for line in Path(f"/proc/{node.daemon.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def blocks_ok(node: Node) -> int:
    st = node.status()
    return int(st["stats"]["blocks_ok"]) if st else -1


def wait_block(p: Pair, timeout_s: float) -> float | None:
    """Seconds until the transmitter commits a new block (None: not within timeout). A
    transmitter that was just restarted counts its blocks from 0."""
    t0 = time.monotonic()
    start = blocks_ok(p.tx)
    while time.monotonic() - t0 < timeout_s:
        if blocks_ok(p.tx) > max(start, 0):
            return time.monotonic() - t0
        time.sleep(1.0)
    return None


def inject(p: Pair, fault: str) -> None:
    if fault in ("fiber_cut", "detector_disconnect"):
        node = p.tx if fault == "fiber_cut" else p.rx
        node.call("sim.inject", fault=fault)
        time.sleep(HOLD_S)
        node.call("sim.inject", fault=fault, clear=True)
        return
    node = p.rx if fault == "kill_receiver" else p.tx
    assert node.daemon is not None
    node.daemon.proc.send_signal(signal.SIGKILL)
    node.daemon.proc.wait(30)
    node.close_client()
    time.sleep(2.0)
    node.start()


def run(duration_s: float, fault_interval_s: float, seed: int, out: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    mports = {"tx": free_port(), "rx": free_port()}

    def metrics(port: int) -> str:
        return f'\n[metrics]\nenabled = true\nlisten_host = "127.0.0.1"\nlisten_port = {port}\n'

    # Nobody consumes keys during the soak: they expire instead (short time to live), so
    # the store never fills and the expiry sweep runs all the time.
    p = make_pair(
        out, autostart=True, extra_tx=metrics(mports["tx"]), extra_rx=metrics(mports["rx"])
    )
    for n in p.nodes:
        text = n.config.read_text()
        assert text.count("[keystore]\n") == 1
        n.config.write_text(
            text.replace("[keystore]\n", "[keystore]\nkey_ttl_s = 300\nmax_key_count = 2000000\n")
        )
    p.start()
    faults: list[dict[str, Any]] = []
    # one list of (seconds, RSS KiB) samples per process lifetime of each daemon
    rss: dict[str, list[list[tuple[float, int]]]] = {"transmitter": [[]], "receiver": [[]]}
    restarted = {"transmitter": False, "receiver": False}
    try:
        p.wait_exchanging(START_TIMEOUT_S, min_blocks_after=0)
        if wait_block(p, START_TIMEOUT_S) is None:
            raise SystemExit(p.report("no first block"))
        t_start = time.monotonic()
        next_fault = t_start + fault_interval_s
        order = list(FAULTS)
        k = rng.randrange(len(order))
        while time.monotonic() - t_start < duration_s:
            now = time.monotonic()
            for n in p.nodes:
                r = rss_kib(n)
                if r is not None:
                    rss[n.role][-1].append((now - t_start, r))
            if now >= next_fault and duration_s - (now - t_start) > 120:
                fault = order[k % len(order)]
                k += 1
                state = p.tx.status()
                phase = (state or {}).get("state", "?")
                t0 = time.monotonic()
                inject(p, fault)
                if fault.startswith("kill_"):
                    role = "receiver" if fault == "kill_receiver" else "transmitter"
                    restarted[role] = True
                recovered = wait_block(p, 600)
                faults.append(
                    {
                        "fault": fault,
                        "at_s": round(t0 - t_start, 1),
                        "tx_state_before": phase,
                        "recovered": recovered is not None,
                        "recovery_s": None
                        if recovered is None
                        else round(time.monotonic() - t0, 1),
                    }
                )
                print(json.dumps(faults[-1]), flush=True)
                if fault.startswith("kill_"):
                    node = p.rx if fault == "kill_receiver" else p.tx
                    rss[node.role].append([])
                next_fault = time.monotonic() + fault_interval_s
            time.sleep(10.0)
        # settle: alarms raised by the last fault clear once a block is committed
        wait_block(p, 300)
        time.sleep(10.0)
        active = {
            n.role: [a["name"] for a in (n.status() or {}).get("alarms", [])] for n in p.nodes
        }
        assert p.tx.call("stop")["state"] == "IDLE"
        deadline = time.monotonic() + 120
        while True:
            da, db = p.tx.call("keys.digest"), p.rx.call("keys.digest")
            if da == db or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        report = _report(p, rss, restarted, faults, active, da == db, da, duration_s, seed)
    finally:
        p.kill_all()
    return report


def _report(
    p: Pair,
    rss: dict[str, list[list[tuple[float, int]]]],
    restarted: dict[str, bool],
    faults: list[dict[str, Any]],
    active: dict[str, list[str]],
    identical: bool,
    digest: dict[str, Any],
    duration_s: float,
    seed: int,
) -> dict[str, Any]:
    # RSS growth per process lifetime of at least 15 minutes: from the largest RSS of its
    # first third (at most 10 minutes: bounded buffers fill then) to the median of its
    # last ten samples (RSS breathes with each block).
    growth: dict[str, list[dict[str, Any]]] = {}
    for role, lives in rss.items():
        growth[role] = []
        for samples in lives:
            if len(samples) < 2 or samples[-1][0] - samples[0][0] < 900:
                continue
            t0 = samples[0][0]
            warm = min(600.0, (samples[-1][0] - t0) / 3)
            base = max(v for t, v in samples if t - t0 <= warm)
            tail = sorted(v for _, v in samples[-10:])
            end = tail[len(tail) // 2]
            growth[role].append(
                {
                    "from_s": round(t0),
                    "to_s": round(samples[-1][0]),
                    "base_kib": base,
                    "end_kib": end,
                    "growth_percent": round(100.0 * (end - base) / base, 2),
                }
            )
    blocks: dict[str, Any] = {}
    alarms: dict[str, Any] = {}
    for n in p.nodes:
        ok = n.events("block_summary", ok=True)
        bad = n.events("block_summary", ok=False)
        causes = collections.Counter(str(r.get("reason")) for r in bad)
        blocks[n.role] = {"committed": len(ok), "aborted": len(bad), "causes": dict(causes)}
        raised = collections.Counter(str(r.get("alarm")) for r in n.events("alarm"))
        cleared = collections.Counter(str(r.get("alarm")) for r in n.events("alarm_cleared"))
        alarms[n.role] = {"raised": dict(raised), "cleared": dict(cleared)}
    no_cause = sum(int(b["causes"].get("None", 0)) for b in blocks.values())
    checks = {
        "rss_growth_below_5_percent": all(
            g["growth_percent"] < 5.0 for lives in growth.values() for g in lives
        ),
        "rss_measured": any(growth.values()),
        "no_block_lost_without_cause": no_cause == 0,
        "keys_identical": identical,
        "every_alarm_cleared": not any(active.values()),
        "every_fault_recovered": all(f["recovered"] for f in faults),
    }
    return {
        "duration_s": duration_s,
        "seed": seed,
        "rss_growth": growth,
        "rss_kib_samples": {
            r: [life[:: max(1, len(life) // 20)] for life in lives] for r, lives in rss.items()
        },
        "restarted": restarted,
        "blocks": blocks,
        "alarms": alarms,
        "alarms_active_at_end": active,
        "faults": faults,
        "digest": digest,
        "checks": checks,
        "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    ap.add_argument("--fault-interval", type=float, default=300.0, help="seconds between faults")
    ap.add_argument("--seed", type=int, default=1, help="order of the faults")
    ap.add_argument("--out", type=Path, default=None, help="directory for configs and logs")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="qkdnode-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    report = run(args.duration, args.fault_interval, args.seed, out)
    (out / "soak-report.json").write_text(json.dumps(report, indent=2))
    print(f"logs and configs: {out}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
