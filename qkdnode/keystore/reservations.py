"""The peer's side of key delivery (ETSI dec_keys): keys reserved for the issuer's SAEs.

:func:`activate` reserves the keys of an activation for its master and slaves, durably,
all or nothing, and answers refusals in the reply; :func:`release` erases the parts of an
activation the issuer abandoned; :func:`claim_keys` hands reserved keys to the slaves they
were activated for. Each function is the body of the
:class:`~qkdnode.keystore.store.KeyStore` method of the same name, which documents it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from qkdnode.keystore.database import Database
from qkdnode.keystore.errors import (
    KeyRequestError,
    KeysUnavailableError,
    LinkMismatchError,
    UnknownKeyError,
)
from qkdnode.keystore.models import (
    ActivationRefusal,
    ActivationReply,
    ActivationRequest,
    DeliveredKey,
    EraseReason,
    KeyState,
    ReleaseRequest,
)


@dataclass(frozen=True)
class Claimed:
    """What ``claim_keys`` handed out, and which of the keys are now delivered to every
    slave they were activated for (the issuer is told, so it erases its copies)."""

    keys: list[DeliveredKey]
    completed: list[uuid.UUID]


def _refuse(refusal: ActivationRefusal, message: str) -> ActivationReply:
    """A refused activation. Raised out of the transaction by the caller's return, which
    commits nothing (no statement changed anything yet)."""
    return ActivationReply(activated=False, refusal=refusal, message=message)


def activate(
    db: Database, req: ActivationRequest, *, link_id: str, enc_parity: int
) -> ActivationReply:
    if req.link_id != link_id:
        return ActivationReply(
            activated=False, refusal="bad_request", message="activation for another link"
        )
    peer_parity = 1 - enc_parity
    now = db.clock()
    seen: set[bytes] = set()
    updates: list[tuple[str, str, bytes, int, int, bytes]] = []
    slaves_json = json.dumps(list(req.slaves))
    with db.tx() as cur:
        for k in req.keys:
            if k.parts[0] != k.key_ID:
                return _refuse("bad_request", f"key_ID {k.key_ID} is not its first part")
            bits = 0
            for n, part in enumerate(k.parts):
                pid = part.bytes
                if pid in seen:
                    return _refuse("bad_request", f"part {part} appears twice")
                seen.add(pid)
                row = cur.execute(
                    "SELECT state, enc_parity, size_bits, expires_at, pair_master, slaves, "
                    "delivered_as, part, delivered_size_bits FROM keys WHERE key_id=?",
                    (pid,),
                ).fetchone()
                if row is None:
                    return _refuse("not_available", f"part {part} is not held here")
                state, parity, stored, expires, pm, sl, das, dpart, dsize = row
                if parity != peer_parity:
                    return _refuse("bad_request", f"part {part} is not the peer's to issue")
                if expires <= now:
                    return _refuse("not_available", f"part {part} has expired")
                if pm is not None:
                    same = (pm, sl, das, dpart, dsize) == (
                        req.master,
                        slaves_json,
                        k.key_ID.bytes,
                        n,
                        k.size_bits,
                    )
                    if not same:
                        return _refuse("not_available", f"part {part} is reserved already")
                elif state not in (KeyState.AVAILABLE.value, KeyState.PENDING.value):
                    return _refuse("not_available", f"part {part} is {state}")
                bits += stored
                updates.append((req.master, slaves_json, k.key_ID.bytes, n, k.size_bits, pid))
            if bits < k.size_bits or bits - stored >= k.size_bits:
                return _refuse(
                    "bad_request", f"key_ID {k.key_ID}: parts do not make {k.size_bits} bits"
                )
        cur.executemany(
            # fetched is kept on an identical repeat: a slave that fetched already must
            # not fetch again
            "UPDATE keys SET pair_master=?, slaves=?, fetched=COALESCE(fetched, '[]'), "
            "delivered_as=?, part=?, "
            "delivered_size_bits=?, state = CASE state WHEN 'available' THEN 'reserved' "
            "ELSE state END WHERE key_id=?",
            updates,
        )
    return ActivationReply(activated=True)


def release(db: Database, req: ReleaseRequest, *, link_id: str, enc_parity: int) -> int:
    if req.link_id != link_id:
        raise LinkMismatchError(f"release for link {req.link_id!r}, this store is {link_id!r}")
    peer_parity = 1 - enc_parity
    with db.tx() as cur:
        ids = [
            r[0]
            for p in req.parts
            for r in cur.execute(
                "SELECT key_id FROM keys WHERE key_id=? AND enc_parity=? AND "
                "(fetched IS NULL OR fetched='[]')",
                (p.bytes, peer_parity),
            )
        ]
        n = db.erase(cur, ids, EraseReason.UNCERTAIN)
    return n


def claim_keys(db: Database, master: str, slave: str, key_ids: Sequence[uuid.UUID]) -> Claimed:
    if not key_ids:
        raise KeyRequestError("no key_ID given")
    if len(set(key_ids)) != len(key_ids):
        raise KeyRequestError("a key_ID is requested twice")
    now = db.clock()
    out: list[DeliveredKey] = []
    done: list[uuid.UUID] = []
    with db.tx() as cur:
        fetch_updates: list[tuple[str, bytes]] = []
        erase: list[bytes] = []
        for kid in key_ids:
            rows = cur.execute(
                "SELECT key_id, state, expires_at, pair_master, slaves, fetched, "
                "delivered_size_bits, via, part, key FROM keys WHERE delivered_as=? "
                "ORDER BY part",
                (kid.bytes,),
            ).fetchall()
            usable = bool(rows) and all(
                r[3] == master
                and r[7] is None
                and r[2] > now
                and slave in json.loads(r[4] or "[]")
                and slave not in json.loads(r[5] or "[]")
                and r[8] == n
                for n, r in enumerate(rows)
            )
            if not usable:
                raise UnknownKeyError(
                    f"key_ID {kid} is unknown, already delivered, or not issued to this SAE pair"
                )
            if any(r[1] == KeyState.PENDING.value for r in rows):
                raise KeysUnavailableError(
                    f"key_ID {kid}: its block is not yet committed on this KME; retry"
                )
            size = int(rows[0][6])
            data = b"".join(bytes(r[9]) for r in rows)[: size // 8]
            if len(data) * 8 != size:
                raise UnknownKeyError(
                    f"key_ID {kid} is unknown, already delivered, or not issued to this SAE pair"
                )
            slaves = json.loads(rows[0][4])
            fetched = [*json.loads(rows[0][5] or "[]"), slave]
            if set(slaves) <= set(fetched):
                erase.extend(r[0] for r in rows)
                done.append(kid)
            else:
                fetch_updates.extend((json.dumps(fetched), r[0]) for r in rows)
            out.append(DeliveredKey(kid, size, data))
        cur.executemany("UPDATE keys SET fetched=? WHERE key_id=?", fetch_updates)
        cur.executemany(
            "UPDATE keys SET state=?, delivered_at=?, via='dec' WHERE key_id=?",
            [(KeyState.DELIVERED.value, now, kid) for kid in erase],
        )
        db.erase(cur, erase, EraseReason.DELIVERED)
    return Claimed(keys=out, completed=done)
