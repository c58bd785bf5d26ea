from __future__ import annotations

import asyncio
import os
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdnode.keystore import (
    KeyState,
    KeyStore,
    KeysUnavailableError,
    LinkMismatchError,
    ReconcileActions,
    UnknownKeyError,
    reconcile,
)
from qkdnode.keystore.models import EraseReason

from .conftest import MASTER, PROV, SLAVE, Clock, StorePair, final_key, open_pair

M, S = MASTER, SLAVE
SIDES = ("transmitter", "receiver")


def live(store: KeyStore) -> dict[int, list[int]]:
    return {b.block_id: b.live_indices for b in store.summary().blocks}


def store_of(pair: StorePair, side: str) -> KeyStore:
    return pair.tx if side == "transmitter" else pair.rx


def state(store: KeyStore) -> tuple[Any, ...]:
    s = store.summary()
    return (
        s.blocks,
        sorted(s.issued),
        sorted(s.reserved),
        sorted(s.fetched),
        store.digest(),
        store.counts(),
    )


def assert_in_step(pair: StorePair) -> None:
    """Both nodes hold the same keys, and another exchange changes nothing."""
    assert live(pair.tx) == live(pair.rx)
    assert pair.tx.digest() == pair.rx.digest()
    assert all(b.committed for b in pair.tx.summary().blocks + pair.rx.summary().blocks)
    s_tx, s_rx = pair.tx.summary(), pair.rx.summary()
    for a in (reconcile(s_tx, s_rx), reconcile(s_rx, s_tx)):
        # only delivered keys (gone on both) are named again: erasing them is a no-op
        assert not (a.commit_blocks or a.discard_blocks or a.discard_keys or a.erase_uncertain)
    before = state(pair.tx), state(pair.rx)
    pair.sync()
    assert (state(pair.tx), state(pair.rx)) == before


# -- blocks and keys --------------------------------------------------------------------------


def test_pending_here_committed_there_is_committed(pair: StorePair) -> None:
    final = final_key(4)
    pair.tx.add_block(1, final, 256, PROV)
    pair.rx.add_block(1, final, 256, PROV)
    pair.tx.commit_block(1)  # the receiver crashed before its commit
    pair.sync()
    assert pair.rx.counts()[KeyState.AVAILABLE] == 4
    assert pair.tx.counts()[KeyState.AVAILABLE] == 4
    assert_in_step(pair)


def test_pending_on_both_or_missing_on_one_is_discarded(pair: StorePair) -> None:
    for b in (1, 2):
        pair.tx.add_block(b, final_key(2), 256, PROV)
    pair.rx.add_block(1, final_key(2), 256, PROV)
    pair.tx.commit_block(2)  # committed without the peer (not allowed, but must heal)
    pair.sync()
    assert live(pair.tx) == {} and live(pair.rx) == {}
    assert_in_step(pair)


def test_key_lost_on_one_side_is_discarded_on_both(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=6)
    pair.add_committed(2, n_keys=4)
    ids = pair.tx.key_ids_of_block(1)
    pair.rx.discard_block(1)  # the receiver lost block 1...
    # ... and key 3 of block 2 (e.g. it expired first on a clock ahead)
    pair.rx.apply_reconcile(ReconcileActions(discard_keys=[(2, 3)]))
    pair.sync()
    assert live(pair.tx) == live(pair.rx) == {2: [0, 1, 2]}
    assert pair.tx.erase_reason(ids[0]) is EraseReason.DISCARDED
    assert_in_step(pair)


def test_lost_notice_is_recovered_by_the_summary(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=6)
    keys = pair.issue(pair.rx, 2, 256)
    got = pair.claim(pair.tx, [k.key_id for k in keys], notify=False)  # notice lost
    assert [g.key for g in got] == [k.key for k in keys]
    assert pair.rx.counts()[KeyState.DELIVERED] == 2
    s_rx, s_tx = pair.rx.summary(), pair.tx.summary()
    assert set(s_tx.fetched) == {k.key_id for k in keys} and not s_tx.reserved
    assert set(s_rx.issued) == {k.key_id for k in keys}
    actions = reconcile(s_rx, s_tx)
    assert set(actions.erase_delivered) == {k.key_id for k in keys}
    assert not actions.erase_uncertain
    pair.sync()
    assert pair.rx.counts()[KeyState.DELIVERED] == 0
    for k in keys:
        assert pair.rx.erase_reason(k.key_id) is EraseReason.DELIVERED
    assert live(pair.tx) == live(pair.rx) == {1: [0, 2, 4, 5]}
    assert_in_step(pair)


