"""Toeplitz-hash privacy amplification, computed exactly: as the middle of a product of
binary polynomials with carry-less multiplication, or with blocked FFT convolutions.

Two functions, both bit-exact whichever backend computes them:

* :func:`toeplitz_hash` — for input bits ``x`` (length n), seed bits ``s`` (length
  n + m - 1) and output length m,

      y[i] = XOR_j  s[i - j + n - 1] * x[j]        (i < m, j < n)

  i.e. ``y = T x`` over GF(2) with the m x n Toeplitz matrix ``T[i, j] = s[i - j + n - 1]``,
  the slice ``[n - 1, n - 1 + m)`` of the integer convolution ``s * x`` taken mod 2.
* :func:`pa_hash` — what the nodes use for privacy amplification: ``y = (I | T) x``, i.e.
  ``x[:m] XOR T x[m:]`` with an m x (n - m) Toeplitz ``T`` and a seed of n - 1 bits. It is
  universal2 (for x != x' with equal tails the hashes differ; otherwise ``T d`` is uniform
  for the non-zero tail difference d), so the leftover hash lemma applies as for plain
  Toeplitz hashing (Hayashi and Tsurumaru, IEEE Trans. Inf. Theory 62, 2213 (2016)). At
  compression 0.5 it does half the products of a plain Toeplitz hash and needs a shorter
  seed.

Backends (:func:`available_backends`, :func:`default_backend`). Over GF(2), ``T x`` is
the coefficients n - 1 .. n + m - 2 of the product ``S(z) X(z)`` of the seed's and the
input's polynomials. :func:`toeplitz_hash_clmul` packs both 64 bits to a word and has the
native extension (``qkdnode.native.gf2``, compiled ahead of time: no JIT, so it runs under
the hardened unit) compute just those words, as middle products in Karatsuba form
(Hanrot, Quercia and Zimmermann, AAECC 14 (2004)): the cost of one product of min(n, m)
bits, O(min(n, m)^1.58) word products. The word products use VPCLMULQDQ on AVX-512
registers (``"vpclmul"``), PCLMULQDQ (``"pclmul"``) or plain C (``"portable"``), by what
the CPU has, checked at run time. Where neither instruction is there, or the extension was
not built, :func:`toeplitz_hash_fft` runs instead (the portable kernel is slower than the
FFT). All backends give the same bits, so two nodes agree whatever each runs.

FFT backend. The convolution is cut into tiles: x into column chunks of ``b`` bits, y into
row chunks of ``b`` bits; tile (r, c) needs the seed segment of diagonal ``d = r - c``.
The tile grid is walked in rectangles of row and column chunks: spectra of the rectangle's
x chunks and seed diagonals are computed with batched real FFTs of length 2b (ducc0; the
seed diagonals are overlapping views of one staged stretch of the seed), the products
accumulate per row chunk in the frequency domain, then one inverse FFT per row chunk gives
the rectangle's contribution, which is rounded and added mod 2 into y. Sums stay below
(columns per rectangle) x b and the float64 round-off below 0.25 (checked; an error is
raised otherwise), so the result is bit-exact.

Where the FFT backend's time goes (1 Mbit in, 0.5 Mbit out, reference machine): 15 real
FFTs of 250000 points (4 x chunks, 7 seed diagonals, 4 inverse) are nearly all of it; the
benchmark reports the hash beside those transforms run bare (:func:`pa_transforms`). Work
arrays of hashes up to 256 MB of them are kept per thread and reused: allocated afresh,
faulting their pages in from the kernel took half the CPU time of a 1 Mbit hash.

Memory of the carry-less backend: the packed inputs, and about 12 words per word of min(n,
m) plus 2 per output word (window, chunk, Karatsuba scratch, sums): about 1 MB for a 1
Mbit hash. Memory of the FFT backend: the spectra of one rectangle take at most
``max_spectra_bytes`` (512 MB by default), the float64 staging buffers about half of that
again, the accumulated spectra of a group of output chunks and their inverse transforms up
to 64 MB each, plus the inputs and output (n + (n + m - 1) + m bytes). Measured peak RSS
of a whole process running :func:`pa_hash` at compression 0.5: 0.71 GB for 1e7 bits, 1.77
GB for 1e8 bits (before the seed views, which only lower it).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal, cast

import ducc0
import numpy as np
import numpy.typing as npt
import scipy.fft as sfft

try:
    from qkdnode.native import gf2 as _gf2
except ImportError:  # the extension was not built (no compiler at install): FFT only
    _gf2 = None  # type: ignore[assignment]

U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]
C128 = npt.NDArray[np.complex128]

#: How a hash is computed: carry-less products of the native extension (CPU checked at
#: run time) with VPCLMULQDQ on AVX-512 registers (``"vpclmul"``), with PCLMULQDQ
#: (``"pclmul"``) or in plain C (``"portable"``), or blocked float FFT convolutions
#: (``"fft"``). Exact all four: the bits never depend on which runs.
Backend = Literal["vpclmul", "pclmul", "portable", "fft"]
_FREQ_CHUNK = 8192


#: FFT threads of a hash (-1: every core). One: on the 2-core reference machine, shared
#: with the node's other processes, a second thread cost more than it gave (1 Mbit hash,
#: medians of 21 under load: 29 ms with one thread, 41 ms with two).
DEFAULT_WORKERS = 1

#: Work arrays up to this many bytes in all are kept per thread between calls (see
#: :class:`_Workspace`); larger hashes allocate theirs afresh.
_KEEP_BYTES = 256 << 20


class _Workspace(threading.local):
    """Per-thread work arrays reused from one hash to the next.

    A 1 Mbit hash touches ~50 MB of staging, spectra and inverse transforms. Allocated
    afresh, every call faults those pages in from the kernel again: measured on the
    reference machine that was half of the CPU time of a 1 Mbit hash (33 -> 18 ms).
    """

    def __init__(self) -> None:
        self.arrays: dict[str, npt.NDArray[np.generic]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type[np.generic], keep: bool) -> Any:
        """An uninitialised array of ``shape``; a view of a kept buffer if ``keep``."""
        size = math.prod(shape)
        if not keep:
            return np.empty(shape, dtype=dtype)
        have = self.arrays.get(name)
        if have is None or have.dtype != dtype or have.shape[0] < size:
            have = np.empty(size, dtype=dtype)
            self.arrays[name] = have
        return have[:size].reshape(shape)


_WORK = _Workspace()


def _threads(workers: int) -> int:
    """ducc0's thread count for scipy-style ``workers`` (-1: every core)."""
    return max(1, os.cpu_count() or 1) if workers < 0 else max(1, workers)


