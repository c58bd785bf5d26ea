"""One node's key store in a subprocess, driven by JSON lines on stdin (tests only).

Replies are written to stdout only after the store call returned, i.e. after its SQLite
transaction is durable. The parent test SIGKILLs this process at random moments. Keys
picked for an activation (``pick``) live in this process's memory only, as in the daemon,
until ``confirm`` or ``abandon``: a kill loses them.

usage: python crash_worker.py DB SIDE SEED [DIE_AFTER_STATEMENTS]

With DIE_AFTER_STATEMENTS > 0 the worker SIGKILLs itself when SQLite is about to run that
statement (counted from the start), i.e. inside a transaction between two statements.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import uuid
from typing import Any

import structlog

from qkdnode.keystore import (
    ActivationRequest,
    DeliveryNotice,
    IssuedKey,
    KeyStore,
    KeyStoreError,
    Provenance,
    ReleaseRequest,
    SyncSummary,
    link_id_for,
    reconcile,
)
from qkdnode.keystore.ids import ID_SEED_BYTES

KEY_SIZE_BITS = 256
LINK = link_id_for("alice", "bob")
MASTER = "sae-m"


def final_key(seed: int, block_id: int, n_keys: int) -> bytes:
    """What post-processing would hand both nodes for this block: ID seed, then keys."""
    return hashlib.shake_256(f"{seed}:{block_id}".encode()).digest(
        ID_SEED_BYTES + n_keys * KEY_SIZE_BITS // 8
    )


class Worker:
    def __init__(self, store: KeyStore, seed: int) -> None:
        self.store = store
        self.seed = seed
        self.picked: dict[int, list[IssuedKey]] = {}
        self.next_token = 0

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        store = self.store
        op = msg["op"]
        if op == "add":
            prov = Provenance(qber=0.02, eps_sec=1e-10, eps_cor=1e-15)
            final = final_key(self.seed, msg["block"], msg["n"])
            store.add_block(msg["block"], final, KEY_SIZE_BITS, prov)
            return {}
        if op == "commit":
            store.commit_block(msg["block"])
            return {}
        if op == "pick":  # in memory only
            issued = store.pick_for_enc(msg["n"], msg["size"])
            self.next_token += 1
            self.picked[self.next_token] = issued
            req = store.activation_request(MASTER, msg["slaves"], issued)
            return {"token": self.next_token, "activation": req.model_dump_json()}
        if op == "activate":
            reply = store.activate(ActivationRequest.model_validate_json(msg["activation"]))
            return {"reply": reply.model_dump(mode="json")}
        if op == "confirm":
            issued = self.picked.pop(msg["token"])
            keys = store.confirm_issued(MASTER, msg["slaves"], issued)
            return {
                "keys": [
                    [str(k.key_id), k.key.hex(), [str(p) for p in i.activated().parts]]
                    for k, i in zip(keys, issued, strict=True)
                ]
            }
        if op == "abandon":
            issued = self.picked.pop(msg["token"])
            store.abandon_issue(issued, erase=msg["erase"])
            return {"release": store.release_request(issued).model_dump_json()}
        if op == "release":
            return {"erased": store.release(ReleaseRequest.model_validate_json(msg["release"]))}
        if op == "claim":
            claimed = store.claim_keys(MASTER, msg["slave"], [uuid.UUID(i) for i in msg["ids"]])
            notice = store.delivery_notice(claimed.completed) if claimed.completed else None
            return {
                "keys": [[str(k.key_id), k.key.hex()] for k in claimed.keys],
                "completed": [str(k) for k in claimed.completed],
                "notice": None if notice is None else notice.model_dump_json(),
            }
        if op == "notice":
            store.apply_notice(DeliveryNotice.model_validate_json(msg["notice"]))
            return {}
        if op == "summary":
            return {
                "summary": store.summary().model_dump_json(),
                "inflight": store.inflight_count(),  # must be 0: no activation under way
            }
        if op == "reconcile":
            remote = SyncSummary.model_validate_json(msg["remote"])
            local = SyncSummary.model_validate_json(msg["local"])
            store.apply_reconcile(reconcile(local, remote))
            return {}
        if op == "inspect":  # per part: erase reason, or who fetched it
            out = {}
            for i in msg["ids"]:
                kid = uuid.UUID(i)
                info = store.key_info(kid)
                reason = store.erase_reason(kid)
                out[i] = {
                    "reason": None if reason is None else reason.value,
                    "state": None if info is None else info.state.value,
                    "fetched_by": [] if info is None else list(info.fetched_by),
                }
            return {"parts": out}
        if op == "digest":
            return {"digest": store.digest()}
        if op == "erase":
            erased = store.erase_due()
            store.compact()
            return {"erased": erased}
        raise ValueError(f"unknown op {op!r}")


def main() -> int:
    db, side, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    die_after = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    store = KeyStore.open(db, link_id=LINK, side=side, key_ttl_s=1e6)  # type: ignore[arg-type]
    if die_after > 0:
        count = 0

        def trace(statement: str) -> None:
            nonlocal count
            count += 1
            if count >= die_after:
                sys.stderr.write(f"self-kill at statement {count}\n")  # no SQL: it has values
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        store._conn.set_trace_callback(trace)
    worker = Worker(store, seed)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            reply = {"ok": True, **worker.handle(msg)}
        except KeyStoreError as exc:
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
