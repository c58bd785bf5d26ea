"""Keyed Cascade permutations: bijective, invertible, deterministic, well scattered."""

from __future__ import annotations

import numpy as np
import pytest

from qkdnode.postproc import shuffle


@pytest.mark.parametrize("n", [1, 2, 3, 64, 65, 1000, 1 << 16, 100_003])
def test_permutation_is_a_bijection_with_matching_inverse_and_gather(n: int) -> None:
    p = shuffle.KeyedPermutation(n, 12345, 2)
    perm = p.array()
    assert np.array_equal(np.sort(perm), np.arange(n))
    assert np.array_equal(p.backward(perm), np.arange(n))
    bits = np.random.default_rng(n).integers(0, 2, n, dtype=np.uint8)
    assert np.array_equal(p.gather(bits), bits[perm])
    some = np.random.default_rng(1).integers(0, n, 50)
    assert np.array_equal(p.forward(some), perm[some])


def test_permutation_depends_on_seed_and_pass_only() -> None:
    n = 10_000
    a = shuffle.keyed_permutation(n, 7, 1)
    assert np.array_equal(a, shuffle.keyed_permutation(n, 7, 1))
    assert not np.array_equal(a, shuffle.keyed_permutation(n, 7, 2))
    assert not np.array_equal(a, shuffle.keyed_permutation(n, 8, 1))


def test_neighbours_are_scattered_like_a_random_permutation() -> None:
    """Bits that share a block of 64 land in the same block of the next pass about as
    rarely as under a uniform permutation (expected 63/n per pair), and the positions of
    a block are spread over the whole key."""
    n, size = 1_000_000, 64
    perm = shuffle.keyed_permutation(n, 99, 1)
    same = np.count_nonzero((perm[:-1] // size) == (perm[1:] // size))
    expected = (n - 1) * (size - 1) / n
    assert same < expected + 5 * np.sqrt(expected) + 5
    inv = shuffle.KeyedPermutation(n, 99, 1).backward(np.arange(n))
    blocks = inv.reshape(-1, size)[: n // size]  # where each new block's bits came from
    spread = blocks.max(axis=1) - blocks.min(axis=1)
    assert np.median(spread) > 0.9 * n


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="length"):
        shuffle.KeyedPermutation(0, 1, 1)
    with pytest.raises(ValueError, match="seed"):
        shuffle.KeyedPermutation(10, -1, 1)
    p = shuffle.KeyedPermutation(10, 1, 1)
    with pytest.raises(ValueError, match="outside"):
        p.forward(np.array([10]))
    with pytest.raises(ValueError, match="expected"):
        p.gather(np.zeros(9, dtype=np.uint8))


def test_cascade_warm_up_compiles_every_kernel_a_block_uses() -> None:
    """After the daemon's warm-up, a real block (other sizes, levels and error counts)
    compiles nothing new: no compile can stall the first key block."""
    from numba.core.registry import CPUDispatcher

    from qkdnode.postproc import bench, cascade, cascade_kernels
    from qkdnode.postproc.params import CascadeParams

    cascade.warm_up()
    kernels = [
        f
        for mod in (shuffle, cascade_kernels)
        for f in vars(mod).values()
        if isinstance(f, CPUDispatcher)
    ]
    assert len(kernels) >= 8
    before = {k: len(k.signatures) for k in kernels}
    # helpers only called from compiled code have none when their callers come from the cache
    assert sum(before.values()) >= 7
    a, b = bench._cascade_inputs(300_001, 0.04, 3)
    out, _ = cascade.reconcile_local(a, b, 0.04, CascadeParams(), 12)
    assert np.array_equal(out, a)
    assert {k: len(k.signatures) for k in kernels} == before