def real_fft(a: npt.NDArray[np.float64], out: C128, workers: int) -> C128:
    """Real FFT along the last axis into ``out`` (ducc0, the successor of scipy.fft's
    pocketfft: 1.3x less CPU time at these lengths on the reference machine)."""
    res: C128 = ducc0.fft.r2c(a, axes=(a.ndim - 1,), nthreads=_threads(workers), out=out)
    return res


def inverse_real_fft(
    a: C128, length: int, out: npt.NDArray[np.float64], workers: int
) -> npt.NDArray[np.float64]:
    """Inverse of :func:`real_fft` for real signals of ``length`` points into ``out`` (``a`` is
    overwritten)."""
    res: npt.NDArray[np.float64] = ducc0.fft.c2r(
        a,
        axes=(a.ndim - 1,),
        lastsize=length,
        forward=False,
        inorm=2,
        nthreads=_threads(workers),
        allow_overwriting_input=True,
        out=out,
    )
    return res


class ToeplitzError(ValueError):
    """Bad sizes or a numerically unsafe convolution."""


def _check(x: U8, seed: U8, m: int) -> int:
    n = int(x.shape[0])
    if n == 0 or m <= 0:
        raise ToeplitzError(f"need n > 0 and m > 0, got n={n}, m={m}")
    if seed.shape[0] != n + m - 1:
        raise ToeplitzError(f"seed must have n + m - 1 = {n + m - 1} bits, got {seed.shape[0]}")
    return n


