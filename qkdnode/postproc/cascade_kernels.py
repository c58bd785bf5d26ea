"""Compiled per-round steps of Bob's Cascade (:class:`qkdnode.postproc.cascade.CascadeCorrector`).

Each loop walks one search or one flipped bit through the pass trees; numpy versions of the
same steps spent most of their time in temporaries (about 1 ms per round at 1e7 bits, a few
hundred rounds per block). Node ids, the state encoding and ``base`` are those of
:class:`qkdnode.postproc.cascade.TreeLayout`: node ``(p, level, j)`` is
``base[p, level] + j``; ``state`` bit 1 set = Alice's parity unknown, else bit 0 = odd.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from qkdnode.jit import JIT, njit

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


@njit
def _toggle_ancestors(state: Any, base: Any, tops: Any, k: Any) -> None:  # pragma: no cover
    for q in range(k.shape[0]):
        for i in range(k.shape[1]):
            x = k[q, i]
            for lvl in range(tops[q] + 1):
                state[base[q, lvl] + (x >> lvl)] ^= 1


@njit
def _smallest_odd(state: Any, base: Any, tops: Any, k: Any, out: Any) -> int:  # pragma: no cover
    m = 0
    for q in range(k.shape[0]):
        for i in range(k.shape[1]):
            x = k[q, i]
            for lvl in range(tops[q] + 1):
                node = base[q, lvl] + (x >> lvl)
                if state[node] == 1:
                    out[0, m] = node
                    out[1, m] = q
                    out[2, m] = lvl
                    out[3, m] = x >> lvl
                    m += 1
                    break
    return m


@njit
def _descend(  # noqa: PLR0917  # pragma: no cover
    state: Any, base: Any, n: int, search: Any, keep: Any, leaf: Any
) -> tuple[int, int]:
    kept = 0
    found = 0
    for s in range(search.shape[1]):
        g, p, lv, j = search[0, s], search[1, s], search[2, s], search[3, s]
        while True:
            if lv == 0:
                leaf[0, found] = p
                leaf[1, found] = j
                found += 1
                break
            cl = lv - 1
            left = j << 1
            gl = base[p, cl] + left
            if ((left + 1) << cl) >= n:
                state[gl] = 1  # no right child: the left one is the whole (odd) parent
                g, lv, j = gl, cl, left
                continue
            sl = state[gl]
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


def toggle_ancestors(state: U8, base: I64, tops: I64, k: I64) -> None:
    """Toggle the parity of every ancestor (all levels) of permuted position ``k[q, i]`` in
    pass ``q``, once per entry: the effect of flipping those bits on Bob's pass trees."""
    k = np.ascontiguousarray(k, dtype=np.int64)
    if not JIT:
        _toggle_ancestors_np(state, base, tops, k)
        return
    _toggle_ancestors(state, base, tops, k)


def smallest_odd(state: U8, base: I64, tops: I64, k: I64) -> I64:
    """For each permuted position ``k[q, i]`` (pass ``q``), the smallest known odd node that
    contains it, if any, as rows (node id, pass, level, node index)."""
    k = np.ascontiguousarray(k, dtype=np.int64)
    if not JIT:
        return _smallest_odd_np(state, base, tops, k)
    out = np.empty((4, k.shape[0] * k.shape[1]), dtype=np.int64)
    m = _smallest_odd(state, base, tops, k, out)
    return out[:, :m]


def descend(state: U8, base: I64, n: int, search: I64) -> tuple[I64, I64]:
    """Move each search (rows node id, pass, level, node index) down through children of
    known parity. Returns the searches still waiting for a parity (same rows) and the
    leaves reached (rows pass, permuted position)."""
    search = np.ascontiguousarray(search, dtype=np.int64)
    if not JIT:
        return _descend_np(state, base, n, search)
    keep = np.empty_like(search)
    leaf = np.empty((2, search.shape[1]), dtype=np.int64)
    kept, found = _descend(state, base, n, search, keep, leaf)
    return keep[:, :kept], leaf[:, :found]


