# Inline kernels of qkdnode.native.shuffle that qkdnode.native.cascade_kernels also compiles
# in (a cimport of this file copies them there: no call across extension modules).
from libc.stdint cimport int64_t, uint8_t, uint64_t

ctypedef struct Consts:
    uint64_t n      # permutation length
    uint64_t mask   # 2**k - 1
    uint64_t shift  # k // 2 + 1


cdef inline uint64_t rounds(uint64_t x, Consts c, const uint64_t* k, const uint64_t* m) noexcept nogil:
    # qkdnode.postproc.shuffle._rounds
    x = ((x ^ k[0]) * m[0]) & c.mask
    x ^= x >> c.shift
    x = ((x ^ k[1]) * m[1]) & c.mask
    x ^= x >> c.shift
    x = ((x ^ k[2]) * m[2]) & c.mask
    x ^= x >> c.shift
    x = ((x ^ k[3]) * m[3]) & c.mask
    return x ^ (x >> c.shift)


cdef inline uint64_t rounds_inv(uint64_t x, Consts c, const uint64_t* k, const uint64_t* inv_m) noexcept nogil:
    # qkdnode.postproc.shuffle._rounds_inv
    x ^= x >> c.shift
    x = ((x * inv_m[3]) & c.mask) ^ (k[3] & c.mask)
    x ^= x >> c.shift
    x = ((x * inv_m[2]) & c.mask) ^ (k[2] & c.mask)
    x ^= x >> c.shift
    x = ((x * inv_m[1]) & c.mask) ^ (k[1] & c.mask)
    x ^= x >> c.shift
    return ((x * inv_m[0]) & c.mask) ^ (k[0] & c.mask)


cdef inline void gather_batch(
    const uint8_t* packed, Consts c, const uint64_t* k, const uint64_t* m,
    int64_t i0, uint64_t* batch, uint8_t* dest, int64_t size,
) noexcept nogil:
    # qkdnode.postproc.shuffle._gather_batch: dest[j] = bits[perm[i0 + j]], j < size
    cdef int64_t j
    cdef uint64_t x
    for j in range(size):
        batch[j] = rounds(<uint64_t>(i0 + j), c, k, m)
    for j in range(size):
        x = batch[j]
        while x >= c.n:
            x = rounds(x, c, k, m)
        dest[j] = (packed[x >> 3] >> (7 - (x & 7))) & 1


cdef inline Consts consts_of(object c) except *:
    return Consts(int(c[0]), int(c[1]), int(c[2]))
