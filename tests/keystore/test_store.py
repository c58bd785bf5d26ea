from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from qkdnode.keystore import (
    BlockError,
    KeyAlreadyDeliveredError,
    KeyNotForPairError,
    KeyRequestError,
    KeyState,
    KeyStore,
    KeysUnavailableError,
    LinkMismatchError,
    Pair,
    StoreFullError,
    UnknownKeyError,
    split_key_id,
)
from qkdnode.keystore.ids import key_ref, make_key_id

from .conftest import LINK, PROV, Clock, StorePair

P = Pair(master="sae-m", slave="sae-s")
OTHER = Pair(master="sae-x", slave="sae-y")


def test_store_uses_wal_full_sync_and_secure_delete(pair: StorePair) -> None:
    conn = pair.tx._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] >= 2  # FULL=2, EXTRA=3
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_pending_keys_are_not_delivered_until_commit(pair: StorePair) -> None:
    data = os.urandom(32 * 4)
    ids = pair.tx.add_block(7, data, 256, PROV)
    assert len(ids) == 4
    assert pair.tx.counts()[KeyState.PENDING] == 4
    with pytest.raises(KeysUnavailableError):
        pair.tx.take_keys(P, 1, 256)
    pair.rx.add_block(7, data, 256, PROV)
    with pytest.raises(KeysUnavailableError, match="not yet committed"):
        pair.rx.claim_keys(P, [ids[0]])
    assert pair.tx.commit_block(7) == 4
    assert pair.tx.commit_block(7) == 0  # idempotent
    assert [k.key for k in pair.tx.take_keys(P, 2, 256)] == [data[0:32], data[64:96]]
    assert pair.tx.block_provenance(7) == PROV


def test_enc_on_one_node_dec_on_the_other_gives_the_same_keys(pair: StorePair) -> None:
    data = pair.add_committed(1, n_keys=10)
    got_tx = pair.tx.take_keys(P, 3, 256)
    got_rx = pair.rx.take_keys(P, 3, 256)
    # transmitter hands out even indices, receiver odd ones: disjoint
    assert {k.key_id for k in got_tx}.isdisjoint({k.key_id for k in got_rx})
    assert [k.key for k in got_tx] == [data[i * 32 : (i + 1) * 32] for i in (0, 2, 4)]
    assert [k.key for k in got_rx] == [data[i * 32 : (i + 1) * 32] for i in (1, 3, 5)]
    dec_rx = pair.rx.claim_keys(P, [k.key_id for k in got_tx])
    dec_tx = pair.tx.claim_keys(P, [k.key_id for k in got_rx])
    assert [(k.key_id, k.key) for k in dec_rx] == [(k.key_id, k.key) for k in got_tx]
    assert [(k.key_id, k.key) for k in dec_tx] == [(k.key_id, k.key) for k in got_rx]


def test_key_handed_out_by_enc_is_never_handed_out_by_enc_on_the_peer(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=6)
    tx_ids = {k.key_id for k in pair.tx.take_keys(P, 3, 256)}
    rx_ids = {k.key_id for k in pair.rx.take_keys(P, 3, 256)}
    assert not tx_ids & rx_ids
    with pytest.raises(KeysUnavailableError):
        pair.tx.take_keys(P, 1, 256)
    # a node cannot redeem through dec_keys a key that it hands out through enc_keys
    own = make_key_id(key_ref(LINK, 1, 0), 256)
    with pytest.raises(KeyNotForPairError, match="enc_keys"):
        pair.tx.claim_keys(P, [own])


def test_shorter_keys_carry_their_size_in_the_id(pair: StorePair) -> None:
    data = pair.add_committed(1, n_keys=4)
    (k,) = pair.tx.take_keys(P, 1, 64)
    assert k.size_bits == 64 and k.key == data[:8]
    assert split_key_id(k.key_id)[1] == 64
    (d,) = pair.rx.claim_keys(P, [k.key_id])
    assert d.key == k.key and d.key_id == k.key_id