@njit
def _pass_tree(leaves: Any, top: int, out: Any, base: Any, flag: Any) -> None:  # pragma: no cover
    n = leaves.shape[0]
    b0 = base[0]
    for i in range(n):
        out[b0 + i] = leaves[i] | flag
    count = n
    for lvl in range(1, top + 1):
        lo, hi = base[lvl - 1], base[lvl]
        half = (count + 1) >> 1
        for j in range(half):
            v = out[lo + 2 * j]
            if 2 * j + 1 < count:
                v ^= out[lo + 2 * j + 1]
            out[hi + j] = (v & 1) | flag
        count = half


def pass_tree(leaves: U8, top: int, out: U8, base: I64, flag: int | np.uint8) -> None:
    """Write the parities of levels ``0..top`` of one pass tree (OR ``flag``) into
    ``out[base[level] : base[level] + ceil(n / 2**level)]``; ``leaves`` are the pass's bits
    in its order."""
    leaves = np.ascontiguousarray(leaves, dtype=np.uint8)
    if not JIT:
        _pass_tree_np(leaves, top, out, base, np.uint8(flag))
        return
    _pass_tree(leaves, top, out, base, np.uint8(flag))


# --- numpy twins (no JIT available: see qkdnode.jit); same results, more slowly -------------


def _ancestors(base: I64, tops: I64, k: I64, q: int) -> I64:
    levels = np.arange(int(tops[q]) + 1, dtype=np.int64)[:, None]
    out: I64 = base[q, : int(tops[q]) + 1, None] + (k[q][None, :] >> levels)
    return out


def _toggle_ancestors_np(state: U8, base: I64, tops: I64, k: I64) -> None:
    flat = np.concatenate([_ancestors(base, tops, k, q).ravel() for q in range(k.shape[0])])
    ids, counts = np.unique(flat, return_counts=True)
    state[ids[(counts & 1) == 1]] ^= 1


def _smallest_odd_np(state: U8, base: I64, tops: I64, k: I64) -> I64:
    rows = []
    for q in range(k.shape[0]):
        m = _ancestors(base, tops, k, q)
        odd = state[m] == 1
        has = odd.any(axis=0)
        if not has.any():
            continue
        lvl = odd.argmax(axis=0)[has].astype(np.int64)
        ids = m[lvl, np.flatnonzero(has)]
        rows.append(np.stack([ids, np.full(ids.shape[0], q), lvl, ids - base[q, lvl]]))
    return np.concatenate(rows, axis=1) if rows else np.zeros((4, 0), np.int64)


def _descend_np(state: U8, base: I64, n: int, search: I64) -> tuple[I64, I64]:
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
        cl = lv - 1
        left = j << 1
        gl = base[p, cl] + left
        sl = state[gl]
        right_empty = ((left + 1) << cl) >= n
        go_right = (sl == 0) & ~right_empty
        move = go_right | (sl == 1) | right_empty
        if not move.any():
            break
        if right_empty.any():
            state[gl[right_empty]] = 1  # the left child is the whole (odd) parent
        g = np.where(move, gl + go_right, g)
        lv = np.where(move, cl, lv)
        j = np.where(move, left + go_right, j)
    leaves = (
        np.stack([np.concatenate(leaf_p), np.concatenate(leaf_j)])
        if leaf_p
        else np.zeros((2, 0), np.int64)
    )
    return np.stack([g, p, lv, j]), leaves


def _pass_tree_np(leaves: U8, top: int, out: U8, base: I64, flag: np.uint8) -> None:
    cur = leaves
    for lvl in range(top + 1):
        if lvl:
            if cur.shape[0] & 1:
                cur = np.append(cur, np.uint8(0))
            cur = cur[0::2] ^ cur[1::2]
        b = int(base[lvl])
        np.bitwise_or(cur, flag, out=out[b : b + cur.shape[0]])
