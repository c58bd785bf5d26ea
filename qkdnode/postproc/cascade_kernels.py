"""Compiled steps of Cascade (:mod:`qkdnode.postproc.cascade`): both sides' pass-tree
builds, Alice's lookups and Bob's per-round work.

Each loop walks one search or one flipped bit through the pass trees; numpy versions of the
same steps spent most of their time in temporaries (about 1 ms per round at 1e7 bits, a few
hundred rounds per block). Node ids and the state encoding are those of
:class:`qkdnode.postproc.cascade.TreeLayout`: pass ``q``'s block ``b`` occupies ids
``pbase[q] + b * 2**(t + 1)`` onwards (``t = tops[q]``), in heap order inside the block (root
at offset 1, children of ``h`` at ``2h`` and ``2h + 1``, leaf ``i`` of the block at
``2**t + i``).

Node states are 2-bit fields, four nodes per byte (node ``x`` in byte ``x >> 2`` at bit
``2 * (x & 3)``): bit 1 set = Alice's parity unknown, then bit 0 is Bob's parity; bit 1
clear = known, bit 0 = Bob's parity XOR Alice's (1 = odd). A 4e6-bit frame's four pass
trees take 8 MB instead of 32 MB at a byte per node, and the random accesses of a round
(a few cache lines per flipped bit and per search) mostly hit the L3 cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdnode.jit import JIT, njit
from qkdnode.postproc import shuffle

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


@njit
def _get(state: Any, x: Any) -> Any:  # pragma: no cover - jit
    return (state[x >> 2] >> ((x & 3) << 1)) & 3


@njit
def _put(state: Any, x: Any, v: Any) -> None:  # pragma: no cover - jit
    sh = (x & 3) << 1
    state[x >> 2] = (state[x >> 2] & ~(3 << sh)) | (v << sh)


@njit
def _toggle(state: Any, x: Any) -> None:  # pragma: no cover - jit
    state[x >> 2] ^= 1 << ((x & 3) << 1)


@njit
def _leaf_slot(pbase: Any, t: Any, x: Any) -> tuple[Any, Any]:  # pragma: no cover - jit
    """(first id of the block, heap index in it) of permuted position ``x`` in a pass
    with top level ``t`` whose blocks start at ``pbase``; ancestors are at ``h >> level``."""
    return pbase + ((x >> t) << (t + 1)), (1 << t) | (x & ((1 << t) - 1))


def state_bytes(nodes: int) -> int:
    """Bytes of a state array for ``nodes`` nodes."""
    return (nodes + 3) >> 2


@njit
def _get_many(state: Any, ids: Any, out: Any) -> None:  # pragma: no cover - jit
    for i in range(ids.shape[0]):
        out[i] = _get(state, ids[i])


def get(state: U8, ids: npt.NDArray[np.integer[Any]]) -> U8:
    """The 2-bit states of nodes ``ids`` (any integer dtype, all in range)."""
    if JIT and ids.ndim == 1:
        out = np.empty(ids.shape[0], dtype=np.uint8)
        _get_many(state, ids, out)
        return out
    idx = np.asarray(ids, dtype=np.int64)
    got: U8 = ((state[idx >> 2] >> ((idx & 3) << 1).astype(np.uint8)) & 3).astype(np.uint8)
    return got


@njit
def _put_many(state: Any, ids: Any, values: Any) -> None:  # pragma: no cover - jit
    for i in range(ids.shape[0]):
        _put(state, ids[i], values[i])


def put(state: U8, ids: I64, values: npt.ArrayLike) -> None:
    """Set the states of the distinct nodes ``ids`` to ``values`` (0..3)."""
    ids = np.asarray(ids, dtype=np.int64)
    if JIT and ids.ndim == 1:
        v = np.broadcast_to(np.asarray(values, dtype=np.uint8) & 3, ids.shape)
        _put_many(state, ids, np.ascontiguousarray(v))
        return
    sh = ((ids & 3) << 1).astype(np.uint8)
    np.bitwise_and.at(state, ids >> 2, ~(np.uint8(3) << sh))
    np.bitwise_or.at(state, ids >> 2, (np.asarray(values, dtype=np.uint8) & 3) << sh)


@njit
def _smallest_odd(  # noqa: PLR0917  # pragma: no cover
    state: Any, pbase: Any, tops: Any, k: Any, out: Any, boff: Any, built: Any
) -> int:
    m = 0
    for q in range(k.shape[0]):
        t = tops[q]
        for i in range(k.shape[1]):
            x = k[q, i]
            block, h = _leaf_slot(pbase[q], t, x)
            lvl = 0
            if not built[boff[q] + (x >> t)]:  # only the block's root is known there
                h, lvl = 1, t
            while h:
                if _get(state, block + h) == 1:
                    out[0, m] = block + h
                    out[1, m] = q
                    out[2, m] = lvl
                    out[3, m] = x >> lvl
                    m += 1
                    break
                h >>= 1
                lvl += 1
    return m


@njit
def _descend(  # noqa: PLR0917  # pragma: no cover
    state: Any, pbase: Any, tops: Any, n: int, search: Any, keep: Any, leaf: Any
) -> tuple[int, int]:
    kept = 0
    found = 0
    for s in range(search.shape[1]):
        g, p, lv, j = search[0, s], search[1, s], search[2, s], search[3, s]
        t = tops[p]
        block = pbase[p] + ((j >> (t - lv)) << (t + 1))
        while True:
            if lv == 0:
                leaf[0, found] = p
                leaf[1, found] = j
                found += 1
                break
            cl = lv - 1
            left = j << 1
            gl = 2 * g - block  # heap child 2h of g = block + h
            if ((left + 1) << cl) >= n:
                _put(state, gl, 1)  # no right child: the left one is the whole (odd) parent
                g, lv, j = gl, cl, left
                continue
            sl = _get(state, gl)
            if sl == 0:
                g, lv, j = gl + 1, cl, left + 1
            elif sl == 1:
                g, lv, j = gl, cl, left
            else:  # left child's parity unknown: this search asks for it next round
                keep[0, kept] = g
                keep[1, kept] = p
                keep[2, kept] = lv
                keep[3, kept] = j
                kept += 1
                break
    return kept, found


@njit
def _unbuilt_blocks(  # noqa: PLR0917  # pragma: no cover
    ids: Any, pbase: Any, tops: Any, boff: Any, built: Any, first: int, out: Any
) -> int:
    m = 0
    last = pbase.shape[0] - 1
    for i in range(ids.shape[0]):
        x = np.int64(ids[i])
        if x < first:
            continue
        q = last
        while pbase[q] > x:
            q -= 1
        g = boff[q] + ((x - pbase[q]) >> (tops[q] + 1))
        if built[g] == 0:
            built[g] = 2  # listed once
            out[m] = g
            m += 1
    for i in range(m):
        built[out[i]] = 0
    return m


def unbuilt_blocks(  # noqa: PLR0917
    ids: npt.NDArray[np.integer[Any]], pbase: I64, tops: I64, boff: I64, built: U8, first: int
) -> I64:
    """Blocks (all-block index ``boff[q] + b`` of block ``b`` of pass ``q``) holding the
    nodes ``ids`` (in range; those below ``first`` are known to be built) whose trees are
    not built (``built[...] == 0``), each once, in the order of their first node."""
    if not JIT:
        x = np.asarray(ids, dtype=np.int64)
        x = x[x >= first]
        q = np.searchsorted(pbase, x, side="right") - 1
        g = boff[q] + ((x - pbase[q]) >> (tops[q] + 1))
        g = g[built[g] == 0]
        order = np.unique(g, return_index=True)[1]
        need: I64 = g[np.sort(order)]
        return need
    out = np.empty(ids.shape[0], dtype=np.int64)
    m = _unbuilt_blocks(np.ascontiguousarray(ids), pbase, tops, boff, built, first, out)
    return out[:m]


@njit
def _distinct_searches(state: Any, s: Any, out: Any) -> int:  # pragma: no cover
    # Every search's node is known odd (state 1); the first search on a node marks it
    # known even (0) until the end, so later ones on it are skipped.
    m = 0
    for i in range(s.shape[1]):
        g = s[0, i]
        if _get(state, g) != 1:
            continue
        _put(state, g, 0)
        for r in range(4):
            out[r, m] = s[r, i]
        m += 1
    for i in range(m):
        _put(state, out[0, i], 1)
    return m


def distinct_searches(state: U8, s: I64) -> I64:
    """The searches (rows node id, pass, level, node index; every node known odd) with
    the first of those that share a node only, in their order."""
    if not JIT:
        first = np.unique(s[0], return_index=True)[1]
        out: I64 = s[:, np.sort(first)]
        return out
    out = np.empty((4, s.shape[1]), dtype=np.int64)
    m = _distinct_searches(state, np.ascontiguousarray(s), out)
    return out[:, :m]


@njit
def _odd_searches(state: Any, s: Any, out: Any) -> int:  # pragma: no cover
    m = 0
    for i in range(s.shape[1]):
        if _get(state, s[0, i]) == 1:
            for r in range(4):
                out[r, m] = s[r, i]
            m += 1
    return m


def odd_searches(state: U8, s: I64) -> I64:
    """The searches whose node is still known odd (a flip elsewhere may have made it even:
    its error was found by another search)."""
    if not JIT:
        out: I64 = s[:, get(state, s[0]) == 1]
        return out
    out = np.empty((4, s.shape[1]), dtype=np.int64)
    m = _odd_searches(state, np.ascontiguousarray(s), out)
    return out[:, :m]


@njit
def _left_children(pbase: Any, tops: Any, s: Any, out: Any) -> None:  # pragma: no cover
    for i in range(s.shape[1]):
        g, p, lv, j = s[0, i], s[1, i], s[2, i], s[3, i]
        t = tops[p]
        out[i] = 2 * g - (pbase[p] + ((j >> (t - lv)) << (t + 1)))


def left_children(pbase: I64, tops: I64, s: I64) -> I64:
    """Ids of the left children of the search nodes ``s`` (rows node id, pass, level >= 1,
    node index): heap child ``2h`` of node ``B + h`` of a block starting at ``B``."""
    s = np.ascontiguousarray(s)
    if not JIT:
        t = tops[s[1]]
        block = pbase[s[1]] + ((s[3] >> (t - s[2])) << (t + 1))
        left: I64 = 2 * s[0] - block
        return left
    out = np.empty(s.shape[1], dtype=np.int64)
    _left_children(pbase, tops, s, out)
    return out


@njit
def _apply_answers(state: Any, left: Any, parent: Any, parities: Any) -> None:  # pragma: no cover
    for i in range(left.shape[0]):
        gl = left[i]
        v = (_get(state, gl) & 1) ^ (parities[i] & 1)
        _put(state, gl, v)
        _put(state, gl + 1, _get(state, parent[i]) ^ v)


def apply_answers(state: U8, left: I64, parent: I64, parities: U8) -> None:
    """Record Alice's parities of the left children ``left`` of the odd known nodes
    ``parent``; each right child (``left + 1``) follows as parent XOR left."""
    if not JIT:
        _apply_answers_np(state, left, parent, parities)
        return
    _apply_answers(state, left, parent, parities)


def _apply_answers_np(state: U8, left: I64, parent: I64, parities: U8) -> None:
    v = (get(state, left) & 1) ^ (parities & 1)
    put(state, left, v)
    put(state, left + 1, get(state, parent) ^ v)


@njit
def _locate(leaf: Any, c: Any, keys: Any, mults: Any, out: Any) -> None:  # pragma: no cover
    n = c[0]
    for i in range(leaf.shape[1]):
        q, j = leaf[0, i], leaf[1, i]
        if q == 0:
            out[i] = j
            continue
        r = q - 1
        k = (keys[r, 0], keys[r, 1], keys[r, 2], keys[r, 3])
        m = (mults[r, 0], mults[r, 1], mults[r, 2], mults[r, 3])
        x = shuffle._rounds(np.uint64(j), c, k, m)
        while x >= n:
            x = shuffle._rounds(x, c, k, m)
        out[i] = np.int64(x)


def locate(leaf: I64, perms: list[shuffle.KeyedPermutation], args: Any) -> I64:
    """Key positions of the leaves ``leaf`` (rows pass, permuted position); pass ``q >= 1``
    is ordered by ``perms[q - 1]`` (``args``: :func:`shuffle.stacked_kernel_args` of them)."""
    if not JIT:
        out = np.empty(leaf.shape[1], dtype=np.int64)
        for q in np.unique(leaf[0]):
            sel = leaf[0] == q
            out[sel] = perms[q - 1].forward(leaf[1][sel]) if q else leaf[1][sel]
        return out
    out = np.empty(leaf.shape[1], dtype=np.int64)
    c, keys, mults, _ = args
    _locate(np.ascontiguousarray(leaf), c, keys, mults, out)
    return out


@njit
def _flip_all_passes(  # noqa: PLR0917  # pragma: no cover
    state: Any,
    pbase: Any,
    tops: Any,
    found: Any,
    c: Any,
    keys: Any,
    inv_mults: Any,
    out: Any,
    boff: Any,
    built: Any,
) -> None:
    n = c[0]
    for q in range(out.shape[0]):
        t = tops[q]
        if q:
            r = q - 1
            k = (keys[r, 0], keys[r, 1], keys[r, 2], keys[r, 3])
            m = (inv_mults[r, 0], inv_mults[r, 1], inv_mults[r, 2], inv_mults[r, 3])
        for i in range(found.shape[0]):
            x = found[i]
            if q:
                y = shuffle._rounds_inv(np.uint64(x), c, k, m)
                while y >= n:
                    y = shuffle._rounds_inv(y, c, k, m)
                x = np.int64(y)
            out[q, i] = x
            block, h = _leaf_slot(pbase[q], t, x)
            if not built[boff[q] + (x >> t)]:
                h = 1  # a block not built yet holds its root only
            while h:
                _toggle(state, block + h)
                h >>= 1


def flip_all_passes(  # noqa: PLR0917
    state: U8,
    pbase: I64,
    tops: I64,
    found: I64,
    perms: list[shuffle.KeyedPermutation],
    args: Any,
    boff: I64,
    built: U8,
) -> I64:
    """Toggle, in every pass, each ancestor of the flipped key positions ``found``
    (distinct) in a block built so far, or the block's root in a block not built
    (``built[boff[q] + b]``: block ``b`` of pass ``q`` is built); returns where they sit
    in every pass's order (row ``q``: pass ``q``)."""
    if not JIT:
        rows = [found] + [p.backward(found, check=False) for p in perms]
        permuted = np.stack(rows)
        _toggle_ancestors_np(state, pbase, tops, permuted, boff, built)
        return permuted
    out = np.empty((len(perms) + 1, found.shape[0]), dtype=np.int64)
    c, keys, _, inv_mults = args
    found = np.ascontiguousarray(found)
    _flip_all_passes(state, pbase, tops, found, c, keys, inv_mults, out, boff, built)
    return out


