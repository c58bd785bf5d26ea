"""Cascade error correction with level-synchronous, pipelined parity queries (pure core).

The receiver (Bob) corrects his sifted key towards the transmitter's (Alice's) fixed key.

Trees. Pass ``p`` reads the key in the order of a public permutation and cuts it into
blocks of ``2**top_levels[p]`` bits; blocks and their halves form a dyadic tree: node
``(p, level, j)`` covers pass-order positions ``[j << level, (j + 1) << level)`` clipped
to the key length ``n``. Every node of every pass has a *node id* (pass-major, then level,
then ``j``; see :class:`TreeLayout`); queries and answers travel as node ids.

Permutations. Pass 0 keeps the key order; pass ``p`` reads position ``pi^p(i)`` at index
``i``, with ``pi`` one uniformly random permutation drawn from the shared public seed. One
draw instead of one per pass saves most of the set-up time (drawing is ~20 ns per bit;
composing is a gather); the relation between passes ``p`` and ``p + 1`` is then the same
random permutation ``pi`` for every ``p``, which the efficiency benchmark covers.

Rounds (what makes a pass cost O(log block size) round trips):

1. Alice sends the parities of all top-level blocks of all passes at once (unasked).
2. Bob keeps a set of *searches*, each sitting at a node whose Alice parity is known and
   differs from his (an odd node). Each round, one message asks for the left-child parity
   of every waiting search; the right child follows from the parent for free.
3. Between rounds Bob moves every search down through nodes whose parities are known
   without asking anything. A search that reaches a single bit has found an error and
   flips it *at once*; the flip makes known nodes of every begun pass that contain the
   bit change parity, and each of those that becomes odd starts a new search in the same
   round (the cascade). Searches whose node turned even (another search fixed the error)
   are dropped. So a chain of cascaded searches costs its own depth in rounds, never the
   depth of the slowest search of a batch.
4. When no search is left, the next pass begins (its block parities are already known).
   At the end every known node of every pass is even.

Every flip is a true error: a search only ever sits on an odd node, so the single bit it
ends on differs from Alice's. Disclosed bits are counted exactly: one per parity Alice
sends, the same count on both sides.

The rounds are vectorised numpy over arrays of ``(pass, level, node)``; there are no
per-search objects. (numba is not used here: the node runs under systemd's
``MemoryDenyWriteExecute=yes``, which forbids a JIT.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkdnode.postproc.params import CascadeParams

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

# Parity of each byte value, and the mask of its low k bits.
_BYTE_PARITY = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1) & 1).astype(
    np.uint8
)
_LOW_MASK = np.array([(1 << k) - 1 for k in range(8)], dtype=np.uint8)


class CascadeError(ValueError):
    """Bad input to the Cascade core (lengths, levels, node ids or call order)."""


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def schedule(n_bits: int, qber: float, params: CascadeParams) -> list[int]:
    """Top tree level (log2 block size) of each pass for an ``n_bits`` key at ``qber``."""
    if n_bits <= 0:
        raise CascadeError(f"key length must be > 0, got {n_bits}")
    q = max(qber, params.qber_floor)
    cap = max(1, math.ceil(math.log2(n_bits)))
    first = min(cap, max(1, round(math.log2(params.first_block_factor / q))))
    step = round(math.log2(params.growth_factor))
    return [min(cap, first + i * step) for i in range(params.passes)]


INDEPENDENT = False


def pass_permutations(n_bits: int, n_passes: int, seed: int) -> list[I64]:
    """Key position read at each index of every pass (pass 0: the identity; pass p:
    ``pi^p`` for the one permutation ``pi`` of the shared public ``seed``)."""
    rng = np.random.default_rng(seed)
    perms = [np.arange(n_bits, dtype=np.int64)]
    if INDEPENDENT:
        perms += [rng.permutation(n_bits).astype(np.int64) for _ in range(n_passes - 1)]
        return perms
    pi = rng.permutation(n_bits).astype(np.int64) if n_passes > 1 else perms[0]
    for _ in range(1, n_passes):
        perms.append(perms[-1][pi])
    return perms


class TreeLayout:
    """Node ids of the trees of all passes: ``id = base[p, level] + j``."""

    def __init__(self, n_bits: int, top_levels: Sequence[int]) -> None:
        if n_bits <= 0:
            raise CascadeError(f"key length must be > 0, got {n_bits}")
        self.n = n_bits
        self.top_levels = [int(t) for t in top_levels]
        if not self.top_levels or min(self.top_levels) < 0 or max(self.top_levels) > 62:
            raise CascadeError(f"bad top levels {self.top_levels}")
        self.passes = len(self.top_levels)
        self.base = np.full((self.passes, max(self.top_levels) + 1), -1, dtype=np.int64)
        starts, passes, levels, counts = [], [], [], []
        total = 0
        for p, top in enumerate(self.top_levels):
            for level in range(top + 1):
                count = -(-n_bits // (1 << level))
                self.base[p, level] = total
                starts.append(total)
                passes.append(p)
                levels.append(level)
                counts.append(count)
                total += count
        self.total = total
        self._starts = np.array(starts, dtype=np.int64)
        self._passes = np.array(passes, dtype=np.int64)
        self._levels = np.array(levels, dtype=np.int64)
        self._counts = np.array(counts, dtype=np.int64)
        self.wire_dtype = np.dtype("<u4") if total < 2**32 else np.dtype("<u8")

    def block_count(self, p: int) -> int:
        return -(-self.n // (1 << self.top_levels[p]))

    def top_ids(self) -> I64:
        """Ids of all top-level blocks, pass by pass."""
        return np.concatenate(
            [
                self.base[p, top] + np.arange(self.block_count(p), dtype=np.int64)
                for p, top in enumerate(self.top_levels)
            ]
        )

    def ids(self, p: I64, level: I64, node: I64) -> I64:
        """Ids of nodes ``(p[i], level[i], node[i])``; raises :class:`CascadeError` outside."""
        p, level, node = (np.asarray(a, dtype=np.int64) for a in (p, level, node))
        if not (p.shape == level.shape == node.shape):
            raise CascadeError("node arrays differ in length")
        if p.size and (
            p.min() < 0
            or p.max() >= self.passes
            or level.min() < 0
            or np.any(level > np.asarray(self.top_levels)[p])
            or node.min() < 0
            or np.any((node << level) >= self.n)
        ):
            raise CascadeError("node outside the Cascade trees")
        return self.base[p, level] + node  # type: ignore[no-any-return]

    def decode(self, ids: I64) -> tuple[I64, I64, I64]:
        """``(pass, level, node)`` of each id; raises :class:`CascadeError` outside."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.total):
            raise CascadeError("node id outside the Cascade trees")
        k = np.searchsorted(self._starts, ids, side="right") - 1
        return self._passes[k], self._levels[k], ids - self._starts[k]


