"""Crash safety: two nodes' stores in two subprocesses, SIGKILLed at random moments.

The test plays the daemon (two-phase block commit; activation first: pick on the issuer,
activate on the peer, confirm on the issuer, or abandon and release; delivery notices;
summary exchange on every restart) and the consumers (it records every key a reply handed
to a master or a slave). Invariants checked after the storm:

- no key is handed out twice (no stored key goes into two keys confirmed to masters, no
  slave gets a key twice);
- both ends return the same bytes, which are the post-processing's bytes;
- every key confirmed to a master can still be fetched by each of its slaves on the other
  node, unless the sync erased it as uncertain (then it was never served anywhere);
- an activation that was never confirmed leaves nothing behind on either node, except one
  whose confirmation was under way when its node died (then it may stay issued there and
  reserved on the peer: no consumer holds it; its time to live ends it);
- both nodes end with the same live keys (same digest);
- delivered keys end erased as delivered on both, their bytes absent from the database
  files; no key bytes (nor ID seed) appear in the processes' logs.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qkdnode.keystore.ids import ID_SEED_BYTES, block_key_ids

from .crash_worker import final_key

WORKER = Path(__file__).with_name("crash_worker.py")
SIDES = ("transmitter", "receiver")
MAX_KEYS_PER_BLOCK = 12


class Died(Exception):
    pass


def other_side(side: str) -> str:
    return SIDES[1 - SIDES.index(side)]


class Node:
    def __init__(
        self, tmp: Path, side: str, seed: int, self_kill_rng: random.Random | None
    ) -> None:
        self.db = tmp / f"{side}.sqlite"
        self.log = tmp / f"{side}.log"
        self.side = side
        self.seed = seed
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.ready = threading.Event()
        self.self_kill_rng = self_kill_rng

    def start(self) -> None:
        with self.lock:
            # Half of the starts die by themselves inside SQLite, at a random statement.
            rng = self.self_kill_rng
            die_after = 0 if rng is None else rng.choice([0, rng.randint(3, 150)])
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    str(self.db),
                    self.side,
                    str(self.seed),
                    str(die_after),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log.open("a"),
                text=True,
                cwd=Path(__file__).parents[2],
            )
            self.starts += 1
            self.ready.clear()
        self._read()  # ready line
        self.ready.set()

    def kill(self) -> bool:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()  # dead before anyone asks alive()
                return True
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure(self) -> None:
        while not self.alive():
            if self.proc is not None:
                self.proc.wait()
                for f in (self.proc.stdin, self.proc.stdout):
                    try:
                        f.close()  # type: ignore[union-attr]
                    except OSError:
                        pass
            try:
                self.start()
            except Died:
                continue

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise Died(self.side)
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, **msg: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise Died(self.side) from None
        return self._read()

    def call_and_kill(self, delay: float, **msg: Any) -> None:
        """Send ``msg``, SIGKILL the process ``delay`` seconds later: the request may or
        may not have been carried out; its reply is lost."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise Died(self.side) from None
        time.sleep(delay)
        self.kill()
        raise Died(self.side)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=10)
            self.proc.stdout.close()  # type: ignore[union-attr]