def test_summaries_list_issued_reserved_and_fetched_parts(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=12)
    ids = pair.tx.key_ids_of_block(1)
    (cat,) = pair.issue(pair.tx, 1, 512)  # parts 0, 2
    (multi,) = pair.issue(pair.tx, 1, 256, slaves=[S, "sae-t"])  # part 4
    (done,) = pair.issue(pair.tx, 1, 256)  # part 6
    pair.claim(pair.rx, [done.key_id])
    pair.rx.claim_keys(M, S, [multi.key_id])  # one of two slaves
    s_tx, s_rx = pair.tx.summary(), pair.rx.summary()
    assert (s_tx.side, s_rx.side) == ("transmitter", "receiver")
    assert sorted(s_tx.issued) == sorted([ids[0], ids[2], ids[4]])
    assert sorted(s_rx.reserved) == sorted([ids[0], ids[2], ids[4]])
    assert s_tx.reserved == s_rx.issued == []
    assert s_tx.fetched == s_rx.fetched == [ids[6]]
    assert [(b.block_id, b.committed) for b in s_tx.blocks] == [(1, True)]
    assert s_tx.blocks[0].live_indices == [i for i in range(12) if i != 6]
    # a partly fetched multicast key survives the exchange; the other slave still gets it
    pair.sync()
    assert_in_step(pair)
    assert [g.key for g in pair.claim(pair.rx, [multi.key_id], slave="sae-t")] == [multi.key]
    assert [g.key for g in pair.claim(pair.rx, [cat.key_id])] == [cat.key]
    pair.sync()
    assert pair.tx.counts()[KeyState.DELIVERED] == 0 and pair.rx.counts()[KeyState.RESERVED] == 0
    assert_in_step(pair)


def test_summaries_of_other_links_or_same_side_are_refused(pair: StorePair) -> None:
    s = pair.tx.summary()
    with pytest.raises(LinkMismatchError):
        reconcile(s, s.model_copy(update={"link_id": "x"}))
    with pytest.raises(LinkMismatchError):
        reconcile(s, s)


# -- uncertain activations --------------------------------------------------------------------

SCENARIOS = [
    # (name, what the peer holds, what the issuer holds, expected fate of the key)
    "issuer crashed between activate and confirm",
    "activation never reached the peer, release lost",
    "activation reply lost, release lost",
    "activation reply lost, release delivered",
    "issuer confirmed, reply to the master lost",
    "issuer crashed during confirm (rolled back)",
    "peer lost its reservation",
]


