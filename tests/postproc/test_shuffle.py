"""Keyed Cascade permutations: bijective, invertible, deterministic, well scattered."""

from __future__ import annotations

import numpy as np
import pytest

from qkdnode.jit import JIT
from qkdnode.postproc import shuffle
from tests.numba_rerun import run_under_numba


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
    if not run_under_numba(__file__, "test_cascade_warm_up_compiles_every_kernel_a_block_uses"):
        return
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
    # as the daemons run it: node ids off the wire (uint32), later passes prepared apart
    levels = cascade.schedule(300_001, 0.04, CascadeParams())
    alice = cascade.CascadeResponder(a, levels, 13)
    bob = cascade.CascadeCorrector(b, levels, 13)
    bob.prepare_later_passes()
    bob.set_block_parities(alice.block_parities())
    while (q := bob.next_queries()) is not None:
        bob.give_answers(alice.answer(bob.layout.encode(q).tobytes(), q.shape[0]))
    assert np.array_equal(bob.corrected(), a)
    assert {k: len(k.signatures) for k in kernels} == before


@pytest.mark.skipif(not JIT, reason="numba unavailable: nothing to compare")
def test_numpy_twins_match_the_compiled_kernels() -> None:
    """The fallbacks for nodes without JIT (qkdnode.jit) give identical permutations and
    identical Cascade steps."""
    from qkdnode.postproc import cascade
    from qkdnode.postproc import cascade_kernels as ck

    p = shuffle.KeyedPermutation(100_003, 5, 3)
    perm = p.array()
    c, keys = p._consts, p._keys
    assert np.array_equal(
        shuffle._walk_np(np.arange(100_003, dtype=np.uint64), c, keys, p._mults, False), perm
    )
    assert np.array_equal(
        shuffle._walk_np(perm.astype(np.uint64), c, keys, p._inv_mults, True), np.arange(100_003)
    )

    rng = np.random.default_rng(8)
    n = 50_001
    lay = cascade.TreeLayout(n, [4, 5, 6])
    tops = np.asarray(lay.top_levels, dtype=np.int64)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    trees = []
    for twin in (ck._pass_tree, ck._pass_tree_np):
        out = np.zeros(ck.state_bytes(lay.total), np.uint8)
        for q in range(3):
            twin(bits, lay.top_levels[q], out, int(lay.pass_base[q]), np.uint8(2))
        trees.append(out)
    assert np.array_equal(trees[0], trees[1])
    nodes = np.where(rng.random(lay.total) < 0.3, 2, rng.integers(0, 2, lay.total))
    state = np.zeros(ck.state_bytes(lay.total), np.uint8)
    ck.put(state, np.arange(lay.total), nodes.astype(np.uint8))
    assert np.array_equal(ck.get(state, np.arange(lay.total)), nodes)
    k = np.stack([rng.choice(n, 500, replace=False) for _ in range(3)]).astype(np.int64)
    boff = lay.block_offsets
    everything = np.ones(int(boff[-1]), np.uint8)
    ck._toggle_ancestors_np(state, lay.pass_base, tops, k, boff, everything)
    a = state.copy()
    out = np.empty((4, k.size), np.int64)
    m = ck._smallest_odd(a, lay.pass_base, tops, k, out, boff, everything)
    assert np.array_equal(
        out[:, :m], ck._smallest_odd_np(a, lay.pass_base, tops, k, boff, everything)
    )
    # blocks not built: only their roots are looked at, by both
    some = (rng.random(int(boff[-1])) < 0.5).astype(np.uint8)
    m2 = ck._smallest_odd(a, lay.pass_base, tops, k, out, boff, some)
    assert np.array_equal(out[:, :m2], ck._smallest_odd_np(a, lay.pass_base, tops, k, boff, some))
    unbuilt = some[boff[out[1, :m2]] + (out[3, :m2] >> (tops[out[1, :m2]] - out[2, :m2]))] == 0
    assert unbuilt.any() and np.all(out[2, :m2][unbuilt] == tops[out[1, :m2][unbuilt]])
    odd = out[:, :m]
    a2, b2 = a.copy(), a.copy()
    keep = np.empty_like(odd)
    leaf = np.empty((2, m), np.int64)
    kept, found = ck._descend(a2, lay.pass_base, tops, n, odd, keep, leaf)
    keep_np, leaf_np = ck._descend_np(b2, lay.pass_base, tops, n, odd)
    assert np.array_equal(a2, b2)
    assert np.array_equal(keep[:, :kept], keep_np)
    order = np.lexsort(leaf[:, :found][::-1])
    order_np = np.lexsort(leaf_np[::-1])
    assert np.array_equal(leaf[:, :found][:, order], leaf_np[:, order_np])