def test_notice_reserves_key_for_its_pair_and_erases_when_both_delivered(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=4)
    keys = pair.tx.take_keys(P, 1, 128)
    pair.rx.apply_notice(pair.tx.notice(P, "enc", keys))
    info = pair.rx.key_info(keys[0].key_id)
    assert info is not None and info.state is KeyState.RESERVED and info.pair == P
    with pytest.raises(KeyNotForPairError, match="not issued"):
        pair.rx.claim_keys(OTHER, [keys[0].key_id])
    wrong_size = make_key_id(split_key_id(keys[0].key_id)[0], 256)
    with pytest.raises(KeyNotForPairError):
        pair.rx.claim_keys(P, [wrong_size])
    got = pair.rx.claim_keys(P, [keys[0].key_id])
    assert got[0].key == keys[0].key
    # both delivered: erased on rx immediately (peer_delivered was set), on tx after notice
    assert pair.rx.key_info(keys[0].key_id) is None
    assert pair.tx.key_info(keys[0].key_id) is not None
    pair.tx.apply_notice(pair.rx.notice(P, "dec", got))
    assert pair.tx.key_info(keys[0].key_id) is None
    assert pair.tx.apply_notice(pair.rx.notice(P, "dec", got)) == 0  # idempotent


def test_dec_errors_are_clear(pair: StorePair) -> None:
    import uuid

    pair.add_committed(1, n_keys=4)
    keys = pair.tx.take_keys(P, 2, 256)
    ids = [k.key_id for k in keys]
    with pytest.raises(UnknownKeyError, match="not a key ID"):
        pair.rx.claim_keys(P, [uuid.uuid4()])
    unknown = make_key_id(key_ref(LINK, 99, 1), 256)
    with pytest.raises(UnknownKeyError, match="unknown"):
        pair.rx.claim_keys(P, [unknown])
    with pytest.raises(KeyRequestError, match="twice"):
        pair.rx.claim_keys(P, [ids[0], ids[0]])
    pair.rx.claim_keys(P, [ids[0]])
    with pytest.raises(KeyAlreadyDeliveredError):
        pair.rx.claim_keys(P, [ids[0]])
    # all or nothing: a bad ID in the batch leaves the good one available
    with pytest.raises(KeyAlreadyDeliveredError):
        pair.rx.claim_keys(P, [ids[1], ids[0]])
    assert pair.rx.key_info(ids[1]).state is KeyState.AVAILABLE  # type: ignore[union-attr]
    # after erasure (both delivered) the tombstone still says "already delivered"
    pair.rx.apply_notice(pair.tx.notice(P, "enc", keys[:1]))
    assert pair.rx.key_info(ids[0]) is None
    with pytest.raises(KeyAlreadyDeliveredError):
        pair.rx.claim_keys(P, [ids[0]])


def test_bad_requests(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=2)
    for size in (0, 12, -8):
        with pytest.raises(KeyRequestError, match="multiple of 8"):
            pair.tx.take_keys(P, 1, size)
    with pytest.raises(KeyRequestError):
        pair.tx.take_keys(P, 0, 256)
    with pytest.raises(KeysUnavailableError, match="512 bits"):
        pair.tx.take_keys(P, 1, 512)  # larger than stored keys
    with pytest.raises(KeysUnavailableError, match="2 keys"):
        pair.tx.take_keys(P, 2, 256)  # only one even-indexed key
    assert pair.tx.available_for_enc() == 1  # all or nothing


