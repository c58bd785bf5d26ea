# cython: language_level=3
"""Products of bit-packed binary polynomials (Karatsuba over PCLMULQDQ or a portable word
product), the core of privacy amplification's Toeplitz hash (``qkdnode.postproc.toeplitz``).

Polynomials are uint64 arrays, the coefficient of z^j in bit j % 64 of word j // 64. The
C code is in ``gf2_clmul.h``; whether the CPU has PCLMULQDQ is checked at run time, and
both base cases compute the same exact product.
"""

from libc.stdint cimport uint64_t


cdef extern from "gf2_clmul.h" nogil:
    int gf2_have_clmul()
    int gf2_window_product(const uint64_t *s, size_t ns, const uint64_t *x, size_t nx,
                           size_t L, size_t w0, size_t w1, uint64_t *out, int use_clmul)
    int GF2_BASE_WORDS


#: Karatsuba's schoolbook base case, in words.
BASE_WORDS = GF2_BASE_WORDS


def have_clmul():
    """True when this CPU has PCLMULQDQ (and SSE4.1), so :func:`window_product` can use it."""
    return bool(gf2_have_clmul())


def window_product(const uint64_t[::1] s, const uint64_t[::1] x, size_t chunk_words,
                   size_t w0, size_t w1, uint64_t[::1] out, bint clmul):
    """Add the words ``[w0, w1)`` of the product ``s * x`` into ``out``.

    ``s`` and ``x`` are zero-padded to whole chunks of ``chunk_words`` words; ``out`` has
    ``len(s) + len(x)`` words and must be zero on entry (words outside ``[w0, w1)`` are
    left partial). ``clmul`` selects PCLMULQDQ (raises ValueError where the CPU lacks it)
    or the portable base case. Raises ValueError on inconsistent sizes, MemoryError when
    the scratch memory (about 6 ``chunk_words`` words) cannot be allocated. Runs without
    the GIL.
    """
    cdef size_t L = chunk_words
    if L == 0 or s.shape[0] == 0 or x.shape[0] == 0:
        raise ValueError("window_product: chunk_words, s and x must be non-empty")
    if s.shape[0] % L or x.shape[0] % L:
        raise ValueError(
            f"window_product: s ({s.shape[0]} words) and x ({x.shape[0]} words) must be "
            f"whole chunks of {L} words"
        )
    if <size_t>out.shape[0] != <size_t>(s.shape[0] + x.shape[0]) or not w0 <= w1 <= <size_t>out.shape[0]:
        raise ValueError(
            f"window_product: out must have {s.shape[0] + x.shape[0]} words and "
            f"0 <= w0 <= w1 <= that, got {out.shape[0]}, w0={w0}, w1={w1}"
        )
    if clmul and not gf2_have_clmul():
        raise ValueError("window_product: this CPU has no PCLMULQDQ")
    cdef size_t ns = s.shape[0] // L, nx = x.shape[0] // L
    cdef int use = 1 if clmul else 0
    cdef int rc
    with nogil:
        rc = gf2_window_product(&s[0], ns, &x[0], nx, L, w0, w1, &out[0], use)
    if rc != 0:
        raise MemoryError(f"window_product: no scratch memory for chunks of {L} words")