def smallest_odd(  # noqa: PLR0917
    state: U8, pbase: I64, tops: I64, k: I64, boff: I64, built: U8
) -> I64:
    """For each permuted position ``k[q, i]`` (pass ``q``), the smallest known odd node that
    contains it, if any, as rows (node id, pass, level, node index); in a block not built
    (``built`` as for :func:`flip_all_passes`) only the root is looked at."""
    k = np.ascontiguousarray(k, dtype=np.int64)
    if not JIT:
        return _smallest_odd_np(state, pbase, tops, k, boff, built)
    out = np.empty((4, k.shape[0] * k.shape[1]), dtype=np.int64)
    m = _smallest_odd(state, pbase, tops, k, out, boff, built)
    return out[:, :m]


def descend(state: U8, pbase: I64, tops: I64, n: int, search: I64) -> tuple[I64, I64]:
    """Move each search (rows node id, pass, level, node index) down through children of
    known parity. Returns the searches still waiting for a parity (same rows) and the
    leaves reached (rows pass, permuted position)."""
    search = np.ascontiguousarray(search, dtype=np.int64)
    if not JIT:
        return _descend_np(state, pbase, tops, n, search)
    keep = np.empty_like(search)
    leaf = np.empty((2, search.shape[1]), dtype=np.int64)
    kept, found = _descend(state, pbase, tops, n, search, keep, leaf)
    return keep[:, :kept], leaf[:, :found]