class Storm:
    """The daemon's and the consumers' side of the test, and what they observed."""

    def __init__(self, tmp: Path, seed: int) -> None:
        self.tmp = tmp
        self.seed = seed
        self.rng = random.Random(seed)
        self.nodes = {s: Node(tmp, s, seed, random.Random(seed + 2)) for s in SIDES}
        # key ID -> giver side, slaves, key bytes, part IDs (confirmed to the master)
        self.confirmed: dict[str, dict[str, Any]] = {}
        self.confirmed_parts: set[str] = set()
        self.served: dict[tuple[str, str], bytes] = {}  # (key ID, slave) -> bytes
        self.tried: set[tuple[str, str]] = set()
        self.claim_lost: set[tuple[str, str]] = set()  # claim sent, reply lost
        self.never_confirmed: set[str] = set()  # parts activated (maybe), no confirm sent
        self.confirm_lost: set[str] = set()  # parts whose confirm reply was lost
        # parts activated, their issuer died before confirming -> the issuer's side
        self.reserved_unconfirmed: dict[str, str] = {}
        self.uncertain: set[str] = set()  # confirmed keys the sync erased as uncertain
        self.pending_releases: list[tuple[str, str]] = []  # (to side, release JSON)
        self.handed: list[str] = []
        self.blocks = 0

    # -- the daemon --------------------------------------------------------------------------

    def sync(self) -> None:
        """Reconnect: restart dead nodes, deliver some late releases, exchange summaries
        and reconcile (the receiver first, as the key service does); retry until done."""
        while True:
            for n in self.nodes.values():
                n.ensure()
            try:
                for to, rel in list(self.pending_releases):
                    if self.rng.random() < 0.5:
                        assert self.nodes[to].call(op="release", release=rel)["ok"]
                    self.pending_releases.remove((to, rel))
                tx, rx = self.nodes["transmitter"], self.nodes["receiver"]
                r_tx, r_rx = tx.call(op="summary"), rx.call(op="summary")
                assert r_tx.get("inflight") == r_rx.get("inflight") == 0, (r_tx, r_rx)
                s_tx, s_rx = r_tx["summary"], r_rx["summary"]
                assert rx.call(op="reconcile", local=s_rx, remote=s_tx)["ok"]
                assert tx.call(op="reconcile", local=s_tx, remote=s_rx)["ok"]
                return
            except Died:
                continue

    def issue(self) -> None:
        giver_side = self.rng.choice(SIDES)
        giver, other = self.nodes[giver_side], self.nodes[other_side(giver_side)]
        slaves = self.rng.choice([["sae-s"], ["sae-s"], ["sae-s", "sae-t"]])
        r = giver.call(
            op="pick",
            n=self.rng.randint(1, 3),
            size=self.rng.choice([128, 256, 256, 384, 512]),
            slaves=slaves,
        )
        if not r["ok"]:
            assert r["error"] == "KeysUnavailableError", r
            return
        token, activation = r["token"], r["activation"]
        parts = {p for k in json.loads(activation)["keys"] for p in k["parts"]}
        assert not parts & self.confirmed_parts, "a key delivered to a master picked again"
        self.never_confirmed |= parts
        chaos = self.rng.random()  # besides the killer: deaths around the activation
        try:
            if chaos < 0.04:  # the peer dies while it handles the activation: reply lost
                other.call_and_kill(
                    self.rng.uniform(0, 0.005), op="activate", activation=activation
                )
            a = other.call(op="activate", activation=activation)
        except Died:
            # Outcome unknown: erase here, ask the peer to erase (it is down: the message
            # waits for the restart or is lost; the key-ID sync erases them then).
            rel = giver.call(op="abandon", token=token, erase=True)
            self.pending_releases.append((other.side, rel["release"]))
            raise
        assert a["ok"], a
        if not a["reply"]["activated"]:
            giver.call(op="abandon", token=token, erase=False)
            self.never_confirmed -= parts
            return
        if chaos > 0.96:  # the issuer dies between the activation and its confirmation
            self.reserved_unconfirmed.update(dict.fromkeys(parts, giver_side))
            giver.kill()
            raise Died(giver.side)
        self.never_confirmed -= parts
        self.confirm_lost |= parts
        if chaos > 0.92:  # the issuer dies while it confirms: the master gets nothing
            giver.call_and_kill(
                self.rng.uniform(0, 0.005), op="confirm", token=token, slaves=slaves
            )
        c = giver.call(op="confirm", token=token, slaves=slaves)
        assert c["ok"], c
        self.confirm_lost -= parts
        for kid, hexkey, kparts in c["keys"]:
            assert kid not in self.confirmed, "key handed out twice to masters"
            assert not set(kparts) & self.confirmed_parts, "stored key in two keys"
            self.confirmed_parts |= set(kparts)
            self.confirmed[kid] = {
                "giver": giver_side,
                "slaves": slaves,
                "key": bytes.fromhex(hexkey),
                "parts": kparts,
            }
            self.handed.append(kid)

    def claim(self, kid: str, slave: str, *, notice_p: float, chaos: bool = False) -> None:
        """``slave`` fetches ``kid`` on the node that did not issue it."""
        k = self.confirmed[kid]
        redeemer = self.nodes[other_side(k["giver"])]
        self.tried.add((kid, slave))
        self.claim_lost.add((kid, slave))
        if chaos and self.rng.random() < 0.03:  # the node dies while it serves the claim
            redeemer.call_and_kill(self.rng.uniform(0, 0.005), op="claim", slave=slave, ids=[kid])
        r = redeemer.call(op="claim", slave=slave, ids=[kid])
        self.claim_lost.discard((kid, slave))
        if not r["ok"]:
            assert r["error"] == "UnknownKeyError", r
            # allowed only if the sync erased the key as uncertain (never served then)
            part = redeemer.call(op="inspect", ids=[k["parts"][0]])["parts"][k["parts"][0]]
            assert part["reason"] == "uncertain", (kid, slave, r, part)
            assert not any(key == kid for key, _ in self.served), "served, then uncertain"
            self.uncertain.add(kid)
            return
        ((rid, rhex),) = r["keys"]
        assert rid == kid and bytes.fromhex(rhex) == k["key"], "the two ends disagree"
        assert kid not in self.uncertain
        assert (kid, slave) not in self.served, "key handed out twice to a slave"
        self.served[kid, slave] = bytes.fromhex(rhex)
        if r["notice"] is not None and self.rng.random() < notice_p:
            self.nodes[k["giver"]].call(op="notice", notice=r["notice"])

    def waiting(self) -> list[tuple[str, str]]:
        return [
            (kid, s)
            for kid in self.handed
            for s in self.confirmed[kid]["slaves"]
            if (kid, s) not in self.tried
        ]


