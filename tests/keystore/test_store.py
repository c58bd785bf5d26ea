from __future__ import annotations

import base64
import os
import sqlite3
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from qkdnode.keystore import (
    ActivatedKey,
    ActivationRequest,
    BlockError,
    KeyRequestError,
    KeyState,
    KeyStore,
    KeyStoreError,
    KeysUnavailableError,
    LinkMismatchError,
    Pair,
    ReconcileActions,
    ReleaseRequest,
    StoreFullError,
    UnknownKeyError,
    reconcile,
)
from qkdnode.keystore.ids import ID_SEED_BYTES
from qkdnode.keystore.models import MAX_PARTS_PER_KEY, DeliveryNotice, EraseReason
from qkdnode.keystore.store import SCHEMA_VERSION
from qkdnode.paths import InsecureFileError

from .conftest import LINK, MASTER, PROV, SLAVE, Clock, StorePair, final_key, key_bytes

M, S = MASTER, SLAVE


def rows(store: KeyStore) -> list[tuple[Any, ...]]:
    """Every stored key's row but its bytes, to check that nothing changed."""
    return store._conn.execute(
        "SELECT key_id, block_id, idx, state, pair_master, slaves, fetched, delivered_as, part, "
        "delivered_size_bits, via, expires_at FROM keys ORDER BY key_id"
    ).fetchall()


def unknown_message(store: KeyStore, master: str, slave: str, kid: uuid.UUID) -> str:
    """The UnknownKeyError message of a claim, with the ID itself blanked out."""
    with pytest.raises(UnknownKeyError) as info:
        store.claim_keys(master, slave, [kid])
    assert type(info.value) is UnknownKeyError
    assert str(kid) in str(info.value)
    return str(info.value).replace(str(kid), "<ID>")


def ak(parts: list[uuid.UUID], size_bits: int | None = None) -> ActivatedKey:
    return ActivatedKey(key_ID=parts[0], size_bits=size_bits or 256 * len(parts), parts=list(parts))


def activation(keys: list[ActivatedKey], **kw: Any) -> ActivationRequest:
    args: dict[str, Any] = {"link_id": LINK, "master": M, "slaves": [S], "keys": keys}
    args.update(kw)
    return ActivationRequest(**args)


# -- the file ---------------------------------------------------------------------------------


def test_store_uses_wal_full_sync_and_secure_delete(pair: StorePair) -> None:
    conn = pair.tx._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] >= 2  # FULL=2, EXTRA=3
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    assert meta["schema"] == str(SCHEMA_VERSION) == "3"


def test_files_of_another_schema_version_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    KeyStore.open(path, link_id=LINK, side="transmitter").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='2' WHERE name='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(KeyStoreError, match="schema 2"):
        KeyStore.open(path, link_id=LINK, side="transmitter")


def test_wrong_link_or_side_is_refused(tmp_path: Path) -> None:
    KeyStore.open(tmp_path / "k.sqlite", link_id=LINK, side="transmitter").close()
    with pytest.raises(LinkMismatchError):
        KeyStore.open(tmp_path / "k.sqlite", link_id="other", side="transmitter")
    with pytest.raises(LinkMismatchError):
        KeyStore.open(tmp_path / "k.sqlite", link_id=LINK, side="receiver")
    with pytest.raises(ValueError, match="side"):
        KeyStore.open(tmp_path / "k2.sqlite", link_id=LINK, side="sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("umask", [0, 0o022])
def test_files_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        d = tmp_path / "state"
        path = d / "keys.sqlite"
        s = KeyStore.open(path, link_id=LINK, side="transmitter")
        s.add_block(1, final_key(4), 256, PROV)  # something in the WAL
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
        assert set(modes) == {"keys.sqlite", "keys.sqlite-wal", "keys.sqlite-shm"}
        assert set(modes.values()) == {0o600}, modes
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        s.compact()  # VACUUM rewrites the file
        assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o600}
        s.close()
        KeyStore.open(path, link_id=LINK, side="transmitter").close()
        (tmp_path / "probe").touch()  # the umask is really in force for other files
        assert stat.S_IMODE((tmp_path / "probe").stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("suffix", "mode"),
    [("", 0o644), ("", 0o640), ("", 0o620), ("", 0o604), ("-wal", 0o640), ("-shm", 0o666)],
)
def test_store_accessible_to_others_is_refused(tmp_path: Path, suffix: str, mode: int) -> None:
    path = tmp_path / "k.sqlite"
    s = KeyStore.open(path, link_id=LINK, side="transmitter")
    s.add_block(1, final_key(4), 256, PROV)
    s.close()
    target = path.with_name(path.name + suffix)
    if not target.exists():  # a clean close removes the WAL and shared-memory files
        target.touch(mode=0o600)
    os.chmod(target, mode)
    with pytest.raises(InsecureFileError) as info:
        KeyStore.open(path, link_id=LINK, side="transmitter")
    assert str(target) in str(info.value)
    assert "chmod 600" in str(info.value)
    os.chmod(target, 0o600)
    s = KeyStore.open(path, link_id=LINK, side="transmitter")
    assert s.counts()[KeyState.PENDING] == 4
    s.close()


# -- blocks -----------------------------------------------------------------------------------