def test_block_ids_are_never_reused(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=2)
    with pytest.raises(BlockError, match="already stored"):
        pair.tx.add_block(1, os.urandom(64), 256, PROV)
    pair.tx.discard_block(1)
    with pytest.raises(BlockError, match="never reused"):
        pair.tx.add_block(1, os.urandom(64), 256, PROV)
    # a block discarded while pending may be stored again
    pair.tx.add_block(2, os.urandom(64), 256, PROV)
    pair.tx.discard_block(2)
    pair.tx.add_block(2, os.urandom(64), 256, PROV)
    with pytest.raises(BlockError, match="no key"):
        pair.tx.add_block(3, b"\x00" * 3, 256, PROV)
    with pytest.raises(BlockError, match="not stored"):
        pair.tx.commit_block(42)


def test_store_full(tmp_path: Path) -> None:
    s = KeyStore.open(tmp_path / "k.sqlite", link_id=LINK, side="transmitter", max_key_count=10)
    s.add_block(1, os.urandom(32 * 8), 256, PROV)
    with pytest.raises(StoreFullError, match="max_key_count 10"):
        s.add_block(2, os.urandom(32 * 3), 256, PROV)
    s.close()


def test_wrong_link_or_side_is_refused(tmp_path: Path) -> None:
    KeyStore.open(tmp_path / "k.sqlite", link_id=LINK, side="transmitter").close()
    with pytest.raises(LinkMismatchError):
        KeyStore.open(tmp_path / "k.sqlite", link_id="other", side="transmitter")
    with pytest.raises(LinkMismatchError):
        KeyStore.open(tmp_path / "k.sqlite", link_id=LINK, side="receiver")


def test_expired_keys_are_erased_on_both_sides(pair: StorePair, clock: Clock) -> None:
    pair.add_committed(1, n_keys=4)
    keys = pair.tx.take_keys(P, 1, 256)  # delivered, never redeemed
    clock.now += 3599
    assert pair.tx.erase_due() == 0
    clock.now += 2
    with pytest.raises(KeysUnavailableError):
        pair.tx.take_keys(P, 1, 256)  # expired keys are not handed out even before the sweep
    with pytest.raises(UnknownKeyError, match="expired"):
        pair.rx.claim_keys(P, [keys[0].key_id])
    assert pair.tx.erase_due() == 4
    assert pair.rx.erase_due() == 4
    assert sum(pair.tx.counts().values()) == 0
    with pytest.raises(UnknownKeyError, match="expired"):
        pair.rx.claim_keys(P, [keys[0].key_id])
    clock.now += 3 * 3600
    pair.rx.erase_due()  # tombstones forgotten
    with pytest.raises(UnknownKeyError, match="unknown"):
        pair.rx.claim_keys(P, [keys[0].key_id])


def test_erased_key_bytes_are_gone_from_the_files(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    s = KeyStore.open(path, link_id=LINK, side="transmitter")
    marker = bytes(range(1, 33)) * 4  # 4 keys of 256 bits with a recognisable pattern
    keep = os.urandom(32 * 4)
    s.add_block(1, marker, 256, PROV)
    s.add_block(2, keep, 256, PROV)
    s.erase_due()  # checkpoint: the marker is now in the main file

    def file_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("k.sqlite"))

    assert marker[:32] in file_bytes()
    s.discard_block(1)
    s.erase_due()
    content = file_bytes()
    assert marker[:32] not in content
    assert keep[:32] in content
    s.close()


def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "k.sqlite"
    s = KeyStore.open(path, link_id=LINK, side="receiver")
    data = os.urandom(32 * 6)
    s.add_block(5, data, 256, PROV)
    s.commit_block(5)
    taken = s.take_keys(P, 2, 256)
    s.close()
    s = KeyStore.open(path, link_id=LINK, side="receiver")
    assert s.counts()[KeyState.DELIVERED] == 2
    assert s.available_for_enc() == 1
    with pytest.raises(KeyNotForPairError):
        s.claim_keys(P, [taken[0].key_id])
    s.close()