def run_storm(tmp: Path, seed: int, kills: int, min_blocks: int = 10) -> None:
    st = Storm(tmp, seed)
    rng = st.rng
    for n in st.nodes.values():
        n.start()
    stop = threading.Event()
    kill_rng = random.Random(seed + 1)
    done_kills = 0

    def killer() -> None:
        nonlocal done_kills
        while done_kills < kills and not stop.is_set():
            # kill while the nodes work (not while they start): after a random delay
            while not all(n.ready.is_set() for n in st.nodes.values()) and not stop.is_set():
                time.sleep(0.005)
            time.sleep(kill_rng.uniform(0.01, 0.25))
            if st.nodes[kill_rng.choice(SIDES)].kill():
                done_kills += 1

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while (done_kills < kills or st.blocks < min_blocks) and time.monotonic() < deadline:
            st.blocks += 1
            block = st.blocks
            try:
                n_keys = rng.randint(4, MAX_KEYS_PER_BLOCK)
                tx, rx = st.nodes["transmitter"], st.nodes["receiver"]
                ok = [
                    tx.call(op="add", block=block, n=n_keys)["ok"],
                    rx.call(op="add", block=block, n=n_keys)["ok"],
                ]
                if not all(ok):
                    raise Died("add refused")  # resync discards the half-stored block
                tx.call(op="commit", block=block)
                rx.call(op="commit", block=block)
                for _ in range(rng.randint(1, 4)):
                    st.issue()
                    # slaves fetch some keys handed out earlier (on either node)
                    waiting = st.waiting()
                    for kid, slave in rng.sample(waiting, k=min(len(waiting), rng.randint(0, 3))):
                        st.claim(kid, slave, notice_p=0.7, chaos=True)
            except Died:
                st.sync()
    finally:
        stop.set()
        thread.join()
    # the storm is over: restart both nodes without self-kill, then reconnect
    for n in st.nodes.values():
        n.self_kill_rng = None
        n.kill()
    st.sync()
    nodes = st.nodes
    assert done_kills >= kills
    assert sum(n.starts for n in nodes.values()) >= kills + 4
    self_kills = sum(n.log.read_text().count("self-kill at statement") for n in nodes.values())
    assert self_kills > 0

    # every slave of every confirmed key can fetch it on the other node, same bytes
    lost_claims_done = 0
    for kid, k in st.confirmed.items():
        for slave in k["slaves"]:
            if (kid, slave) in st.served:
                continue
            if (kid, slave) in st.claim_lost:
                redeemer = nodes[other_side(k["giver"])]
                part = redeemer.call(op="inspect", ids=[k["parts"][0]])["parts"][k["parts"][0]]
                if part["reason"] == "delivered" or slave in part["fetched_by"]:
                    # the lost claim did happen before the kill: the key says so
                    st.served[kid, slave] = k["key"]
                    lost_claims_done += 1
                    continue
            st.claim(kid, slave, notice_p=1.0)
    st.sync()

    # both nodes hold the same live keys
    s_tx = json.loads(nodes["transmitter"].call(op="summary")["summary"])
    s_rx = json.loads(nodes["receiver"].call(op="summary")["summary"])
    assert s_tx["blocks"] == s_rx["blocks"]
    assert all(b["committed"] for b in s_tx["blocks"])
    assert (
        nodes["transmitter"].call(op="digest")["digest"]
        == nodes["receiver"].call(op="digest")["digest"]
    )
    # What is still issued or reserved was confirmed by a call whose reply the kill
    # swallowed: no consumer holds it; both erase it when its time to live ends.
    leftover = set(s_tx["issued"]) | set(s_rx["issued"]) | set(s_tx["reserved"])
    leftover |= set(s_rx["reserved"])
    assert leftover <= st.confirm_lost, leftover - st.confirm_lost
    # activations never confirmed left no reservation behind: their keys are erased on
    # both, or (the activation never reached the peer, nor the erasure the issuer's disk)
    # available on both
    never = sorted(st.never_confirmed - st.confirmed_parts - st.confirm_lost)
    states = [n.call(op="inspect", ids=never)["parts"] for n in nodes.values()]
    for p in never:
        assert states[0][p]["state"] == states[1][p]["state"] in (None, "available"), p
    never_erased = [p for p in never if states[0][p]["state"] is None]
    # reserved on the peer, never confirmed: erased on both, as uncertain by the peer (the
    # issuer discards it instead if it died in the sync after the peer erased it)
    for n in nodes.values():
        parts = n.call(op="inspect", ids=sorted(st.reserved_unconfirmed))["parts"]
        for p, info in parts.items():
            issuer = st.reserved_unconfirmed[p] == n.side
            assert info["reason"] in (("uncertain", "discarded") if issuer else ("uncertain",))

    # handed-out keys are the post-processing's bytes, and both ends got the same
    stored: dict[str, bytes] = {}
    seeds: list[bytes] = []
    for b in range(1, st.blocks + 1):
        final = final_key(seed, b, MAX_KEYS_PER_BLOCK)
        seeds.append(final[:ID_SEED_BYTES])
        for i, part_id in enumerate(block_key_ids(seeds[-1], b, MAX_KEYS_PER_BLOCK)):
            stored[str(part_id)] = final[ID_SEED_BYTES + i * 32 : ID_SEED_BYTES + (i + 1) * 32]
    for kid, k in st.confirmed.items():
        assert k["parts"][0] == kid
        expected = b"".join(stored[p] for p in k["parts"])[: len(k["key"])]
        assert k["key"] == expected
        for slave in k["slaves"]:
            assert st.served.get((kid, slave), k["key"]) == k["key"]
    # delivered keys are erased as delivered on both nodes
    delivered = [
        p
        for kid, k in st.confirmed.items()
        if kid not in st.uncertain and all((kid, s) in st.served for s in k["slaves"])
        for p in k["parts"]
    ]
    assert len(delivered) == len(st.confirmed_parts) - sum(
        len(st.confirmed[kid]["parts"]) for kid in st.uncertain
    )
    for n in nodes.values():
        parts = n.call(op="inspect", ids=delivered)["parts"]
        assert {p["reason"] for p in parts.values()} <= {"delivered"}, n.side
        assert n.call(op="erase")["ok"]
        n.stop()
    # the bytes of every stored key a consumer got, and every ID seed, are gone from the
    # files; no key bytes in any log
    handed_parts = [stored[p] for p in st.confirmed_parts]
    never_bytes = [stored[p] for p in never_erased]
    for n in nodes.values():
        files = {f.name: f.read_bytes() for f in tmp.iterdir() if f.name.startswith(n.db.name)}
        logs = n.log.read_text()
        for secret in handed_parts + never_bytes + seeds:
            for name, content in files.items():
                at = content.find(secret)
                assert at < 0, f"erased key bytes in {name} at {at} (page {at // 4096})"
            assert secret.hex() not in logs
            assert base64.b64encode(secret).decode() not in logs
        for k in st.confirmed.values():
            assert k["key"].hex() not in logs
    assert len(st.confirmed) > 10
    assert any(len(k["slaves"]) == 2 for k in st.confirmed.values())
    assert any(len(k["parts"]) > 1 for k in st.confirmed.values())
    print(
        f"storm seed={seed}: {done_kills} kills + {self_kills} inside SQLite, {st.blocks} "
        f"blocks, {len(st.confirmed)} keys confirmed, {len(st.served)} fetches, "
        f"{len(never_erased)} parts of unconfirmed activations erased "
        f"({len(st.reserved_unconfirmed)} known reserved), "
        f"{len(st.confirm_lost)} of lost confirmations, {lost_claims_done} lost claims done, "
        f"{len(st.uncertain)} confirmed keys erased as uncertain"
    )


def test_random_sigkill_storm(tmp_path: Path) -> None:
    run_storm(tmp_path, seed=20261127, kills=14)


@pytest.mark.system  # 40 kills per seed, ~30 s each: make test keeps the 14-kill storm above
@pytest.mark.parametrize("seed", [1, 2])
def test_random_sigkill_storm_long(tmp_path: Path, seed: int) -> None:
    run_storm(tmp_path, seed=seed, kills=40)
