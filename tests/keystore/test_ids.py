from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdnode.keystore.ids import key_ref, link_id_for, make_key_id, split_key_id


def test_link_id_is_symmetric() -> None:
    assert link_id_for("a", "b") == link_id_for("b", "a")
    assert link_id_for("a", "b") != link_id_for("a", "c")


@given(
    block=st.integers(0, 2**40),
    index=st.integers(0, 2**20),
    size_bytes=st.integers(1, 0xFFFF),
)
def test_key_id_roundtrip_is_rfc_version_8(block: int, index: int, size_bytes: int) -> None:
    ref = key_ref("L", block, index)
    kid = make_key_id(ref, size_bytes * 8)
    assert kid.version == 8
    assert kid.variant == uuid.RFC_4122
    assert split_key_id(kid) == (ref, size_bytes * 8)
    assert split_key_id(uuid.UUID(str(kid))) == (ref, size_bytes * 8)


def test_ids_differ_by_link_block_and_index() -> None:
    refs = {key_ref(link, b, i) for link in ("L1", "L2") for b in range(20) for i in range(50)}
    assert len(refs) == 2 * 20 * 50


def test_foreign_and_malformed_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="not a key ID"):
        split_key_id(uuid.uuid4())
    with pytest.raises(ValueError, match="not a key ID"):
        split_key_id(uuid.UUID(int=key_ref("L", 1, 1)))  # size field zero
    for bad in (0, 7, -8, 8 * 0x10000):
        with pytest.raises(ValueError):
            make_key_id(key_ref("L", 1, 1), bad)