def pa_seed_bits(n: int, m: int) -> int:
    """Seed length (bits) of :func:`pa_hash` for ``n`` input and ``m`` output bits."""
    if not 0 < m < n:
        raise ToeplitzError(f"privacy amplification needs 0 < m < n, got n={n}, m={m}")
    return n - 1


def pa_hash(x: U8, seed: U8, m: int, *, backend: Backend | None = None) -> U8:
    """``(I | T) x`` over GF(2): ``x[:m] XOR toeplitz_hash(x[m:], seed, m)``.

    ``seed`` has :func:`pa_seed_bits` = n - 1 bits. ``backend`` as :func:`toeplitz_hash`
    (the result is the same whichever runs). Raises :class:`ToeplitzError` unless 0 < m < n
    and the seed has that length, or when the backend asked for is not available here.
    """
    n = int(x.shape[0])
    if seed.shape[0] != pa_seed_bits(n, m):
        raise ToeplitzError(f"seed must have n - 1 = {n - 1} bits, got {seed.shape[0]}")
    y = toeplitz_hash(x[m:], seed, m, backend=backend)
    y ^= x[:m]
    return y


def pa_hash_direct(x: U8, seed: U8, m: int) -> U8:
    """Reference for :func:`pa_hash` by explicit matrix product; tests only."""
    pa_seed_bits(int(x.shape[0]), m)
    return x[:m] ^ toeplitz_hash_direct(x[m:], seed, m)


def toeplitz_hash_direct(x: U8, seed: U8, m: int) -> U8:
    """Reference: explicit matrix product over GF(2). O(m n) time and memory; tests only."""
    n = _check(x, seed, m)
    rows = np.lib.stride_tricks.sliding_window_view(seed.astype(np.int64), n)[:m, ::-1]
    return ((rows @ x.astype(np.int64)) & 1).astype(np.uint8)


