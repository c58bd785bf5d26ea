from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdnode.keystore import KeyStore, block_key_ids, link_id_for
from qkdnode.keystore.ids import ID_SEED_BYTES, is_key_id

from .conftest import LINK, PROV, final_key


def test_link_id_is_symmetric() -> None:
    assert link_id_for("a", "b") == link_id_for("b", "a")
    assert link_id_for("a", "b") != link_id_for("a", "c")


@given(
    seed=st.binary(min_size=16, max_size=64),
    block=st.integers(0, 2**40),
    start=st.integers(0, 2**20),
)
def test_ids_are_rfc_version_4_and_deterministic(seed: bytes, block: int, start: int) -> None:
    ids = block_key_ids(seed, block, 3, start)
    for kid in ids:
        assert kid.version == 4
        assert kid.variant == uuid.RFC_4122
        assert is_key_id(kid)
        assert uuid.UUID(str(kid)) == kid
    assert len(set(ids)) == 3
    # both nodes compute the same IDs from the same seed, and any index range agrees
    assert block_key_ids(bytes(seed), block, 3, start) == ids
    assert block_key_ids(seed, block, 2, start + 1) == ids[1:]


def test_ids_depend_on_seed_block_and_index_only() -> None:
    seed = os.urandom(ID_SEED_BYTES)
    flipped = bytes([seed[0] ^ 1]) + seed[1:]
    ids = {kid for s in (seed, flipped) for b in range(20) for kid in block_key_ids(s, b, 50)}
    assert len(ids) == 2 * 20 * 50
    assert block_key_ids(seed, 3, 0) == []


def test_bad_seed_or_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        block_key_ids(b"\x01" * 15, 0, 1)
    for block, count, start in ((-1, 1, 0), (0, -1, 0), (0, 1, -1)):
        with pytest.raises(ValueError, match=">= 0"):
            block_key_ids(b"\x01" * 32, block, count, start)


def test_shape_check_accepts_only_version_4() -> None:
    seed = os.urandom(32)
    assert is_key_id(block_key_ids(seed, 1, 1)[0])
    assert is_key_id(uuid.uuid4())  # shape only: says nothing about existence
    for other in (uuid.uuid1(), uuid.uuid5(uuid.NAMESPACE_DNS, "x"), uuid.UUID(int=0)):
        assert not is_key_id(other)
    v8 = uuid.UUID(int=(uuid.uuid4().int & ~(0xF << 76)) | (8 << 76))
    assert not is_key_id(v8)


def test_store_ids_come_from_the_seed_not_from_public_data(tmp_path: Path) -> None:
    """The IDs of a block are block_key_ids(first ID_SEED_BYTES of the final key): no key
    size, link or position is encoded, and the seed is never a key."""
    s = KeyStore.open(tmp_path / "k.sqlite", link_id=LINK, side="transmitter")
    final = final_key(6, 256)
    ids = s.add_block(4, final, 256, PROV)
    assert ids == block_key_ids(final[:ID_SEED_BYTES], 4, 6)
    assert s.key_ids_of_block(4) == ids
    # the same final key cut into smaller keys: same IDs for the first indices
    ids_small = s.add_block(5, final, 128, PROV)
    assert ids_small == block_key_ids(final[:ID_SEED_BYTES], 5, 12)
    assert block_key_ids(final[:ID_SEED_BYTES], 4, 12)[:6] == ids
    # ID_SEED_BYTES..: the keys; the seed bytes are stored nowhere
    s.commit_block(4)
    (k,) = s.pick_for_enc(1, 256)
    assert k.delivered().key == final[ID_SEED_BYTES : ID_SEED_BYTES + 32]
    s.abandon_issue([k], erase=False)
    s.compact()
    s.close()
    content = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert final[:ID_SEED_BYTES] not in content
    assert final[ID_SEED_BYTES : ID_SEED_BYTES + 32] in content


def test_two_fresh_stores_with_the_same_node_and_block_ids_never_share_an_id(
    tmp_path: Path,
) -> None:
    """Old IDs were a hash of (link, block, index): two stores of the same nodes collided.
    Now each block's random final key seeds its IDs."""
    all_ids: list[set[uuid.UUID]] = []
    for run in range(2):
        s = KeyStore.open(
            tmp_path / f"run{run}.sqlite", link_id=LINK, side="transmitter", max_key_count=10**6
        )
        ids: set[uuid.UUID] = set()
        for block in range(30):
            ids.update(s.add_block(block, final_key(100, 64), 64, PROV))
        assert len(ids) == 3000
        all_ids.append(ids)
        s.close()
    assert not all_ids[0] & all_ids[1]
    assert all(kid.version == 4 and kid.variant == uuid.RFC_4122 for kid in all_ids[0])
