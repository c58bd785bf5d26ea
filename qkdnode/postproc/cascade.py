"""Cascade error correction with batched parity queries (pure core, no I/O).

The receiver (Bob) corrects his sifted key towards the transmitter's (Alice's). Every pass
``p`` shuffles the key with a permutation drawn from a shared public seed (pass 0 keeps the
order) and cuts it into blocks of ``2**top_level[p]`` bits. Inside a pass the blocks and
their halves form a dyadic tree: node ``(p, level, j)`` covers permuted positions
``[j << level, (j + 1) << level)`` (clipped to the key length).

Round structure (what makes each pass take O(log block size) round trips):

1. Alice discloses the parities of all top-level blocks of the pass (one message).
2. All blocks whose parity differs are binary-searched *in parallel*: one round trip per
   tree level, each round asking Alice for the left-child parity of every active search.
   Bob's bits stay fixed during such a batch, so every search ends on a true error; errors
   found twice (overlapping blocks of different passes) are flipped once.
3. The flips make known nodes of earlier passes odd (the cascade effect). Every node whose
   Alice parity is already known — blocks, queried halves and their inferred siblings — is
   reused: a search starts from the smallest known odd node and descends through known
   nodes without asking anything. Only unknown left children cost a disclosed bit.

Disclosed bits are counted exactly: one per parity Alice sends.
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


class CascadeError(ValueError):
    """Bad input to the Cascade core (lengths, levels or indices out of range)."""


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


def permutations(n_bits: int, n_passes: int, seed: int) -> list[I64]:
    """Pass permutations from the shared public ``seed``; pass 0 is the identity."""
    rng = np.random.default_rng(seed)
    perms = [np.arange(n_bits, dtype=np.int64)]
    perms += [rng.permutation(n_bits).astype(np.int64) for _ in range(n_passes - 1)]
    return perms


def _prefix(bits: U8, perm: I64) -> U8:
    out = np.zeros(bits.shape[0] + 1, dtype=np.uint8)
    np.bitwise_xor.accumulate(bits[perm], out=out[1:])
    return out


def _node_range(level: I64, node: I64, n: int) -> tuple[I64, I64]:
    start = np.minimum(node << level, n)
    stop = np.minimum((node + 1) << level, n)
    return start, stop


class CascadeResponder:
    """Alice's side: answers parity queries about her fixed key and counts what she
    discloses (:attr:`disclosed_bits`)."""

    def __init__(self, key_bits: U8, top_levels: Sequence[int], seed: int) -> None:
        self.n = int(key_bits.shape[0])
        self.top_levels = list(top_levels)
        perms = permutations(self.n, len(self.top_levels), seed)
        self._prefix = np.stack([_prefix(key_bits, p) for p in perms])
        self.disclosed_bits = 0

    def block_parities(self, pass_index: int) -> U8:
        """Parities of all top-level blocks of ``pass_index``."""
        if not 0 <= pass_index < len(self.top_levels):
            raise CascadeError(f"pass {pass_index} out of range")
        level = self.top_levels[pass_index]
        count = -(-self.n // (1 << level))
        nodes = np.arange(count, dtype=np.int64)
        out = self.parities(np.full(count, pass_index), np.full(count, level), nodes)
        return out

    def parities(self, pass_index: I64, level: I64, node: I64) -> U8:
        """Parities of nodes ``(pass_index[i], level[i], node[i])``; each is a disclosed bit."""
        pass_index = np.asarray(pass_index, dtype=np.int64)
        level = np.asarray(level, dtype=np.int64)
        node = np.asarray(node, dtype=np.int64)
        if not (pass_index.shape == level.shape == node.shape):
            raise CascadeError("query arrays differ in length")
        if pass_index.size:
            tops = np.asarray(self.top_levels)
            if (
                pass_index.min() < 0
                or pass_index.max() >= len(self.top_levels)
                or level.min() < 0
                or np.any(level > tops[pass_index])
                or node.min() < 0
                or np.any((node << level) >= self.n)
            ):
                raise CascadeError("parity query outside the Cascade tree")
        start, stop = _node_range(level, node, self.n)
        self.disclosed_bits += int(pass_index.shape[0])
        return self._prefix[pass_index, stop] ^ self._prefix[pass_index, start]


@dataclass
class CascadeStats:
    disclosed_bits: int = 0
    rounds: int = 0
    errors_corrected: int = 0
    passes: int = 0


class CascadeCorrector:
    """Bob's side: a synchronous state machine driven by the protocol layer.

    ``begin_pass(p, block_parities)``, then repeatedly ``q = next_queries()`` and
    ``give_answers(parities)`` until ``next_queries()`` returns None; next pass.
    """

    def __init__(self, key_bits: U8, top_levels: Sequence[int], seed: int) -> None:
        self.n = n = int(key_bits.shape[0])
        self.top_levels = list(top_levels)
        self._bits0 = np.ascontiguousarray(key_bits, dtype=np.uint8)
        self._perms = permutations(n, len(self.top_levels), seed)
        self._inv = []
        for perm in self._perms:
            inv = np.empty(n, dtype=np.int64)
            inv[perm] = np.arange(n, dtype=np.int64)
            self._inv.append(inv)
        self._prefix0 = np.stack([_prefix(self._bits0, p) for p in self._perms])
        max_level = max(self.top_levels)
        self._base = np.zeros((len(self.top_levels), max_level + 2), dtype=np.int64)
        total = 0
        for p, top in enumerate(self.top_levels):
            for lvl in range(top + 1):
                self._base[p, lvl] = total
                total += -(-n // (1 << lvl))
        self._known = np.full(total, -1, dtype=np.int8)  # Alice's parities learnt so far
        self._flips: list[I64] = []  # real positions flipped (all batches)
        self._flips_perm: list[I64] = [np.zeros(0, np.int64) for _ in self.top_levels]
        self._started = 0
        self._active = (np.zeros(0, np.int64),) * 3
        self._leaves: list[I64] = []
        self.stats = CascadeStats()

    # --- parities -----------------------------------------------------------------
    def _bob_parity(self, p: I64, level: I64, node: I64) -> U8:
        start, stop = _node_range(level, node, self.n)
        par = self._prefix0[p, stop] ^ self._prefix0[p, start]
        if self._flips:
            for q in np.unique(p):
                sel = p == q
                f = self._flips_perm[int(q)]
                cnt = np.searchsorted(f, stop[sel]) - np.searchsorted(f, start[sel])
                par[sel] ^= (cnt & 1).astype(np.uint8)
        return par

    def _gid(self, p: I64, level: I64, node: I64) -> I64:
        return self._base[p, level] + node

    # --- driving ------------------------------------------------------------------
    def begin_pass(self, pass_index: int, block_parities: U8) -> None:
        if pass_index != self._started:
            raise CascadeError(f"pass {pass_index} begun out of order")
        top = self.top_levels[pass_index]
        count = -(-self.n // (1 << top))
        block_parities = np.asarray(block_parities, dtype=np.uint8)
        if block_parities.shape != (count,):
            raise CascadeError(f"pass {pass_index}: {block_parities.shape} block parities")
        if self._flips:
            self._flips_perm[pass_index] = np.sort(
                self._inv[pass_index][np.concatenate(self._flips)]
            )
        self._started += 1
        self.stats.passes += 1
        self.stats.disclosed_bits += count
        self.stats.rounds += 1
        base = self._base[pass_index, top]
        self._known[base : base + count] = block_parities.astype(np.int8)
        nodes = np.arange(count, dtype=np.int64)
        p = np.full(count, pass_index, dtype=np.int64)
        lv = np.full(count, top, dtype=np.int64)
        odd = self._bob_parity(p, lv, nodes) != block_parities
        self._active = (p[odd], lv[odd], nodes[odd])

    def _descend(self) -> None:
        p, lv, j = self._active
        while p.size:
            done = lv == 0
            if done.any():
                self._leaves.append(
                    np.concatenate(
                        [self._perms[int(q)][j[done & (p == q)]] for q in np.unique(p[done])]
                    )
                )
                p, lv, j = p[~done], lv[~done], j[~done]
                if not p.size:
                    break
            cl = lv - 1
            left = 2 * j
            right = left + 1
            right_empty = (right << cl) >= self.n
            left_gid = self._gid(p, cl, left)
            left_known = self._known[left_gid] >= 0
            can = right_empty | left_known
            if not can.any():
                break
            pc, cc, lc, re_, lg = p[can], cl[can], left[can], right_empty[can], left_gid[can]
            parent = self._known[self._gid(pc, lv[can], j[can])]
            new_j = lc.copy()
            # right child empty: the whole parent lies in the left child
            self._known[lg[re_]] = parent[re_]
            full = ~re_
            if full.any():
                la = self._known[lg[full]]
                lb = self._bob_parity(pc[full], cc[full], lc[full]).astype(np.int8)
                rgid = lg[full] + 1
                self._known[rgid] = la ^ parent[full]
                new_j[full] = np.where(la != lb, lc[full], lc[full] + 1)
            j = j.copy()
            lv = lv.copy()
            j[can] = new_j
            lv[can] = cc
        self._active = (p, lv, j)

    def next_queries(self) -> tuple[I64, I64, I64] | None:
        """Parity queries ``(pass, level, node)`` for Alice, or None when the pass is done."""
        while True:
            self._descend()
            p, lv, j = self._active
            if p.size:
                self.stats.rounds += 1
                return p, lv - 1, 2 * j
            if not self._leaves:
                return None
            self._apply_leaves()

    def give_answers(self, parities: U8) -> None:
        p, lv, j = self._active
        parities = np.asarray(parities, dtype=np.uint8)
        if parities.shape != p.shape:
            raise CascadeError(f"{parities.shape[0]} answers for {p.shape[0]} queries")
        self._known[self._gid(p, lv - 1, 2 * j)] = parities.astype(np.int8)
        self.stats.disclosed_bits += int(p.shape[0])

    def _apply_leaves(self) -> None:
        found = np.unique(np.concatenate(self._leaves))
        self._leaves = []
        self._flips.append(found)
        self.stats.errors_corrected += int(found.shape[0])
        cand: list[tuple[I64, I64, I64]] = []
        for q in range(self._started):
            qp = self._inv[q][found]
            self._flips_perm[q] = np.sort(np.concatenate([self._flips_perm[q], qp]))
        for q in range(self._started):
            qp = self._inv[q][found]
            best = np.full(qp.shape[0], -1, dtype=np.int64)
            for lvl in range(self.top_levels[q], -1, -1):
                node = qp >> lvl
                pv = np.full(qp.shape[0], q, dtype=np.int64)
                lva = np.full(qp.shape[0], lvl, dtype=np.int64)
                alice = self._known[self._gid(pv, lva, node)]
                known = alice >= 0
                odd = np.zeros(qp.shape[0], dtype=np.bool_)
                if known.any():
                    odd[known] = self._bob_parity(pv[known], lva[known], node[known]) != alice[
                        known
                    ].astype(np.uint8)
                best[odd] = lvl
            sel = best >= 0
            if sel.any():
                nodes = np.unique(
                    (qp[sel] >> best[sel]) * 64 + best[sel]
                )  # unique (node, level) pairs
                cand.append((np.full(nodes.shape[0], q, np.int64), nodes % 64, nodes // 64))
        if cand:
            self._active = tuple(np.concatenate(c) for c in zip(*cand, strict=True))  # type: ignore[assignment]
        else:
            self._active = (np.zeros(0, np.int64),) * 3

    def corrected(self) -> U8:
        """Bob's key with every flip applied (a new array)."""
        out = self._bits0.copy()
        if self._flips:
            idx = np.concatenate(self._flips)
            np.bitwise_xor.at(out, idx, 1)
        return out


def reconcile_local(
    alice_bits: U8, bob_bits: U8, qber: float, params: CascadeParams, seed: int
) -> tuple[U8, CascadeStats]:
    """Run the whole Cascade in-process (tests and benchmarks of the core)."""
    if alice_bits.shape != bob_bits.shape:
        raise CascadeError("keys differ in length")
    levels = schedule(int(alice_bits.shape[0]), qber, params)
    alice = CascadeResponder(alice_bits, levels, seed)
    bob = CascadeCorrector(bob_bits, levels, seed)
    for p in range(len(levels)):
        bob.begin_pass(p, alice.block_parities(p))
        while (q := bob.next_queries()) is not None:
            bob.give_answers(alice.parities(*q))
    assert bob.stats.disclosed_bits == alice.disclosed_bits
    return bob.corrected(), bob.stats
