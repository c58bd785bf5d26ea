"""Toeplitz-hash privacy amplification, computed exactly with blocked FFT convolutions.

Two functions, both bit-exact:

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

The convolution is cut into tiles: x into column chunks of ``b`` bits, y into row chunks of
``b`` bits; tile (r, c) needs the seed segment of diagonal ``d = r - c``. The tile grid is
walked in rectangles of row and column chunks: spectra of the rectangle's x chunks and seed
diagonals are computed with batched real FFTs of length 2b, the products accumulate per
row chunk in the frequency domain, then one inverse FFT per row chunk gives the
rectangle's contribution, which is rounded and added mod 2 into y. Sums stay below
(columns per rectangle) x b and the float64 round-off below 0.25 (checked; an error is
raised otherwise), so the result is bit-exact.

Memory: the spectra of one rectangle take at most ``max_spectra_bytes`` (512 MB by
default), the float64 staging buffer about half of that again, the accumulated spectra of
a group of output chunks and their inverse transforms up to 64 MB each, plus the inputs
and output (n + (n + m - 1) + m bytes). Measured peak RSS of a whole process running
:func:`pa_hash` at compression 0.5: 0.71 GB for 1e7 bits, 1.77 GB for 1e8 bits.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.fft as sfft

U8 = npt.NDArray[np.uint8]
C128 = npt.NDArray[np.complex128]
_FREQ_CHUNK = 8192


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


def pa_hash(x: U8, seed: U8, m: int) -> U8:
    """``(I | T) x`` over GF(2): ``x[:m] XOR toeplitz_hash(x[m:], seed, m)``.

    ``seed`` has :func:`pa_seed_bits` = n - 1 bits. Raises :class:`ToeplitzError` unless
    0 < m < n and the seed has that length.
    """
    n = int(x.shape[0])
    if seed.shape[0] != pa_seed_bits(n, m):
        raise ToeplitzError(f"seed must have n - 1 = {n - 1} bits, got {seed.shape[0]}")
    y = toeplitz_hash(x[m:], seed, m)
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


def toeplitz_hash(
    x: U8,
    seed: U8,
    m: int,
    tile_bits: int | None = None,
    *,
    workers: int = -1,
    max_spectra_bytes: int = 512 << 20,
) -> U8:
    """``y = T x`` over GF(2) (see module doc), as a uint8 0/1 array of length ``m``.

    The tile grid is walked in rectangles of ``rows`` output chunks x ``cols`` input
    chunks whose spectra (cols x chunks, rows + cols - 1 seed diagonals) take at most
    about ``max_spectra_bytes``. Each rectangle's contribution to its output chunks is
    brought back to integers and added mod 2, so float sums stay below cols x tile bits.
    Raises :class:`ToeplitzError` on inconsistent sizes.
    """
    n = _check(x, seed, m)
    b = tile_bits or _tile_bits(n, m)
    fft_len = 2 * b
    n_cols = -(-n // b)
    n_rows = -(-m // b)
    n_seed = n + m - 1
    budget = max(3, max_spectra_bytes // (16 * (b + 1)))  # spectra that fit
    cols = max(1, min(n_cols, budget // 3))
    rows = max(1, min(n_rows, budget - 2 * cols + 1))
    n_spec = b + 1
    group = max(1, (64 << 20) // (16 * n_spec))
    out = np.zeros(n_rows * b, dtype=np.uint8)
    buf = np.empty((max(cols, rows + cols - 1), fft_len), dtype=np.float64)

    # Staging rows are written whole (data, then zeros): no separate zero-fill pass.
    for c0 in range(0, n_cols, cols):
        c1 = min(c0 + cols, n_cols)
        for c in range(c0, c1):
            part = x[c * b : (c + 1) * b]
            buf[c - c0, : part.shape[0]] = part
            buf[c - c0, part.shape[0] :] = 0.0
        spec_x = sfft.rfft(buf[: c1 - c0], axis=1, workers=workers)
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            # Tile (r, c) is the linear convolution of x chunk c with the seed window of
            # diagonal d = r - c (2b - 1 bits from d b + n - b), read at offset b - 1.
            d_lo = r0 - (c1 - 1)
            n_diag = (r1 - 1 - c0) - d_lo + 1
            for k in range(n_diag):
                lo = (d_lo + k) * b + n - b
                a, z = max(lo, 0), min(lo + fft_len - 1, n_seed)
                row = buf[k]
                if a < z:
                    row[: a - lo] = 0.0
                    row[a - lo : z - lo] = seed[a:z]
                    row[z - lo :] = 0.0
                else:
                    row[:] = 0.0
            spec_s = sfft.rfft(buf[:n_diag], axis=1, workers=workers)
            # Inverse FFTs are batched too, in groups of rows taking at most ~64 MB.
            for g0 in range(r0, r1, group):
                g1 = min(g0 + group, r1)
                acc = np.empty((g1 - g0, n_spec), dtype=np.complex128)
                # diagonal of (r, c0) is r - c0 - d_lo; (r, c) is that minus c - c0
                _accumulate(spec_s, spec_x, acc, g0 - c0 - d_lo)
                conv = sfft.irfft(acc, fft_len, axis=1, overwrite_x=True, workers=workers)
                conv = conv[:, b - 1 : 2 * b - 1]
                rounded = np.rint(conv)
                np.subtract(conv, rounded, out=conv)  # conv is this group's own array
                if float(np.max(np.abs(conv, out=conv), initial=0.0)) > 0.25:
                    raise ToeplitzError("FFT round-off too large for an exact result")
                parity = rounded.astype(np.int64)
                parity &= 1
                out[g0 * b : g1 * b] ^= parity.astype(np.uint8).reshape(-1)
    return out[:m]
