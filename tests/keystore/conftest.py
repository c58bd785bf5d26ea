from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from qkdnode.keystore import (
    ActivationRequest,
    DeliveredKey,
    IssuedKey,
    KeyStore,
    Provenance,
    SyncSummary,
    link_id_for,
    reconcile,
)
from qkdnode.keystore.ids import ID_SEED_BYTES

LINK = link_id_for("alice", "bob")
PROV = Provenance(qber=0.021, eps_sec=1e-10, eps_cor=1e-15)
MASTER = "sae-m"
SLAVE = "sae-s"


def final_key(n_keys: int, key_size_bits: int = 256) -> bytes:
    """A block's privacy-amplified output: ID seed, then ``n_keys`` keys."""
    return os.urandom(ID_SEED_BYTES + n_keys * key_size_bits // 8)


def key_bytes(final: bytes) -> bytes:
    """The part of a final key that is cut into keys (the ID seed is not)."""
    return final[ID_SEED_BYTES:]


@dataclass
class Clock:
    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StorePair:
    tx: KeyStore
    rx: KeyStore
    clock: Clock

    def peer(self, store: KeyStore) -> KeyStore:
        return self.rx if store is self.tx else self.tx

    def add_committed(self, block_id: int, n_keys: int = 8, key_size_bits: int = 256) -> bytes:
        """Store and commit one block on both nodes; returns its key bytes (no seed)."""
        final = final_key(n_keys, key_size_bits)
        ids_tx = self.tx.add_block(block_id, final, key_size_bits, PROV)
        ids_rx = self.rx.add_block(block_id, final, key_size_bits, PROV)
        assert ids_tx == ids_rx
        self.tx.commit_block(block_id)
        self.rx.commit_block(block_id)
        return key_bytes(final)

    def activate(
        self,
        issuer: KeyStore,
        number: int,
        size_bits: int,
        *,
        master: str = MASTER,
        slaves: Sequence[str] = (SLAVE,),
    ) -> tuple[list[IssuedKey], ActivationRequest]:
        """Pick keys on ``issuer`` and have its peer activate them (not yet confirmed)."""
        issued = issuer.pick_for_enc(number, size_bits)
        req = issuer.activation_request(master, list(slaves), issued)
        # the request crosses the wire as JSON
        req = ActivationRequest.model_validate_json(req.model_dump_json())
        reply = self.peer(issuer).activate(req)
        assert reply.activated, reply
        return issued, req

    def issue(
        self,
        issuer: KeyStore,
        number: int,
        size_bits: int,
        *,
        master: str = MASTER,
        slaves: Sequence[str] = (SLAVE,),
    ) -> list[DeliveredKey]:
        """The whole enc_keys flow: pick, activation by the peer, confirmation."""
        issued, _ = self.activate(issuer, number, size_bits, master=master, slaves=slaves)
        return issuer.confirm_issued(master, list(slaves), issued)

    def claim(
        self,
        store: KeyStore,
        key_ids: Sequence[uuid.UUID],
        *,
        master: str = MASTER,
        slave: str = SLAVE,
        notify: bool = True,
    ) -> list[DeliveredKey]:
        """The dec_keys flow on ``store``; the delivery notice reaches the issuer if
        ``notify``."""
        claimed = store.claim_keys(master, slave, key_ids)
        if notify and claimed.completed:
            self.peer(store).apply_notice(store.delivery_notice(claimed.completed))
        return claimed.keys

    def sync(self) -> None:
        """What the daemon does on reconnection: exchange summaries, apply reconcile."""
        s_tx, s_rx = self.tx.summary(), self.rx.summary()
        s_tx = SyncSummary.model_validate_json(s_tx.model_dump_json())
        s_rx = SyncSummary.model_validate_json(s_rx.model_dump_json())
        self.tx.apply_reconcile(reconcile(s_tx, s_rx))
        self.rx.apply_reconcile(reconcile(s_rx, s_tx))

    def reopen(self, side: str) -> KeyStore:
        """Close and reopen one node's store (a restart: what was in memory is lost)."""
        old = self.tx if side == "transmitter" else self.rx
        old.close()
        new = KeyStore.open(
            old.path,
            link_id=old.link_id,
            side=old.side,
            clock=self.clock,
            key_ttl_s=old.key_ttl_s,
        )
        if side == "transmitter":
            self.tx = new
        else:
            self.rx = new
        return new

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def open_pair(d: Path, clock: Clock, *, key_ttl_s: float = 3600) -> StorePair:
    tx = KeyStore.open(
        d / "tx.sqlite", link_id=LINK, side="transmitter", clock=clock, key_ttl_s=key_ttl_s
    )
    rx = KeyStore.open(
        d / "rx.sqlite", link_id=LINK, side="receiver", clock=clock, key_ttl_s=key_ttl_s
    )
    return StorePair(tx, rx, clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pair(tmp_path: Path, clock: Clock) -> Iterator[StorePair]:
    p = open_pair(tmp_path, clock)
    yield p
    p.close()