class _PrefixParity:
    """Parities of ranges of a fixed 0/1 array, from bit-packed bytes and byte prefixes
    (about 1/8 of the set-up work of a per-bit XOR prefix)."""

    def __init__(self, bits: U8) -> None:
        packed = np.packbits(bits, bitorder="little")
        self._packed = np.append(packed, np.uint8(0))
        self._before = np.zeros(self._packed.shape[0], dtype=np.uint8)
        np.bitwise_xor.accumulate(_BYTE_PARITY[packed], out=self._before[1:])

    def at(self, k: I64) -> U8:
        """XOR of ``bits[:k]`` for each ``k``."""
        byte = k >> 3
        return self._before[byte] ^ _BYTE_PARITY[self._packed[byte] & _LOW_MASK[k & 7]]  # type: ignore[no-any-return]


def _pass_bits(bits: U8, perms: list[I64]) -> U8:
    """The key in the order of every pass, concatenated (pass p at ``[p n, (p + 1) n)``)."""
    return np.concatenate([bits[perm] for perm in perms])


def _node_bounds(layout: TreeLayout, p: I64, level: I64, node: I64) -> tuple[I64, I64]:
    """Range of each node in the concatenated pass order."""
    n = layout.n
    start = node << level
    stop = np.minimum(start + (1 << level), n)
    return p * n + start, p * n + stop