def test_key_bytes_never_in_logs_reprs_or_errors(pair: StorePair) -> None:
    with capture_logs() as logs:
        data = pair.add_committed(1, n_keys=4)
        keys = pair.tx.take_keys(P, 2, 256)
        pair.rx.apply_notice(pair.tx.notice(P, "enc", keys))
        got = pair.rx.claim_keys(P, [k.key_id for k in keys])
        try:
            pair.rx.claim_keys(P, [keys[0].key_id])
        except KeyAlreadyDeliveredError as exc:
            err = exc
        pair.tx.apply_notice(pair.rx.notice(P, "dec", got))
        summary = pair.tx.summary()
        pair.tx.erase_due()
    assert logs, "the store logs its operations"
    texts = [repr(logs), str(err), repr(err), repr(pair.tx), str(summary), repr(summary)]
    texts += [repr(k) for k in keys + got] + [str(k) for k in keys + got]
    texts += [repr(pair.rx.key_info(keys[0].key_id))]
    for chunk in (data[i : i + 8] for i in range(0, len(data), 8)):
        for needle in (
            chunk.hex(),
            repr(chunk)[2:-1],
            __import__("base64").b64encode(chunk).decode()[:10],
        ):
            for t in texts:
                assert needle not in t


def test_concurrent_takes_from_threads_never_duplicate(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=400, key_size_bits=128)
    results: list[list[object]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        mine: list[object] = []
        for _ in range(15):
            try:
                mine.extend(k.key_id for k in pair.tx.take_keys(P, 2, 128))
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


def test_raw_rows_match_states(pair: StorePair) -> None:
    pair.add_committed(1, n_keys=4)
    pair.tx.take_keys(P, 1, 256)
    conn = sqlite3.connect(pair.tx.path)
    rows = dict(conn.execute("SELECT idx, state FROM keys").fetchall())
    conn.close()
    assert rows == {0: "delivered", 1: "available", 2: "available", 3: "available"}


def test_digest_compares_stores_and_last_block_id_survives_erasure(pair: StorePair) -> None:
    assert pair.tx.last_block_id() == -1
    pair.add_committed(3, n_keys=4)
    pair.add_committed(9, n_keys=4)
    assert pair.tx.digest() == pair.rx.digest()
    assert pair.tx.digest()["count"] == 8
    pair.tx.take_keys(P, 1, 256)  # state changes do not change the digest
    assert pair.tx.digest() == pair.rx.digest()
    pair.rx.discard_block(3)
    assert pair.tx.digest() != pair.rx.digest()
    pair.tx.discard_block(3)
    assert pair.tx.digest() == pair.rx.digest()
    pair.tx.discard_block(9)
    assert pair.tx.last_block_id() == 9
    pair.tx.add_block(10, os.urandom(64), 256, PROV)
    pair.tx.add_block(4, os.urandom(64), 256, PROV)
    assert pair.tx.last_block_id() == 10


def test_compaction_runs_after_erasures_at_most_once_per_interval(tmp_path: Path) -> None:
    s = KeyStore.open(
        tmp_path / "k.sqlite", link_id=LINK, side="transmitter", compact_interval_s=3600
    )
    with capture_logs() as logs:
        s.erase_due()  # first sweep after opening: compacts (a crash may have left remnants)
        s.erase_due()  # nothing erased since: no compaction
        s.add_block(1, os.urandom(64), 256, PROV)
        s.discard_block(1)
        s.erase_due()  # erased, but within the interval
    assert [e["event"] for e in logs].count("keystore.compacted") == 1
    s.compact_interval_s = 0
    with capture_logs() as logs:
        s.erase_due()
        s.erase_due()
    assert [e["event"] for e in logs].count("keystore.compacted") == 1
    s.close()


def test_files_of_another_schema_version_are_refused(tmp_path: Path) -> None:
    from qkdnode.keystore import KeyStoreError

    path = tmp_path / "k.sqlite"
    KeyStore.open(path, link_id=LINK, side="transmitter").close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='1' WHERE name='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(KeyStoreError, match="schema 1"):
        KeyStore.open(path, link_id=LINK, side="transmitter")
