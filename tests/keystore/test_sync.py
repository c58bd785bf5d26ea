from __future__ import annotations

import os
import random
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdnode.keystore import (
    KeyNotForPairError,
    KeyRequestError,
    KeyState,
    KeyStore,
    KeysUnavailableError,
    LinkMismatchError,
    Pair,
    SyncSummary,
    reconcile,
)

from .conftest import PROV, StorePair

P = Pair(master="sae-m", slave="sae-s")


def sync(pair: StorePair) -> None:
    """What the daemon does on reconnection: exchange summaries, apply reconcile."""
    s_tx, s_rx = pair.tx.summary(), pair.rx.summary()
    # messages cross the wire as JSON
    s_tx = SyncSummary.model_validate_json(s_tx.model_dump_json())
    s_rx = SyncSummary.model_validate_json(s_rx.model_dump_json())
    pair.tx.apply_reconcile(reconcile(s_tx, s_rx))
    pair.rx.apply_reconcile(reconcile(s_rx, s_tx))


def live(store: KeyStore) -> dict[int, list[int]]:
    return {b.block_id: b.live_indices for b in store.summary().blocks}


def test_pending_here_committed_there_is_committed(pair: StorePair) -> None:
    data = os.urandom(32 * 4)
    pair.tx.add_block(1, data, 256, PROV)
    pair.rx.add_block(1, data, 256, PROV)
    pair.tx.commit_block(1)  # the receiver crashed before its commit
    sync(pair)
    assert pair.rx.counts()[KeyState.AVAILABLE] == 4
    assert pair.tx.counts()[KeyState.AVAILABLE] == 4


def test_pending_on_both_or_missing_on_one_is_discarded(pair: StorePair) -> None:
    for b in (1, 2):
        pair.tx.add_block(b, os.urandom(64), 256, PROV)
    pair.rx.add_block(1, os.urandom(64), 256, PROV)
    pair.tx.commit_block(2)  # committed without the peer (not allowed, but must heal)
    sync(pair)
    assert live(pair.tx) == {} and live(pair.rx) == {}


def test_key_lost_on_one_side_is_discarded_on_both(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=6)
    taken = pair.tx.take_keys(P, 1, 256)
    got = pair.rx.claim_keys(P, [taken[0].key_id])
    # rx learns of tx's delivery and erases; tx never hears about rx's delivery
    pair.rx.apply_notice(pair.tx.notice(P, "enc", taken))
    assert 0 not in live(pair.rx)[1]
    sync(pair)
    assert live(pair.tx) == live(pair.rx) == {1: [1, 2, 3, 4, 5]}
    assert got[0].key == taken[0].key


def test_lost_notice_is_recovered_by_the_summary(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=6)
    taken = pair.rx.take_keys(P, 2, 256)  # notice lost
    sync(pair)
    for k in taken:
        info = pair.tx.key_info(k.key_id)
        assert info is not None and info.state is KeyState.RESERVED and info.pair == P
    with pytest.raises(KeyNotForPairError, match="not issued"):
        pair.tx.claim_keys(Pair(master="x", slave="y"), [taken[0].key_id])
    got = pair.tx.claim_keys(P, [k.key_id for k in taken])
    assert [g.key for g in got] == [k.key for k in taken]
    sync(pair)  # both delivered -> erased on both
    assert live(pair.tx) == live(pair.rx) == {1: [0, 2, 4, 5]}


def test_summaries_of_other_links_or_same_side_are_refused(pair: StorePair) -> None:
    s = pair.tx.summary()
    with pytest.raises(LinkMismatchError):
        reconcile(s, s.model_copy(update={"link_id": "x"}))
    with pytest.raises(LinkMismatchError):
        reconcile(s, s)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_histories_converge(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    """Random blocks, commits on one or both sides, deliveries and lost notices: after one
    summary exchange both nodes hold the same live keys, no key is delivered twice, and every
    key handed out by enc on one side can still be redeemed on the other."""
    from .conftest import LINK, Clock

    rng = random.Random(seed)
    d = tmp_path_factory.mktemp("conv")
    clock = Clock()
    pair = StorePair(
        KeyStore.open(d / "tx.sqlite", link_id=LINK, side="transmitter", clock=clock),
        KeyStore.open(d / "rx.sqlite", link_id=LINK, side="receiver", clock=clock),
        clock,
    )
    enc_given: dict[uuid.UUID, tuple[KeyStore, bytes]] = {}
    dec_given: set[uuid.UUID] = set()
    stores = (pair.tx, pair.rx)
    for block in range(rng.randint(1, 6)):
        data = os.urandom(32 * rng.randint(1, 6))
        on = rng.choice([(True, True), (True, True), (True, False), (False, True)])
        for s, present in zip(stores, on, strict=True):
            if present:
                s.add_block(block, data, 256, PROV)
        if all(on):
            commits = rng.choice(
                [(True, True), (True, True), (True, False), (False, True), (False, False)]
            )
            for s, c in zip(stores, commits, strict=True):
                if c:
                    s.commit_block(block)
        for _ in range(rng.randint(0, 4)):
            giver = rng.choice(stores)
            other = pair.rx if giver is pair.tx else pair.tx
            try:
                keys = giver.take_keys(P, 1, rng.choice([64, 256]))
            except KeysUnavailableError:
                continue
            enc_given[keys[0].key_id] = (other, keys[0].key)
            if rng.random() < 0.5:
                other.apply_notice(giver.notice(P, "enc", keys))
            if rng.random() < 0.4:
                try:
                    got = other.claim_keys(P, [keys[0].key_id])
                except KeysUnavailableError:
                    continue  # block not committed there yet
                assert got[0].key == keys[0].key
                dec_given.add(keys[0].key_id)
                if rng.random() < 0.5:
                    giver.apply_notice(other.notice(P, "dec", got))
    sync(pair)
    assert live(pair.tx) == live(pair.rx)
    assert all(b.committed for b in pair.tx.summary().blocks + pair.rx.summary().blocks)
    for kid, (other, key) in enc_given.items():
        if kid in dec_given:
            with pytest.raises(KeyRequestError, match=r"already delivered|unknown|discarded"):
                other.claim_keys(P, [kid])
        else:
            (redeemed,) = other.claim_keys(P, [kid])
            assert redeemed.key == key
    sync(pair)
    assert live(pair.tx) == live(pair.rx)
    for s in stores:
        assert s.counts()[KeyState.DELIVERED] == 0  # delivered on both -> erased on both
        s.close()
