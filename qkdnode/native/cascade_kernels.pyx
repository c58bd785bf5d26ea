# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Ahead-of-time twin of the compiled kernels of :mod:`qkdnode.postproc.cascade_kernels`.

Same names, arguments and results as the ``@njit`` kernels there (each one a line-by-line
translation, same node ids and 2-bit state encoding: update both together);
:mod:`qkdnode.jit` puts these in their place when numba cannot run. Arrays are int64 node
ids / positions and uint8 state bytes; ``c``/``keys``/``mults`` as in
:func:`qkdnode.postproc.shuffle.stacked_kernel_args`.
"""

import numpy as np

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from qkdnode.native.shuffle cimport (
    Consts,
    Keyed,
    consts_of,
    gather_batch,
    keyed,
    qkd_rounds_inv_batch,
    rounds,
    rounds_inv,
    walk_batch,
)


# --- 2-bit node states, four per byte ------------------------------------------------------

cdef inline int c_get(uint8_t* state, int64_t x) noexcept nogil:
    return (state[x >> 2] >> ((x & 3) << 1)) & 3


cdef inline void c_put(uint8_t* state, int64_t x, int v) noexcept nogil:
    cdef int sh = (x & 3) << 1
    state[x >> 2] = (state[x >> 2] & ~(3 << sh)) | (v << sh)


cdef inline void c_toggle(uint8_t* state, int64_t x) noexcept nogil:
    state[x >> 2] ^= 1 << ((x & 3) << 1)


cdef inline void c_leaf_slot(int64_t pbase, int64_t t, int64_t x, int64_t* block,
                             int64_t* h) noexcept nogil:
    block[0] = pbase + ((x >> t) << (t + 1))
    h[0] = (1 << t) | (x & ((1 << t) - 1))


def _get(uint8_t[::1] state, int64_t x):
    cdef uint8_t* st = &state[0]
    return c_get(st, x)


def _put(uint8_t[::1] state, int64_t x, int v):
    cdef uint8_t* st = &state[0]
    c_put(st, x, v)


def _toggle(uint8_t[::1] state, int64_t x):
    cdef uint8_t* st = &state[0]
    c_toggle(st, x)


def _leaf_slot(int64_t pbase, int64_t t, int64_t x):
    cdef int64_t block, h
    c_leaf_slot(pbase, t, x, &block, &h)
    return block, h


# --- Alice's lookups and Bob's rounds ------------------------------------------------------

def _get_many(uint8_t[::1] state, ids, uint8_t[:] out):
    cdef uint8_t* st = &state[0]
    cdef const int64_t[:] idv = np.asarray(ids, dtype=np.int64)
    cdef Py_ssize_t i
    with nogil:
        for i in range(idv.shape[0]):
            out[i] = c_get(st, idv[i])


def _put_many(uint8_t[::1] state, const int64_t[:] ids, const uint8_t[:] values):
    cdef uint8_t* st = &state[0]
    cdef Py_ssize_t i
    with nogil:
        for i in range(ids.shape[0]):
            c_put(st, ids[i], values[i])


def _smallest_odd(uint8_t[::1] state, const int64_t[:] pbase, const int64_t[:] tops,
                  const int64_t[:, :] k, int64_t[:, :] out, const int64_t[:] boff,
                  const uint8_t[:] built):
    cdef uint8_t* st = &state[0]
    cdef int64_t m = 0, t, x, block, h, lvl
    cdef Py_ssize_t q, i
    with nogil:
        for q in range(k.shape[0]):
            t = tops[q]
            for i in range(k.shape[1]):
                x = k[q, i]
                c_leaf_slot(pbase[q], t, x, &block, &h)
                lvl = 0
                if not built[boff[q] + (x >> t)]:  # only the block's root is known there
                    h, lvl = 1, t
                while h:
                    if c_get(st, block + h) == 1:
                        out[0, m] = block + h
                        out[1, m] = q
                        out[2, m] = lvl
                        out[3, m] = x >> lvl
                        m += 1
                        break
                    h >>= 1
                    lvl += 1
    return m


def _descend(uint8_t[::1] state, const int64_t[:] pbase, const int64_t[:] tops, int64_t n,
             const int64_t[:, :] search, int64_t[:, :] keep, int64_t[:, :] leaf):
    cdef uint8_t* st = &state[0]
    cdef int64_t kept = 0, found = 0, g, p, lv, j, t, block, cl, left, gl
    cdef int sl
    cdef Py_ssize_t s
    with nogil:
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
                    c_put(st, gl, 1)  # no right child: the left one is the whole parent
                    g, lv, j = gl, cl, left
                    continue
                sl = c_get(st, gl)
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


ctypedef fused index_t:
    int32_t
    int64_t
    uint32_t
    uint64_t


def _unbuilt_blocks(const index_t[:] ids, const int64_t[:] pbase, const int64_t[:] tops,
                    const int64_t[:] boff, uint8_t[:] built, int64_t first, int64_t[:] out):
    # ids: node ids of any of these integer types (numba compiles one version per type)
    cdef int64_t m = 0, last = pbase.shape[0] - 1, x, q, g
    cdef Py_ssize_t i
    with nogil:
        for i in range(ids.shape[0]):
            x = <int64_t>ids[i]
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


def _distinct_searches(uint8_t[::1] state, const int64_t[:, :] s, int64_t[:, :] out):
    cdef uint8_t* st = &state[0]
    cdef int64_t m = 0, g
    cdef Py_ssize_t i, r
    with nogil:
        for i in range(s.shape[1]):
            g = s[0, i]
            if c_get(st, g) != 1:
                continue
            c_put(st, g, 0)
            for r in range(4):
                out[r, m] = s[r, i]
            m += 1
        for i in range(m):
            c_put(st, out[0, i], 1)
    return m


def _odd_searches(uint8_t[::1] state, const int64_t[:, :] s, int64_t[:, :] out):
    cdef uint8_t* st = &state[0]
    cdef int64_t m = 0
    cdef Py_ssize_t i, r
    with nogil:
        for i in range(s.shape[1]):
            if c_get(st, s[0, i]) == 1:
                for r in range(4):
                    out[r, m] = s[r, i]
                m += 1
    return m


def _left_children(const int64_t[:] pbase, const int64_t[:] tops, const int64_t[:, :] s,
                   int64_t[:] out):
    cdef int64_t g, p, lv, j, t
    cdef Py_ssize_t i
    with nogil:
        for i in range(s.shape[1]):
            g, p, lv, j = s[0, i], s[1, i], s[2, i], s[3, i]
            t = tops[p]
            out[i] = 2 * g - (pbase[p] + ((j >> (t - lv)) << (t + 1)))


def _apply_answers(uint8_t[::1] state, const int64_t[:] left, const int64_t[:] parent,
                   const uint8_t[:] parities):
    cdef uint8_t* st = &state[0]
    cdef int64_t gl
    cdef int v
    cdef Py_ssize_t i
    with nogil:
        for i in range(left.shape[0]):
            gl = left[i]
            v = (c_get(st, gl) & 1) ^ (parities[i] & 1)
            c_put(st, gl, v)
            c_put(st, gl + 1, c_get(st, parent[i]) ^ v)


def _locate(const int64_t[:, :] leaf, c, const uint64_t[:, ::1] keys,
            const uint64_t[:, ::1] mults, int64_t[:] out):
    cdef Consts cc = consts_of(c)
    cdef int64_t q, j, r
    cdef uint64_t x
    cdef Keyed f
    cdef Py_ssize_t i
    with nogil:
        for i in range(leaf.shape[1]):
            q, j = leaf[0, i], leaf[1, i]
            if q == 0:
                out[i] = j
                continue
            r = q - 1
            f = keyed(cc, &keys[r, 0], &mults[r, 0])
            x = rounds(<uint64_t>j, f)
            while x >= f.n:
                x = rounds(x, f)
            out[i] = <int64_t>x


def _flip_all_passes(uint8_t[::1] state, const int64_t[:] pbase, const int64_t[:] tops,
                     const int64_t[:] found, c, const uint64_t[:, ::1] keys,
                     const uint64_t[:, ::1] inv_mults, int64_t[:, :] out,
                     const int64_t[:] boff, const uint8_t[:] built):
    cdef uint8_t* st = &state[0]
    cdef Consts cc = consts_of(c)
    cdef int64_t t, x, r = 0, block, h
    cdef uint64_t y
    cdef Keyed f
    cdef Py_ssize_t q, i
    with nogil:
        for q in range(out.shape[0]):
            t = tops[q]
            if q:
                r = q - 1
                f = keyed(cc, &keys[r, 0], &inv_mults[r, 0])
            for i in range(found.shape[0]):
                x = found[i]
                if q:
                    y = rounds_inv(<uint64_t>x, f)
                    while y >= f.n:
                        y = rounds_inv(y, f)
                    x = <int64_t>y
                out[q, i] = x
                c_leaf_slot(pbase[q], t, x, &block, &h)
                if not built[boff[q] + (x >> t)]:
                    h = 1  # a block not built yet holds its root only
                while h:
                    c_toggle(st, block + h)
                    h >>= 1


# --- pass trees ----------------------------------------------------------------------------

cdef void c_block_trees(const uint8_t* leaves, int64_t m, int64_t start, int64_t top,
                        uint8_t* out, int64_t pbase, uint8_t flag, uint8_t* buf) noexcept nogil:
    # Trees of the blocks of leaves[:m] (see the numba source for the contract); buf holds
    # 2**(top + 1) bytes, buf[0] == 0, top >= 1, pbase a multiple of 4, little-endian host.
    cdef int64_t size = 1 << top, lo, k, half, i, base, w
    cdef uint32_t flag4 = (<uint32_t>flag) * 0x01010101u, v
    lo = 0
    while lo < m:
        k = min(size, m - lo)
        memcpy(buf + size, leaves + lo, k)
        memset(buf + size + k, 0, size - k)  # past the key's end: no bit, even parity
        half = size >> 1
        while half:
            for i in range(half, 2 * half):
                buf[i] = buf[2 * i] ^ buf[2 * i + 1]
            half >>= 1
        base = (pbase + (((start + lo) >> top) << (top + 1))) >> 2
        # four node bytes (0/1 | flag) -> one byte of 2-bit fields, a 32-bit word at a time
        for w in range(size >> 1):
            memcpy(&v, buf + 4 * w, 4)
            v = v | flag4
            out[base + w] = (v & 3) | ((v >> 6) & 0xC) | ((v >> 12) & 0x30) | ((v >> 18) & 0xC0)
        lo += size


def _block_trees(const uint8_t[::1] leaves, int64_t m, int64_t start, int64_t top,
                 uint8_t[::1] out, int64_t pbase, uint8_t flag, uint8_t[::1] buf):
    """Trees of the blocks of ``leaves[:m]``, the pass's bits from ``start`` on (see the
    numba kernel for the contract)."""
    if m > leaves.shape[0] or buf.shape[0] < (2 << top):
        raise ValueError("leaves or buf too short")
    if m <= 0:
        return
    with nogil:
        c_block_trees(&leaves[0], m, start, top, &out[0], pbase, flag, &buf[0])


def _pass_tree(const uint8_t[::1] leaves, int64_t top, uint8_t[::1] out, int64_t pbase,
               uint8_t flag):
    cdef uint8_t* buf
    if leaves.shape[0] == 0:
        return
    buf = <uint8_t*>calloc(2 << top, 1)  # one block's tree, in L1 cache
    if buf == NULL:
        raise MemoryError()
    with nogil:
        c_block_trees(&leaves[0], leaves.shape[0], 0, top, &out[0], pbase, flag, buf)
    free(buf)


def _permuted_blocks(const uint8_t[::1] packed, c, const uint64_t[::1] keys,
                     const uint64_t[::1] mults, int64_t top, uint8_t[::1] out, int64_t pbase,
                     uint8_t flag, const int64_t[:] blocks):
    # shuffle._gather_batch and _block_trees a run of consecutive blocks (of at least 4096
    # bits) at a time: the permuted bits stay in cache instead of going through an n-byte
    # array, and small blocks share one batch.
    cdef Keyed f = keyed(consts_of(c), &keys[0], &mults[0])
    cdef int64_t nn = <int64_t>f.n, size = (<int64_t>1) << top
    cdef int64_t per_run = max(<int64_t>1, (<int64_t>4096) >> top), chunk = per_run * size
    cdef int64_t i = 0, first, run, start, cnt
    cdef uint64_t* batch
    cdef int64_t* todo
    cdef uint8_t* leaves
    cdef uint8_t* buf
    if blocks.shape[0] == 0:
        return
    batch = <uint64_t*>malloc(chunk * sizeof(uint64_t))
    todo = <int64_t*>malloc(chunk * sizeof(int64_t))
    leaves = <uint8_t*>malloc(chunk)
    buf = <uint8_t*>calloc(2 * size, 1)
    if batch == NULL or todo == NULL or leaves == NULL or buf == NULL:
        free(batch)
        free(todo)
        free(leaves)
        free(buf)
        raise MemoryError()
    with nogil:
        while i < blocks.shape[0]:
            first = blocks[i]
            run = 1
            while run < per_run and i + run < blocks.shape[0] and blocks[i + run] == first + run:
                run += 1
            start = first << top
            cnt = min(run * size, nn - start)
            gather_batch(&packed[0], f, start, batch, leaves, cnt, todo)
            c_block_trees(leaves, cnt, start, top, &out[0], pbase, flag, buf)
            i += run
    free(batch)
    free(todo)
    free(leaves)
    free(buf)


def _block_parities(const uint8_t[:] bits, c, const uint64_t[:, ::1] keys,
                    const uint64_t[:, ::1] inv_mults, const int64_t[:] tops,
                    const int64_t[:] offs, uint8_t[:] out):
    # The key in batches: the positions of a batch's ones are listed branch-free once, and
    # for each pass q their permuted positions are computed (the inverse permutation
    # keys[q], inv_mults[q], branch-free first, as shuffle._gather_batch) and each toggles
    # the parity of its block; into one 64-bit word per pass when it has at most 64 blocks
    # (the check passes), else into out[offs[q]:offs[q + 1]] (see the numba kernel).
    cdef Consts cc = consts_of(c)
    cdef int64_t nn = <int64_t>cc.n, size = 4096, passes = tops.shape[0]
    cdef int64_t i0, end, cnt, j, q, b, base
    cdef uint64_t shift, word, one = 1
    cdef Keyed f
    cdef uint64_t* ones
    cdef uint64_t* batch
    cdef int64_t* todo
    cdef uint64_t* words
    if passes == 0:
        return
    ones = <uint64_t*>malloc(size * sizeof(uint64_t))
    batch = <uint64_t*>malloc(size * sizeof(uint64_t))
    todo = <int64_t*>malloc(size * sizeof(int64_t))
    words = <uint64_t*>calloc(passes, sizeof(uint64_t))
    if ones == NULL or batch == NULL or todo == NULL or words == NULL:
        free(ones)
        free(batch)
        free(todo)
        free(words)
        raise MemoryError()
    with nogil:
        i0 = 0
        while i0 < nn:
            end = min(size, nn - i0)
            cnt = 0
            for j in range(end):
                ones[cnt] = <uint64_t>(i0 + j)
                cnt += bits[i0 + j]
            for q in range(passes):
                f = keyed(cc, &keys[q, 0], &inv_mults[q, 0])
                # batch[j] = rounds_inv(ones[j]) for j < cnt (vectorised: rounds.h)
                qkd_rounds_inv_batch(ones, batch, cnt, f.mask, f.shift, f.k, f.m)
                walk_batch(batch, cnt, f, True, todo)
                shift = <uint64_t>tops[q]
                if offs[q + 1] - offs[q] <= 64:
                    word = words[q]
                    for j in range(cnt):
                        word ^= one << (batch[j] >> shift)
                    words[q] = word
                else:
                    base = offs[q]
                    for j in range(cnt):
                        out[base + <int64_t>(batch[j] >> shift)] ^= 1
            i0 += size
        for q in range(passes):
            if offs[q + 1] - offs[q] <= 64:
                for b in range(offs[q + 1] - offs[q]):
                    out[offs[q] + b] = (words[q] >> <uint64_t>b) & one
    free(ones)
    free(batch)
    free(todo)
    free(words)


def _toggle_bits(uint8_t[::1] packed, const int64_t[:] pos):
    cdef int64_t x
    cdef Py_ssize_t i
    with nogil:
        for i in range(pos.shape[0]):
            x = pos[i]
            packed[x >> 3] ^= (<uint8_t>0x80) >> (x & 7)
