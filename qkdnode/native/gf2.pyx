# cython: language_level=3
"""Products of bit-packed binary polynomials (middle products in Karatsuba form over
carry-less word products), the core of privacy amplification's Toeplitz hash
(``qkdnode.postproc.toeplitz``).

Polynomials are uint64 arrays, the coefficient of z^j in bit j % 64 of word j // 64. The
C code is in ``gf2_clmul.h``. The word products have three kernels, all exact and giving
the same bits: ``"vpclmul"`` (VPCLMULQDQ on AVX-512 registers, four products an
instruction), ``"pclmul"`` (PCLMULQDQ) and ``"portable"`` (plain C); which of them the CPU
runs is checked at run time (:func:`available_kernels`).
"""

from libc.stdint cimport uint64_t


cdef extern from "gf2_clmul.h" nogil:
    int gf2_cpu_kernels()
    int gf2_product_words(const uint64_t *s, size_t ws, const uint64_t *x, size_t wx,
                          size_t w0, size_t nw, uint64_t *out, int kernel)
    int GF2_BASE_WORDS
    int GF2_PORTABLE
    int GF2_PCLMUL
    int GF2_VPCLMUL


#: Karatsuba's schoolbook base case, in words.
BASE_WORDS = GF2_BASE_WORDS

_KERNEL_IDS = {"portable": GF2_PORTABLE, "pclmul": GF2_PCLMUL, "vpclmul": GF2_VPCLMUL}


def available_kernels():
    """The kernels this CPU runs, fastest first: ``"vpclmul"`` and ``"pclmul"`` where it
    has those instructions, ``"portable"`` always."""
    have = gf2_cpu_kernels()
    out = []
    if have & 2:
        out.append("vpclmul")
    if have & 1:
        out.append("pclmul")
    out.append("portable")
    return tuple(out)


def product_words(const uint64_t[::1] s, const uint64_t[::1] x, size_t w0,
                  uint64_t[::1] out, str kernel):
    """Words ``[w0, w0 + len(out))`` of the product ``s * x`` into ``out``.

    Computed as middle products (Karatsuba) of the words that reach them, so the cost is
    that of one product of the shorter of ``x`` and ``out``. ``kernel`` is one of
    :func:`available_kernels` (ValueError otherwise). Raises ValueError on empty arrays,
    MemoryError when the working memory (about 12 words per word of the shorter of ``x``
    and ``out``, plus 2 per word of ``out``) cannot be allocated. Runs without the GIL.
    """
    if s.shape[0] == 0 or x.shape[0] == 0 or out.shape[0] == 0:
        raise ValueError("product_words: s, x and out must be non-empty")
    if kernel not in available_kernels():
        raise ValueError(
            f"product_words: kernel {kernel!r} does not run here "
            f"(available: {available_kernels()})"
        )
    cdef int kid = _KERNEL_IDS[kernel]
    cdef int rc
    with nogil:
        rc = gf2_product_words(&s[0], s.shape[0], &x[0], x.shape[0], w0, out.shape[0],
                               &out[0], kid)
    if rc != 0:
        raise MemoryError(f"product_words: no working memory for {out.shape[0]} words")
