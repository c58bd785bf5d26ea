"""``make test-faults``: a fault campaign on one pair of real daemons with key delivery.

A transmitter/receiver pair (``tests.system.conftest.make_pair``: autostart, ETSI GS QKD
014 delivery on both KMEs, small blocks so that many blocks pass) takes ``--faults N``
faults, one after the other, each at a random moment (``random.Random(seed)``):

- ``kill_transmitter`` / ``kill_receiver``: SIGKILL, down for a moment, restarted;
- ``fiber_cut`` (at the transmitter) / ``detector_disconnect`` (at the receiver): the
  simulator's faults (``sim.inject``), held a few seconds, then cleared;
- ``peer_drop``: one daemon frozen (SIGSTOP) for longer than the peer timeout
  (``bus.heartbeat_interval_s * bus.heartbeat_liveness``), then SIGCONT;
- ``disk_write_error``: the daemon's file size limit (RLIMIT_FSIZE, lowered on the live
  process with prlimit(2), no root needed) set to 0 for a few seconds: every write to a
  file fails with EFBIG (key store, its WAL, authentication pool, and the daemon's own log,
  whose lines of that window are lost).

Left out: a clock step (``drivers/simlink/world.py`` FAULTS has none).

Most faults land while key flows (``exchange`` anchor: a random delay after the pair has
recovered from the previous fault); some land while the pair is still recovering from
the previous one (``recovery`` anchor: a random delay after that fault ended; the earlier
fault is then ``interrupted`` and the chain is checked as one). The phase a fault hit is
read from both nodes' status and telemetry just before it (``calibrating``,
``synchronizing``, ``key_id_sync``, ``collecting``, ``pp:<stage>`` (post-processing, the
stage estimated from the previous block's stage times), ``two_phase_commit``,
``between_commits``, or the state a node was in).

After each fault (chain): the transmitter must commit a block that finished after the
fault ended (``--recover-timeout``, default 180 s; otherwise the fault is
``unrecovered``, its evidence is recorded and both daemons are restarted), both nodes must
report ``delivery_in_step``, ``keys.digest`` must agree (retried for 20 s, the consumer
paused: a persistent difference is a mismatch), previously delivered key IDs replayed at
dec_keys must be refused, and the alarms raised since the fault must have cleared (30 s
grace). All along, a consumer thread fetches keys over ETSI 014 (master SAE ``enc_keys``
at one KME, slave SAE ``dec_keys`` at the other, alternating which KME issues) and records
every key ID: an ID handed out twice (by enc_keys, on one node or both, or by dec_keys) is
a double delivery; enc and dec bytes must match.

Report: a table on stderr, JSON on the last stdout line and in ``DIR/report.json``
(configs and daemon logs in ``DIR/pair``). Exit status 0 only when no store mismatch, no
double delivery, no key-bytes mismatch and no unrecovered fault. Usage::

    python -m tests.faults.campaign --faults 100 --seed 1 --out DIR
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qkdnode.bus.errors import BusError
from qkdnode.bus.keys import load_keypair
from qkdnode.client import Client
from qkdnode.client.telemetry import Subscription
from qkdnode.config.loader import ConfigError, load_config
from tests.system.conftest import SAE_MASTER, SAE_SLAVE, Node, Pair, make_pair

#: every kind this campaign can inject, in the order the schedule draws from
FAULT_KINDS = (
    "kill_transmitter",
    "kill_receiver",
    "fiber_cut",
    "detector_disconnect",
    "peer_drop",
    "disk_write_error",
    "clock_step",
)
#: asked for, not injected, and why
LEFT_OUT: dict[str, str] = {}
BLOCK_DETECTIONS = 2_000_000
RECOVER_TIMEOUT_S = 180.0
START_TIMEOUT_S = 300.0
DIGEST_RETRY_S = 20.0
ALARM_GRACE_S = 30.0
#: share of faults (after the first) that land while the pair recovers from the previous
RECOVERY_ANCHOR_P = 0.3
#: random delay before a fault: exchange anchor up to --max-delay, recovery anchor up to this
RECOVERY_DELAY_MAX_S = 30.0
PEER_TIMEOUT_DEFAULT_S = 10.0
SIM_FAULT_FOR = {
    "fiber_cut": "transmitter",
    "detector_disconnect": "receiver",
    "clock_step": "receiver",  # one-shot: the tagger clock jumps 1 us; clearing does nothing
}
STAGES = ("sifting", "estimation", "error_correction", "verification", "privacy_amplification")
KEY_SIZE_BITS = 32768
MAX_FRAME_BYTES = 0  # the daemon default (bus.max_peer_header_bytes covers the sync)
#: keys per enc_keys request of the consumer, their size (the ETSI maximum, delivery's
#: default max_key_size_bits: the first half of one stored key each), pause between
#: requests: about 4-5 keys/s, a little below the pair's production at KEY_SIZE_BITS
CONSUMER_NUMBER = 4
CONSUMER_SIZE = 4096
CONSUMER_PAUSE_S = 0.8
DEC_RETRY_S = 90.0
#: seconds between a block's last and the next block's first progress message beyond
#: which the earlier block counts as abandoned (progress comes once a second)
ABANDONED_GAP_S = 5.0


# =========================================================================== pure parts
@dataclass(frozen=True)
class FaultPlan:
    """One planned fault: what, on which node, when (``delay_s`` after its anchor), and
    how long it is held (``hold_s``: down time of a killed daemon, duration of a held
    fault, of a freeze, of the write errors)."""

    index: int
    kind: str
    victim: str  # "transmitter" | "receiver"
    anchor: str  # "exchange" | "recovery"
    delay_s: float
    hold_s: float


def schedule(
    n: int,
    seed: int,
    *,
    kinds: Sequence[str] = FAULT_KINDS,
    max_delay_s: float = 12.0,
    peer_timeout_s: float = PEER_TIMEOUT_DEFAULT_S,
) -> list[FaultPlan]:
    """The campaign's faults, from ``seed`` alone (same seed and arguments: same list).

    Every fault draws the same number of random values whatever its kind, so a fault's
    timing does not depend on the kinds drawn before it."""
    if not kinds:
        raise ValueError("no fault kinds")
    rng = random.Random(seed)
    out: list[FaultPlan] = []
    for i in range(n):
        kind = kinds[rng.randrange(len(kinds))]
        u_victim, u_anchor, u_delay, u_hold = (rng.random() for _ in range(4))
        if kind == "kill_transmitter":
            victim = "transmitter"
        elif kind == "kill_receiver":
            victim = "receiver"
        elif kind in SIM_FAULT_FOR:
            victim = SIM_FAULT_FOR[kind]
        else:
            victim = "transmitter" if u_victim < 0.5 else "receiver"
        anchor = "recovery" if i > 0 and u_anchor < RECOVERY_ANCHOR_P else "exchange"
        delay = u_delay * (RECOVERY_DELAY_MAX_S if anchor == "recovery" else max_delay_s)
        if kind.startswith("kill_"):
            hold = 0.5 + 4.5 * u_hold
        elif kind == "peer_drop":
            hold = peer_timeout_s + 2.0 + 6.0 * u_hold
        elif kind == "disk_write_error":
            hold = 5.0 + 10.0 * u_hold
        else:
            hold = 3.0 + 5.0 * u_hold
        out.append(FaultPlan(i, kind, victim, anchor, round(delay, 2), round(hold, 2)))
    return out


@dataclass(frozen=True)
class Telemetry:
    """One telemetry value seen: publisher time (Unix s), node role, topic, payload."""

    ts: float
    role: str
    topic: str
    payload: dict[str, Any]


def _pending(status: dict[str, Any]) -> int:
    return int((status.get("keystore") or {}).get("pending", 0))


def label_phase(
    tx: dict[str, Any] | None,
    rx: dict[str, Any] | None,
    events: Iterable[Telemetry],
    now: float,
) -> tuple[str, str]:
    """The phase of the exchange at ``now`` (Unix s), from both nodes' status (None: no
    answer) and the recent telemetry: ``(label, detail)``."""
    if tx is None or rx is None:
        who = [r for r, s in (("transmitter", tx), ("receiver", rx)) if s is None]
        return "node_not_answering", "no status from " + ", ".join(who)
    tstate, rstate = str(tx.get("state")), str(rx.get("state"))
    states = f"tx {tstate}, rx {rstate}"
    for state in ("CALIBRATING", "SYNCHRONIZING"):
        if state in (tstate, rstate):
            return state.lower(), states
    if (tstate, rstate) != ("EXCHANGING", "EXCHANGING"):
        other = tstate if tstate != "EXCHANGING" else rstate
        return other.lower(), states
    if not (tx.get("delivery_in_step") and rx.get("delivery_in_step")):
        return "key_id_sync", (
            f"delivery_in_step tx {tx.get('delivery_in_step')}, rx {rx.get('delivery_in_step')}"
        )
    evs = list(events)
    rx_progress = [
        e
        for e in evs
        if e.role == "receiver" and e.topic == "progress" and e.payload.get("what") == "block"
    ]
    done = {
        role: {int(e.payload["block_id"]) for e in evs if e.role == role and e.topic == "block"}
        for role in ("transmitter", "receiver")
    }
    collecting = max((int(e.payload["block_id"]) for e in rx_progress), default=None)
    processing = None if collecting is None else collecting - 1
    rx_has_processing = processing is not None and processing in done["receiver"]
    tp, rp = _pending(tx), _pending(rx)
    if tp or rp:
        if tp and not rp and rx_has_processing:
            return "between_commits", f"block {processing}: receiver committed, transmitter not"
        return "two_phase_commit", f"pending keys tx {tp}, rx {rp}"
    if collecting is None or processing is None:
        return "collecting", "no block progress seen yet"
    started = min(e.ts for e in rx_progress if int(e.payload["block_id"]) == collecting)
    before = [e.ts for e in rx_progress if int(e.payload["block_id"]) == processing]
    # collection runs on without a break while key flows: a longer gap between the two
    # blocks means the earlier one was abandoned (a fault) and is not being processed
    was_collected = bool(before) and started - max(before) <= ABANDONED_GAP_S
    if was_collected and processing not in done["receiver"]:
        elapsed = now - started
        last_rx_block = [e for e in evs if e.role == "receiver" and e.topic == "block"]
        stage = _stage_at(elapsed, last_rx_block[-1].payload if last_rx_block else {})
        return f"pp:{stage}", (
            f"block {processing}, {elapsed:.1f} s in (stage estimated from the previous "
            f"block's stage times); collecting block {collecting}"
        )
    if was_collected and processing not in done["transmitter"]:
        return "two_phase_commit", f"block {processing}: receiver done, transmitter not"
    last = rx_progress[-1].payload
    return "collecting", f"block {collecting} {last.get('done')}/{last.get('total')}"


def _stage_at(elapsed: float, previous_block: dict[str, Any]) -> str:
    """The post-processing stage ``elapsed`` seconds into a block, assuming the stages take
    as long as in ``previous_block`` (``seconds_<stage>`` fields of the block topic)."""
    t = 0.0
    known = False
    for stage in STAGES:
        v = previous_block.get(f"seconds_{stage}")
        if isinstance(v, int | float):
            known = True
            t += float(v)
            if elapsed < t:
                return stage
    return "privacy_amplification" if known else "unknown"


def _digest(key: Any) -> str:
    """What the ledger keeps of a key: enough to compare, too little to hold many keys."""
    return hashlib.sha256(str(key).encode()).hexdigest()[:32]


class DeliveryLedger:
    """Every key handed out over ETSI 014 during the campaign (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: key_ID -> (issuing KME, key digest, time)
        self.enc: dict[str, tuple[str, str, float]] = {}
        #: key_ID -> (serving KME, key digest, time)
        self.dec: dict[str, tuple[str, str, float]] = {}
        self.double: list[dict[str, Any]] = []
        self.bytes_mismatch: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []
        self.replays_refused = 0
        self.enc_requests = 0
        self.dec_requests = 0

    def record_enc(self, kme: str, keys: Iterable[dict[str, Any]], t: float) -> None:
        with self._lock:
            self.enc_requests += 1
            for k in keys:
                kid, key = str(k["key_ID"]), _digest(k["key"])
                if kid in self.enc:
                    first = self.enc[kid][0]
                    how = "enc_keys_twice_same_kme" if first == kme else "enc_keys_on_both_kmes"
                    self.double.append({"key_ID": kid, "how": how, "kmes": [first, kme], "t": t})
                else:
                    self.enc[kid] = (kme, key, t)

    def record_dec(self, kme: str, keys: Iterable[dict[str, Any]], t: float) -> None:
        with self._lock:
            self.dec_requests += 1
            for k in keys:
                kid, key = str(k["key_ID"]), _digest(k["key"])
                if kid in self.dec:
                    self.double.append(
                        {"key_ID": kid, "how": "dec_keys_twice", "kmes": [self.dec[kid][0], kme]}
                    )
                    continue
                self.dec[kid] = (kme, key, t)
                issued = self.enc.get(kid)
                if issued is None:
                    self.bytes_mismatch.append({"key_ID": kid, "why": "never issued by enc_keys"})
                elif issued[1] != key:
                    self.bytes_mismatch.append({"key_ID": kid, "why": "enc and dec bytes differ"})

    def record_lost(self, kme: str, key_ids: Iterable[str], why: str, t: float) -> None:
        with self._lock:
            for kid in key_ids:
                self.lost.append({"key_ID": kid, "kme": kme, "why": why, "t": t})

    def record_replay(self, kme: str, key_id: str, status: int, t: float) -> None:
        """A dec_keys replay of an ID already fetched: anything but 400/401 is double."""
        with self._lock:
            if status == 200:
                self.double.append({"key_ID": key_id, "how": "dec_keys_replay_served", "t": t})
            else:
                self.replays_refused += 1

    def delivered_before(self, t: float, n: int) -> list[tuple[str, str]]:
        """Up to ``n`` (key_ID, serving KME) of the last keys fetched by dec_keys before
        ``t`` at each KME."""
        with self._lock:
            done = [(kid, v[0]) for kid, v in self.dec.items() if v[2] < t]
        kmes = sorted({kme for _, kme in done})
        return [x for kme in kmes for x in [d for d in done if d[1] == kme][-n:]]

    def summary(self) -> dict[str, Any]:
        with self._lock:
            per_kme = collections.Counter(v[0] for v in self.enc.values())
            return {
                "keys_delivered": len(self.enc),
                "keys_fetched_by_slave": len(self.dec),
                "issued_per_kme": dict(per_kme),
                "enc_requests": self.enc_requests,
                "dec_requests": self.dec_requests,
                "double_deliveries": len(self.double),
                "double_delivery_cases": self.double[:20],
                "key_bytes_mismatches": len(self.bytes_mismatch),
                "key_bytes_mismatch_cases": self.bytes_mismatch[:20],
                "keys_lost": len(self.lost),
                "keys_lost_cases": self.lost[:20],
                "replays_refused": self.replays_refused,
            }


def verdict(totals: dict[str, Any]) -> tuple[bool, list[str]]:
    """Pass only with no store mismatch, no double delivery, no key-bytes mismatch and no
    unrecovered fault; the reasons when it fails."""
    reasons = []
    for key, what in (
        ("mismatched_stores", "key stores differ after a fault"),
        ("double_deliveries", "a key ID was delivered twice"),
        ("key_bytes_mismatches", "enc_keys and dec_keys returned different bytes"),
        ("unrecovered_faults", "a fault was not recovered from"),
    ):
        n = int(totals.get(key, 0))
        if n:
            reasons.append(f"{key} = {n}: {what}")
    return not reasons, reasons


def build_report(
    *,
    seed: int,
    requested: int,
    faults: list[dict[str, Any]],
    deliveries: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    injected = [f for f in faults if f.get("injected")]
    totals = {
        "faults_requested": requested,
        "faults_injected": len(injected),
        "mismatched_stores": sum(1 for f in faults if f.get("digest_match") is False),
        "double_deliveries": int(deliveries.get("double_deliveries", 0)),
        "key_bytes_mismatches": int(deliveries.get("key_bytes_mismatches", 0)),
        "unrecovered_faults": sum(1 for f in faults if f.get("outcome") == "unrecovered"),
        "faults_with_alarms_left": sum(1 for f in faults if f.get("alarms_left")),
        "keys_delivered": int(deliveries.get("keys_delivered", 0)),
        "keys_lost": int(deliveries.get("keys_lost", 0)),
    }
    passed, reasons = verdict(totals)
    return {
        "seed": seed,
        "faults_requested": requested,
        "faults_injected": len(injected),
        "fault_kinds": list(FAULT_KINDS),
        "left_out": LEFT_OUT,
        **(extra or {}),
        "faults": faults,
        "deliveries": deliveries,
        "totals": totals,
        "passed": passed,
        "failures": reasons,
    }


def format_table(report: dict[str, Any]) -> str:
    cols = ("#", "kind", "victim", "at_s", "phase", "recov_s", "outcome", "digest", "alarms left")
    rows = []
    for f in report["faults"]:
        rec = f.get("recovery_s")
        dm = f.get("digest_match")
        rows.append(
            (
                str(f["index"]),
                str(f["kind"]),
                str(f["victim"])[:2],
                f"{f.get('at_s', 0):.0f}",
                str(f.get("phase", "?")),
                "-" if rec is None else f"{rec:.1f}",
                str(f.get("outcome", "?")),
                "-" if dm is None else ("same" if dm else "DIFF"),
                ",".join(f.get("alarms_left") or []) or "-",
            )
        )
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    t = report["totals"]
    lines.append(
        f"seed {report['seed']}: faults {t['faults_injected']}/{t['faults_requested']} injected; "
        f"unrecovered {t['unrecovered_faults']}, store mismatches {t['mismatched_stores']}, "
        f"double deliveries {t['double_deliveries']}, key-bytes mismatches "
        f"{t['key_bytes_mismatches']}, keys delivered {t['keys_delivered']} "
        f"(lost {t['keys_lost']}), faults with alarms left {t['faults_with_alarms_left']}: "
        + ("PASS" if report["passed"] else "FAIL")
    )
    return "\n".join(lines)


# =========================================================================== the run
STATUS_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Tuning:
    """What the campaign changes in make_pair's configs (all three are ordinary settings):

    - ``block_detections``: small blocks, so that many blocks pass between faults;
    - ``key_size_bits``: large stored keys, so that the stores and the delivery ledger stay
      small (at 256 bits the pair stores ~700 keys/s and fills the default 100 000-key store
      in minutes; a full store drops every block, so no fault could be seen to recover);
    - ``max_frame_bytes``: ``bus.max_control_frame_bytes`` if not 0 (default 0: the
      daemon's own). The key-ID sync summary travels in one peer header frame, limited by
      ``bus.max_peer_header_bytes`` (32 MiB); it once was limited to 256 KiB, which a store
      of ~50 000 live keys or ~6 500 delivered keys exceeded.
    """

    block_detections: int = BLOCK_DETECTIONS
    key_size_bits: int = KEY_SIZE_BITS
    max_frame_bytes: int = MAX_FRAME_BYTES


def make_valid_pair(d: Path, tuning: Tuning, attempts: int = 5) -> Pair:
    """make_pair with delivery and autostart, in ``d``, tuned; made again when a config
    does not load (tests/daemon/conftest.py node_config replaces default ports one after the
    other, so a free port that begins with a later default, e.g. 55521 for 5552, corrupts
    the endpoint)."""
    for attempt in range(attempts):
        if d.exists():
            shutil.rmtree(d)
        pair = make_pair(d, autostart=True, delivery=True, block_detections=tuning.block_detections)
        try:
            for node in pair.nodes:
                tune_config(node.config, tuning)
            return pair
        except ConfigError as exc:
            print(f"pair config unusable (attempt {attempt + 1}): {exc}", file=sys.stderr)
    raise RuntimeError(f"no usable pair config in {attempts} attempts")


def _set(text: str, pattern: str, line: str) -> str:
    text, n = re.subn(pattern, line, text, count=1, flags=re.MULTILINE)
    if n != 1:
        raise RuntimeError(f"config: no line matching {pattern!r}")
    return text


def tune_config(config: Path, tuning: Tuning) -> None:
    """Apply ``tuning`` to a node config and check that the daemon will read it so."""
    text = config.read_text()
    text = _set(text, r"^block_detections = \d+$", f"block_detections = {tuning.block_detections}")
    text = _set(text, r"^key_size_bits = \d+$", f"key_size_bits = {tuning.key_size_bits}")
    if tuning.max_frame_bytes:
        text = _set(
            text, r"^\[bus\]$", f"[bus]\nmax_control_frame_bytes = {tuning.max_frame_bytes}"
        )
    config.write_text(text)
    cfg = load_config(config)
    got = (cfg.protocol.block_detections, cfg.keystore.key_size_bits)
    if got != (tuning.block_detections, tuning.key_size_bits) or (
        tuning.max_frame_bytes and cfg.bus.max_control_frame_bytes != tuning.max_frame_bytes
    ):
        raise RuntimeError(f"{config}: tuning not applied")


def _status(node: Node, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any] | None:
    if node.daemon is None or node.daemon.proc.poll() is not None:
        return None
    try:
        return node.client.request("status", {}, timeout_s)
    except BusError:
        return None


class LogTail:
    """The JSON log records of every run of a node, read incrementally."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.offsets: dict[Path, int] = {}
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        for i in range(1, self.node.starts + 1):
            path = self.node.log_dir / f"{self.node.name}.{i}.log"
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + end + 1
            for line in data[: end + 1].splitlines():
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(rec, dict):
                    rec["_run"] = i
                    self.records.append(rec)
        return self.records

    def since(self, mark: int, event: str | None = None) -> list[dict[str, Any]]:
        recs = self.poll()[mark:]
        return recs if event is None else [r for r in recs if r.get("event") == event]


class TelemetryWatch(threading.Thread):
    """Follows one node's telemetry (state, progress, block, peer, alarm) into ``sink``;
    survives restarts and freezes of the node."""

    def __init__(
        self, node: Node, sink: collections.deque[Telemetry], lock: threading.Lock
    ) -> None:
        super().__init__(name=f"telemetry-{node.name}", daemon=True)
        self.node, self.sink, self.lock = node, sink, lock
        self.stop = threading.Event()
        self.endpoint = load_config(node.config).bus.telemetry_endpoint

    def run(self) -> None:
        node = self.node
        keys = load_keypair(node.client_key_file) if node.client_key_file else None
        client = Client(
            node.control_endpoint,
            server_public_key=node.server_public,
            client_keys=keys,
            timeout_s=STATUS_TIMEOUT_S,
        )
        sub = Subscription(
            self.endpoint,
            client,
            node.server_public,
            keys,
            topics=("state", "progress", "block", "peer", "alarm"),
            snapshot_timeout_s=STATUS_TIMEOUT_S,
            retry_s=2.0,
        )
        try:
            while not self.stop.is_set():
                try:
                    events = sub.poll(0.2)
                except BusError:
                    time.sleep(0.5)
                    continue
                with self.lock:
                    for ev in events:
                        if ev.kind != "stale":
                            self.sink.append(Telemetry(ev.ts, node.role, ev.topic, ev.payload))
        finally:
            sub.close()
            client.close()


class Consumer(threading.Thread):
    """ETSI 014 consumer: enc_keys for the master SAE at one KME, dec_keys for the slave at
    the other, alternating which KME issues; every key into the ledger."""

    def __init__(self, pair: Pair, ledger: DeliveryLedger) -> None:
        super().__init__(name="etsi-consumer", daemon=True)
        self.pair, self.ledger = pair, ledger
        self.stop = threading.Event()
        self.pause = threading.Event()
        self.idle = threading.Event()
        self.errors: collections.Counter[str] = collections.Counter()

    def _etsi(
        self, node: Node, sae: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        assert self.pair.pki is not None
        try:
            return node.etsi(self.pair.pki, sae, path, body)
        except Exception as exc:  # refused, reset, timed out, TLS, a torn reply
            self.errors[type(exc).__name__] += 1
            return 0, {"message": f"{type(exc).__name__}: {exc}"}

    def run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            if self.pause.is_set():
                self.idle.set()
                time.sleep(0.2)
                continue
            self.idle.clear()
            issuer, peer = (
                (self.pair.tx, self.pair.rx) if turn % 2 == 0 else (self.pair.rx, self.pair.tx)
            )
            turn += 1
            st, enc = self._etsi(
                issuer,
                SAE_MASTER,
                f"{SAE_SLAVE}/enc_keys",
                {"number": CONSUMER_NUMBER, "size": CONSUMER_SIZE},
            )
            if st != 200:
                self.errors[f"enc_{st}"] += 1
                time.sleep(1.0)
                continue
            keys = list(enc.get("keys") or [])
            self.ledger.record_enc(issuer.name, keys, time.time())
            self._fetch(peer, [str(k["key_ID"]) for k in keys])
            time.sleep(CONSUMER_PAUSE_S)

    def _fetch(self, peer: Node, ids: list[str]) -> None:
        deadline = time.monotonic() + DEC_RETRY_S
        body = {"key_IDs": [{"key_ID": i} for i in ids]}
        last = "no answer"
        while time.monotonic() < deadline and not self.stop.is_set():
            st, dec = self._etsi(peer, SAE_SLAVE, f"{SAE_MASTER}/dec_keys", body)
            if st == 200:
                self.ledger.record_dec(peer.name, dec.get("keys") or [], time.time())
                return
            self.errors[f"dec_{st}"] += 1
            last = f"{st} {str(dec.get('message'))[:120]}"
            if st in (400, 401):
                break
            time.sleep(1.0)
        self.ledger.record_lost(peer.name, ids, f"dec_keys: {last}", time.time())


@dataclass
class Chain:
    """Faults checked together: an ``exchange`` fault and the ``recovery`` faults after it."""

    records: list[dict[str, Any]] = field(default_factory=list)
    t_inject_wall: float = 0.0
    marks: dict[str, int] = field(default_factory=dict)


class Campaign:
    def __init__(
        self,
        out: Path,
        seed: int,
        n: int,
        *,
        max_delay_s: float,
        tuning: Tuning,
        recover_timeout_s: float,
        kinds: Sequence[str] = FAULT_KINDS,
    ) -> None:
        self.out, self.seed, self.n = out, seed, n
        self.kinds = tuple(kinds)
        self.max_delay_s = max_delay_s
        self.tuning = tuning
        self.recover_timeout_s = recover_timeout_s
        self.pair = make_valid_pair(out / "pair", tuning)
        bus = load_config(self.pair.tx.config).bus
        self.peer_timeout_s = bus.heartbeat_interval_s * bus.heartbeat_liveness
        self.logs = {n.role: LogTail(n) for n in self.pair.nodes}
        self.tele: collections.deque[Telemetry] = collections.deque(maxlen=4000)
        self.tele_lock = threading.Lock()
        self.watches = [TelemetryWatch(n, self.tele, self.tele_lock) for n in self.pair.nodes]
        self.ledger = DeliveryLedger()
        self.consumer = Consumer(self.pair, self.ledger)
        self.t0 = time.monotonic()
        self.crashes: list[dict[str, Any]] = []
        self.restarts_of_pair = 0
        self.states: list[tuple[float, str, str]] = []
        self.aborted: str | None = None
        self.stores_differed = False

    # ------------------------------------------------------------------ helpers
    def node(self, role: str) -> Node:
        return self.pair.tx if role == "transmitter" else self.pair.rx

    def now_s(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def log(self, msg: str) -> None:
        print(f"[{self.now_s():7.1f}s] {msg}", file=sys.stderr, flush=True)

    def statuses(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        a, b = _status(self.pair.tx), _status(self.pair.rx)
        s = (a["state"] if a else "-", b["state"] if b else "-")
        if not self.states or self.states[-1][1:] != s:
            self.states.append((self.now_s(), *s))
        return a, b

    def marks(self) -> dict[str, int]:
        return {role: len(t.poll()) for role, t in self.logs.items()}

    def check_crashes(self) -> list[dict[str, Any]]:
        """Daemons that exited by themselves: recorded (with their log tail), restarted."""
        found = []
        for n in self.pair.nodes:
            if n.daemon is not None and n.daemon.proc.poll() is not None:
                rec = {
                    "node": n.name,
                    "exit_code": n.daemon.proc.returncode,
                    "at_s": self.now_s(),
                    "log_tail": n.log_tail(2000),
                }
                self.log(f"!! {n.name} exited by itself (code {rec['exit_code']}); restarting")
                self.crashes.append(rec)
                found.append(rec)
                n.close_client()
                n.start()
        return found

    def max_block_id(self) -> int:
        ids = [
            int(r["block_id"])
            for t in self.logs.values()
            for r in t.poll()
            if r.get("event") in ("keystore.block_added", "keystore.block_committed")
            and isinstance(r.get("block_id"), int)
        ]
        return max(ids, default=-1)

    def phase(self) -> tuple[str, str]:
        tx, rx = _status(self.pair.tx, 2.0), _status(self.pair.rx, 2.0)
        with self.tele_lock:
            recent = [e for e in self.tele if e.ts > time.time() - 600]
        return label_phase(tx, rx, recent, time.time())

    # ------------------------------------------------------------------ faults
    def _sim(self, node: Node, fault: str, clear: bool, timeout_s: float) -> str | None:
        """``sim.inject`` (retried while the node starts); None or the last error."""
        deadline = time.monotonic() + timeout_s
        err = "not tried"
        while time.monotonic() < deadline:
            try:
                node.client.request("sim.inject", {"fault": fault, "clear": clear}, 5.0)
                return None
            except BusError as exc:
                err = f"{type(exc).__name__}: {exc}"
                time.sleep(1.0)
        return err

    def inject(self, plan: FaultPlan) -> dict[str, Any]:
        node = self.node(plan.victim)
        crashed = self.check_crashes()
        phase, detail = self.phase()
        rec: dict[str, Any] = {
            "index": plan.index,
            "kind": plan.kind,
            "victim": plan.victim,
            "anchor": plan.anchor,
            "delay_s": plan.delay_s,
            "hold_s": plan.hold_s,
            "at_s": self.now_s(),
            "wall_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "phase": phase,
            "phase_detail": detail,
            "injected": False,
        }
        if crashed:
            rec["daemon_crashes_before"] = [c["node"] for c in crashed]
        self.log(f"fault {plan.index}: {plan.kind} on {node.name}, phase {phase} ({detail})")
        assert node.daemon is not None
        proc = node.daemon.proc
        if plan.kind.startswith("kill_"):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                rec["injected"] = True
            else:
                rec["error"] = f"{node.name} was not running"
            node.close_client()
            time.sleep(plan.hold_s)
            node.start()
        elif plan.kind in SIM_FAULT_FOR:
            err = self._sim(node, plan.kind, False, 30.0)
            if err is None:
                rec["injected"] = True
                time.sleep(plan.hold_s)
                err = self._sim(node, plan.kind, True, 60.0)
                if err is not None:
                    rec["error"] = f"could not clear: {err}"
            else:
                rec["error"] = f"could not inject: {err}"
        elif plan.kind == "peer_drop":
            try:
                os.kill(proc.pid, signal.SIGSTOP)
                rec["injected"] = True
                time.sleep(plan.hold_s)
            except ProcessLookupError:
                rec["error"] = f"{node.name} was not running"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
        elif plan.kind == "disk_write_error":
            try:
                old = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, old[1]))
            except (ProcessLookupError, OSError) as exc:
                rec["error"] = f"prlimit: {exc}"
            else:
                rec["injected"] = True
                try:
                    time.sleep(plan.hold_s)
                finally:
                    with contextlib.suppress(ProcessLookupError, OSError):
                        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, old)
        else:
            raise ValueError(f"unknown fault kind {plan.kind!r}")
        rec["ended_at_s"] = self.now_s()
        return rec

    # ------------------------------------------------------------------ checks
    def wait_recovered(self, timeout_s: float) -> dict[str, Any]:
        """After a fault ended: a block committed by the transmitter that finished after
        now, then both nodes in step. Daemons that died on the way are restarted."""
        t_end = time.monotonic()
        baseline = self.max_block_id()
        tx_mark = len(self.logs["transmitter"].poll())
        out: dict[str, Any] = {"recovery_s": None, "in_step_s": None, "crashed": []}
        deadline = t_end + timeout_s
        committed_at: float | None = None
        while time.monotonic() < deadline:
            out["crashed"] += self.check_crashes()
            if committed_at is None:
                for r in self.logs["transmitter"].since(tx_mark, "keystore.block_committed"):
                    if int(r.get("block_id", -1)) > baseline:
                        committed_at = time.monotonic()
                        out["recovery_s"] = round(committed_at - t_end, 1)
                        out["block_id"] = int(r["block_id"])
                        break
            a, b = self.statuses()
            in_step = bool(a and b and a.get("delivery_in_step") and b.get("delivery_in_step"))
            if committed_at is not None and in_step:
                out["in_step_s"] = round(time.monotonic() - t_end, 1)
                break
            time.sleep(0.5)
        out["recovered"] = out["in_step_s"] is not None and not out["crashed"]
        if committed_at is None:
            out["why"] = f"no block committed within {timeout_s:g} s"
        elif out["in_step_s"] is None:
            out["why"] = f"delivery not in step within {timeout_s:g} s"
        elif out["crashed"]:
            out["why"] = "a daemon exited by itself"
        return out

    def compare_digests(self) -> dict[str, Any]:
        """keys.digest of both nodes, the consumer paused, retried for DIGEST_RETRY_S."""
        self.consumer.pause.set()
        idle = self.consumer.idle.wait(DEC_RETRY_S + 40.0) or not self.consumer.is_alive()
        out: dict[str, Any] = {"consumer_idle": idle}
        try:
            deadline = time.monotonic() + DIGEST_RETRY_S
            tries = 0
            da: dict[str, Any] | None = None
            db: dict[str, Any] | None = None
            while True:
                tries += 1
                try:
                    da = self.pair.tx.client.request("keys.digest", {}, 10.0)
                    db = self.pair.rx.client.request("keys.digest", {}, 10.0)
                except BusError as exc:
                    out["error"] = f"{type(exc).__name__}: {exc}"
                    da = db = None
                if da is not None and da == db:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            out.update(match=da is not None and da == db, tries=tries, tx=da, rx=db)
            out["replays"] = self.replay_probe()
        finally:
            self.consumer.idle.clear()
            self.consumer.pause.clear()
        return out

    def replay_probe(self, n: int = 2) -> list[dict[str, Any]]:
        """dec_keys again for keys already fetched: each must be refused."""
        assert self.pair.pki is not None
        out: list[dict[str, Any]] = []
        for kid, kme in self.ledger.delivered_before(time.time(), n):
            node = self.pair.tx if kme == self.pair.tx.name else self.pair.rx
            body = {"key_IDs": [{"key_ID": kid}]}
            try:
                st, _ = node.etsi(self.pair.pki, SAE_SLAVE, f"{SAE_MASTER}/dec_keys", body)
            except Exception as exc:
                out.append({"key_ID": kid, "error": type(exc).__name__})
                continue
            self.ledger.record_replay(kme, kid, st, time.time())
            out.append({"key_ID": kid, "kme": kme, "status": st})
        return out

    def alarms_left(self, since_wall: float) -> tuple[list[str], list[str]]:
        """Wait up to ALARM_GRACE_S for the alarms raised since ``since_wall`` to clear:
        (those still active, other active alarms)."""
        deadline = time.monotonic() + ALARM_GRACE_S
        left: list[str] = []
        other: list[str] = []
        while True:
            a, b = self.statuses()
            left, other = [], []
            for n, s in ((self.pair.tx, a), (self.pair.rx, b)):
                for al in (s or {}).get("alarms") or []:
                    name = f"{n.name}:{al['name']}"
                    (left if float(al.get("since") or 0) >= since_wall - 1.0 else other).append(
                        name
                    )
            if not left or time.monotonic() > deadline:
                return left, other
            time.sleep(1.0)

    def evidence(self, marks: dict[str, int]) -> dict[str, Any]:
        """What the daemons did since ``marks``: state history, warnings and errors."""
        ev: dict[str, Any] = {"states_tx_rx": self.states[-30:]}
        for role, tail in self.logs.items():
            recs = [
                {
                    k: v
                    for k, v in r.items()
                    if k not in ("logger", "node_id", "role") and not str(k).startswith("_")
                }
                for r in tail.since(marks.get(role, 0))
                if r.get("level") in ("warning", "error", "critical")
                or r.get("event") in ("state_changed", "key_sync_done", "keystore.reconciled")
            ]
            ev[role] = [json.dumps(r)[:400] for r in recs[-40:]]
        return ev

    def seen_since(self, since_wall: float) -> tuple[list[str], list[str]]:
        """From telemetry since ``since_wall`` (it survives lost log lines): (state
        transitions ``node:OLD->NEW``, alarms raised ``node:name``)."""
        states: list[str] = []
        alarms: list[str] = []
        with self.tele_lock:
            recent = [e for e in self.tele if e.ts >= since_wall - 0.5]
        for e in sorted(recent, key=lambda e: e.ts):
            name = self.node(e.role).name
            if e.topic == "state":
                s = f"{name}:{e.payload.get('old')}->{e.payload.get('new')}"
                if s not in states[-4:]:
                    states.append(s)
            elif e.topic == "alarm" and e.payload.get("event") == "raise":
                alarms.append(f"{name}:{e.payload.get('name')}")
        return states[-60:], sorted(set(alarms))

    def logged_since(self, marks: dict[str, int]) -> tuple[list[str], list[str]]:
        """(alarms raised, error-level events) in both logs since ``marks``."""
        alarms: list[str] = []
        errors: list[str] = []
        for role, tail in self.logs.items():
            name = self.node(role).name
            for r in tail.since(marks.get(role, 0)):
                if r.get("event") == "alarm":
                    alarms.append(f"{name}:{r.get('alarm')}")
                if r.get("level") in ("error", "critical") or "exception" in r:
                    errors.append(f"{name}:{str(r.get('event')).splitlines()[0][:120]}")
        return sorted(set(alarms)), sorted(set(errors))

    def restart_pair(self) -> bool:
        """Both daemons stopped and started again; True once they exchange and are in step."""
        self.restarts_of_pair += 1
        self.log("restarting both daemons")
        for n in self.pair.nodes:
            with contextlib.suppress(ProcessLookupError):
                if n.daemon is not None and n.daemon.proc.poll() is None:
                    os.kill(n.daemon.proc.pid, signal.SIGCONT)
            try:
                if n.daemon is not None and n.daemon.proc.poll() is None:
                    n.stop(signal.SIGTERM, 60.0)
            except Exception:
                n.kill_leftover()
            n.kill_leftover()
        self.pair.start()
        return bool(self.wait_recovered(START_TIMEOUT_S)["recovered"])

    # ------------------------------------------------------------------ campaign
    def run(self) -> dict[str, Any]:
        plans = schedule(
            self.n,
            self.seed,
            kinds=self.kinds,
            max_delay_s=self.max_delay_s,
            peer_timeout_s=self.peer_timeout_s,
        )
        faults: list[dict[str, Any]] = []
        try:
            self.pair.start()
            for w in self.watches:
                w.start()
            self.log(f"pair starting in {self.out}; waiting for the first committed block")
            first = self.wait_recovered(START_TIMEOUT_S)
            if first["recovered"]:
                self.log(f"first block committed after {first['recovery_s']} s; faults begin")
                self.consumer.start()
                self.run_faults(plans, faults)
            else:
                self.aborted = f"the pair never produced key: {first.get('why')}"
        except Exception as exc:  # a campaign bug: keep what was measured
            self.aborted = f"campaign error: {type(exc).__name__}: {exc}"
            self.log(self.aborted)
        finally:
            self.consumer.stop.set()
            self.consumer.join(timeout=DEC_RETRY_S + 40.0)
            for w in self.watches:
                w.stop.set()
            for w in self.watches:
                w.join(timeout=10.0)
            for n in self.pair.nodes:
                with contextlib.suppress(Exception):
                    if n.daemon is not None and n.daemon.proc.poll() is None:
                        os.kill(n.daemon.proc.pid, signal.SIGCONT)
                        n.stop(signal.SIGTERM, 60.0)
            self.pair.kill_all()
        deliveries = self.ledger.summary()
        deliveries["consumer_errors"] = dict(self.consumer.errors)
        return build_report(
            seed=self.seed,
            requested=self.n,
            faults=faults,
            deliveries=deliveries,
            extra={
                "out": str(self.out),
                "logs": str(self.pair.tmp),
                "kinds_drawn_from": list(self.kinds),
                "tuning": asdict(self.tuning),
                "peer_timeout_s": self.peer_timeout_s,
                "recover_timeout_s": self.recover_timeout_s,
                "schedule": [asdict(p) for p in plans],
                "daemon_crashes": self.crashes,
                "pair_restarts": self.restarts_of_pair,
                "aborted": self.aborted,
                "duration_s": self.now_s(),
            },
        )

    def run_faults(self, plans: list[FaultPlan], faults: list[dict[str, Any]]) -> None:
        chain = Chain()
        for k, plan in enumerate(plans):
            time.sleep(plan.delay_s)
            if not chain.records:
                chain.t_inject_wall = time.time()
                chain.marks = self.marks()
            rec = self.inject(plan)
            faults.append(rec)
            chain.records.append(rec)
            if k + 1 < len(plans) and plans[k + 1].anchor == "recovery":
                rec["outcome"] = "interrupted"
                continue  # the next fault lands while the pair recovers from this one
            if not self.check_chain(chain):
                self.aborted = f"the pair did not recover even after a restart (fault {k})"
                return
            chain = Chain()

    def check_chain(self, chain: Chain) -> bool:
        """The checks after the last fault of ``chain``; False when the pair is lost."""
        last = chain.records[-1]
        rec = self.wait_recovered(self.recover_timeout_s)
        alarms, errors = self.logged_since(chain.marks)
        states, tele_alarms = self.seen_since(chain.t_inject_wall)
        alarms = sorted(set(alarms) | set(tele_alarms))
        last["recovery_s"] = rec["recovery_s"]
        last["in_step_s"] = rec["in_step_s"]
        last["outcome"] = "recovered" if rec["recovered"] else "unrecovered"
        if rec["crashed"]:
            last["daemon_crashes"] = [
                {k: v for k, v in c.items() if k != "log_tail"} for c in rec["crashed"]
            ]
        for r in chain.records:
            r["alarms_raised"] = alarms
            r["errors_logged"] = errors
        last["states_seen"] = states
        ok = True
        if not rec["recovered"]:
            last["why"] = rec.get("why")
            last["evidence"] = self.evidence(chain.marks)
            self.log(f"fault {last['index']} UNRECOVERED: {rec.get('why')}")
            ok = self.restart_pair()
            if not ok:
                return False
        digest = self.compare_digests()
        left, other = self.alarms_left(chain.t_inject_wall)
        for r in chain.records:
            r["digest_match"] = digest["match"]
            r["alarms_left"] = left
        if not digest["match"] and self.stores_differed:
            last["mismatch_carried_over"] = True  # the stores already differed before
        self.stores_differed = not digest["match"]
        last["digests"] = {k: digest.get(k) for k in ("tx", "rx", "tries", "consumer_idle")}
        last["replays"] = digest.get("replays")
        if other:
            last["other_active_alarms"] = other
        if not digest["match"]:
            last.setdefault("evidence", self.evidence(chain.marks))
        self.log(
            f"fault {last['index']}: {last['outcome']} in {last['recovery_s']} s, digests "
            f"{'same' if digest['match'] else 'DIFFER'}, alarms left {left or '-'}, "
            f"keys delivered so far {len(self.ledger.enc)}"
        )
        return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=100, help="faults to inject (default 100)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    ap.add_argument("--out", type=Path, default=None, help="directory for configs and logs")
    ap.add_argument(
        "--max-delay", type=float, default=12.0, help="longest random wait before a fault (s)"
    )
    ap.add_argument(
        "--kinds",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated fault kinds to draw from (default: all of {', '.join(FAULT_KINDS)})",
    )
    ap.add_argument("--block-detections", type=int, default=BLOCK_DETECTIONS)
    ap.add_argument(
        "--key-size-bits", type=int, default=KEY_SIZE_BITS, help="[keystore] key_size_bits"
    )
    ap.add_argument(
        "--max-frame-bytes",
        type=int,
        default=MAX_FRAME_BYTES,
        help="bus.max_control_frame_bytes (0, the default: the daemon's own)",
    )
    ap.add_argument("--recover-timeout", type=float, default=RECOVER_TIMEOUT_S)
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in str(args.kinds).split(",") if k.strip())
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown or not kinds:
        ap.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="qkdnode-faults-"))
    out.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(
        out,
        args.seed,
        args.faults,
        max_delay_s=args.max_delay,
        tuning=Tuning(args.block_detections, args.key_size_bits, args.max_frame_bytes),
        recover_timeout_s=args.recover_timeout,
        kinds=kinds,
    )
    report = campaign.run()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_table(report), file=sys.stderr)
    print(f"report: {out / 'report.json'}; configs and logs: {out / 'pair'}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