def _tile_bits(n: int, m: int) -> int:
    # Tile products cost ~ n m / b complex multiply-adds, FFTs ~ 4 (n + m) log(2b) points,
    # and FFTs longer than 2**19 points cost 2.5-3.5x more per point on the reference
    # machine (cache). Measured there, one thread (best tile, seconds):
    #   n=1e6 m=5e5: 2**17 (0.057; 2**20 0.17)    n=4e6 m=1e6: 2**17-2**18 (0.24)
    #   n=9.8e6 m=2.4e6: 2**18 (0.63; 2**20 1.32)  n=1e7 m=5e6: 2**18-2**19 (1.0; 2**20 1.45)
    # Blocks of 1e8 bits need b = 2**20 to keep the n m / b products in check.
    # The tile is then shrunk to the smallest b >= the target's chunk counts' need whose
    # FFT length 2b is 5-smooth, so the last chunks carry no padding to speak of
    # (5e5 x 5e5: 4 x 4 tiles of 125000 bits instead of 131072).
    need = max(n, m)
    if need < 3_000_000:
        target = 1 << 17
    elif need < 30_000_000:
        target = 1 << 18
    else:
        target = 1 << 20
    target = min(target, 1 << max(0, (need - 1).bit_length()))
    b_min = max(-(-n // -(-n // target)), -(-m // -(-m // target)))
    fft_len = sfft.next_fast_len(2 * b_min, real=True)
    while fft_len % 2:
        fft_len = sfft.next_fast_len(fft_len + 1, real=True)
    return int(fft_len // 2)


def _accumulate(spec_s: C128, spec_x: C128, acc: C128, hi0: int) -> None:
    """``acc[g] = sum_c spec_s[hi0 + g - c] * spec_x[c]``, walked in frequency chunks of
    8192 bins (128 kB per row: the rows are MBs long, and output row by output row every
    spectrum streams from memory again, 1.5x slower at 1 Mbit and 3x at the daemons'
    10 Mbit blocks; shorter chunks cost more in numpy calls than they save in cache)."""
    chunk = _FREQ_CHUNK
    tmp = np.empty(chunk, dtype=np.complex128)
    n_freq = acc.shape[1]
    for f0 in range(0, n_freq, chunk):
        f1 = min(f0 + chunk, n_freq)
        t = tmp[: f1 - f0]
        for g in range(acc.shape[0]):
            a = acc[g, f0:f1]
            np.multiply(spec_s[hi0 + g, f0:f1], spec_x[0, f0:f1], out=a)
            for c in range(1, spec_x.shape[0]):
                np.multiply(spec_s[hi0 + g - c, f0:f1], spec_x[c, f0:f1], out=t)
                a += t


@dataclass(frozen=True)
class Transform:
    """One batched FFT call of a hash: ``batch`` transforms of ``length`` real points,
    forward (``inverse`` False: real in, ``length // 2 + 1`` complex out) or inverse."""

    inverse: bool
    batch: int
    length: int


@dataclass(frozen=True)
class _Plan:
    b: int  # tile bits
    n_cols: int
    n_rows: int
    cols: int  # input chunks per rectangle
    rows: int  # output chunks per rectangle
    group: int  # output chunks per batch of inverse transforms


def _plan(n: int, m: int, tile_bits: int | None, max_spectra_bytes: int) -> _Plan:
    b = tile_bits or _tile_bits(n, m)
    budget = max(3, max_spectra_bytes // (16 * (b + 1)))  # spectra that fit
    n_cols, n_rows = -(-n // b), -(-m // b)
    cols = max(1, min(n_cols, budget // 3))
    rows = max(1, min(n_rows, budget - 2 * cols + 1))
    group = max(1, (64 << 20) // (16 * (b + 1)))
    return _Plan(b, n_cols, n_rows, cols, rows, group)


def transforms(
    n: int, m: int, tile_bits: int | None = None, max_spectra_bytes: int = 512 << 20
) -> list[Transform]:
    """The FFT calls :func:`toeplitz_hash_fft` makes for ``n`` input and ``m`` output bits,
    in order (the benchmark times them bare: the FFT floor of the hash)."""
    p = _plan(n, m, tile_bits, max_spectra_bytes)
    out = []
    for c0 in range(0, p.n_cols, p.cols):
        c1 = min(c0 + p.cols, p.n_cols)
        out.append(Transform(False, c1 - c0, 2 * p.b))
        for r0 in range(0, p.n_rows, p.rows):
            r1 = min(r0 + p.rows, p.n_rows)
            out.append(Transform(False, (r1 - 1 - c0) - (r0 - (c1 - 1)) + 1, 2 * p.b))
            out += [
                Transform(True, min(g0 + p.group, r1) - g0, 2 * p.b)
                for g0 in range(r0, r1, p.group)
            ]
    return out


def pa_transforms(n: int, m: int) -> list[Transform]:
    """:func:`transforms` of :func:`pa_hash` (``n`` input bits, ``m`` output bits)."""
    pa_seed_bits(n, m)
    return transforms(n - m, m)


def toeplitz_hash(x: U8, seed: U8, m: int, *, backend: Backend | None = None) -> U8:
    """``y = T x`` over GF(2) (see module doc), as a uint8 0/1 array of length ``m``.

    ``x`` and ``seed`` are uint8 arrays of 0/1 bits. ``backend`` None runs
    :func:`default_backend`; ``"fft"`` :func:`toeplitz_hash_fft`, the others the
    carry-less product with that kernel (:func:`toeplitz_hash_clmul`). All are exact: the
    same inputs give the same bits whichever runs. Raises :class:`ToeplitzError` on
    inconsistent sizes or a backend that is not available here.
    """
    which = backend or default_backend()
    if which == "fft":
        return toeplitz_hash_fft(x, seed, m)
    if which not in available_backends():
        raise ToeplitzError(
            f"backend {which!r} is not available here (available: {available_backends()})"
        )
    return toeplitz_hash_clmul(x, seed, m, kernel=which)


def toeplitz_hash_fft(
    x: U8,
    seed: U8,
    m: int,
    tile_bits: int | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
    max_spectra_bytes: int = 512 << 20,
) -> U8:
    """``y = T x`` over GF(2) by blocked FFT convolution (see module doc), as a uint8 0/1
    array of length ``m``.

    The tile grid is walked in rectangles of ``rows`` output chunks x ``cols`` input
    chunks whose spectra (cols x chunks, rows + cols - 1 seed diagonals) take at most
    about ``max_spectra_bytes``. Each rectangle's contribution to its output chunks is
    brought back to integers and added mod 2, so float sums stay below cols x tile bits.
    Raises :class:`ToeplitzError` on inconsistent sizes.
    """
    n = _check(x, seed, m)
    plan = _plan(n, m, tile_bits, max_spectra_bytes)
    b, n_cols, n_rows, cols, rows, group = (
        plan.b,
        plan.n_cols,
        plan.n_rows,
        plan.cols,
        plan.rows,
        plan.group,
    )
    fft_len = 2 * b
    n_seed = n + m - 1
    n_spec = b + 1
    out = np.zeros(n_rows * b, dtype=np.uint8)
    n_diag_max = rows + cols - 1
    g_max = min(group, rows)
    work = (
        8 * cols * fft_len  # x staging
        + 8 * (n_diag_max + 1) * b  # seed staging
        + 16 * (cols + n_diag_max + g_max) * n_spec  # spectra, accumulated products
        + 12 * g_max * fft_len  # inverse transforms, their integers
    )
    keep = work <= _KEEP_BYTES
    buf = _WORK.get("x", (cols, fft_len), np.float64, keep)
    seed_buf = _WORK.get("seed", ((n_diag_max + 1) * b,), np.float64, keep)
    spec_x_buf = _WORK.get("spec_x", (cols, n_spec), np.complex128, keep)
    spec_s_buf = _WORK.get("spec_s", (n_diag_max, n_spec), np.complex128, keep)
    acc_buf = _WORK.get("acc", (g_max, n_spec), np.complex128, keep)
    conv_buf = _WORK.get("conv", (g_max, fft_len), np.float64, keep)
    int_buf = _WORK.get("int", (g_max, b), np.int32, keep)

    # Staging rows are written whole (data, then zeros): no separate zero-fill pass.
    for c0 in range(0, n_cols, cols):
        c1 = min(c0 + cols, n_cols)
        for c in range(c0, c1):
            part = x[c * b : (c + 1) * b]
            buf[c - c0, : part.shape[0]] = part
            buf[c - c0, part.shape[0] :] = 0.0
        spec_x = real_fft(buf[: c1 - c0], spec_x_buf[: c1 - c0], workers)
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            # Tile (r, c) is the linear convolution of x chunk c with the seed window of
            # diagonal d = r - c (2b - 1 bits from d b + n - b), read at offset b - 1; the
            # window's 2b-th point reaches none of those outputs, so the windows of
            # consecutive diagonals are overlapping 2b-point views, b apart, of one staged
            # stretch of the seed (zero outside it).
            d_lo = r0 - (c1 - 1)
            n_diag = (r1 - 1 - c0) - d_lo + 1
            lo = d_lo * b + n - b
            span = (n_diag + 1) * b
            a, z = max(lo, 0), min(lo + span, n_seed)
            stage = seed_buf[:span]
            stage[: a - lo] = 0.0
            stage[a - lo : z - lo] = seed[a:z]
            stage[z - lo :] = 0.0
            windows = np.lib.stride_tricks.as_strided(
                stage, shape=(n_diag, fft_len), strides=(8 * b, 8), writeable=False
            )
            spec_s = real_fft(windows, spec_s_buf[:n_diag], workers)
            # Inverse FFTs are batched too, in groups of rows taking at most ~64 MB.
            for g0 in range(r0, r1, group):
                g1 = min(g0 + group, r1)
                acc = acc_buf[: g1 - g0]
                # diagonal of (r, c0) is r - c0 - d_lo; (r, c) is that minus c - c0
                _accumulate(spec_s, spec_x, acc, g0 - c0 - d_lo)
                conv = inverse_real_fft(acc, fft_len, conv_buf[: g1 - g0], workers)[
                    :, b - 1 : 2 * b - 1
                ]
                ints = int_buf[: g1 - g0]
                # nearest integers of the (non-negative) sums, below 2**31: v + 0.5 truncated
                conv += 0.5
                np.copyto(ints, conv, casting="unsafe")
                np.subtract(conv, ints, out=conv)  # now 0.5 + (v - nearest integer)
                if float(conv.min()) < 0.25 or float(conv.max()) > 0.75:
                    raise ToeplitzError("FFT round-off too large for an exact result")
                low = ints.view(np.uint8)[:, ::4]  # the low byte of each int32
                low &= 1
                out[g0 * b : g1 * b] ^= low.reshape(-1)
    return out[:m]


# --- carry-less products ---------------------------------------------------------------


def available_backends() -> tuple[Backend, ...]:
    """The backends this process can run, fastest first: the native extension's kernels
    this CPU runs (:func:`qkdnode.native.gf2.available_kernels`) when it is built, then
    ``"fft"`` always."""
    if _gf2 is None:
        return ("fft",)
    native = tuple(cast(Backend, k) for k in _gf2.available_kernels())
    return (*native, "fft")


def default_backend() -> Backend:
    """The fastest backend here: ``"vpclmul"``, else ``"pclmul"``, else ``"fft"``.

    Measured on the reference machine, one thread, 1 Mbit at compression 0.5
    (docs/performance.md): each of the two is several times faster than the FFT path;
    the portable kernel is about 15x slower than PCLMULQDQ and slower than the FFT path,
    so a CPU with neither instruction runs the FFT. The bits are the same either way.
    """
    for backend in available_backends():
        if backend != "portable":
            return backend
    return "fft"


def _pack_words(bits: U8) -> U64:
    """0/1 bits packed little-endian into uint64 words (bit j in bit j % 64 of word
    j // 64), zero beyond the bits."""
    buf = np.zeros(-(-bits.shape[0] // 64) * 8, dtype=np.uint8)
    packed = np.packbits(bits, bitorder="little")
    buf[: packed.shape[0]] = packed
    return buf.view(np.uint64)


def toeplitz_hash_clmul(x: U8, seed: U8, m: int, *, kernel: str | None = None) -> U8:
    """``y = T x`` over GF(2) as the middle of a product of binary polynomials.

    With ``S(z) = sum seed[k] z^k`` and ``X(z) = sum x[j] z^j``, ``y[i]`` is the
    coefficient of ``z^(i + n - 1)`` of ``S X``. Seed and input are packed 64 bits to a
    word; the words of those coefficients are computed as middle products (Karatsuba over
    carry-less word products with ``kernel``, by default the fastest this CPU runs), which
    cost one product of min(n, m) bits. Needs the native extension. Raises
    :class:`ToeplitzError` on inconsistent sizes, or when the extension or the kernel is
    missing here.
    """
    n = _check(x, seed, m)
    if _gf2 is None:
        raise ToeplitzError("the native GF(2) extension is not built here")
    have = _gf2.available_kernels()
    kernel = kernel or have[0]
    if kernel not in have:
        raise ToeplitzError(f"kernel {kernel!r} does not run on this CPU (available: {have})")
    w0, w1 = (n - 1) // 64, -(-(n + m - 1) // 64)  # the words of coefficients n-1 .. n+m-2
    out = np.empty(w1 - w0, dtype=np.uint64)
    _gf2.product_words(_pack_words(seed), _pack_words(x), w0, out, kernel)
    first = n - 1 - 64 * w0  # bit of coefficient n - 1 in word w0
    bits = np.unpackbits(out.view(np.uint8)[: -(-(first + m) // 8)], bitorder="little")
    return bits[first : first + m].copy()