@pytest.mark.skipif(not JIT, reason="numba unavailable: nothing to compare")
def test_fused_kernels_match_their_parts_and_twins() -> None:
    """The permuted pass tree equals the tree of the gathered bits; duplicate searches and
    answers are handled alike by the compiled kernels and their numpy twins."""
    from qkdnode.postproc import cascade
    from qkdnode.postproc import cascade_kernels as ck

    rng = np.random.default_rng(9)
    n = 70_001
    lay = cascade.TreeLayout(n, [5, 7, 13])
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    packed = np.packbits(bits)
    for q, top in enumerate(lay.top_levels):
        perm = shuffle.KeyedPermutation(n, 4, q + 1)
        base = int(lay.pass_base[q])
        size = ck.state_bytes(lay.total)
        fused, parts = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
        every = np.arange(lay.count(top), dtype=np.int64)
        ck.permuted_blocks(bits, packed, perm, top, fused, base, 2, every)
        ck._pass_tree_np(perm.gather(bits), top, parts, base, np.uint8(2))
        assert np.array_equal(fused, parts)
        # some blocks only (the last, partial one among them): the same bytes, by both
        chosen = np.unique(np.append(rng.choice(every, max(1, every.shape[0] // 3)), every[-1]))
        jit, twin = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
        ck.permuted_blocks(bits, packed, perm, top, jit, base, 2, chosen)
        ck._permuted_blocks_np(bits, perm, top, twin, base, np.uint8(2), chosen)
        assert np.array_equal(jit, twin)
        ids = np.concatenate([lay.top_ids(q)[chosen]])
        assert np.array_equal(ck.get(jit, ids), ck.get(parts, ids))
        # block parities without a tree: as the tree's roots, compiled and numpy alike
        roots = ck.get(parts, lay.top_ids(q)) & 1
        assert np.array_equal(ck.block_parities(bits, [perm], [top])[0], roots)
        ones = perm.backward(np.flatnonzero(bits))
        assert np.array_equal(np.bincount(ones >> top, minlength=roots.shape[0]) & 1, roots)

    # several passes in one sweep (the check passes' words and a pass of more blocks)
    perms = [shuffle.KeyedPermutation(n, 4, q + 1) for q in range(4)]
    tops = [13, 7, 12, 16]
    jit_pars = ck.block_parities(bits, perms, tops)
    assert len(jit_pars) == 4
    twins = ck._block_parities_np(bits, perms, tops)
    for q, (got, twin) in enumerate(zip(jit_pars, twins, strict=True)):
        direct = [
            int(bits[perms[q].array()[b << tops[q] : (b + 1) << tops[q]]].sum() & 1)
            for b in range(got.shape[0])
        ]
        assert got.tolist() == twin.tolist() == direct
    assert ck.block_parities(bits, [], []) == []

    # the blocks of nodes whose trees are not built, compiled and numpy alike
    boff = lay.block_offsets
    built = (rng.random(int(boff[-1])) < 0.7).astype(np.uint8)
    ids = rng.integers(0, lay.total, 5000)
    first = int(lay.pass_base[1])
    got = ck.unbuilt_blocks(ids.astype("<u4"), lay.pass_base, lay.tops, boff, built, first)
    q_of = np.searchsorted(lay.pass_base, ids, side="right") - 1
    g = boff[q_of] + ((ids - lay.pass_base[q_of]) >> (lay.tops[q_of] + 1))
    want = g[(built[g] == 0) & (ids >= first)]
    assert np.array_equal(got, want[np.sort(np.unique(want, return_index=True)[1])])
    assert np.array_equal(
        ck.unbuilt_blocks(ids, lay.pass_base, lay.tops, boff, built, 0),
        np.asarray(
            [x for i, x in enumerate(g) if built[x] == 0 and x not in g[:i]], dtype=np.int64
        ),
    )
    flips = np.unique(rng.integers(0, n, 300))
    a, b = packed.copy(), packed.copy()
    ck._toggle_bits(a, flips)
    np.bitwise_xor.at(b, flips >> 3, (np.uint8(0x80) >> (flips & 7).astype(np.uint8)))
    flipped = bits.copy()
    flipped[flips] ^= 1
    assert np.array_equal(a, b) and np.array_equal(a, np.packbits(flipped))

    state = rng.integers(0, 256, ck.state_bytes(lay.total)).astype(np.uint8)
    s = rng.integers(0, lay.total, (4, 3000)).astype(np.int64)
    s[:, 2000:] = s[:, :1000]  # a third are repeats
    ck.put(state, np.unique(s[0]), np.uint8(1))  # searches sit on known odd nodes
    before = state.copy()
    jit = ck.distinct_searches(state, s)
    assert np.array_equal(state, before)  # the marks are cleared
    first = np.sort(np.unique(s[0], return_index=True)[1])
    assert np.array_equal(jit, s[:, first])

    odd = np.zeros(lay.total, bool)
    odd[s[0, ::3]] = True  # a third of the search nodes stay odd
    ck.put(state, np.unique(s[0]), odd[np.unique(s[0])].astype(np.uint8))
    out = np.empty_like(s)
    m = ck._odd_searches(state, s, out)
    assert np.array_equal(out[:, :m], s[:, odd[s[0]]])

    # searches of every pass and level: left children as TreeLayout numbers them
    p = rng.integers(0, 3, 500)
    lv = rng.integers(1, lay.tops[p] + 1)
    j = rng.integers(0, -(-n // (1 << lv)))
    rows = np.stack([lay.node_id(p, lv, j), p, lv, j])
    want = lay.node_id(p, lv - 1, 2 * j)
    out1 = np.empty(500, np.int64)
    ck._left_children(lay.pass_base, lay.tops, rows, out1)
    assert np.array_equal(out1, want)

    left = np.unique(rng.integers(0, lay.total // 4, 2000)) * 2
    # parents are known nodes, never among the children being answered
    parent = rng.integers(lay.total // 2 + 2, lay.total, left.shape[0]).astype(np.int64)
    answers = rng.integers(0, 2, left.shape[0]).astype(np.uint8)
    a, b = state.copy(), state.copy()
    ck._apply_answers(a, left, parent, answers)
    ck._apply_answers_np(b, left, parent, answers)
    assert np.array_equal(a, b)
    v = (ck.get(state, left) & 1) ^ answers
    assert np.array_equal(ck.get(a, left), v)
    assert np.array_equal(ck.get(a, left + 1), ck.get(state, parent) ^ v)
    untouched = np.setdiff1d(np.arange(lay.total), np.concatenate([left, left + 1]))
    assert np.array_equal(ck.get(a, untouched), ck.get(state, untouched))


@pytest.mark.skipif(not JIT, reason="numba unavailable: nothing to compare")
def test_locate_and_flip_kernels_match_the_permutations() -> None:
    """Leaves map to key positions and flips to every pass's order as the pass
    permutations say, and the toggles equal the numpy twin's."""
    from qkdnode.postproc import cascade
    from qkdnode.postproc import cascade_kernels as ck

    rng = np.random.default_rng(10)
    n = 90_001
    lay = cascade.TreeLayout(n, [5, 6, 7, 8])
    perms = [shuffle.KeyedPermutation(n, 21, q) for q in range(1, 4)]
    args = shuffle.stacked_kernel_args(perms)
    leaf = np.stack([rng.integers(0, 4, 700), rng.integers(0, n, 700)]).astype(np.int64)
    want = np.array([j if q == 0 else perms[q - 1].array()[j] for q, j in leaf.T])
    assert np.array_equal(ck.locate(leaf, perms, args), want)

    found = np.unique(rng.integers(0, n, 900))
    state = rng.integers(0, 256, ck.state_bytes(lay.total)).astype(np.uint8)
    boff = lay.block_offsets
    for share in (1.0, 0.5, 0.0):  # blocks not built: only their roots toggle
        built = (rng.random(int(boff[-1])) < share).astype(np.uint8)
        a, b = state.copy(), state.copy()
        rows = ck.flip_all_passes(a, lay.pass_base, lay.tops, found, perms, args, boff, built)
        assert np.array_equal(rows[0], found)
        for q in range(1, 4):
            assert np.array_equal(perms[q - 1].forward(rows[q]), found)
        ck._toggle_ancestors_np(b, lay.pass_base, lay.tops, rows, boff, built)
        assert np.array_equal(a, b)
        for q in range(4):
            t = int(lay.tops[q])
            blk = rows[q] >> t
            root = lay.pass_base[q] + (blk << (t + 1)) + 1
            leaf = lay.pass_base[q] + (blk << (t + 1)) + (1 << t) + (rows[q] & ((1 << t) - 1))
            odd_count = np.bincount(root, minlength=lay.total)[root] & 1
            assert np.array_equal(ck.get(a, root) ^ ck.get(state, root), odd_count)
            whole = built[boff[q] + blk] == 1
            assert np.all((ck.get(a, leaf[whole]) ^ ck.get(state, leaf[whole])) == 1)
            rest = ~whole & ~np.isin(leaf, root)
            assert np.array_equal(ck.get(a, leaf[rest]), ck.get(state, leaf[rest]))
