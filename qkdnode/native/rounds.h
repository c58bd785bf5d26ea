/* The round loops of qkdnode.native.shuffle's gather_batch (qkdnode.postproc.shuffle._rounds
 * over consecutive positions) and of qkdnode.native.cascade_kernels' _block_parities
 * (_rounds_inv over a list of positions), compiled several times for the CPU's vector extensions and
 * chosen by the dynamic loader when the module loads (GCC/Clang target_clones, an ifunc:
 * no run-time code generation). numba vectorises the same loop for the CPU it runs on; a
 * build for the generic x86-64 instruction set alone has no 64-bit vector multiply and ran
 * at 2/3 of its speed. Elsewhere the loop is compiled once, for the generic target. */
#ifndef QKDNODE_ROUNDS_H
#define QKDNODE_ROUNDS_H

#include <stdint.h>

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define QKD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef QKD_CLONES
#define QKD_CLONES
#endif
/* each module that includes this header uses only some of the loops */
#if defined(__GNUC__)
#define QKD_MAYBE_UNUSED __attribute__((unused))
#else
#define QKD_MAYBE_UNUSED
#endif

/* batch[j] = rounds(i0 + j) for j < size; k, m: the four round keys and multipliers */
QKD_CLONES QKD_MAYBE_UNUSED static void
qkd_rounds_batch(uint64_t i0, uint64_t* batch, int64_t size, uint64_t mask, uint64_t shift,
                 const uint64_t* k, const uint64_t* m) {
    const uint64_t k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3];
    const uint64_t m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3];
    for (int64_t j = 0; j < size; j++) {
        uint64_t x = i0 + (uint64_t)j;
        x = ((x ^ k0) * m0) & mask;
        x ^= x >> shift;
        x = ((x ^ k1) * m1) & mask;
        x ^= x >> shift;
        x = ((x ^ k2) * m2) & mask;
        x ^= x >> shift;
        x = ((x ^ k3) * m3) & mask;
        batch[j] = x ^ (x >> shift);
    }
}

/* batch[j] = rounds_inv(pos[j]) for j < size; k, m: the four round keys and inverse
 * multipliers (qkdnode.postproc.shuffle._rounds_inv, same order of operations) */
QKD_CLONES QKD_MAYBE_UNUSED static void
qkd_rounds_inv_batch(const uint64_t* pos, uint64_t* batch, int64_t size, uint64_t mask,
                     uint64_t shift, const uint64_t* k, const uint64_t* m) {
    const uint64_t k0 = k[0] & mask, k1 = k[1] & mask, k2 = k[2] & mask, k3 = k[3] & mask;
    const uint64_t m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3];
    for (int64_t j = 0; j < size; j++) {
        uint64_t x = pos[j];
        x ^= x >> shift;
        x = ((x * m3) & mask) ^ k3;
        x ^= x >> shift;
        x = ((x * m2) & mask) ^ k2;
        x ^= x >> shift;
        x = ((x * m1) & mask) ^ k1;
        x ^= x >> shift;
        batch[j] = ((x * m0) & mask) ^ k0;
    }
}

#endif
