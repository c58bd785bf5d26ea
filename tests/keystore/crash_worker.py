"""One node's key store in a subprocess, driven by JSON lines on stdin (tests only).

Replies are written to stdout only after the store call returned, i.e. after its SQLite
transaction is durable. The parent test SIGKILLs this process at random moments.

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
    DeliveryNotice,
    KeyStore,
    KeyStoreError,
    Pair,
    Provenance,
    SyncSummary,
    link_id_for,
    reconcile,
)

KEY_SIZE_BITS = 256
LINK = link_id_for("alice", "bob")
PAIR = Pair(master="sae-m", slave="sae-s")


def block_bytes(seed: int, block_id: int, n_keys: int) -> bytes:
    """What post-processing would hand both nodes for this block."""
    return hashlib.shake_256(f"{seed}:{block_id}".encode()).digest(n_keys * KEY_SIZE_BITS // 8)


def handle(store: KeyStore, seed: int, msg: dict[str, Any]) -> dict[str, Any]:
    op = msg["op"]
    if op == "add":
        prov = Provenance(qber=0.02, eps_sec=1e-10, eps_cor=1e-15)
        store.add_block(
            msg["block"], block_bytes(seed, msg["block"], msg["n"]), KEY_SIZE_BITS, prov
        )
        return {}
    if op == "commit":
        store.commit_block(msg["block"])
        return {}
    if op in ("take", "claim"):
        if op == "take":
            keys = store.take_keys(PAIR, msg["n"], msg["size"])
        else:
            keys = store.claim_keys(PAIR, [uuid.UUID(i) for i in msg["ids"]])
        notice = store.notice(PAIR, "enc" if op == "take" else "dec", keys)
        return {
            "keys": [[str(k.key_id), k.key.hex()] for k in keys],
            "notice": notice.model_dump_json(),
        }
    if op == "notice":
        store.apply_notice(DeliveryNotice.model_validate_json(msg["notice"]))
        return {}
    if op == "summary":
        return {"summary": store.summary().model_dump_json()}
    if op == "reconcile":
        remote = SyncSummary.model_validate_json(msg["remote"])
        store.apply_reconcile(reconcile(store.summary(), remote))
        return {}
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
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            reply = {"ok": True, **handle(store, seed, msg)}
        except KeyStoreError as exc:
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