@njit
def _block_trees(  # noqa: PLR0917  # pragma: no cover
    leaves: Any, m: int, start: int, top: int, out: Any, pbase: int, flag: Any, buf: Any
) -> None:
    """Trees of the blocks of ``leaves[:m]``, the pass's bits from ``start`` (a multiple of
    2**top) on, as 2-bit states OR ``flag``; ``buf`` holds 2**(top + 1) bytes and
    ``buf[0] == 0``; ``top >= 1`` and ``pbase`` is a multiple of 4 (little-endian host)."""
    size = 1 << top
    words = buf.view(np.uint32)
    flag4 = np.uint32(flag) * np.uint32(0x01010101)
    for lo in range(0, m, size):
        k = min(size, m - lo)
        buf[size : size + k] = leaves[lo : lo + k]
        buf[size + k :] = 0  # past the key's end: no bit, even parity
        half = size >> 1
        while half:
            for i in range(half, 2 * half):
                buf[i] = buf[2 * i] ^ buf[2 * i + 1]
            half >>= 1
        base = (pbase + (((start + lo) >> top) << (top + 1))) >> 2
        # four node bytes (0/1 | flag) -> one byte of 2-bit fields, a 32-bit word at a time
        # (numba vectorises this; byte by byte it took 3/4 of the tree build)
        for w in range(size >> 1):
            v = words[w] | flag4
            out[base + w] = (v & 3) | ((v >> 6) & 0xC) | ((v >> 12) & 0x30) | ((v >> 18) & 0xC0)