class CascadeResponder:
    """Alice's side: answers parity queries about her fixed key and counts what she
    discloses (:attr:`disclosed_bits`)."""

    def __init__(self, key_bits: U8, top_levels: Sequence[int], seed: int) -> None:
        self.layout = TreeLayout(int(key_bits.shape[0]), top_levels)
        self.n = self.layout.n
        self.top_levels = self.layout.top_levels
        perms = pass_permutations(self.n, self.layout.passes, seed)
        bits = np.ascontiguousarray(key_bits, dtype=np.uint8)
        self._prefix = _PrefixParity(_pass_bits(bits, perms))
        self.disclosed_bits = 0

    def top_level_parities(self) -> U8:
        """Parities of all top-level blocks of all passes (``layout.top_ids()`` order)."""
        return self.answer(self.layout.top_ids())

    def answer(self, ids: I64) -> U8:
        """Parities of the nodes ``ids``; each is one disclosed bit."""
        p, level, node = self.layout.decode(ids)
        start, stop = _node_bounds(self.layout, p, level, node)
        self.disclosed_bits += int(p.shape[0])
        return self._prefix.at(stop) ^ self._prefix.at(start)  # type: ignore[no-any-return]

    def parities(self, pass_index: I64, level: I64, node: I64) -> U8:
        """Parities of nodes ``(pass_index[i], level[i], node[i])`` (checked)."""
        return self.answer(self.layout.ids(pass_index, level, node))


@dataclass
class CascadeStats:
    disclosed_bits: int = 0
    rounds: int = 0  # round trips, the block parities included
    errors_corrected: int = 0
    passes: int = 0


_EMPTY = np.zeros(0, dtype=np.int64)
OVERLAP_FRACTION = 0.0


