"""Privacy amplification's backends against the definition of the Toeplitz hash and
against each other: two nodes hash the same key with whichever backend each has, so every
backend must give the same bits for every size.

The reference is the matrix of the definition, built with scipy.linalg.toeplitz:
``T[i, j] = s[i - j + n - 1]`` (first column ``s[n-1 : n-1+m]``, first row
``s[n-1], s[n-2], ..., s[0]``), ``y = T x mod 2``.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.postproc import toeplitz

BACKENDS = toeplitz.available_backends()
NATIVE = pytest.mark.skipif(
    "portable" not in BACKENDS, reason="the native GF(2) extension is not built here"
)


def _by_definition(x: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    n = x.shape[0]
    t = scipy.linalg.toeplitz(seed[n - 1 : n - 1 + m], seed[n - 1 :: -1]).astype(np.int64)
    return ((t @ x.astype(np.int64)) & 1).astype(np.uint8)


# Sizes around a word (64 bits) and around Karatsuba's base case and its odd splits.
_EDGES = [1, 2, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 1087, 1088, 1089, 2111]
_sizes = st.one_of(st.sampled_from(_EDGES), st.integers(1, 2200))


@NATIVE
@settings(max_examples=150, deadline=None)
@given(n=_sizes, m=_sizes, seed=st.integers(0, 2**32 - 1), density=st.sampled_from([0.5, 0.02]))
def test_every_backend_is_the_toeplitz_matrix_product(
    n: int, m: int, seed: int, density: float
) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.random(n) < density).astype(np.uint8)
    s = (rng.random(n + m - 1) < density).astype(np.uint8)
    want = _by_definition(x, s, m)
    assert np.array_equal(want, toeplitz.toeplitz_hash_direct(x, s, m))
    for backend in BACKENDS:
        got = toeplitz.toeplitz_hash(x, s, m, backend=backend)
        assert got.dtype == np.uint8 and got.shape == (m,)
        assert np.array_equal(got, want), backend


@NATIVE
@pytest.mark.parametrize(
    ("n", "m"),
    [(2, 1), (1000, 999), (64 * 16 * 3 + 1, 64 * 16 * 3), (1_000_000, 500_000), (200_003, 17)],
)
def test_backends_agree_bit_for_bit_on_pa_blocks(n: int, m: int) -> None:
    # Beyond what the matrix can check: deep Karatsuba recursions, uneven chunks.
    rng = np.random.default_rng(n ^ m)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, toeplitz.pa_seed_bits(n, m), dtype=np.uint8)
    results = {b: toeplitz.pa_hash(x, s, m, backend=b) for b in BACKENDS}
    for backend, got in results.items():
        assert np.array_equal(got, results["fft"]), backend


@NATIVE
def test_all_ones_and_all_zeros_extremes() -> None:
    # All-ones: y[i] is the parity of the n products, n mod 2 for every i.
    n, m = 4097, 3001
    ones = np.ones(n + m - 1, dtype=np.uint8)
    for backend in BACKENDS:
        y = toeplitz.toeplitz_hash(ones[:n], ones, m, backend=backend)
        assert (y == n % 2).all(), backend
        z = toeplitz.toeplitz_hash(np.zeros(n, np.uint8), ones, m, backend=backend)
        assert not z.any(), backend


def test_a_node_without_the_extension_hashes_the_same_bits() -> None:
    # The peer may run without the native extension (no compiler at install): its import
    # fails, it falls back to the FFT, and the key it keeps must be the one we keep.
    n, m = 300_001, 120_000
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n - 1, dtype=np.uint8)
    here = toeplitz.pa_hash(x, s, m)
    code = (
        "import sys, numpy as np\n"
        "sys.modules['qkdnode.native.gf2'] = None  # as if never built\n"
        "from qkdnode.postproc import toeplitz\n"
        "assert toeplitz.available_backends() == ('fft',), toeplitz.available_backends()\n"
        "assert toeplitz.default_backend() == 'fft'\n"
        "data = np.frombuffer(sys.stdin.buffer.read(), np.uint8)\n"
        f"x, s = data[:{n}], data[{n}:]\n"
        f"sys.stdout.buffer.write(np.packbits(toeplitz.pa_hash(x, s, {m})).tobytes())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=np.concatenate([x, s]).tobytes(),
        capture_output=True,
        timeout=120,
        check=True,
    )
    peer = np.unpackbits(np.frombuffer(proc.stdout, np.uint8))[:m]
    assert np.array_equal(peer, here)


def test_default_backend_is_the_fastest_available() -> None:
    fast = [b for b in ("vpclmul", "pclmul") if b in BACKENDS]
    assert toeplitz.default_backend() == (fast[0] if fast else "fft")


def test_unknown_or_missing_backend_is_a_clear_error() -> None:
    x = np.zeros(10, np.uint8)
    s = np.zeros(14, np.uint8)
    with pytest.raises(toeplitz.ToeplitzError, match="'bogus' is not available"):
        toeplitz.toeplitz_hash(x, s, 5, backend=cast(toeplitz.Backend, "bogus"))
    with pytest.raises(toeplitz.ToeplitzError, match="n - 1"):
        toeplitz.pa_hash(x, s, 5, backend="fft")


@NATIVE
@pytest.mark.parametrize(("s_words", "x_words"), [(1, 1), (3, 40), (40, 3), (77, 77), (300, 129)])
def test_native_product_words_are_the_polynomial_product(s_words: int, x_words: int) -> None:
    # Any run of words of s * x, against the integer convolution taken mod 2; words past
    # the end of the product are zero.
    from qkdnode.native import gf2

    rng = np.random.default_rng(s_words * 1000 + x_words)
    s_bits = rng.integers(0, 2, 64 * s_words, dtype=np.uint8)
    x_bits = rng.integers(0, 2, 64 * x_words, dtype=np.uint8)
    full = np.zeros(64 * (s_words + x_words + 3), dtype=np.uint8)
    full[: 64 * (s_words + x_words) - 1] = np.convolve(s_bits, x_bits) & 1
    want = np.packbits(full, bitorder="little").view(np.uint64)
    s = np.packbits(s_bits, bitorder="little").view(np.uint64)
    x = np.packbits(x_bits, bitorder="little").view(np.uint64)
    total = s_words + x_words + 3
    for kernel in gf2.available_kernels():
        for w0, nw in [(0, total), (1, 2), (s_words, x_words + 1), (total - 2, 2), (total, 5)]:
            out = np.full(nw, 0xDEAD, dtype=np.uint64)
            gf2.product_words(s, x, w0, out, kernel)
            expect = want[w0 : w0 + nw] if w0 < total else np.zeros(nw, np.uint64)
            assert np.array_equal(out, np.pad(expect, (0, nw - expect.shape[0]))), (w0, nw)
    with pytest.raises(ValueError, match="non-empty"):
        gf2.product_words(s, x, 0, np.zeros(0, np.uint64), "portable")
    with pytest.raises(ValueError, match="kernel 'sse9' does not run here"):
        gf2.product_words(s, x, 0, np.zeros(3, np.uint64), "sse9")


@NATIVE
def test_native_hashes_in_threads_at_once_match() -> None:
    # The product runs without the GIL (the node hashes in a worker thread): concurrent
    # hashes of different sizes must not share scratch memory.
    rng = np.random.default_rng(9)
    cases = []
    for n, m in [(200_001, 99_000), (70_003, 3_001), (150_000, 149_999)]:
        x = rng.integers(0, 2, n, dtype=np.uint8)
        s = rng.integers(0, 2, n - 1, dtype=np.uint8)
        cases.append((x, s, m, toeplitz.pa_hash(x, s, m, backend="fft")))

    def hash_all(k: int) -> bool:
        backend = BACKENDS[k % (len(BACKENDS) - 1)]  # the native ones
        return all(
            np.array_equal(toeplitz.pa_hash(x, s, m, backend=backend), want)
            for x, s, m, want in cases[k % 3 :] + cases[: k % 3]
        )

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(hash_all, range(6)))
