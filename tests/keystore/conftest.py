from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qkdnode.keystore import KeyStore, Provenance, link_id_for

LINK = link_id_for("alice", "bob")
PROV = Provenance(qber=0.021, eps_sec=1e-10, eps_cor=1e-15)


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

    def add_committed(self, block_id: int, n_keys: int = 8, key_size_bits: int = 256) -> bytes:
        data = os.urandom(n_keys * key_size_bits // 8)
        ids_tx = self.tx.add_block(block_id, data, key_size_bits, PROV)
        ids_rx = self.rx.add_block(block_id, data, key_size_bits, PROV)
        assert ids_tx == ids_rx
        self.tx.commit_block(block_id)
        self.rx.commit_block(block_id)
        return data


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pair(tmp_path: Path, clock: Clock) -> Iterator[StorePair]:
    tx = KeyStore.open(
        tmp_path / "tx.sqlite", link_id=LINK, side="transmitter", clock=clock, key_ttl_s=3600
    )
    rx = KeyStore.open(
        tmp_path / "rx.sqlite", link_id=LINK, side="receiver", clock=clock, key_ttl_s=3600
    )
    yield StorePair(tx, rx, clock)
    tx.close()
    rx.close()