class CascadeCorrector:
    """Bob's side: a synchronous state machine driven by the protocol layer.

    ``begin(top_level_parities)``, then repeatedly ``ids = next_queries()`` and
    ``give_answers(parities)`` until ``next_queries()`` returns None.
    """

    def __init__(self, key_bits: U8, top_levels: Sequence[int], seed: int) -> None:
        self.layout = TreeLayout(int(key_bits.shape[0]), top_levels)
        self.n = n = self.layout.n
        self.top_levels = self.layout.top_levels
        self._bits = np.array(key_bits, dtype=np.uint8)
        self._perms = pass_permutations(n, self.layout.passes, seed)
        self._inv: list[I64 | None] = [None] * self.layout.passes
        self._prefix = _PrefixParity(_pass_bits(self._bits, self._perms))
        self._known = np.full(self.layout.total, -1, dtype=np.int8)  # Alice's parities
        self._flipped = _EMPTY  # key positions corrected so far
        self._flip_coords = _EMPTY  # ... in concatenated pass order (begun passes), sorted
        self._begun = 0
        self._wait: tuple[I64, I64, I64] = (_EMPTY, _EMPTY, _EMPTY)  # searches asking
        self._queries: I64 | None = None
        self._overlap_below = 0
        self.stats = CascadeStats()

    # --- parities and positions -----------------------------------------------------
    def _bob_parity(self, p: I64, level: I64, node: I64) -> U8:
        start, stop = _node_bounds(self.layout, p, level, node)
        par = self._prefix.at(stop) ^ self._prefix.at(start)
        f = self._flip_coords
        if f.size:
            cnt = np.searchsorted(f, stop) - np.searchsorted(f, start)
            par ^= (cnt & 1).astype(np.uint8)
        return par  # type: ignore[no-any-return]

    def _odd(self, p: I64, level: I64, node: I64) -> npt.NDArray[np.bool_]:
        alice = self._known[self.layout.base[p, level] + node]
        return (alice >= 0) & (self._bob_parity(p, level, node) != alice)  # type: ignore[no-any-return]

    def _position(self, p: I64, index: I64) -> I64:
        """Key position read at ``index`` of pass ``p``."""
        out = index.copy()
        for k in range(1, len(self._perms)):
            sel = p == k
            out[sel] = self._perms[k][index[sel]]
        return out

    def _coords(self, positions: I64, passes: range) -> list[I64]:
        """Concatenated-order coordinates of ``positions`` in each pass of ``passes``."""
        out = []
        for p in passes:
            inv = self._inv[p]
            if inv is None:
                inv = self._inv[p] = np.empty(self.n, dtype=np.int64)
                inv[self._perms[p]] = np.arange(self.n, dtype=np.int64)
            out.append(p * self.n + inv[positions])
        return out

    def _add_flip_coords(self, coords: list[I64]) -> None:
        if not coords:
            return
        new = np.sort(np.concatenate(coords))
        self._flip_coords = np.insert(
            self._flip_coords, np.searchsorted(self._flip_coords, new), new
        )

    # --- driving ------------------------------------------------------------------
    def begin(self, top_level_parities: U8) -> None:
        """Take Alice's parities of all top-level blocks (``layout.top_ids()`` order)."""
        if self._begun:
            raise CascadeError("Cascade already begun")
        ids = self.layout.top_ids()
        par = np.asarray(top_level_parities, dtype=np.uint8)
        if par.shape != ids.shape:
            raise CascadeError(f"{par.shape[0]} block parities for {ids.shape[0]} blocks")
        self._known[ids] = par.astype(np.int8)
        self.stats.disclosed_bits += int(ids.shape[0])
        self.stats.rounds += 1
        self._settle((_EMPTY, _EMPTY, _EMPTY))

    def next_queries(self) -> I64 | None:
        """Node ids whose parities Bob needs next, or None when Cascade is finished."""
        if not self._begun:
            raise CascadeError("begin() first")
        p, level, node = self._wait
        if not p.size:
            return None
        self._queries = self.layout.base[p, level - 1] + 2 * node
        self.stats.rounds += 1
        return self._queries

    def give_answers(self, parities: U8) -> None:
        ids = self._queries
        if ids is None:
            raise CascadeError("no queries outstanding")
        parities = np.asarray(parities, dtype=np.uint8)
        if parities.shape != ids.shape:
            raise CascadeError(f"{parities.shape[0]} answers for {ids.shape[0]} queries")
        self._queries = None
        self.stats.disclosed_bits += int(ids.shape[0])
        p, level, node = self._wait
        alice_left = parities.astype(np.int8)
        self._known[ids] = alice_left
        parent = self._known[self.layout.base[p, level] + node]
        self._known[ids + 1] = alice_left ^ parent  # the right child is never empty here
        cl, left = level - 1, 2 * node
        go_left = self._bob_parity(p, cl, left) != parities
        self._settle((p, cl, np.where(go_left, left, left + 1)))

    def _settle(self, odd: tuple[I64, I64, I64]) -> None:
        """Move the odd nodes ``odd`` and every search they cascade into down to their next
        question; flip the errors found; begin passes while nothing is left to ask."""
        waiting: list[tuple[I64, I64, I64]] = []
        while True:
            leaves = self._descend(odd, waiting)
            p, lv, j = self._concat(waiting)
            if leaves.size:
                odd = self._flip(np.unique(leaves))
                keep = self._odd(p, lv, j)  # searches whose error was just fixed stop
                waiting = [(p[keep], lv[keep], j[keep])]
                continue
            if self._begun == self.layout.passes or p.size > self._overlap_below:
                break
            odd = self._begin_pass()
            self._overlap_below = int(OVERLAP_FRACTION * odd[0].size)
        _, first = np.unique(self.layout.base[p, lv] + j, return_index=True)
        self._wait = (p[first], lv[first], j[first])

    @staticmethod
    def _concat(parts: list[tuple[I64, I64, I64]]) -> tuple[I64, I64, I64]:
        if not parts:
            return (_EMPTY, _EMPTY, _EMPTY)
        return tuple(np.concatenate(c) for c in zip(*parts, strict=True))  # type: ignore[return-value]

    def _descend(self, odd: tuple[I64, I64, I64], waiting: list[tuple[I64, I64, I64]]) -> I64:
        """Walk odd nodes down through known children; searches that need a question go to
        ``waiting``; returns the key positions of the single bits reached."""
        p, lv, j = odd
        base, known, n = self.layout.base, self._known, self.n
        leaves: list[I64] = []
        while p.size:
            at_leaf = lv == 0
            if at_leaf.any():
                leaves.append(self._position(p[at_leaf], j[at_leaf]))
                keep = ~at_leaf
                p, lv, j = p[keep], lv[keep], j[keep]
            cl, left = lv - 1, 2 * j
            left_id = base[p, cl] + left
            right_empty = ((left + 1) << cl) >= n
            alice_left = known[left_id]
            ask = (alice_left < 0) & ~right_empty
            if ask.any():
                waiting.append((p[ask], lv[ask], j[ask]))
                keep = ~ask
                p, lv, j, cl, left = p[keep], lv[keep], j[keep], cl[keep], left[keep]
                left_id, right_empty, alice_left = left_id[keep], right_empty[keep], alice_left[keep]
            if not p.size:
                break
            parent = known[base[p, lv] + j]
            # Empty right child: the parent is its left child.
            known[left_id[right_empty]] = parent[right_empty]
            full = ~right_empty
            known[left_id[full] + 1] = alice_left[full] ^ parent[full]
            go_left = right_empty.copy()
            go_left[full] = self._bob_parity(p[full], cl[full], left[full]) != alice_left[full]
            p, lv, j = p, cl, np.where(go_left, left, left + 1)
        return np.concatenate(leaves) if leaves else _EMPTY

    def _flip(self, positions: I64) -> tuple[I64, I64, I64]:
        """Correct ``positions``; return the known nodes that became odd (new searches)."""
        self._bits[positions] ^= 1
        self._flipped = np.concatenate([self._flipped, positions])
        self.stats.errors_corrected += int(positions.shape[0])
        coords = self._coords(positions, range(self._begun))
        self._add_flip_coords(coords)
        # In every begun pass, the smallest known node around each flip that is now odd
        # starts a search (larger odd ones are explained by it and turn even when it ends).
        cand_p, cand_l, cand_j = [], [], []
        for p, c in enumerate(coords):
            idx = c - p * self.n
            levels = np.arange(self.top_levels[p] + 1, dtype=np.int64)
            nodes = idx[:, None] >> levels[None, :]
            lv = np.broadcast_to(levels, nodes.shape)
            odd = self._odd(np.full(nodes.shape, p, dtype=np.int64), lv, nodes)
            hit = odd.any(axis=1)
            deepest = odd[hit].argmax(axis=1)
            cand_p.append(np.full(deepest.shape[0], p, dtype=np.int64))
            cand_l.append(deepest)
            cand_j.append(nodes[hit, deepest] if False else np.take_along_axis(nodes[hit], deepest[:, None], 1)[:, 0])
        p, lv, j = (np.concatenate(a) for a in (cand_p, cand_l, cand_j))
        _, first = np.unique(self.layout.base[p, lv] + j, return_index=True)
        return p[first], lv[first], j[first]

    def _begin_pass(self) -> tuple[I64, I64, I64]:
        """Begin the next pass; return its odd blocks."""
        p = self._begun
        self._begun += 1
        self.stats.passes += 1
        if self._flipped.size:
            self._add_flip_coords(self._coords(self._flipped, range(p, p + 1)))
        count = self.layout.block_count(p)
        pv = np.full(count, p, dtype=np.int64)
        lv = np.full(count, self.top_levels[p], dtype=np.int64)
        j = np.arange(count, dtype=np.int64)
        odd = self._odd(pv, lv, j)
        return pv[odd], lv[odd], j[odd]

    def corrected(self) -> U8:
        """Bob's key with every correction applied (a new array)."""
        return self._bits.copy()


def reconcile_local(
    alice_bits: U8, bob_bits: U8, qber: float, params: CascadeParams, seed: int
) -> tuple[U8, CascadeStats]:
    """Run the whole Cascade in-process (tests and benchmarks of the core)."""
    if alice_bits.shape != bob_bits.shape:
        raise CascadeError("keys differ in length")
    levels = schedule(int(alice_bits.shape[0]), qber, params)
    alice = CascadeResponder(alice_bits, levels, seed)
    bob = CascadeCorrector(bob_bits, levels, seed)
    bob.begin(alice.top_level_parities())
    while (q := bob.next_queries()) is not None:
        bob.give_answers(alice.answer(q))
    assert bob.stats.disclosed_bits == alice.disclosed_bits
    return bob.corrected(), bob.stats