@njit
def _pass_tree(leaves: Any, top: int, out: Any, pbase: int, flag: Any) -> None:  # pragma: no cover
    buf = np.zeros(2 << top, dtype=np.uint8)  # one block's tree, in L1 cache
    _block_trees(leaves, leaves.shape[0], 0, top, out, pbase, flag, buf)


@njit
def _permuted_blocks(  # noqa: PLR0917  # pragma: no cover
    packed: Any,
    c: Any,
    keys: Any,
    mults: Any,
    top: int,
    out: Any,
    pbase: int,
    flag: Any,
    blocks: Any,
) -> None:
    # shuffle._gather_batch and _block_trees a run of consecutive blocks (of at least 4096
    # bits) at a time: the permuted bits stay in cache instead of going through an n-byte
    # array, and small blocks share one batch.
    nn = np.int64(c[0])
    k, m = (keys[0], keys[1], keys[2], keys[3]), (mults[0], mults[1], mults[2], mults[3])
    size = np.int64(1) << top
    per_run = max(np.int64(1), np.int64(4096) >> top)
    chunk = per_run * size
    batch = np.empty(chunk, dtype=np.uint64)
    todo = np.empty(chunk, dtype=np.int64)
    leaves = np.empty(chunk, dtype=np.uint8)
    buf = np.zeros(2 * size, dtype=np.uint8)
    i = 0
    while i < blocks.shape[0]:
        first = blocks[i]
        run = 1
        while run < per_run and i + run < blocks.shape[0] and blocks[i + run] == first + run:
            run += 1
        start = first << top
        cnt = min(run * size, nn - start)
        shuffle._gather_batch(packed, c, k, m, start, batch, leaves[:cnt], todo)
        _block_trees(leaves, cnt, start, top, out, pbase, flag, buf)
        i += run


