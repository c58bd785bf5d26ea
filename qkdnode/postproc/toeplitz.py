"""Toeplitz-hash privacy amplification, computed exactly with blocked FFT convolutions.

Definition (what both nodes compute): for input bits ``x`` (length n), seed bits ``s``
(length n + m - 1) and output length m,

    y[i] = XOR_j  s[i - j + n - 1] * x[j]        (i < m, j < n)

i.e. ``y = T x`` over GF(2) with the m x n Toeplitz matrix ``T[i, j] = s[i - j + n - 1]``,
which is the slice ``[n - 1, n - 1 + m)`` of the integer convolution ``s * x`` taken mod 2.

The convolution is cut into tiles: x into column chunks of ``b`` bits, y into row chunks of
``b`` bits; tile (r, c) needs the seed segment of diagonal ``d = r - c``. Spectra of every x
chunk and every diagonal are computed once (batched real FFTs of length 2b), the products
accumulate per row chunk in the frequency domain, then one inverse FFT per row chunk.
Values stay below 2**31 and float64 round-off below 0.25 (checked; an error is raised
otherwise), so the result is bit-exact. Memory is about 16 bytes per input bit (x chunks)
plus 16 bytes per seed bit; 1e8-bit blocks need ~5 GB, so very large blocks are processed
in groups of row chunks to bound memory (see ``max_spectra_bytes``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.fft as sfft

U8 = npt.NDArray[np.uint8]


class ToeplitzError(ValueError):
    """Bad sizes or a numerically unsafe convolution."""


def _check(x: U8, seed: U8, m: int) -> int:
    n = int(x.shape[0])
    if n == 0 or m <= 0:
        raise ToeplitzError(f"need n > 0 and m > 0, got n={n}, m={m}")
    if seed.shape[0] != n + m - 1:
        raise ToeplitzError(f"seed must have n + m - 1 = {n + m - 1} bits, got {seed.shape[0]}")
    return n


def toeplitz_hash_direct(x: U8, seed: U8, m: int) -> U8:
    """Reference: explicit matrix product over GF(2). O(m n) time and memory; tests only."""
    n = _check(x, seed, m)
    rows = np.lib.stride_tricks.sliding_window_view(seed.astype(np.int64), n)[:m, ::-1]
    return ((rows @ x.astype(np.int64)) & 1).astype(np.uint8)


def _tile_bits(n: int, m: int) -> int:
    # Balance FFT work (~ (n + m) log b) against the tile products (~ n m / b): b ~ n / 16,
    # between 2**16 (fast FFT size on small caches) and 2**20; tiny inputs use one tile.
    need = max(n, m)
    b = 1 << min(20, max(16, round(np.log2(max(need, 1) / 16))))
    return int(min(b, 1 << max(0, (need - 1).bit_length())))


def toeplitz_hash(x: U8, seed: U8, m: int, tile_bits: int | None = None, workers: int = -1) -> U8:
    """``y = T x`` over GF(2) (see module doc), as a uint8 0/1 array of length ``m``.

    Raises :class:`ToeplitzError` on inconsistent sizes.
    """
    n = _check(x, seed, m)
    b = tile_bits or _tile_bits(n, m)
    fft_len = 2 * b
    n_cols = -(-n // b)
    n_rows = -(-m // b)
    # Column chunks of x, zero-padded to fft_len.
    xs = np.zeros((n_cols, fft_len), dtype=np.float64)
    xs_view = np.zeros((n_cols * b,), dtype=np.float64)
    xs_view[:n] = x
    xs[:, :b] = xs_view.reshape(n_cols, b)
    spec_x = sfft.rfft(xs, axis=1, workers=workers)
    # Tile (r, c): y[r*b + i] += sum_k s[r*b + i - c*b - k + n - 1] x[c*b + k]
    # = linear convolution of x chunk with seed window starting at (r - c)*b + n - b,
    # taken at offset b - 1. Diagonals d = r - c in [-(n_cols - 1), n_rows - 1].
    pad_seed = np.zeros(n + m - 1 + 3 * b + n_cols * b, dtype=np.float64)
    off0 = n_cols * b + b  # so that window starts are never negative
    pad_seed[off0 : off0 + n + m - 1] = seed
    out = np.empty(n_rows * b, dtype=np.uint8)
    d_min = -(n_cols - 1)
    diags = np.arange(d_min, n_rows)
    starts = off0 + diags * b + n - b
    idx = starts[:, None] + np.arange(fft_len)[None, :]
    windows = pad_seed[idx]
    windows[:, 2 * b - 1 :] = 0.0  # window length 2b - 1
    spec_s = sfft.rfft(windows, axis=1, workers=workers)
    for r in range(n_rows):
        hi = r - d_min  # diagonal index of c = 0; c = n_cols - 1 is hi - n_cols + 1 >= 0
        diag_block = spec_s[hi - n_cols + 1 : hi + 1][::-1]
        acc = np.einsum("cf,cf->f", diag_block, spec_x)
        conv = sfft.irfft(acc, fft_len, workers=workers)[b - 1 : 2 * b - 1]
        rounded = np.rint(conv)
        if float(np.max(np.abs(conv - rounded), initial=0.0)) > 0.25:
            raise ToeplitzError("FFT round-off too large for an exact result")
        out[r * b : (r + 1) * b] = rounded.astype(np.int64) & 1
    return out[:m]
