"""Keyed pseudo-random permutations of ``[0, n)`` for the Cascade passes, in O(n) streaming work.

Cascade needs, per pass, a permutation both nodes derive from a public seed that scatters
bits which shared a block in earlier passes; it need not be secret. ``Generator.permutation``
is a Fisher-Yates shuffle whose random memory accesses cost 0.2 s for 4e6 positions on the
reference machine (70 % of a whole in-process Cascade). Here instead a keyed bijection ``f``
of k-bit words (``2**k >= n``) is evaluated at ``0 .. n-1`` in order, and a value ``>= n`` is
walked along its cycle (``f(f(x))`` ...) until it falls inside ``[0, n)``: cycle-walking
(Black and Rogaway, CT-RSA 2002) keeps it a bijection of ``[0, n)``, and as ``2**k < 2 n``
it takes fewer than two evaluations per position on average.

``f`` is four rounds of: XOR with a round key, multiplication by a keyed odd constant modulo
``2**k`` (carries mix low bits into high ones), XOR with itself shifted right by
``k // 2 + 1`` (high bits into low ones). Each step is a bijection of k-bit words.

The round keys come from ``numpy.random.default_rng([seed, pass_index])``, so the same
``(n, seed, pass_index)`` gives the same permutation on every machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from qkdnode.jit import JIT, njit

I64 = npt.NDArray[np.int64]
_ROUNDS = 4


@njit
def _rounds(x: Any, c: Any, k: Any, m: Any) -> Any:  # pragma: no cover - jit
    """One evaluation of the 4-round bijection (unrolled: ~3x faster than a loop over
    the rounds, which numba does not unroll); ``c`` = (n, 2**k - 1, k // 2 + 1)."""
    _, mask, shift = c
    x = ((x ^ k[0]) * m[0]) & mask
    x ^= x >> shift
    x = ((x ^ k[1]) * m[1]) & mask
    x ^= x >> shift
    x = ((x ^ k[2]) * m[2]) & mask
    x ^= x >> shift
    x = ((x ^ k[3]) * m[3]) & mask
    return x ^ (x >> shift)


@njit
def _rounds_inv(x: Any, c: Any, k: Any, inv_m: Any) -> Any:  # pragma: no cover - jit
    _, mask, shift = c
    x ^= x >> shift  # its own inverse: 2 * shift > k
    x = ((x * inv_m[3]) & mask) ^ (k[3] & mask)
    x ^= x >> shift
    x = ((x * inv_m[2]) & mask) ^ (k[2] & mask)
    x ^= x >> shift
    x = ((x * inv_m[1]) & mask) ^ (k[1] & mask)
    x ^= x >> shift
    return ((x * inv_m[0]) & mask) ^ (k[0] & mask)


@njit
def _forward(idx: Any, c: Any, keys: Any, mults: Any, out: Any) -> None:  # pragma: no cover
    n = c[0]
    k, m = (keys[0], keys[1], keys[2], keys[3]), (mults[0], mults[1], mults[2], mults[3])
    for i in range(idx.shape[0]):
        x = _rounds(np.uint64(idx[i]), c, k, m)
        while x >= n:  # cycle-walk back into [0, n)
            x = _rounds(x, c, k, m)
        out[i] = np.int64(x)


@njit
def _backward(pos: Any, c: Any, keys: Any, inv_mults: Any, out: Any) -> None:  # pragma: no cover
    n = c[0]
    k = (keys[0], keys[1], keys[2], keys[3])
    m = (inv_mults[0], inv_mults[1], inv_mults[2], inv_mults[3])
    for i in range(pos.shape[0]):
        x = _rounds_inv(np.uint64(pos[i]), c, k, m)
        while x >= n:
            x = _rounds_inv(x, c, k, m)
        out[i] = np.int64(x)


@njit
def _walk_batch(  # noqa: PLR0917
    batch: Any, size: int, c: Any, k: Any, m: Any, inverse: bool, todo: Any
) -> None:  # pragma: no cover
    """Walk the values ``>= n`` among ``batch[:size]`` (one round evaluation each so far)
    on along their cycles (:func:`_rounds`, or :func:`_rounds_inv` if ``inverse``) until
    they fall inside ``[0, n)``; ``todo`` is scratch space of ``size`` int64.

    The out-of-range values (under half, ~5 % for n just below a power of two) are listed
    first by a branch-free pass, then walked: a branch per value on an unpredictable
    condition cost as much as the vectorised round pass itself (measured)."""
    n = c[0]
    cnt = 0
    for j in range(size):
        todo[cnt] = j
        cnt += batch[j] >= n
    for t in range(cnt):
        j = todo[t]
        x = batch[j]
        while x >= n:
            x = _rounds_inv(x, c, k, m) if inverse else _rounds(x, c, k, m)
        batch[j] = x


@njit
def _gather_batch(  # noqa: PLR0917  # pragma: no cover
    packed: Any, c: Any, k: Any, m: Any, i0: int, batch: Any, dest: Any, todo: Any
) -> None:
    """``dest[j] = bits[perm[i0 + j]]`` for ``j < dest.shape[0] <= batch.shape[0]``
    (``todo``: scratch of as many int64).

    Reads from the bit-packed key (np.packbits order): a 1e7-bit key is 1.2 MB and stays
    in cache, where random reads from one byte per bit cost ~47 ns each (measured). One
    branch-free round pass over the batch first (independent iterations pipeline: ~3x
    faster than walking each position's cycle in turn), then the few values >= n walk on
    (:func:`_walk_batch`).
    """
    size = dest.shape[0]
    for j in range(size):
        batch[j] = _rounds(np.uint64(i0 + j), c, k, m)
    _walk_batch(batch, size, c, k, m, False, todo)
    for j in range(size):
        x = batch[j]
        dest[j] = (packed[x >> np.uint64(3)] >> (np.uint64(7) - (x & np.uint64(7)))) & 1


@njit
def _gather(packed: Any, c: Any, keys: Any, mults: Any, out: Any) -> None:  # pragma: no cover
    k, m = (keys[0], keys[1], keys[2], keys[3]), (mults[0], mults[1], mults[2], mults[3])
    batch = np.empty(4096, dtype=np.uint64)
    todo = np.empty(4096, dtype=np.int64)
    for i0 in range(0, out.shape[0], batch.shape[0]):
        size = min(batch.shape[0], out.shape[0] - i0)
        _gather_batch(packed, c, k, m, i0, batch, out[i0 : i0 + size], todo)


def _walk_np(
    x: npt.NDArray[np.uint64], c: Any, keys: Any, mults: Any, inverse: bool
) -> npt.NDArray[np.uint64]:
    """numpy twin of :func:`_f` / :func:`_f_inv` over an array (see :mod:`qkdnode.jit`)."""
    n, mask, shift = c
    out = x.copy()
    todo = np.arange(x.shape[0])
    with np.errstate(over="ignore"):
        while todo.size:
            y = out[todo]
            if inverse:
                for r in range(keys.shape[0] - 1, -1, -1):
                    y ^= y >> shift
                    y = ((y * mults[r]) & mask) ^ (keys[r] & mask)
            else:
                for r in range(keys.shape[0]):
                    y = ((y ^ keys[r]) * mults[r]) & mask
                    y ^= y >> shift
            out[todo] = y
            todo = todo[y >= n]
    return out


def _inverse_odd(a: int, bits: int = 64) -> int:
    """``a**-1 mod 2**bits`` for odd ``a`` (Newton's iteration doubles the correct bits)."""
    x = a
    for _ in range(6):
        x = (x * (2 - a * x)) % (1 << bits)
    return x


class KeyedPermutation:
    """The permutation ``perm`` of ``[0, n)`` for ``(seed, pass_index)``, evaluated only where
    it is needed: :meth:`forward` (``perm[i]``), :meth:`backward` (the inverse) and
    :meth:`gather` (``bits[perm]``) never build the n-entry index arrays.

    Raises ValueError for ``n < 1`` or a negative seed or pass index.
    """

    def __init__(self, n: int, seed: int, pass_index: int) -> None:
        if n < 1:
            raise ValueError(f"permutation length must be >= 1, got {n}")
        if seed < 0 or pass_index < 0:
            raise ValueError(f"seed and pass index must be >= 0, got {seed}, {pass_index}")
        self.n = n
        k = max(1, (n - 1).bit_length())
        rng = np.random.default_rng([seed, pass_index])
        top = np.iinfo(np.uint64).max
        self._keys = rng.integers(0, top, _ROUNDS, dtype=np.uint64, endpoint=True)
        mults = rng.integers(0, top, _ROUNDS, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self._mults = mults
        self._inv_mults = np.array([_inverse_odd(int(m)) for m in mults], dtype=np.uint64)
        self._consts = (np.uint64(n), np.uint64((1 << k) - 1), np.uint64(k // 2 + 1))
        #: (constants, round keys, multipliers) for compiled callers of :func:`_rounds`
        self.kernel_args = (self._consts, self._keys, self._mults)
        #: (constants, round keys, inverse multipliers) for compiled callers of
        #: :func:`_rounds_inv`
        self.inverse_kernel_args = (self._consts, self._keys, self._inv_mults)

    def _positions(self, x: npt.ArrayLike, check: bool = True) -> npt.NDArray[np.int64]:
        arr = np.ascontiguousarray(x, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError("positions must be a 1-d array")
        if check and arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.n):
            raise ValueError(f"position outside [0, {self.n})")
        return arr

    def forward(self, idx: npt.ArrayLike, check: bool = True) -> I64:
        """``perm[idx]``: where the bits at permuted positions ``idx`` sit in the key
        (``check=False``: the caller guarantees ``0 <= idx < n``)."""
        arr = self._positions(idx, check)
        if not JIT:
            y = _walk_np(arr.astype(np.uint64), self._consts, self._keys, self._mults, False)
            return y.astype(np.int64)
        out = np.empty_like(arr)
        _forward(arr, self._consts, self._keys, self._mults, out)
        return out

    def backward(self, pos: npt.ArrayLike, check: bool = True) -> I64:
        """``perm⁻¹[pos]``: the permuted positions of key positions ``pos`` (``check`` as
        for :meth:`forward`)."""
        arr = self._positions(pos, check)
        if not JIT:
            y = _walk_np(arr.astype(np.uint64), self._consts, self._keys, self._inv_mults, True)
            return y.astype(np.int64)
        out = np.empty_like(arr)
        _backward(arr, self._consts, self._keys, self._inv_mults, out)
        return out

    def gather(self, bits: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """``bits[perm]`` (``bits`` must hold n values)."""
        if bits.shape != (self.n,):
            raise ValueError(f"{bits.shape} bits, expected ({self.n},)")
        if not JIT:
            return np.ascontiguousarray(bits, dtype=np.uint8)[self.array()]
        out = np.empty(self.n, dtype=np.uint8)
        _gather(np.packbits(bits), self._consts, self._keys, self._mults, out)
        return out

    def array(self) -> I64:
        """The whole permutation as an int64 array (tests and references)."""
        return self.forward(np.arange(self.n, dtype=np.int64))


def stacked_kernel_args(
    perms: list[KeyedPermutation],
) -> tuple[Any, npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(constants, round keys, multipliers, inverse multipliers) of permutations of one
    length, one row each, for compiled callers of :func:`_rounds` / :func:`_rounds_inv`."""
    if not perms:
        empty = np.zeros((0, _ROUNDS), dtype=np.uint64)
        return (np.uint64(1), np.uint64(1), np.uint64(1)), empty, empty, empty
    if len({p.n for p in perms}) != 1:
        raise ValueError("permutations of different lengths")
    return (
        perms[0]._consts,
        np.stack([p._keys for p in perms]),
        np.stack([p._mults for p in perms]),
        np.stack([p._inv_mults for p in perms]),
    )


def keyed_permutation(n: int, seed: int, pass_index: int) -> I64:
    """The permutation of ``[0, n)`` for ``(seed, pass_index)`` as int64 positions."""
    return KeyedPermutation(n, seed, pass_index).array()
