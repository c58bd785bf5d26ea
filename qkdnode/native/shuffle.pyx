# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Ahead-of-time twin of the compiled kernels of :mod:`qkdnode.postproc.shuffle`.

Same names, arguments and results as the ``@njit`` kernels there (each one a line-by-line
translation: update both together); :mod:`qkdnode.jit` puts these in their place when
numba cannot run. ``c`` is the ``(n, 2**k - 1, k // 2 + 1)`` constants tuple, ``k``/``m``
four round keys / multipliers (uint64).
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc


cdef inline void _four(object seq, uint64_t* dst) except *:
    cdef int r
    for r in range(4):
        dst[r] = int(seq[r])


def _rounds(x, c, k, m):
    """One evaluation of the 4-round bijection (uint64 in, uint64 out)."""
    cdef uint64_t kk[4]
    cdef uint64_t mm[4]
    _four(k, kk)
    _four(m, mm)
    return rounds(int(x), keyed(consts_of(c), kk, mm))


def _rounds_inv(x, c, k, inv_m):
    """The inverse of :func:`_rounds`."""
    cdef uint64_t kk[4]
    cdef uint64_t mm[4]
    _four(k, kk)
    _four(inv_m, mm)
    return rounds_inv(int(x), keyed(consts_of(c), kk, mm))


def _forward(const int64_t[:] idx, c, const uint64_t[::1] keys, const uint64_t[::1] mults,
             int64_t[:] out):
    cdef Keyed f = keyed(consts_of(c), &keys[0], &mults[0])
    cdef Py_ssize_t i
    cdef uint64_t x
    with nogil:
        for i in range(idx.shape[0]):
            x = rounds(<uint64_t>idx[i], f)
            while x >= f.n:  # cycle-walk back into [0, n)
                x = rounds(x, f)
            out[i] = <int64_t>x


def _backward(const int64_t[:] pos, c, const uint64_t[::1] keys, const uint64_t[::1] inv_mults,
              int64_t[:] out):
    cdef Keyed f = keyed(consts_of(c), &keys[0], &inv_mults[0])
    cdef Py_ssize_t i
    cdef uint64_t x
    with nogil:
        for i in range(pos.shape[0]):
            x = rounds_inv(<uint64_t>pos[i], f)
            while x >= f.n:
                x = rounds_inv(x, f)
            out[i] = <int64_t>x


def _walk_batch(uint64_t[::1] batch, int64_t size, c, k, m, bint inverse,
                int64_t[::1] todo):
    """Walk the values ``>= n`` among ``batch[:size]`` on along their cycles until they fall
    inside ``[0, n)`` (``m``: the inverse multipliers if ``inverse``); ``todo`` is scratch
    of ``size`` int64. ValueError if ``batch`` or ``todo`` holds fewer than ``size``."""
    cdef uint64_t kk[4]
    cdef uint64_t mm[4]
    _four(k, kk)
    _four(m, mm)
    if size < 0 or size > batch.shape[0] or size > todo.shape[0]:
        raise ValueError(f"size {size}: batch holds {batch.shape[0]}, todo {todo.shape[0]}")
    cdef Keyed f = keyed(consts_of(c), kk, mm)
    if size == 0:
        return
    with nogil:
        walk_batch(&batch[0], size, f, inverse, &todo[0])


def _gather_batch(const uint8_t[::1] packed, c, k, m, int64_t i0, uint64_t[::1] batch,
                  uint8_t[::1] dest, int64_t[::1] todo):
    """``dest[j] = bits[perm[i0 + j]]`` for ``j < dest.shape[0] <= batch.shape[0]``
    (``todo``: scratch of as many int64). ValueError if ``batch`` or ``todo`` is shorter
    than ``dest``."""
    cdef uint64_t kk[4]
    cdef uint64_t mm[4]
    _four(k, kk)
    _four(m, mm)
    if dest.shape[0] > batch.shape[0] or dest.shape[0] > todo.shape[0]:
        raise ValueError(
            f"dest holds {dest.shape[0]} > batch {batch.shape[0]} or todo {todo.shape[0]}"
        )
    cdef Keyed f = keyed(consts_of(c), kk, mm)
    if dest.shape[0] == 0:
        return
    with nogil:
        gather_batch(&packed[0], f, i0, &batch[0], &dest[0], dest.shape[0], &todo[0])


def _gather(const uint8_t[::1] packed, c, const uint64_t[::1] keys, const uint64_t[::1] mults,
            uint8_t[::1] out):
    cdef Keyed f = keyed(consts_of(c), &keys[0], &mults[0])
    cdef int64_t chunk = 4096, i0, size, total = out.shape[0]
    cdef uint64_t* batch
    cdef int64_t* todo
    if total == 0:
        return
    batch = <uint64_t*>malloc(chunk * sizeof(uint64_t))
    todo = <int64_t*>malloc(chunk * sizeof(int64_t))
    if batch == NULL or todo == NULL:
        free(batch)
        free(todo)
        raise MemoryError()
    with nogil:
        i0 = 0
        while i0 < total:
            size = min(chunk, total - i0)
            gather_batch(&packed[0], f, i0, batch, &out[i0], size, todo)
            i0 += chunk
    free(batch)
    free(todo)
