"""Keys the site's key manager consumes from a link store: drawn by the sending side
from its own parity, erased by the receiving side by ID; all or nothing."""

from __future__ import annotations

import uuid

import pytest

from qkdnode.keystore.errors import KeyRequestError, KeysUnavailableError
from qkdnode.keystore.models import EraseReason, KeyState
from tests.keystore.conftest import Clock, StorePair

R = EraseReason.RELAYED


def test_both_ends_erase_the_same_keys_and_get_the_same_bytes(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    drawn = pair.tx.consume_own(512, R)
    assert len(drawn) == 2
    ids = [kid for kid, _ in drawn]
    assert pair.rx.consume_named(ids, R) == b"".join(k for _, k in drawn)
    for kid in ids:
        assert pair.tx.key_info(kid) is None and pair.rx.key_info(kid) is None
        assert pair.tx.erase_reason(kid) is R and pair.rx.erase_reason(kid) is R
    assert pair.tx.consumed_counts() == {"relayed": 2, "authentication": 0}
    assert pair.rx.consumed_counts() == {"relayed": 2, "authentication": 0}


def test_each_side_draws_only_its_own_parity(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    tx_ids = [kid for kid, _ in pair.tx.consume_own(4 * 256, R)]
    rx_ids = [kid for kid, _ in pair.rx.consume_own(4 * 256, R)]
    assert not set(tx_ids) & set(rx_ids)
    with pytest.raises(KeysUnavailableError):
        pair.tx.consume_own(256, R)  # its 4 are gone; the other 4 are the receiver's
    # a side cannot be made to erase its own parity's keys by naming them
    pair.add_committed(2, n_keys=2)
    ((own, _),) = pair.tx.consume_own(256, R)
    with pytest.raises(KeysUnavailableError):
        pair.tx.consume_named([pair.rx.consume_own(256, R)[0][0], own], R)


def test_a_failed_consumption_changes_nothing(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    drawn = pair.tx.consume_own(256, R)
    good = drawn[0][0]
    with pytest.raises(KeysUnavailableError, match="1 of 2 named keys"):
        pair.rx.consume_named([good, uuid.uuid4()], R)
    info = pair.rx.key_info(good)
    assert info is not None and info.state is KeyState.AVAILABLE
    with pytest.raises(KeyRequestError, match="twice"):
        pair.rx.consume_named([good, good], R)
    with pytest.raises(KeyRequestError):
        pair.rx.consume_named([], R)
    assert pair.rx.consume_named([good], R)  # still there
    with pytest.raises(KeysUnavailableError):
        pair.rx.consume_named([good], R)  # a replay names a gone key


def test_expired_reserved_and_inflight_keys_are_not_consumed(pair: StorePair, clock: Clock) -> None:
    pair.add_committed(1, n_keys=8)
    issued = pair.tx.pick_for_enc(1, 256)  # in flight: not drawn
    inflight = issued[0].key_id
    drawn = [kid for kid, _ in pair.tx.consume_own(3 * 256, R)]
    assert inflight not in drawn
    with pytest.raises(KeysUnavailableError):
        pair.tx.consume_own(256, R)
    pair.tx.abandon_issue(issued, erase=False)
    # reserved on the peer for an SAE: the issuer cannot relay it behind the SAE's back
    (k,) = pair.issue(pair.tx, 1, 256)
    with pytest.raises(KeysUnavailableError):
        pair.rx.consume_named([k.key_id], R)
    pair.add_committed(2, n_keys=2)
    clock.now += 3601
    with pytest.raises(KeysUnavailableError):
        pair.tx.consume_own(256, R)


def test_pending_keys_of_the_peer_may_be_consumed(pair: StorePair) -> None:
    """The receiver commits first (before its ``done``): a key it draws may still be
    pending at the transmitter, whose commit follows."""
    from tests.keystore.conftest import PROV, final_key

    final = final_key(4)
    pair.tx.add_block(1, final, 256, PROV)
    pair.rx.add_block(1, final, 256, PROV)
    pair.rx.commit_block(1)
    drawn = pair.rx.consume_own(256, R)
    assert pair.tx.consume_named([drawn[0][0]], R) == drawn[0][1]


def test_only_relay_and_authentication_are_consumption_reasons(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=2)
    with pytest.raises(ValueError, match="relayed or authentication"):
        pair.tx.consume_own(256, EraseReason.DELIVERED)


def test_a_reserve_is_left_for_other_uses(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)  # 4 keys of 256 bits on each side
    with pytest.raises(KeysUnavailableError, match="beyond a reserve of 512"):
        pair.tx.consume_own(3 * 256, R, keep_bits=512)
    assert pair.tx.available_bits() == 4 * 256  # nothing taken
    assert len(pair.tx.consume_own(2 * 256, R, keep_bits=512)) == 2
    # the reserve is there for what may use it (here: tags)
    assert len(pair.tx.consume_own(512, EraseReason.AUTHENTICATION)) == 2