def permuted_blocks(  # noqa: PLR0917
    bits: U8,
    packed: U8,
    perm: shuffle.KeyedPermutation,
    top: int,
    out: U8,
    pbase: int,
    flag: int | np.uint8,
    blocks: I64,
) -> None:
    """Write the trees (parities OR ``flag``) of blocks ``blocks`` (distinct indices) of the
    pass ordered by ``perm`` with blocks of ``2**top`` bits, as :func:`pass_tree` would
    write them for ``perm.gather(bits)``; ``packed`` is ``np.packbits(bits)``."""
    blocks = np.ascontiguousarray(blocks, dtype=np.int64)
    if not JIT:
        _permuted_blocks_np(bits, perm, top, out, pbase, np.uint8(flag), blocks)
        return
    consts, keys, mults = perm.kernel_args
    _permuted_blocks(packed, consts, keys, mults, top, out, pbase, np.uint8(flag), blocks)


@njit
def _block_parities(  # noqa: PLR0917  # pragma: no cover
    bits: Any, c: Any, keys: Any, inv_mults: Any, tops: Any, offs: Any, out: Any
) -> None:
    # The key in batches: the positions of a batch's ones are listed branch-free once, and
    # for each pass q their permuted positions are computed (the inverse permutation
    # keys[q], inv_mults[q], branch-free first, as shuffle._gather_batch) and each toggles
    # the parity of its block: half the evaluations of a sweep over every bit, the key
    # read once and in order, and only the parities written at random, into one 64-bit
    # word per pass when it has at most 64 blocks (the check passes), else into
    # out[offs[q]:offs[q + 1]].
    nn = np.int64(c[0])
    size = 4096
    ones = np.empty(size, dtype=np.uint64)
    batch = np.empty(size, dtype=np.uint64)
    todo = np.empty(size, dtype=np.int64)
    passes = tops.shape[0]
    words = np.zeros(passes, dtype=np.uint64)
    one = np.uint64(1)
    for i0 in range(0, nn, size):
        end: Any = min(size, nn - i0)
        cnt = 0
        for j in range(end):
            ones[cnt] = np.uint64(i0 + j)
            cnt += bits[i0 + j]
        for q in range(passes):
            k = (keys[q, 0], keys[q, 1], keys[q, 2], keys[q, 3])
            m = (inv_mults[q, 0], inv_mults[q, 1], inv_mults[q, 2], inv_mults[q, 3])
            for j in range(cnt):
                batch[j] = shuffle._rounds_inv(ones[j], c, k, m)
            shuffle._walk_batch(batch, cnt, c, k, m, True, todo)
            shift = np.uint64(tops[q])
            if offs[q + 1] - offs[q] <= 64:
                word = words[q]
                for j in range(cnt):
                    word ^= one << (batch[j] >> shift)
                words[q] = word
            else:
                base = offs[q]
                for j in range(cnt):
                    out[base + np.int64(batch[j] >> shift)] ^= 1
    for q in range(passes):
        if offs[q + 1] - offs[q] <= 64:
            for b in range(offs[q + 1] - offs[q]):
                out[offs[q] + b] = (words[q] >> np.uint64(b)) & one