def test_pending_keys_are_not_issued_until_commit(pair: StorePair) -> None:
    final = final_key(4)
    data = key_bytes(final)
    ids = pair.tx.add_block(7, final, 256, PROV)
    assert len(ids) == 4 and pair.tx.key_ids_of_block(7) == ids
    assert pair.tx.counts()[KeyState.PENDING] == 4
    with pytest.raises(KeysUnavailableError):
        pair.tx.pick_for_enc(1, 256)
    assert pair.tx.inflight_count() == 0
    assert pair.rx.add_block(7, final, 256, PROV) == ids
    assert pair.tx.commit_block(7) == 4
    assert pair.tx.commit_block(7) == 0  # idempotent
    # the peer accepts an activation of a block it still holds pending...
    issued, _ = pair.activate(pair.tx, 1, 256)
    info = pair.rx.key_info(ids[0])
    assert info is not None and info.state is KeyState.PENDING
    assert info.pair == Pair(master=M, slave=S)
    (key,) = pair.tx.confirm_issued(M, [S], issued)
    assert key.key_id == ids[0] and key.key == data[0:32]
    # ...but serves it only once the block is committed there
    with pytest.raises(KeysUnavailableError, match="not yet committed"):
        pair.rx.claim_keys(M, S, [ids[0]])
    assert pair.rx.commit_block(7) == 4
    info = pair.rx.key_info(ids[0])
    assert info is not None and info.state is KeyState.RESERVED
    (got,) = pair.claim(pair.rx, [ids[0]])
    assert got.key == key.key
    assert pair.tx.block_provenance(7) == PROV


def test_block_ids_are_never_reused(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=2)
    with pytest.raises(BlockError, match="already stored"):
        pair.tx.add_block(1, final_key(2), 256, PROV)
    pair.tx.discard_block(1)
    with pytest.raises(BlockError, match="never reused"):
        pair.tx.add_block(1, final_key(2), 256, PROV)
    # a block discarded while pending may be stored again
    pair.tx.add_block(2, final_key(2), 256, PROV)
    pair.tx.discard_block(2)
    pair.tx.add_block(2, final_key(2), 256, PROV)
    with pytest.raises(BlockError, match="no key"):
        pair.tx.add_block(3, b"\x00" * 3, 256, PROV)
    with pytest.raises(BlockError, match="no key"):  # the ID seed alone, or a short key
        pair.tx.add_block(3, os.urandom(ID_SEED_BYTES + 31), 256, PROV)
    with pytest.raises(BlockError, match="multiple of 8"):
        pair.tx.add_block(3, final_key(2), 12, PROV)
    with pytest.raises(BlockError, match=">= 0"):
        pair.tx.add_block(-1, final_key(2), 256, PROV)
    with pytest.raises(BlockError, match="not stored"):
        pair.tx.commit_block(42)


def test_store_full(tmp_path: Path) -> None:
    s = KeyStore.open(tmp_path / "k.sqlite", link_id=LINK, side="transmitter", max_key_count=10)
    s.add_block(1, final_key(8), 256, PROV)
    with pytest.raises(StoreFullError, match="max_key_count 10"):
        s.add_block(2, final_key(3), 256, PROV)
    s.close()


# -- issuing and claiming ---------------------------------------------------------------------


def test_enc_on_one_node_dec_on_the_other_gives_the_same_keys(pair: StorePair) -> None:
    data = pair.add_committed(1, n_keys=10)
    ids = pair.tx.key_ids_of_block(1)
    got_tx = pair.issue(pair.tx, 3, 256)
    got_rx = pair.issue(pair.rx, 3, 256)
    # transmitter hands out even indices, receiver odd ones: disjoint
    assert [k.key_id for k in got_tx] == [ids[i] for i in (0, 2, 4)]
    assert [k.key_id for k in got_rx] == [ids[i] for i in (1, 3, 5)]
    assert [k.key for k in got_tx] == [data[i * 32 : (i + 1) * 32] for i in (0, 2, 4)]
    assert [k.key for k in got_rx] == [data[i * 32 : (i + 1) * 32] for i in (1, 3, 5)]
    dec_rx = pair.claim(pair.rx, [k.key_id for k in got_tx])
    dec_tx = pair.claim(pair.tx, [k.key_id for k in got_rx])
    assert [(k.key_id, k.key) for k in dec_rx] == [(k.key_id, k.key) for k in got_tx]
    assert [(k.key_id, k.key) for k in dec_tx] == [(k.key_id, k.key) for k in got_rx]
    # delivered at both ends: erased on both (the claimer at once, the issuer by the notice)
    assert pair.tx.key_ids_of_block(1) == pair.rx.key_ids_of_block(1) == ids[6:]
    for i in range(6):
        assert pair.tx.erase_reason(ids[i]) is EraseReason.DELIVERED
        assert pair.rx.erase_reason(ids[i]) is EraseReason.DELIVERED


def test_a_key_issued_by_one_node_is_never_issued_by_the_peer(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=6)
    tx_keys = pair.issue(pair.tx, 3, 256)
    rx_keys = pair.issue(pair.rx, 3, 256)
    assert not {k.key_id for k in tx_keys} & {k.key_id for k in rx_keys}
    with pytest.raises(KeysUnavailableError):
        pair.tx.pick_for_enc(1, 256)
    with pytest.raises(KeysUnavailableError):
        pair.rx.pick_for_enc(1, 256)
    # a node does not serve through dec_keys a key it issued itself
    with pytest.raises(UnknownKeyError):
        pair.tx.claim_keys(M, S, [tx_keys[0].key_id])


