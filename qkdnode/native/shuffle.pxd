# Inline kernels of qkdnode.native.shuffle that qkdnode.native.cascade_kernels also compiles
# in (a cimport of this file copies them there: no call across extension modules).
from libc.stdint cimport int64_t, uint8_t, uint64_t

ctypedef struct Consts:
    uint64_t n      # permutation length
    uint64_t mask   # 2**k - 1
    uint64_t shift  # k // 2 + 1

# One permutation's constants, round keys and (inverse) multipliers, passed by value: the
# compiler keeps them in registers (through pointers it reloads them after every store,
# as an output array might alias them, and does not vectorise the round loop).
ctypedef struct Keyed:
    uint64_t n
    uint64_t mask
    uint64_t shift
    uint64_t k[4]
    uint64_t m[4]


cdef inline Keyed keyed(Consts c, const uint64_t* k, const uint64_t* m) noexcept nogil:
    cdef Keyed f
    cdef int r
    f.n, f.mask, f.shift = c.n, c.mask, c.shift
    for r in range(4):
        f.k[r] = k[r]
        f.m[r] = m[r]
    return f


cdef inline uint64_t rounds(uint64_t x, Keyed f) noexcept nogil:
    # qkdnode.postproc.shuffle._rounds
    x = ((x ^ f.k[0]) * f.m[0]) & f.mask
    x ^= x >> f.shift
    x = ((x ^ f.k[1]) * f.m[1]) & f.mask
    x ^= x >> f.shift
    x = ((x ^ f.k[2]) * f.m[2]) & f.mask
    x ^= x >> f.shift
    x = ((x ^ f.k[3]) * f.m[3]) & f.mask
    return x ^ (x >> f.shift)


cdef inline uint64_t rounds_inv(uint64_t x, Keyed f) noexcept nogil:
    # qkdnode.postproc.shuffle._rounds_inv (f.m: the inverse multipliers)
    x ^= x >> f.shift
    x = ((x * f.m[3]) & f.mask) ^ (f.k[3] & f.mask)
    x ^= x >> f.shift
    x = ((x * f.m[2]) & f.mask) ^ (f.k[2] & f.mask)
    x ^= x >> f.shift
    x = ((x * f.m[1]) & f.mask) ^ (f.k[1] & f.mask)
    x ^= x >> f.shift
    return ((x * f.m[0]) & f.mask) ^ (f.k[0] & f.mask)


cdef extern from "rounds.h":
    void qkd_rounds_batch(uint64_t i0, uint64_t* batch, int64_t size, uint64_t mask,
                          uint64_t shift, const uint64_t* k, const uint64_t* m) nogil
    void qkd_rounds_inv_batch(const uint64_t* pos, uint64_t* batch, int64_t size,
                              uint64_t mask, uint64_t shift, const uint64_t* k,
                              const uint64_t* m) nogil


cdef inline void walk_batch(
    uint64_t* batch, int64_t size, Keyed f, bint inverse, int64_t* todo
) noexcept nogil:
    # qkdnode.postproc.shuffle._walk_batch: the values >= n among batch[:size] walk on
    # along their cycles (rounds, or rounds_inv if inverse; f.m: the matching multipliers)
    # until they fall inside [0, n); todo: scratch of size int64. The out-of-range ones
    # are listed branch-free first, then walked.
    cdef int64_t j, t, cnt = 0
    cdef uint64_t x
    for j in range(size):
        todo[cnt] = j
        cnt += batch[j] >= f.n
    for t in range(cnt):
        j = todo[t]
        x = batch[j]
        while x >= f.n:
            x = rounds_inv(x, f) if inverse else rounds(x, f)
        batch[j] = x


cdef inline void gather_batch(
    const uint8_t* packed, Keyed f, int64_t i0, uint64_t* batch, uint8_t* dest, int64_t size,
    int64_t* todo
) noexcept nogil:
    # qkdnode.postproc.shuffle._gather_batch: dest[j] = bits[perm[i0 + j]], j < size
    # (its first loop, rounds(i0 + j) for every j, is qkd_rounds_batch in rounds.h; todo:
    # scratch of size int64 for walk_batch)
    cdef int64_t j
    cdef uint64_t x
    qkd_rounds_batch(<uint64_t>i0, batch, size, f.mask, f.shift, f.k, f.m)
    walk_batch(batch, size, f, False, todo)
    for j in range(size):
        x = batch[j]
        dest[j] = (packed[x >> 3] >> (7 - (x & 7))) & 1


cdef inline Consts consts_of(object c) except *:
    return Consts(int(c[0]), int(c[1]), int(c[2]))