def block_parities(
    bits: U8, perms: Sequence[shuffle.KeyedPermutation], tops: Sequence[int]
) -> list[U8]:
    """Parities of the blocks of ``2**tops[q]`` bits of ``perms[q].gather(bits)`` (0/1
    bits) for each ``q``, without building the permuted keys or their trees."""
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    counts = [-(-bits.shape[0] // (1 << t)) for t in tops]
    if not JIT:
        return _block_parities_np(bits, perms, tops)
    offs = np.cumsum([0, *counts], dtype=np.int64)
    out = np.zeros(int(offs[-1]), dtype=np.uint8)
    if counts:
        consts, keys, _, inv_mults = shuffle.stacked_kernel_args(list(perms))
        tops_arr = np.asarray(tops, dtype=np.int64)
        _block_parities(bits, consts, keys, inv_mults, tops_arr, offs, out)
    return [out[offs[q] : offs[q + 1]] for q in range(len(counts))]


@njit
def _toggle_bits(packed: Any, pos: Any) -> None:  # pragma: no cover - jit
    for i in range(pos.shape[0]):
        x = pos[i]
        packed[x >> 3] ^= np.uint8(0x80) >> (x & 7)


def toggle_bits(packed: U8, pos: I64) -> None:
    """Flip bits ``pos`` (distinct) of a np.packbits array."""
    if not JIT:
        np.bitwise_xor.at(packed, pos >> 3, (np.uint8(0x80) >> (pos & 7).astype(np.uint8)))
        return
    _toggle_bits(packed, np.ascontiguousarray(pos, dtype=np.int64))


def pass_tree(leaves: U8, top: int, out: U8, pbase: int, flag: int | np.uint8) -> None:
    """Write the parities (OR ``flag``) of one pass tree into its blocks at ``out[pbase:]``
    (layout of :class:`qkdnode.postproc.cascade.TreeLayout`); ``leaves`` are the pass's
    bits (0/1) in its order."""
    leaves = np.ascontiguousarray(leaves, dtype=np.uint8)
    if not JIT:
        _pass_tree_np(leaves, top, out, pbase, np.uint8(flag))
        return
    _pass_tree(leaves, top, out, pbase, np.uint8(flag))


# --- numpy twins (no JIT available: see qkdnode.jit); same results, more slowly -------------


def _ancestors(pbase: I64, tops: I64, k: I64, q: int) -> I64:
    """Ids of the ancestors of ``k[q]`` in pass ``q``, one row per level (0 = the leaves)."""
    t = int(tops[q])
    x = k[q]
    block = pbase[q] + ((x >> t) << (t + 1))
    leaf = (1 << t) | (x & ((1 << t) - 1))
    levels = np.arange(t + 1, dtype=np.int64)[:, None]
    out: I64 = block[None, :] + (leaf[None, :] >> levels)
    return out


def _toggle_ancestors_np(  # noqa: PLR0917
    state: U8, pbase: I64, tops: I64, k: I64, boff: I64, built: U8
) -> None:
    parts = []
    for q in range(k.shape[0]):
        anc = _ancestors(pbase, tops, k, q)
        whole = built[boff[q] + (k[q] >> int(tops[q]))] != 0
        parts += [anc[:, whole].ravel(), anc[-1, ~whole]]  # unbuilt: the root only
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    np.bitwise_xor.at(state, flat >> 2, (np.uint8(1) << ((flat & 3) << 1).astype(np.uint8)))


def _smallest_odd_np(  # noqa: PLR0917
    state: U8, pbase: I64, tops: I64, k: I64, boff: I64, built: U8
) -> I64:
    rows = []
    for q in range(k.shape[0]):
        m = _ancestors(pbase, tops, k, q)
        odd = get(state, m.ravel()).reshape(m.shape) == 1
        odd[:-1, built[boff[q] + (k[q] >> int(tops[q]))] == 0] = False  # unbuilt: root only
        has = odd.any(axis=0)
        if not has.any():
            continue
        cols = np.flatnonzero(has)
        lvl = odd.argmax(axis=0)[has].astype(np.int64)
        ids = m[lvl, cols]
        rows.append(np.stack([ids, np.full(ids.shape[0], q), lvl, k[q][cols] >> lvl]))
    return np.concatenate(rows, axis=1) if rows else np.zeros((4, 0), np.int64)


def _descend_np(state: U8, pbase: I64, tops: I64, n: int, search: I64) -> tuple[I64, I64]:
    g, p, lv, j = (search[r].copy() for r in range(4))
    leaf_p: list[I64] = []
    leaf_j: list[I64] = []
    while g.size:
        leaf = lv == 0
        if leaf.any():
            leaf_p.append(p[leaf])
            leaf_j.append(j[leaf])
            keep = ~leaf
            g, p, lv, j = g[keep], p[keep], lv[keep], j[keep]
            if not g.size:
                break
        t = tops[p]
        block = pbase[p] + ((j >> (t - lv)) << (t + 1))
        cl = lv - 1
        left = j << 1
        gl = 2 * g - block
        sl = get(state, gl)
        right_empty = ((left + 1) << cl) >= n
        go_right = (sl == 0) & ~right_empty
        move = go_right | (sl == 1) | right_empty
        if not move.any():
            break
        if right_empty.any():
            put(state, gl[right_empty], np.uint8(1))  # the left child is the whole parent
        g = np.where(move, gl + go_right, g)
        lv = np.where(move, cl, lv)
        j = np.where(move, left + go_right, j)
    leaves = (
        np.stack([np.concatenate(leaf_p), np.concatenate(leaf_j)])
        if leaf_p
        else np.zeros((2, 0), np.int64)
    )
    return np.stack([g, p, lv, j]), leaves


def _block_parities_np(
    bits: U8, perms: Sequence[shuffle.KeyedPermutation], tops: Sequence[int]
) -> list[U8]:
    ones = np.flatnonzero(bits)
    return [
        (np.bincount(p.backward(ones, check=False) >> t, minlength=-(-p.n >> t)) & 1).astype(
            np.uint8
        )
        for p, t in zip(perms, tops, strict=True)
    ]


def _trees_np(cur: U8, top: int, flag: np.uint8) -> U8:
    """The packed 2-bit trees (rows of ``2**top // 2`` bytes) of the blocks ``cur`` (rows of
    ``2**top`` bits)."""
    size = 1 << top
    tree = np.zeros((cur.shape[0], 2 * size), dtype=np.uint8)
    tree[:, size:] = cur
    level: npt.NDArray[Any] = cur
    for lvl in range(1, top + 1):
        level = level[:, 0::2] ^ level[:, 1::2]
        tree[:, size >> lvl : size >> (lvl - 1)] = level
    four = (tree | flag).reshape(tree.shape[0], -1, 4)
    packed = four[..., 0] | (four[..., 1] << 2) | (four[..., 2] << 4) | (four[..., 3] << 6)
    return packed.astype(np.uint8, copy=False)


def _pass_tree_np(leaves: U8, top: int, out: U8, pbase: int, flag: np.uint8) -> None:
    size = 1 << top
    blocks = -(-leaves.shape[0] // size)
    cur = np.zeros(blocks * size, dtype=np.uint8)
    cur[: leaves.shape[0]] = leaves
    packed = _trees_np(cur.reshape(blocks, size), top, flag).ravel()
    out[pbase >> 2 : (pbase >> 2) + packed.shape[0]] = packed


def _permuted_blocks_np(  # noqa: PLR0917
    bits: U8,
    perm: shuffle.KeyedPermutation,
    top: int,
    out: U8,
    pbase: int,
    flag: np.uint8,
    blocks: I64,
) -> None:
    size = 1 << top
    pos = (blocks[:, None] << top) + np.arange(size, dtype=np.int64)[None, :]
    inside = pos < bits.shape[0]
    cur = np.zeros(pos.shape, dtype=np.uint8)
    cur[inside] = bits[perm.forward(pos[inside], check=False)]
    packed = _trees_np(cur, top, flag)
    first = (pbase + (blocks << (top + 1))) >> 2
    out[first[:, None] + np.arange(packed.shape[1], dtype=np.int64)[None, :]] = packed