@pytest.mark.parametrize("issuer_side", SIDES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_uncertain_activations_converge(pair: StorePair, issuer_side: str, scenario: str) -> None:
    pair.add_committed(1, n_keys=8)
    pair.add_committed(2, n_keys=4)
    (before,) = pair.issue(store_of(pair, issuer_side), 1, 256)  # an earlier, normal key
    peer_side = SIDES[1 - SIDES.index(issuer_side)]
    issuer, peer = store_of(pair, issuer_side), store_of(pair, peer_side)
    issued = issuer.pick_for_enc(2, 384)
    parts = [p for k in issued for p in k.activated().parts]
    req = issuer.activation_request(M, [S], issued)
    survives = False
    expect_here: EraseReason | None = EraseReason.UNCERTAIN
    expect_there: EraseReason | None = EraseReason.UNCERTAIN
    if scenario == "issuer crashed between activate and confirm":
        assert peer.activate(req).activated
        pair.reopen(issuer_side)  # the picks were only in memory
    elif scenario == "activation never reached the peer, release lost":
        issuer.abandon_issue(issued, erase=True)
        expect_there = EraseReason.DISCARDED  # live there, gone here
    elif scenario == "activation reply lost, release lost":
        assert peer.activate(req).activated
        issuer.abandon_issue(issued, erase=True)
    elif scenario == "activation reply lost, release delivered":
        assert peer.activate(req).activated
        issuer.abandon_issue(issued, erase=True)
        assert peer.release(issuer.release_request(issued)) == len(parts)
    elif scenario == "issuer confirmed, reply to the master lost":
        assert peer.activate(req).activated
        issuer.confirm_issued(M, [S], issued)
        pair.reopen(issuer_side)
        survives = True
    elif scenario == "issuer crashed during confirm (rolled back)":
        assert peer.activate(req).activated
        conn = issuer._conn
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE keys SET state='delivered', via='enc' WHERE state='available'")
        # SIGKILL here: the transaction never commits
        pair.reopen(issuer_side)
    elif scenario == "peer lost its reservation":  # e.g. its file restored from a backup
        issuer.confirm_issued(M, [S], issued)
    else:  # pragma: no cover
        raise AssertionError(scenario)
    issuer, peer = store_of(pair, issuer_side), store_of(pair, peer_side)
    assert issuer.inflight_count() == 0
    s_i, s_p = issuer.summary(), peer.summary()
    a_i, a_p = reconcile(s_i, s_p), reconcile(s_p, s_i)
    # both compute the same verdict from the same two summaries
    assert sorted(a_i.erase_uncertain) == sorted(a_p.erase_uncertain)
    pair.sync()
    assert_in_step(pair)
    for part in parts:
        if survives:
            assert issuer.key_info(part) is not None and peer.key_info(part) is not None
        else:
            assert issuer.key_info(part) is None and peer.key_info(part) is None
            assert issuer.erase_reason(part) is expect_here
            assert peer.erase_reason(part) is expect_there
    for k in issued:
        if survives:
            (g,) = pair.claim(peer, [k.key_id])
            assert g.key == k.delivered().key
        else:
            with pytest.raises(UnknownKeyError):
                peer.claim_keys(M, S, [k.key_id])
    # the earlier key and the other keys are untouched
    (g,) = pair.claim(peer, [before.key_id])
    assert g.key == before.key
    keys = pair.issue(issuer, 1, 256)
    assert not {k.key_id for k in keys} & set(parts)
    pair.sync()
    assert_in_step(pair)


# -- random histories -------------------------------------------------------------------------

FATES = ["ok", "ok", "ok", "ok", "refused", "no_request", "lost_reply", "crash", "master_lost"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_histories_converge(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    """Random blocks, commits on one or both sides, activations with every outcome (refused,
    request or reply lost, issuer crashed before or after confirming), fetches by one or two
    slaves, lost notices and restarts: after one summary exchange both nodes hold the same
    keys, no key is served twice, every key confirmed to a master can be fetched by each of
    its slaves on the other node, and no activation that was not confirmed survives."""
    rng = random.Random(seed)
    pair = open_pair(tmp_path_factory.mktemp("conv"), Clock())
    # key ID -> (issuer side, slaves, bytes)
    confirmed: dict[uuid.UUID, tuple[str, list[str], bytes]] = {}
    served: dict[tuple[uuid.UUID, str], bytes] = {}
    unconfirmed: set[uuid.UUID] = set()  # parts of activations that were not confirmed
    master_lost: set[uuid.UUID] = set()  # parts confirmed, reply to the master lost
    confirmed_parts: set[uuid.UUID] = set()  # delivered to a master: never picked again
    # part -> (master, slaves, key ID, size) of the activation the peer accepted
    activated: dict[uuid.UUID, tuple[str, tuple[str, ...], uuid.UUID, int]] = {}

    def fetch(side: str, kid: uuid.UUID, slave: str, notify: bool) -> None:
        claimer = store_of(pair, SIDES[1 - SIDES.index(side)])
        (got,) = pair.claim(claimer, [kid], slave=slave, notify=notify)
        assert (kid, slave) not in served, "served twice"
        assert got.key == confirmed[kid][2]
        served[kid, slave] = got.key

    for block in range(rng.randint(1, 6)):
        final = final_key(rng.randint(2, 12))
        on = rng.choice([(True, True), (True, True), (True, False), (False, True)])
        for side, present in zip(SIDES, on, strict=True):
            if present:
                store_of(pair, side).add_block(block, final, 256, PROV)
        if all(on):
            commits = rng.choice(
                [(True, True), (True, True), (True, False), (False, True), (False, False)]
            )
            for side, c in zip(SIDES, commits, strict=True):
                if c:
                    store_of(pair, side).commit_block(block)
        for _ in range(rng.randint(0, 6)):
            side = rng.choice(SIDES)
            giver = store_of(pair, side)
            other = store_of(pair, SIDES[1 - SIDES.index(side)])
            slaves = rng.choice([[S], [S], [S, "sae-t"]])
            try:
                issued = giver.pick_for_enc(rng.randint(1, 2), rng.choice([64, 256, 512]))
            except KeysUnavailableError:
                continue
            parts = {p for k in issued for p in k.activated().parts}
            assert not parts & confirmed_parts, "a delivered key picked again"
            req = giver.activation_request(M, slaves, issued)
            fate = rng.choice(FATES)
            if fate == "no_request":  # the request never reached the peer
                giver.abandon_issue(issued, erase=True)
                if rng.random() < 0.5:
                    other.release(giver.release_request(issued))
                continue
            if fate == "refused":  # e.g. not in step: the peer changes nothing
                giver.abandon_issue(issued, erase=False)
                continue
            if not other.activate(req).activated:  # block not held there
                giver.abandon_issue(issued, erase=False)
                continue
            for a in req.keys:
                for part in a.parts:
                    what = (req.master, tuple(req.slaves), a.key_ID, a.size_bits)
                    # a part is activated again only by an identical repeat (here: the same
                    # pick after the issuer restarted before the sync)
                    assert activated.setdefault(part, what) == what
            unconfirmed -= parts
            if fate == "lost_reply":
                unconfirmed |= parts
                giver.abandon_issue(issued, erase=True)
                if rng.random() < 0.5:
                    other.release(giver.release_request(issued))
                continue
            if fate == "crash":  # between activate and confirm
                unconfirmed |= parts
                pair.reopen(side)
                if rng.random() < 0.5:
                    pair.sync()  # what the daemon does on restart (before any request)
                continue
            keys = giver.confirm_issued(M, slaves, issued)
            confirmed_parts |= parts
            if fate == "master_lost":
                master_lost |= parts
                continue
            for k in keys:
                confirmed[k.key_id] = (side, slaves, k.key)
                for slave in slaves:
                    if rng.random() < 0.4:
                        try:
                            fetch(side, k.key_id, slave, notify=rng.random() < 0.5)
                        except KeysUnavailableError:
                            pass  # block not committed there yet
        if rng.random() < 0.2:
            pair.reopen(rng.choice(SIDES))
    pair.sync()
    assert_in_step(pair)
    for part in unconfirmed:
        assert pair.tx.key_info(part) is None and pair.rx.key_info(part) is None
    for kid, (side, slaves, _) in confirmed.items():
        for slave in slaves:
            if (kid, slave) in served:
                claimer = store_of(pair, SIDES[1 - SIDES.index(side)])
                with pytest.raises(UnknownKeyError):
                    claimer.claim_keys(M, slave, [kid])
            else:
                fetch(side, kid, slave, notify=rng.random() < 0.5)
    pair.sync()
    assert_in_step(pair)
    for s in (pair.tx, pair.rx):
        s_ = s.summary()
        # what is still issued or reserved went to a master that never got it
        assert set(s_.issued) | set(s_.reserved) <= master_lost
        assert s.counts()[KeyState.DELIVERED] == len(set(s_.issued))
    pair.close()


# -- the same through the key services and their peer channel ---------------------------------


def test_key_services_release_or_sync_away_an_unconfirmed_activation(tmp_path: Path) -> None:
    """Through two key services and their peer channel: a lost activation reply makes the
    issuer erase the keys and release them at the peer; if the release is lost too, the
    key-ID sync erases the reservation on both."""
    from qkdnode.delivery.keyservice import NotInStepError, PeerUnavailableError
    from tests.delivery.kme_pair import KmePair, settle

    async def lost_release(args: dict[str, Any]) -> dict[str, Any]:
        return {"erased": 0}

    async def main() -> None:
        p = KmePair(tmp_path, activation_timeout_s=0.2)
        try:
            p.add_blocks(1, keys_per_block=16)
            with pytest.raises(NotInStepError):
                await p.tx.service.issue(M, [S], 1, 256)
            await p.sync()
            keys = await p.tx.service.issue(M, [S], 2, 256)
            got = await p.rx.service.claim(M, S, [k.key_id for k in keys])
            assert [g.key for g in got] == [k.key for k in keys]
            await settle()  # the delivery notice erases the issuer's copies
            assert p.tx.store.counts()[KeyState.DELIVERED] == 0
            # the activation reply is lost: erased at the issuer, released at the peer
            p.rx.drop_replies.add("activate")
            with pytest.raises(PeerUnavailableError):
                await p.tx.service.issue(M, [S], 1, 256)
            await settle()
            assert p.rx.store.counts()[KeyState.RESERVED] == 0
            assert p.tx.store.digest() == p.rx.store.digest()
            # reply and release lost: the peer still holds the reservation...
            p.rx.service.serve_release = lost_release  # type: ignore[method-assign]
            with pytest.raises(PeerUnavailableError):
                await p.tx.service.issue(M, [S], 1, 256)
            await settle()
            (part,) = p.rx.store.summary().reserved
            assert p.tx.store.erase_reason(part) is EraseReason.UNCERTAIN
            p.rx.drop_replies.clear()
            # ... until the next key-ID sync
            await p.sync()
            assert p.rx.store.erase_reason(part) is EraseReason.UNCERTAIN
            assert p.tx.store.digest() == p.rx.store.digest()
            keys = await p.tx.service.issue(M, [S], 1, 256)
            assert part not in {k.key_id for k in keys}
            got = await p.rx.service.claim(M, S, [k.key_id for k in keys])
            assert [g.key for g in got] == [k.key for k in keys]
        finally:
            await p.tx.service.close()
            await p.rx.service.close()
            p.close()

    asyncio.run(main())


def test_a_fault_between_the_two_block_commits_blocks_delivery_until_the_stores_agree(
    tmp_path: Path,
) -> None:
    """The receiver committed block 1 and its reply was lost: the transmitter holds the
    block pending. The transmitter's session then puts its key service out of step (what
    it does on an unconfirmed commit); no key is served on either node, the receiver's
    half of block 1 included, until the key-ID sync commits the block on the transmitter
    too, after which both stores are identical and serve block 1's keys."""
    from qkdnode.delivery.keyservice import NotInStepError, PeerUnavailableError
    from qkdnode.keystore.ids import ID_SEED_BYTES
    from tests.delivery.kme_pair import KmePair

    async def main() -> None:
        p = KmePair(tmp_path, activation_timeout_s=0.5)
        try:
            p.add_blocks(1, keys_per_block=16)
            await p.sync()
            block = p.next_block
            p.next_block += 1
            data = os.urandom(ID_SEED_BYTES + 16 * 256 // 8)
            for kme in (p.tx, p.rx):
                kme.store.add_block(block, data, 256, PROV)
            p.rx.store.commit_block(block)  # the receiver commits first ...
            p.tx.service.out_of_step(f"block {block} commit unconfirmed")  # ... reply lost
            assert p.tx.store.digest() != p.rx.store.digest()
            with pytest.raises(NotInStepError):
                await p.tx.service.issue(M, [S], 1, 256)
            # the receiver is in step but cannot activate anything at the transmitter
            with pytest.raises(PeerUnavailableError, match="synchronising"):
                await p.rx.service.issue(S, [M], 1, 256)
            await p.sync()
            assert p.tx.store.digest() == p.rx.store.digest()
            assert p.tx.service.in_step and p.rx.service.in_step
            keys = await p.tx.service.issue(M, [S], 16, 256)
            got = await p.rx.service.claim(M, S, [k.key_id for k in keys])
            assert [g.key for g in got] == [k.key for k in keys]
        finally:
            await p.tx.service.close()
            await p.rx.service.close()
            p.close()

    asyncio.run(main())


def test_the_summary_names_only_deliveries_since_the_last_sync(pair: StorePair) -> None:
    """Tombstones of delivered keys are kept for days, but a summary naming all of them
    would grow with every delivery (a long-running link could no longer synchronise)."""
    from qkdnode.keystore.store import FETCHED_AFTER_SYNC_S

    pair.add_committed(1, n_keys=8)
    old = pair.issue(pair.rx, 2, 256)
    pair.claim(pair.tx, [k.key_id for k in old], notify=False)  # notice lost
    pair.sync()  # the receiver erases them as delivered
    assert_in_step(pair)
    assert set(pair.tx.summary().fetched) == {k.key_id for k in old}  # still: recent
    pair.clock.now += 2 * FETCHED_AFTER_SYNC_S
    pair.sync()  # a later sync: the old deliveries are long settled
    new = pair.issue(pair.rx, 1, 256)
    pair.claim(pair.tx, [k.key_id for k in new], notify=False)
    assert set(pair.tx.summary().fetched) == {new[0].key_id}
    pair.sync()
    assert pair.rx.erase_reason(new[0].key_id) is EraseReason.DELIVERED
    assert_in_step(pair)


def test_a_node_that_missed_the_last_sync_still_never_serves_a_delivered_key(
    pair: StorePair,
) -> None:
    """The receiver issued a key, the transmitter's slave fetched it (notice lost); the
    transmitter applied two syncs the receiver never did (it crashed in both), far enough
    apart that the transmitter's summary no longer names the key: the receiver erases it
    as uncertain."""
    from qkdnode.keystore.store import FETCHED_AFTER_SYNC_S

    pair.add_committed(1, n_keys=8)
    (k,) = pair.issue(pair.rx, 1, 256)
    pair.claim(pair.tx, [k.key_id], notify=False)
    for _ in range(2):
        assert k.key_id in pair.tx.summary().fetched
        pair.tx.apply_reconcile(reconcile(pair.tx.summary(), pair.rx.summary()))  # rx crashed
        pair.clock.now += 2 * FETCHED_AFTER_SYNC_S
    assert k.key_id not in pair.tx.summary().fetched
    pair.sync()
    assert pair.rx.erase_reason(k.key_id) is EraseReason.UNCERTAIN
    with pytest.raises((KeysUnavailableError, UnknownKeyError)):
        pair.rx.claim_keys(M, S, [k.key_id])
    assert_in_step(pair)