def test_pick_writes_nothing_and_holds_keys_in_flight(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    before, changes = rows(pair.tx), pair.tx._conn.total_changes
    a = pair.tx.pick_for_enc(2, 256)
    assert pair.tx.inflight_count() == 2
    assert rows(pair.tx) == before and pair.tx._conn.total_changes == changes
    assert pair.tx.counts()[KeyState.AVAILABLE] == 8
    b = pair.tx.pick_for_enc(2, 256)  # in-flight keys are not picked again
    assert not {k.key_id for k in a} & {k.key_id for k in b}
    with pytest.raises(KeysUnavailableError):
        pair.tx.pick_for_enc(1, 256)
    assert pair.tx.abandon_issue(a, erase=False) == 0
    assert pair.tx.inflight_count() == 2
    c = pair.tx.pick_for_enc(2, 256)  # back, oldest first
    assert [k.key_id for k in c] == [k.key_id for k in a]
    assert rows(pair.tx) == before


def test_refused_or_unconfirmed_activation(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    ids = pair.tx.key_ids_of_block(1)
    # refused by the peer (nothing changed there): the keys go back
    issued = pair.tx.pick_for_enc(1, 256)
    req = pair.tx.activation_request(M, [S], issued)
    before = rows(pair.rx)
    reply = pair.rx.activate(req.model_copy(update={"link_id": "other"}))
    assert not reply.activated and reply.refusal == "bad_request"
    assert rows(pair.rx) == before
    assert pair.tx.abandon_issue(issued, erase=False) == 0
    assert pair.tx.inflight_count() == 0
    # outcome unknown (the reply was lost): erased here, and the release erases it there
    issued, _ = pair.activate(pair.tx, 2, 256)
    assert [k.key_id for k in issued] == [ids[0], ids[2]]
    assert pair.tx.abandon_issue(issued, erase=True) == 2
    assert pair.tx.inflight_count() == 0
    rel = pair.tx.release_request(issued)
    assert rel.parts == [ids[0], ids[2]] and rel.link_id == LINK
    assert pair.rx.release(ReleaseRequest.model_validate_json(rel.model_dump_json())) == 2
    assert pair.rx.release(rel) == 0  # idempotent
    for kid in (ids[0], ids[2]):
        assert pair.tx.erase_reason(kid) is EraseReason.UNCERTAIN
        assert pair.rx.erase_reason(kid) is EraseReason.UNCERTAIN
        unknown_message(pair.rx, M, S, kid)
    assert pair.tx.digest() == pair.rx.digest()
    assert [k.key_id for k in pair.tx.pick_for_enc(1, 256)] == [ids[4]]


def test_truncated_keys_are_the_first_bits_of_one_stored_key(pair: StorePair) -> None:
    data = pair.add_committed(1, n_keys=4)
    ids = pair.tx.key_ids_of_block(1)
    (k,) = pair.issue(pair.tx, 1, 64)
    assert k.size_bits == 64 and k.key == data[:8] and k.key_id == ids[0]
    info = pair.rx.key_info(ids[0])
    assert info is not None and info.size_bits == 256 and info.delivered_as == ids[0]
    (d,) = pair.claim(pair.rx, [k.key_id])
    assert (d.key_id, d.size_bits, d.key) == (k.key_id, 64, k.key)
    # the rest of the stored key is never handed out: erased on both with the key
    assert pair.tx.erase_reason(ids[0]) is pair.rx.erase_reason(ids[0]) is EraseReason.DELIVERED
    (k2,) = pair.issue(pair.tx, 1, 256)
    assert k2.key_id == ids[2] and k2.key == data[64:96]


def test_concatenated_keys_are_made_of_several_stored_keys(pair: StorePair) -> None:
    data = pair.add_committed(1, n_keys=8)
    ids = pair.tx.key_ids_of_block(1)
    issued, req = pair.activate(pair.tx, 2, 384)
    assert [k.activated().parts for k in issued] == [[ids[0], ids[2]], [ids[4], ids[6]]]
    assert [(a.key_ID, a.size_bits) for a in req.keys] == [(ids[0], 384), (ids[4], 384)]
    keys = pair.tx.confirm_issued(M, [S], issued)
    assert [k.key_id for k in keys] == [ids[0], ids[4]]
    assert keys[0].key == data[0:32] + data[64:80]
    assert keys[1].key == data[128:160] + data[192:208]
    assert all(k.size_bits == 384 and len(k.key) == 48 for k in keys)
    info = pair.rx.key_info(ids[2])
    assert info is not None and info.state is KeyState.RESERVED and info.delivered_as == ids[0]
    # a part is not a key: its own ID is unknown to dec_keys
    unknown_message(pair.rx, M, S, ids[2])
    got = pair.claim(pair.rx, [ids[4], ids[0]])
    assert [(g.key_id, g.key) for g in got] == [(ids[4], keys[1].key), (ids[0], keys[0].key)]
    for i in (0, 2, 4, 6):
        assert pair.tx.erase_reason(ids[i]) is EraseReason.DELIVERED
        assert pair.rx.erase_reason(ids[i]) is EraseReason.DELIVERED
    # exactly two stored keys, from the receiver's side
    (k,) = pair.issue(pair.rx, 1, 512)
    assert k.key_id == ids[1] and k.key == data[32:64] + data[96:128]
    (g,) = pair.claim(pair.tx, [k.key_id])
    assert g.key == k.key


def test_concatenation_across_blocks_of_different_key_sizes(pair: StorePair) -> None:
    d1 = pair.add_committed(1, n_keys=2, key_size_bits=128)
    d2 = pair.add_committed(2, n_keys=4, key_size_bits=256)
    assert pair.tx.max_stored_key_size_bits() == 256
    (k,) = pair.issue(pair.tx, 1, 384)
    assert k.key == d1[0:16] + d2[0:32]
    (g,) = pair.claim(pair.rx, [k.key_id])
    assert g.key == k.key
    assert pair.tx.key_ids_of_block(1) == pair.rx.key_ids_of_block(1)  # index 1 left


def test_a_key_of_more_parts_than_allowed_is_a_bad_request(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=2 * (MAX_PARTS_PER_KEY + 1), key_size_bits=8)
    with pytest.raises(KeyRequestError, match=str(MAX_PARTS_PER_KEY)):
        pair.tx.pick_for_enc(1, (MAX_PARTS_PER_KEY + 1) * 8)
    assert pair.tx.inflight_count() == 0
    (k,) = pair.issue(pair.tx, 1, MAX_PARTS_PER_KEY * 8)
    assert len(k.key) == MAX_PARTS_PER_KEY
    (g,) = pair.claim(pair.rx, [k.key_id])
    assert g.key == k.key


def test_confirm_of_more_parts_than_sqlite_binds_in_one_statement(pair: StorePair) -> None:
    """A request may have up to 1024 keys of 256 parts: more than SQLite's variable limit
    on many builds (32766 by default; 999 before 3.32)."""
    pair.add_committed(1, n_keys=2 * 1200, key_size_bits=8)
    for s in (pair.tx, pair.rx):
        s._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    keys = pair.issue(pair.tx, 20, 60 * 8)  # 1200 parts
    assert pair.tx.counts()[KeyState.DELIVERED] == 1200
    got = pair.claim(pair.rx, [k.key_id for k in keys])
    assert [g.key for g in got] == [k.key for k in keys]
    assert pair.tx.digest() == pair.rx.digest()


def test_multicast_each_slave_fetches_once_and_keys_go_after_all(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=4)
    slaves = ["sae-s", "sae-t"]
    (k,) = pair.issue(pair.tx, 1, 256, slaves=slaves)
    info = pair.rx.key_info(k.key_id)
    assert info is not None and info.slaves == tuple(slaves) and info.fetched_by == ()
    template = unknown_message(pair.rx, M, S, uuid.uuid4())
    c1 = pair.rx.claim_keys(M, "sae-s", [k.key_id])
    assert [x.key for x in c1.keys] == [k.key] and c1.completed == []
    info = pair.rx.key_info(k.key_id)
    assert info is not None and info.state is KeyState.RESERVED and info.fetched_by == ("sae-s",)
    # each slave once; nobody else
    for master, slave in ((M, "sae-s"), (M, "sae-x"), (M, M), ("sae-x", "sae-t")):
        assert unknown_message(pair.rx, master, slave, k.key_id) == template
    # the issuer keeps its copy until every slave fetched
    tx_info = pair.tx.key_info(k.key_id)
    assert tx_info is not None and tx_info.state is KeyState.DELIVERED
    assert pair.tx.apply_notice(pair.rx.delivery_notice(c1.completed)) == 0
    c2 = pair.rx.claim_keys(M, "sae-t", [k.key_id])
    assert [x.key for x in c2.keys] == [k.key] and c2.completed == [k.key_id]
    assert pair.rx.key_info(k.key_id) is None
    assert pair.rx.erase_reason(k.key_id) is EraseReason.DELIVERED
    assert unknown_message(pair.rx, M, "sae-t", k.key_id) == template
    notice = pair.rx.delivery_notice(c2.completed)
    assert pair.tx.apply_notice(DeliveryNotice.model_validate_json(notice.model_dump_json())) == 1
    assert pair.tx.erase_reason(k.key_id) is EraseReason.DELIVERED
    assert pair.tx.apply_notice(notice) == 0  # idempotent


def test_identical_repeat_of_an_activation_is_accepted(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    issued, req = pair.activate(pair.tx, 2, 512)
    before = rows(pair.rx)
    assert pair.rx.activate(req).activated
    assert pair.rx.activate(req.model_copy(update={"keys": req.keys[1:]})).activated
    assert rows(pair.rx) == before
    keys = pair.tx.confirm_issued(M, [S], issued)
    got = pair.claim(pair.rx, [k.key_id for k in keys])
    assert [g.key for g in got] == [k.key for k in keys]


def test_a_repeat_after_a_slave_fetched_does_not_let_it_fetch_again(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=4)
    slaves = ["sae-s", "sae-t"]
    issued, req = pair.activate(pair.tx, 1, 256, slaves=slaves)
    (k,) = pair.tx.confirm_issued(M, slaves, issued)
    pair.rx.claim_keys(M, "sae-s", [k.key_id])
    assert pair.rx.activate(req).activated  # e.g. a duplicated message
    info = pair.rx.key_info(k.key_id)
    assert info is not None and info.fetched_by == ("sae-s",)
    unknown_message(pair.rx, M, "sae-s", k.key_id)
    assert pair.rx.claim_keys(M, "sae-t", [k.key_id]).completed == [k.key_id]
    # the key is gone: a later repeat finds nothing to reserve
    reply = pair.rx.activate(req)
    assert not reply.activated and reply.refusal == "not_available"


def test_a_conflicting_activation_is_refused_without_changing_anything(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    ids = pair.tx.key_ids_of_block(1)
    issued, req = pair.activate(pair.tx, 1, 256)  # ids[0] for (M, [S]) as itself, 256 bits
    before = rows(pair.rx)
    free = ak([ids[2]])
    conflicts = [
        req.model_copy(update={"master": "sae-x"}),
        req.model_copy(update={"slaves": [S, "sae-t"]}),
        activation([ak([ids[0]], 128)]),
        activation([ak([ids[2], ids[0]])]),  # the reserved key as part of another key
        activation([free, ak([ids[0]])], master="sae-x"),  # all or nothing
    ]
    for conflict in conflicts:
        reply = pair.rx.activate(conflict)
        assert not reply.activated and reply.refusal == "not_available", conflict
        assert "reserved already" in reply.message
        assert rows(pair.rx) == before
    (k,) = pair.tx.confirm_issued(M, [S], issued)
    (g,) = pair.claim(pair.rx, [k.key_id])
    assert g.key == k.key


def test_activation_refusals(pair: StorePair, clock: Clock) -> None:
    pair.add_committed(1, n_keys=8)
    ids = pair.tx.key_ids_of_block(1)
    before = rows(pair.rx)
    cases = [
        (activation([ak([uuid.uuid4()])]), "not_available", "not held"),
        (activation([ak([ids[1]])]), "bad_request", "not the peer's"),  # rx's own parity
        (activation([ak([ids[0]]), ak([ids[0]])]), "bad_request", "twice"),
        (activation([ak([ids[2], ids[4], ids[2]], 768)]), "bad_request", "twice"),
        (
            activation([ActivatedKey(key_ID=ids[2], size_bits=256, parts=[ids[0]])]),
            "bad_request",
            "first part",
        ),
        (activation([ak([ids[0]], 512)]), "bad_request", "do not make"),  # too few bits
        (activation([ak([ids[0], ids[2]], 256)]), "bad_request", "do not make"),  # one too many
        (activation([ak([ids[0]])], link_id="other"), "bad_request", "another link"),
    ]
    for req, refusal, message in cases:
        reply = pair.rx.activate(req)
        assert not reply.activated and reply.refusal == refusal, (req, reply)
        assert message in reply.message
        assert rows(pair.rx) == before
    clock.now += 3601
    reply = pair.rx.activate(activation([ak([ids[0]])]))
    assert not reply.activated and reply.refusal == "not_available" and "expired" in reply.message
    assert rows(pair.rx) == before


def test_claim_answers_the_same_for_every_id_this_slave_cannot_have(
    pair: StorePair, clock: Clock, tmp_path: Path
) -> None:
    """Whatever the reason (never issued, guessed, of another link, pair or slave, issued
    by this node, a part, already fetched, expired), the answer is the same, so a slave
    learns nothing about the keys of others."""
    pair.add_committed(1, n_keys=16)
    ids = pair.tx.key_ids_of_block(1)
    (mine,) = pair.issue(pair.tx, 1, 256)
    (later,) = pair.issue(pair.tx, 1, 256)
    (theirs,) = pair.issue(pair.tx, 1, 256, master="sae-x", slaves=["sae-y"])
    (cat,) = pair.issue(pair.tx, 1, 512)
    (fetched,) = pair.issue(pair.tx, 1, 256)
    pair.claim(pair.rx, [fetched.key_id])
    (own,) = pair.issue(pair.rx, 1, 256)
    other_link = KeyStore.open(tmp_path / "o.sqlite", link_id="c<->d", side="transmitter")
    foreign = other_link.add_block(1, final_key(2), 256, PROV)[0]
    other_link.close()
    template = unknown_message(pair.rx, M, S, uuid.uuid4())
    cases = {
        "guessed v4": (M, S, uuid.uuid4()),
        "not a v4": (M, S, uuid.uuid1()),
        "stored, never activated": (M, S, ids[14]),
        "of another link": (M, S, foreign),
        "of another pair": (M, S, theirs.key_id),
        "another master": ("sae-x", S, mine.key_id),
        "another slave": (M, "sae-y", mine.key_id),
        "issued by this node": (M, S, own.key_id),
        "second part of a key": (M, S, ids[8]),
        "already fetched": (M, S, fetched.key_id),
    }
    rx_info = pair.rx.key_info(ids[8])
    assert rx_info is not None and rx_info.delivered_as == cat.key_id
    for name, (master, slave, kid) in cases.items():
        assert unknown_message(pair.rx, master, slave, kid) == template, name
    # none of those attempts changed anything
    (g,) = pair.claim(pair.rx, [mine.key_id])
    assert g.key == mine.key
    clock.now += 3601
    assert unknown_message(pair.rx, M, S, later.key_id) == template  # expired


def test_a_key_pending_here_asks_its_own_pair_only_to_retry(pair: StorePair) -> None:
    final = final_key(4)
    for s in (pair.tx, pair.rx):
        s.add_block(1, final, 256, PROV)
    pair.tx.commit_block(1)
    (k,) = pair.issue(pair.tx, 1, 256)
    template = unknown_message(pair.rx, M, S, uuid.uuid4())
    with pytest.raises(KeysUnavailableError):
        pair.rx.claim_keys(M, S, [k.key_id])
    assert unknown_message(pair.rx, "sae-x", "sae-y", k.key_id) == template
    pair.rx.commit_block(1)
    (g,) = pair.claim(pair.rx, [k.key_id])
    assert g.key == k.key


def test_claim_is_all_or_nothing(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    keys = pair.issue(pair.tx, 2, 256)
    ids = [k.key_id for k in keys]
    before = rows(pair.rx)
    with pytest.raises(KeyRequestError, match="twice"):
        pair.rx.claim_keys(M, S, [ids[0], ids[0]])
    with pytest.raises(KeyRequestError, match="no key_ID"):
        pair.rx.claim_keys(M, S, [])
    with pytest.raises(UnknownKeyError):
        pair.rx.claim_keys(M, S, [ids[0], uuid.uuid4()])
    assert rows(pair.rx) == before
    got = pair.claim(pair.rx, ids)
    assert [g.key for g in got] == [k.key for k in keys]
    with pytest.raises(UnknownKeyError):
        pair.rx.claim_keys(M, S, [ids[1]])


def test_bad_requests(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=4)  # two keys for the transmitter
    for size in (0, 12, -8):
        with pytest.raises(KeyRequestError, match="multiple of 8"):
            pair.tx.pick_for_enc(1, size)
    with pytest.raises(KeyRequestError):
        pair.tx.pick_for_enc(0, 256)
    with pytest.raises(KeysUnavailableError, match="3 keys of 256 bits"):
        pair.tx.pick_for_enc(3, 256)
    with pytest.raises(KeysUnavailableError, match="768 bits"):
        pair.tx.pick_for_enc(1, 768)  # three stored keys needed, two available
    assert pair.tx.available_for_enc() == 2  # all or nothing
    assert pair.tx.inflight_count() == 0


# -- erasure ----------------------------------------------------------------------------------


def test_expired_keys_are_erased_on_both_sides(pair: StorePair, clock: Clock) -> None:
    pair.add_committed(1, n_keys=4)
    (k,) = pair.issue(pair.tx, 1, 256)  # delivered to the master, never fetched
    clock.now += 3599
    assert pair.tx.erase_due() == 0
    clock.now += 2
    with pytest.raises(KeysUnavailableError):
        pair.tx.pick_for_enc(1, 256)  # expired keys are not handed out even before the sweep
    template = unknown_message(pair.rx, M, S, uuid.uuid4())
    assert unknown_message(pair.rx, M, S, k.key_id) == template
    assert pair.tx.erase_due() == 4
    assert pair.rx.erase_due() == 4
    assert sum(pair.tx.counts().values()) == sum(pair.rx.counts().values()) == 0
    assert pair.tx.erase_reason(k.key_id) is pair.rx.erase_reason(k.key_id) is EraseReason.EXPIRED
    assert unknown_message(pair.rx, M, S, k.key_id) == template
    clock.now += 3 * 3600
    pair.rx.erase_due()  # tombstones forgotten
    assert pair.rx.erase_reason(k.key_id) is None
    assert unknown_message(pair.rx, M, S, k.key_id) == template


def test_confirm_fails_and_erases_when_a_part_went_during_the_activation(
    pair: StorePair,
) -> None:
    pair.add_committed(1, n_keys=8)
    ids = pair.tx.key_ids_of_block(1)
    issued, _ = pair.activate(pair.tx, 1, 512)  # parts ids[0], ids[2]
    pair.tx.apply_reconcile(ReconcileActions(discard_keys=[(1, 2)]))
    with pytest.raises(KeysUnavailableError):
        pair.tx.confirm_issued(M, [S], issued)
    assert pair.tx.inflight_count() == 0
    assert pair.tx.erase_reason(ids[0]) is EraseReason.UNCERTAIN
    assert pair.tx.erase_reason(ids[2]) is EraseReason.DISCARDED
    pair.sync()
    assert pair.rx.erase_reason(ids[0]) is EraseReason.UNCERTAIN
    assert pair.tx.digest() == pair.rx.digest()


def test_every_erase_reason_is_recorded(pair: StorePair, clock: Clock) -> None:
    pair.add_committed(1, n_keys=8)
    ids = pair.tx.key_ids_of_block(1)
    (k,) = pair.issue(pair.tx, 1, 256)
    pair.claim(pair.rx, [k.key_id])
    issued = pair.tx.pick_for_enc(1, 256)
    pair.tx.abandon_issue(issued, erase=True)
    pair.tx.apply_reconcile(ReconcileActions(discard_keys=[(1, 4)]))
    assert pair.tx.erase_reason(ids[0]) is EraseReason.DELIVERED
    assert pair.tx.erase_reason(ids[2]) is EraseReason.UNCERTAIN
    assert pair.tx.erase_reason(ids[4]) is EraseReason.DISCARDED
    assert pair.tx.erase_reason(ids[6]) is None  # live
    assert pair.tx.erase_reason(uuid.uuid4()) is None
    clock.now += 3601
    pair.tx.erase_due()
    assert pair.tx.erase_reason(ids[6]) is EraseReason.EXPIRED
    pair.add_committed(2, n_keys=4)
    ((relayed, _),) = pair.rx.consume_own(256, EraseReason.RELAYED)
    assert pair.rx.erase_reason(relayed) is EraseReason.RELAYED
    pair.tx.consume_named([relayed], EraseReason.RELAYED)
    assert pair.tx.erase_reason(relayed) is EraseReason.RELAYED
    ((tag_key, _),) = pair.tx.consume_own(256, EraseReason.AUTHENTICATION)
    assert pair.tx.erase_reason(tag_key) is EraseReason.AUTHENTICATION
    assert {r.value for r in EraseReason} == {
        "delivered",
        "expired",
        "discarded",
        "uncertain",
        "relayed",
        "authentication",
    }


def test_release_erases_only_unfetched_keys_of_the_peer(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=8)
    ids = pair.tx.key_ids_of_block(1)
    pair.activate(pair.tx, 2, 256)  # ids[0], ids[2] reserved on rx, never confirmed
    pair.tx.abandon_issue(pair.tx.pick_for_enc(1, 256), erase=False)
    (multi,) = pair.issue(pair.tx, 1, 256, slaves=["sae-s", "sae-t"])  # ids[4]
    pair.rx.claim_keys(M, "sae-s", [multi.key_id])
    rel = ReleaseRequest(link_id=LINK, parts=[ids[0], ids[2], ids[1], ids[4], uuid.uuid4()])
    assert pair.rx.release(rel) == 2  # not rx's own key, not one a slave fetched
    assert pair.rx.key_info(ids[1]) is not None and pair.rx.key_info(ids[4]) is not None
    with pytest.raises(LinkMismatchError):
        pair.rx.release(rel.model_copy(update={"link_id": "other"}))


def test_notice_erases_only_keys_issued_here(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=4)
    (k,) = pair.issue(pair.tx, 1, 256)
    notice = DeliveryNotice(link_id=LINK, key_IDs=[k.key_id, uuid.uuid4()])
    assert pair.rx.apply_notice(notice) == 0  # rx holds it reserved, not issued
    assert pair.rx.key_info(k.key_id) is not None
    with pytest.raises(LinkMismatchError):
        pair.tx.apply_notice(notice.model_copy(update={"link_id": "other"}))
    assert pair.tx.apply_notice(notice) == 1


def test_erased_key_bytes_are_gone_from_the_files(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    s = KeyStore.open(path, link_id=LINK, side="transmitter")
    marker = os.urandom(ID_SEED_BYTES) + bytes(range(1, 33)) * 4  # recognisable keys
    keep = final_key(4)
    s.add_block(1, marker, 256, PROV)
    s.add_block(2, keep, 256, PROV)
    s.erase_due()  # checkpoint: the marker is now in the main file

    def file_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("k.sqlite"))

    assert marker[ID_SEED_BYTES:][:32] in file_bytes()
    s.discard_block(1)
    s.erase_due()
    content = file_bytes()
    assert marker[ID_SEED_BYTES:][:32] not in content
    assert keep[ID_SEED_BYTES:][:32] in content
    assert marker[:ID_SEED_BYTES] not in content and keep[:ID_SEED_BYTES] not in content
    s.close()


def test_delivered_key_bytes_are_gone_from_both_nodes_files(pair: StorePair) -> None:
    data = pair.add_committed(1, n_keys=8)
    keys = pair.issue(pair.tx, 2, 384) + pair.issue(pair.rx, 1, 128)
    pair.claim(pair.rx, [k.key_id for k in keys[:2]])
    pair.claim(pair.tx, [keys[2].key_id])
    for s in (pair.tx, pair.rx):
        s.compact_interval_s = 0
        s.erase_due()
        content = b"".join(
            p.read_bytes() for p in s.path.parent.iterdir() if p.name.startswith(s.path.name)
        )
        for i in (0, 1, 2, 4, 6):  # every stored key a delivered key used
            assert data[i * 32 : (i + 1) * 32] not in content
        for i in (3, 5, 7):
            assert data[i * 32 : (i + 1) * 32] in content


# -- durability, inspection, secrecy ----------------------------------------------------------


def test_durable_across_reopen(pair: StorePair) -> None:
    pair.add_committed(5, n_keys=6)
    keys = pair.issue(pair.rx, 2, 256)  # indices 1, 3
    pair.rx.pick_for_enc(1, 256)  # in flight only: index 5
    rx = pair.reopen("receiver")
    assert rx.counts()[KeyState.DELIVERED] == 2
    assert rx.inflight_count() == 0 and rx.available_for_enc() == 1
    tx = pair.reopen("transmitter")
    assert tx.counts()[KeyState.RESERVED] == 2
    got = pair.claim(tx, [k.key_id for k in keys])
    assert [g.key for g in got] == [k.key for k in keys]
    assert rx.counts()[KeyState.DELIVERED] == 0


def test_inspection(pair: StorePair) -> None:
    assert pair.tx.last_block_id() == -1 and pair.tx.max_stored_key_size_bits() is None
    pair.add_committed(1, n_keys=6)
    ids = pair.tx.key_ids_of_block(1)
    assert pair.tx.available_for_enc() == 3 and pair.tx.available_for_enc(512) == 0
    assert pair.tx.max_stored_key_size_bits() == 256
    (k,) = pair.issue(pair.tx, 1, 128, slaves=["sae-s", "sae-t"])
    t, r = pair.tx.key_info(k.key_id), pair.rx.key_info(k.key_id)
    assert t is not None and r is not None
    assert (t.state, r.state) == (KeyState.DELIVERED, KeyState.RESERVED)
    for info in (t, r):
        assert info.block_id == 1 and info.index == 0 and info.size_bits == 256
        assert info.pair == Pair(master=M, slave="sae-s")
        assert info.slaves == ("sae-s", "sae-t") and info.fetched_by == ()
        assert info.delivered_as == k.key_id
        assert info.expires_at == info.created_at + 3600
    untouched = pair.rx.key_info(ids[2])
    assert untouched is not None and untouched.pair is None and untouched.delivered_as is None
    assert pair.tx.key_info(uuid.uuid4()) is None
    assert pair.tx.counts() == {
        "pending": 0,
        "available": 5,
        "reserved": 0,
        "delivered": 1,
        "expired": 0,
    }


def test_raw_rows_match_states(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=4)
    pair.issue(pair.tx, 1, 256)
    for store, first in ((pair.tx, ("delivered", "enc")), (pair.rx, ("reserved", None))):
        conn = sqlite3.connect(store.path)
        got = {i: (s, v) for i, s, v in conn.execute("SELECT idx, state, via FROM keys")}
        conn.close()
        assert got == {
            0: first,
            1: ("available", None),
            2: ("available", None),
            3: ("available", None),
        }


def test_digest_compares_stores_and_last_block_id_survives_erasure(pair: StorePair) -> None:
    assert pair.tx.last_block_id() == -1
    pair.add_committed(3, n_keys=4)
    pair.add_committed(9, n_keys=4)
    assert pair.tx.digest() == pair.rx.digest()
    assert pair.tx.digest()["count"] == 8
    pair.issue(pair.tx, 1, 256)  # state changes do not change the digest
    assert pair.tx.digest() == pair.rx.digest()
    pair.rx.discard_block(3)
    assert pair.tx.digest() != pair.rx.digest()
    pair.tx.discard_block(3)
    assert pair.tx.digest() == pair.rx.digest()
    pair.tx.add_block(11, final_key(2), 256, PROV)  # pending blocks do not count
    assert pair.tx.digest() == pair.rx.digest()
    pair.tx.discard_block(9)
    assert pair.tx.last_block_id() == 11
    pair.tx.discard_block(11)
    pair.tx.add_block(4, final_key(2), 256, PROV)
    assert pair.tx.last_block_id() == 11


def test_compaction_runs_after_erasures_at_most_once_per_interval(tmp_path: Path) -> None:
    s = KeyStore.open(
        tmp_path / "k.sqlite", link_id=LINK, side="transmitter", compact_interval_s=3600
    )
    with capture_logs() as logs:
        s.erase_due()  # first sweep after opening: compacts (a crash may have left remnants)
        s.erase_due()  # nothing erased since: no compaction
        s.add_block(1, final_key(2), 256, PROV)
        s.discard_block(1)
        s.erase_due()  # erased, but within the interval
    assert [e["event"] for e in logs].count("keystore.compacted") == 1
    s.compact_interval_s = 0
    with capture_logs() as logs:
        s.erase_due()
        s.erase_due()
    assert [e["event"] for e in logs].count("keystore.compacted") == 1
    s.close()


def test_key_bytes_never_in_logs_reprs_or_errors(pair: StorePair) -> None:
    final = final_key(8)
    with capture_logs() as logs:
        for s in (pair.tx, pair.rx):
            s.add_block(1, final, 256, PROV)
            s.commit_block(1)
        issued, req = pair.activate(pair.tx, 2, 384)
        keys = pair.tx.confirm_issued(M, [S], issued)
        claimed = pair.rx.claim_keys(M, S, [k.key_id for k in keys])
        try:
            pair.rx.claim_keys(M, S, [keys[0].key_id])
        except UnknownKeyError as exc:
            err = exc
        notice = pair.rx.delivery_notice(claimed.completed)
        pair.tx.apply_notice(notice)
        lost = pair.rx.pick_for_enc(1, 256)
        rel = pair.rx.release_request(lost)
        pair.rx.abandon_issue(lost, erase=True)
        pair.tx.release(rel)
        summary = pair.tx.summary()
        actions = reconcile(summary, pair.rx.summary())
        pair.tx.apply_reconcile(actions)
        pair.tx.erase_due()
    assert logs, "the store logs its operations"
    texts = [repr(logs), str(err), repr(err), repr(pair.tx), str(summary), repr(summary)]
    texts += [repr(issued), str(issued), repr(lost), repr(req), req.model_dump_json()]
    texts += [repr(claimed), str(claimed), notice.model_dump_json(), rel.model_dump_json()]
    texts += [repr(actions), repr(pair.rx.key_info(pair.rx.key_ids_of_block(1)[0]))]
    texts += [repr(k) for k in keys + claimed.keys] + [str(k) for k in keys + claimed.keys]
    for chunk in (final[i : i + 8] for i in range(0, len(final), 8)):
        for needle in (chunk.hex(), repr(chunk)[2:-1], base64.b64encode(chunk).decode()[:10]):
            for t in texts:
                assert needle not in t


def test_concurrent_issues_from_threads_never_duplicate(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=400, key_size_bits=128)
    results: list[list[uuid.UUID]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        mine: list[uuid.UUID] = []
        for _ in range(15):
            try:
                mine.extend(k.key_id for k in pair.issue(pair.tx, 2, 128))
            except KeysUnavailableError:
                break
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        results.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    flat = [k for r in results for k in r]
    assert len(flat) == len(set(flat)) == 200
    assert pair.rx.counts()[KeyState.RESERVED] == 200
    assert pair.tx.inflight_count() == 0


def _counted(store: KeyStore) -> dict[str, int]:
    """The counts straight from the file, through a connection of its own."""
    with sqlite3.connect(store.path) as conn:
        got = dict(conn.execute("SELECT state, COUNT(*) FROM keys GROUP BY state").fetchall())
    return {s.value: got.get(s.value, 0) for s in KeyState}


def test_counts_follow_every_change_but_do_not_recount_an_unchanged_store(
    pair: StorePair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``status`` asks for the counts on every request: an unchanged store must not be
    scanned again, yet every change through the store shows at once."""
    import qkdnode.keystore.store as store_module

    monkeypatch.setattr(store_module, "COUNTS_MAX_AGE_S", 3600.0)
    tx = pair.tx
    statements: list[str] = []
    tx._conn.set_trace_callback(statements.append)
    assert tx.counts() == _counted(tx)
    tx.add_block(0, final_key(8), 256, PROV)
    assert tx.counts()["pending"] == 8 and tx.counts() == _counted(tx)
    tx.commit_block(0)
    assert tx.counts()["available"] == 8 and tx.counts() == _counted(tx)
    statements.clear()
    for _ in range(20):
        assert tx.counts()["available"] == 8
    assert not [s for s in statements if "COUNT" in s.upper()]
    counts = tx.counts()
    counts["available"] = -1  # the caller's copy, not the store's
    assert tx.counts()["available"] == 8


def test_a_write_by_another_process_shows_in_the_counts_within_their_max_age(
    pair: StorePair, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import qkdnode.keystore.store as store_module

    monkeypatch.setattr(store_module, "COUNTS_MAX_AGE_S", 0.05)
    tx = pair.tx
    pair.add_committed(0, n_keys=6)
    assert tx.counts()["available"] == 6
    with sqlite3.connect(tx.path) as other:  # not through the store
        other.execute("DELETE FROM keys WHERE idx < 2")
    time.sleep(0.06)
    assert tx.counts()["available"] == 4 == _counted(tx)["available"]
