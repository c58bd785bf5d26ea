"""Cascade error correction with batched, pipelined parity queries (pure core, no I/O).

The receiver (Bob) corrects his sifted key towards the transmitter's (Alice's). Every pass
``p`` shuffles the key with a permutation drawn from a shared public seed (pass 0 keeps the
order) and cuts it into blocks of ``2**top_level[p]`` bits. Inside a pass the blocks and
their halves form a dyadic tree: node ``(p, level, j)`` covers permuted positions
``[j << level, (j + 1) << level)`` (clipped to the key length). Both sides number the nodes
of all passes with one flat *node id* (:class:`TreeLayout`); node ids are what travels on the
wire (little-endian ``uint32``, or ``uint64`` for trees of 2**32 nodes or more).

Round structure:

1. Bob asks once for the parities of all top-level blocks of all passes (one round trip;
   every pass always runs, so this discloses exactly what pass-by-pass requests would).
2. Passes start in order: the next one when the current one's active searches have fallen
   to ``CascadeCorrector.early_pass_fraction`` of those it started with (its long
   back-tracking tail then runs alongside). Starting a pass makes every odd top-level
   block of it an active binary search. Each round trip asks Alice for the left-child
   parity of every active search whose left child is not known yet (the right one is
   inferred), so one pass costs about ``top_level`` round trips plus the back-tracking
   below.
3. A search that reaches a single bit has found an error: Bob flips it at once. The flip
   changes the parity of every node containing it (in every pass: in a block whose tree
   is built, every ancestor; in one that is not, the root, see :class:`_LazyTrees`);
   searches whose node turned even are dropped. One round later
   (``CascadeCorrector.defer_rounds``, so a search already under way can find the partner
   error first) the smallest known odd node
   containing the flipped bit in each started pass becomes a new search (the cascade effect)
   while the other searches go on: back-tracking does not wait for a whole wave to finish.
   Descending through nodes whose parity is already known costs nothing; only unknown left
   children cost a disclosed bit, and a node is never asked twice.

Invariant: every known node that is odd for Bob's current bits contains the node of an active
search or a flipped bit queued for back-tracking, so when neither is left every known parity
agrees; Cascade ends there once every pass has started.

Trees: both sides build the first two passes' trees whole; of every later pass only the
block parities are computed up front, and a block's tree is built when it is first asked
about (Alice) or first holds a search (Bob): at 4e6 bits and 3 % a third of the middle
pass's blocks and none of the check passes' (:class:`_LazyTrees`).

Disclosed bits are counted exactly on both sides: one per parity Alice sends
(:attr:`CascadeResponder.disclosed_bits` == :attr:`CascadeStats.disclosed_bits`).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkdnode.postproc import cascade_kernels as ck
from qkdnode.postproc import shuffle
from qkdnode.postproc.params import CascadeParams

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
NodeIds = npt.NDArray[np.unsignedinteger]

_UNKNOWN = np.uint8(2)  # bit 1 of Bob's node state: Alice's parity not known yet
#: the first passes, whose trees both sides build whole (:class:`_LazyTrees`): at 3 % nearly
#: every block of the first two passes is searched (86 % of the second's at 4e6 bits)
WHOLE_PASSES = 2


class CascadeError(ValueError):
    """Bad input to the Cascade core (lengths, levels or node ids out of range)."""


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def schedule(n_bits: int, qber: float, params: CascadeParams) -> list[int]:
    """Top tree level (log2 block size) of each pass for an ``n_bits`` frame at ``qber``.

    Pass 1: blocks of ``first_block_factor / qber`` bits, pass 2: ``growth_factor`` times
    larger, then a middle pass of ``middle_block_bits`` if that lies strictly between pass
    2's blocks and the check passes' ones, then check passes: ``check_passes`` of blocks
    ``2**(c - 2)`` for a frame of up to ``2**c`` bits (3-4 blocks), or, when a middle pass
    ran and ``2**(c - 4)`` is larger still, ``check_passes_after_middle`` of blocks
    ``2**(c - 4)`` (8-16 blocks); every level clipped to ``[1, c]``. Measured on random
    frames (f against each frame's own error rate, medians; the 4-pass doubling schedule
    of before on the same frames in brackets): 1e6 bits at 1 / 2 / 3 / 5 / 10 %: f 1.049
    / 1.055 / 1.045 / 1.056 / 1.077 (1.072 / 1.084 / 1.075 / 1.096 / 1.128) in 120 / 100 /
    194 / 123 / 103 round trips (175 / 152 / 270 / 186 / 152); 1000 frames of 1e4 bits at
    1 / 2 / 5 / 10 %: f 1.079 / 1.072 / 1.065 / 1.081 (1.080 / 1.089 / 1.098 / 1.128),
    none left with an error (5 of the 4000 before).
    Raises CascadeError for an empty frame."""
    if n_bits <= 0:
        raise CascadeError(f"key length must be > 0, got {n_bits}")
    q = max(qber, params.qber_floor)
    cap = max(1, math.ceil(math.log2(n_bits)))
    first = min(cap, max(1, round(math.log2(params.first_block_factor / q))))
    second = min(cap, first + round(math.log2(params.growth_factor)))
    check = min(cap, max(second + 1, cap - 2))
    if params.middle_block_bits:
        middle = round(math.log2(params.middle_block_bits))
        if second < middle < check:
            if cap - 4 > middle:  # frames of more than 2**16 bits: 9-16 blocks a pass
                return [first, second, middle] + [cap - 4] * params.check_passes_after_middle
            return [first, second, middle] + [check] * params.check_passes
    return [first, second] + [check] * params.check_passes


def frame_count(n_bits: int, params: CascadeParams) -> int:
    """How many frames an ``n_bits`` key is cut into: ``params.frames``, fewer if frames would
    be shorter than ``params.min_frame_bits``."""
    return max(1, min(params.frames, n_bits // params.min_frame_bits))


def frame_bounds(n_bits: int, count: int) -> list[tuple[int, int]]:
    """(start, stop) of ``count`` consecutive frames of an ``n_bits`` key whose lengths
    differ by at most one bit; raises CascadeError unless ``1 <= count <= min(n_bits, 64)``."""
    if not 1 <= count <= min(n_bits, 64):
        raise CascadeError(f"cannot cut {n_bits} bits into {count} frames")
    edges = [n_bits * k // count for k in range(count + 1)]
    return list(itertools.pairwise(edges))


def frame_seed(seed: int, frame: int) -> int:
    """The permutation seed of frame ``frame`` of a block whose Cascade seed is ``seed``."""
    return (seed + frame) % (1 << 63)


def permutations(n_bits: int, n_passes: int, seed: int) -> list[I64]:
    """Pass permutations from the shared public ``seed`` (:mod:`.shuffle`); pass 0 is the
    identity."""
    perms = [np.arange(n_bits, dtype=np.int64)]
    perms += [shuffle.keyed_permutation(n_bits, seed, p) for p in range(1, n_passes)]
    return perms


def _pass_permutations(n_bits: int, n_passes: int, seed: int) -> list[shuffle.KeyedPermutation]:
    """The lazily evaluated :func:`permutations` of passes ``1 .. n_passes - 1``, at index
    ``p - 1``."""
    return [shuffle.KeyedPermutation(n_bits, seed, p) for p in range(1, n_passes)]


class TreeLayout:
    """Numbering of the nodes of all pass trees of an ``n``-bit key, block after block.

    Pass ``p`` cuts its permuted key into blocks of ``2**t`` bits (``t = top_levels[p]``).
    Block ``b``'s subtree holds the ids ``[B, B + 2**(t + 1))`` with ``B = pass_base[p] +
    b * 2**(t + 1)``, in heap order: its root at ``B + 1``, the children of ``B + h`` at
    ``B + 2h`` and ``B + 2h + 1``, its leaves at ``B + 2**t + i`` (``B`` itself is unused).
    So node ``(p, level, j)`` is at ``B + 2**d + (j mod 2**d)`` with ``d = t - level`` and
    ``b = j >> d``. A flipped bit's ancestors in a pass then lie within one block of at
    most 1 KB (a few cache lines) instead of one per level across the whole tree. Ids run
    over ``[0, total)``; the last block of a pass may reach past the key: those leaves
    are zero and never asked for. Node states are stored four to a byte
    (:mod:`.cascade_kernels`). Raises :class:`CascadeError` for an empty key or levels
    outside ``[1, max(1, ceil(log2 n))]``.
    """

    def __init__(self, n: int, top_levels: Sequence[int]) -> None:
        if n <= 0:
            raise CascadeError(f"key length must be > 0, got {n}")
        self.n = n
        self.top_levels = [int(t) for t in top_levels]
        cap = max(1, (n - 1).bit_length())  # a block of 2**cap bits holds the whole key
        if not self.top_levels or min(self.top_levels) < 1 or max(self.top_levels) > cap:
            raise CascadeError(f"bad tree levels {self.top_levels} for {n} bits (1 to {cap})")
        self.passes = len(self.top_levels)
        #: top level of each pass, as an array
        self.tops = np.asarray(self.top_levels, dtype=np.int64)
        sizes = [self.count(t) << (t + 1) for t in self.top_levels]
        #: first id of each pass's blocks
        self.pass_base = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        self.total = int(sum(sizes))
        self.wire_dtype = np.dtype("<u4") if self.total < 1 << 32 else np.dtype("<u8")
        #: where the top-level blocks of each pass start in the all-blocks parity vector
        self.block_offsets = np.cumsum(
            [0] + [self.count(t) for t in self.top_levels], dtype=np.int64
        )

    def count(self, level: int) -> int:
        """Number of nodes on ``level`` (of any pass)."""
        return -(-self.n // (1 << level))

    def node_id(self, pass_index: I64, level: I64, node: I64) -> I64:
        """Flat ids of nodes ``(pass_index[i], level[i], node[i])``; raises CascadeError
        for a node outside the trees."""
        p = np.asarray(pass_index, dtype=np.int64)
        lv = np.asarray(level, dtype=np.int64)
        j = np.asarray(node, dtype=np.int64)
        if not (p.shape == lv.shape == j.shape):
            raise CascadeError("node arrays differ in length")
        if p.size:
            tops = np.asarray(self.top_levels)
            if (
                p.min() < 0
                or p.max() >= self.passes
                or lv.min() < 0
                or np.any(lv > tops[p])
                or j.min() < 0
                or np.any((j << lv) >= self.n)
            ):
                raise CascadeError("node outside the Cascade tree")
        return self.ids(p, lv, j)

    def ids(self, pass_index: I64, level: I64, node: I64) -> I64:
        """:meth:`node_id` without the range checks (int64 arrays of one shape)."""
        t = self.tops[pass_index]
        d = t - level
        block = self.pass_base[pass_index] + ((node >> d) << (t + 1))
        out: I64 = block + (1 << d) + (node & ((1 << d) - 1))
        return out

    def top_ids(self, pass_index: int) -> I64:
        """Ids of the top-level blocks of ``pass_index``, in block order."""
        t = self.top_levels[pass_index]
        blocks = np.arange(self.count(t), dtype=np.int64)
        return (blocks << (t + 1)) + (int(self.pass_base[pass_index]) + 1)

    def decode(self, data: bytes | memoryview, count: int) -> NodeIds:
        """Node ids from their wire encoding (``wire_dtype``, read-only, not copied); raises
        CascadeError on a wrong length or an id outside ``[0, total)``."""
        size = self.wire_dtype.itemsize
        if count < 0 or len(data) != count * size:
            raise CascadeError(f"{len(data)} bytes do not hold {count} node ids of {size} B")
        ids: NodeIds = np.frombuffer(data, dtype=self.wire_dtype)
        if ids.size and int(ids.max()) >= self.total:
            raise CascadeError("node id outside the Cascade tree")
        return ids

    def encode(self, ids: I64) -> NodeIds:
        """Wire encoding of node ids (``wire_dtype``)."""
        return np.ascontiguousarray(ids, dtype=self.wire_dtype)


def _sorted_unique(x: I64) -> I64:
    """Sorted distinct values of ``x`` (np.unique without its hashing overhead)."""
    x = np.sort(x)
    if x.shape[0] > 1:
        x = x[np.concatenate(([True], x[1:] != x[:-1]))]
    return x


class _LazyTrees:
    """The pass trees of one side, the later passes' built block by block when needed.

    The first :data:`WHOLE_PASSES` passes' trees are built whole (their small blocks are
    nearly all searched). Of every later pass only the top-level block parities are
    computed when the pass is set up (one sweep of the key through the inverse
    permutation, no tree); a block's subtree is built when a node inside it is first
    needed: Alice's when she is asked about it, Bob's when a search starts in it. Most
    blocks of the middle pass and nearly every block of the check passes never are (4e6
    bits at 3 %: a third of the middle pass's blocks, none of the check passes', whose
    blocks all agree by then). A block whose subtree is not built holds its root only;
    :attr:`built` says which are (``built[layout.block_offsets[p] + b]`` for block ``b``
    of pass ``p``).
    """

    def __init__(self, bits: U8, layout: TreeLayout, seed: int) -> None:
        self.layout = layout
        self.bits = bits
        #: ``np.packbits(bits)``, kept current by whoever flips ``bits``
        self.packed = np.packbits(bits)
        self.perms = _pass_permutations(layout.n, layout.passes, seed)
        self.state = np.empty(ck.state_bytes(layout.total), dtype=np.uint8)
        self.built = np.zeros(int(layout.block_offsets[-1]), dtype=np.uint8)
        #: node ids below this one lie in passes built whole
        self.first_lazy_id = (
            int(layout.pass_base[WHOLE_PASSES]) if layout.passes > WHOLE_PASSES else layout.total
        )

    def set_up(self, flag: np.uint8) -> None:
        """Every pass from the current bits, every node OR ``flag``: the first
        :data:`WHOLE_PASSES` trees whole, the later passes' block roots only."""
        lay = self.layout
        for p in range(min(WHOLE_PASSES, lay.passes)):
            self.whole_tree(p, flag)
        later = range(WHOLE_PASSES, lay.passes)
        pars = ck.block_parities(
            self.bits, self.perms[WHOLE_PASSES - 1 :], lay.top_levels[WHOLE_PASSES:]
        )
        for p, par in zip(later, pars, strict=True):
            ck.put(self.state, lay.top_ids(p), par | flag)

    def whole_tree(self, p: int, flag: np.uint8) -> None:
        """Build pass ``p``'s tree from the current bits, every node OR ``flag``."""
        lay = self.layout
        top, base = lay.top_levels[p], int(lay.pass_base[p])
        if p == 0:
            ck.pass_tree(self.bits, top, self.state, base, flag)
        else:
            blocks = np.arange(lay.count(top), dtype=np.int64)
            ck.permuted_blocks(
                self.bits, self.packed, self.perms[p - 1], top, self.state, base, flag, blocks
            )
        self.built[int(lay.block_offsets[p]) : int(lay.block_offsets[p + 1])] = 1

    def ensure(self, ids: npt.NDArray[np.integer], flag: np.uint8, keep_root: bool) -> None:
        """Build the blocks holding nodes ``ids`` (in range) that are not built yet, from the
        current bits, every node OR ``flag``; ``keep_root``: the roots keep their state."""
        lay = self.layout
        need = ck.unbuilt_blocks(
            ids, lay.pass_base, lay.tops, lay.block_offsets, self.built, self.first_lazy_id
        )
        if not need.shape[0]:
            return
        need = np.sort(need)
        passes = np.searchsorted(lay.block_offsets, need, side="right") - 1
        cuts = np.flatnonzero(np.diff(passes)) + 1
        for group in np.split(need, cuts):
            p = int(passes[np.searchsorted(need, group[0])])
            top, base = lay.top_levels[p], int(lay.pass_base[p])
            blocks = group - int(lay.block_offsets[p])
            roots = base + (blocks << (top + 1)) + 1
            saved = ck.get(self.state, roots) if keep_root else None
            ck.permuted_blocks(
                self.bits, self.packed, self.perms[p - 1], top, self.state, base, flag, blocks
            )
            if saved is not None:
                ck.put(self.state, roots, saved)
        self.built[need] = 1


class CascadeResponder:
    """Alice's side: answers parity queries about her fixed key and counts what she
    discloses (:attr:`disclosed_bits`, one per parity returned)."""

    def __init__(self, key_bits: U8, top_levels: Sequence[int], seed: int) -> None:
        self.n = int(key_bits.shape[0])
        self.layout = TreeLayout(self.n, top_levels)
        self.top_levels = self.layout.top_levels
        bits = np.ascontiguousarray(key_bits, dtype=np.uint8)
        self._trees = _LazyTrees(bits, self.layout, seed)
        self._tree = self._trees.state
        self._trees.set_up(np.uint8(0))
        self.disclosed_bits = 0

    def block_parities(self) -> U8:
        """Parities of the top-level blocks of all passes, pass after pass (each a disclosed
        bit)."""
        ids = np.concatenate([self.layout.top_ids(p) for p in range(self.layout.passes)])
        self.disclosed_bits += int(ids.shape[0])
        return ck.get(self._tree, ids)  # the roots are set up front: nothing to build

    def node_parities(self, ids: I64) -> U8:
        """Parities of the nodes with flat ids ``ids``; each is a disclosed bit. Raises
        CascadeError for an id outside the trees."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise CascadeError("node ids must be a 1-d integer array")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.layout.total):
            raise CascadeError("parity query outside the Cascade tree")
        self.disclosed_bits += int(ids.shape[0])
        self._trees.ensure(ids, np.uint8(0), keep_root=False)
        return ck.get(self._tree, ids)

    def answer(self, data: bytes | memoryview, count: int) -> U8:
        """Parities for a wire-encoded query of ``count`` node ids (see :class:`TreeLayout`);
        raises CascadeError as :meth:`TreeLayout.decode` does."""
        ids = self.layout.decode(data, count)
        self.disclosed_bits += count
        self._trees.ensure(ids, np.uint8(0), keep_root=False)
        return ck.get(self._tree, ids)

    def parities(self, pass_index: I64, level: I64, node: I64) -> U8:
        """Parities of nodes ``(pass_index[i], level[i], node[i])``; each is a disclosed bit."""
        return self.node_parities(self.layout.node_id(pass_index, level, node))


@dataclass
class CascadeStats:
    disclosed_bits: int = 0
    rounds: int = 0
    errors_corrected: int = 0
    passes: int = 0


#: most local flip/cascade steps Bob takes between two rounds of queries before he decides
#: that the answers are inconsistent (honest runs need a few tens)
MAX_LOCAL_STEPS = 100_000


class CascadeCorrector:
    """Bob's side: a synchronous state machine driven by the protocol layer.

    ``set_block_parities(alice.block_parities())`` (one round trip), then repeatedly
    ``q = next_queries()`` (node ids) and ``give_answers(alice.node_parities(q))`` until
    ``next_queries()`` returns None.

    State per node id (2 bits, four nodes to a byte): bit 1 set = Alice's parity unknown,
    then bit 0 is Bob's parity; bit 1 clear = known, bit 0 is Bob's parity XOR Alice's
    (1 = odd).
    """

    #: Rounds a flipped bit waits before it starts back-tracking searches. Waiting lets a
    #: search already under way find the partner error first (then no search is needed):
    #: 0 minimises round trips, 1 costs ~30 % more round trips but ~0.6 % less disclosure.
    defer_rounds = 1
    #: The next pass starts once the active searches and queued back-tracking flips have
    #: fallen to this fraction of the searches the current pass started with (or to none).
    #: A pass's last 40-60 % of round trips are a few long back-tracking chains, each link
    #: found only after the previous one; the next pass's binary searches find what those
    #: chains would still find, all at once. Measured on 1e6-bit frames (:func:`schedule`'s
    #: passes, medians of 4 seeds; 0 gives classic pass-after-pass Cascade): at 1 %: 163 ->
    #: 114 round trips, f 1.0468 -> 1.0483; at 3 %: 242 -> 190, f 1.0421 -> 1.0447; at
    #: 5 %: 158 -> 122, f 1.0543 -> 1.0564. 0.02 would cut round trips a further 15-20 %
    #: for f up to 1.061 at 5 %.
    early_pass_fraction = 0.005

    def __init__(self, key_bits: U8, top_levels: Sequence[int], seed: int) -> None:
        self.n = n = int(key_bits.shape[0])
        self.layout = lay = TreeLayout(n, top_levels)
        self.top_levels = lay.top_levels
        self._bits = np.array(key_bits, dtype=np.uint8)  # a copy: Bob's flips go here
        self._original = self._bits.copy()  # for the later passes' block parities
        self._trees = _LazyTrees(self._bits, lay, seed)
        self._perms = self._trees.perms
        self._perm_args = shuffle.stacked_kernel_args(self._perms)
        self._state = self._trees.state
        # Set up now (in a worker thread in the daemons, while Alice sets up hers): the
        # first WHOLE_PASSES trees whole, every parity unknown; every flip keeps them
        # current (_flip: at 4e6 bits and 3 % the second pass's tree is built in 12 ms,
        # which on the receiver's loop stalled both frames, while the flips of the rounds
        # before it starts walk it in a few). Every later pass starts from its roots, whose
        # bit 0 the flips toggle until the pass starts: the parity of the flips in each
        # block. Its block parities are then those of the original key
        # (prepare_later_passes, in the background) XOR those flip parities, and a block's
        # subtree is built from the bits as corrected by then when a search first enters
        # it (_LazyTrees). Until a block holds a search none of its parities below the root
        # is known, so the tree built late is the tree that flips would have kept current;
        # most blocks of the later passes never hold one.
        for p in range(lay.passes):
            if p < WHOLE_PASSES:
                self._trees.whole_tree(p, _UNKNOWN)
            else:
                ck.put(self._state, lay.top_ids(p), _UNKNOWN)
        self._later: list[U8] | None = None  # original block parities of passes >= WHOLE_PASSES
        self._later_lock = threading.Lock()
        self._blocks: U8 | None = None
        self._started = 0
        self._pass_searches = 1  # searches the latest pass started with
        # active searches: node id, pass, level, node index; the node is known and odd
        self._s = np.zeros((4, 0), np.int64)
        self._q_left = np.zeros(0, np.int64)
        self._pending = False
        self._deferred: list[tuple[int, I64, I64]] = []  # (due round, flips, _permuted)
        self.stats = CascadeStats()

    def prepare_later_passes(self) -> None:
        """Compute the block parities of the original key in the passes after the first
        :data:`WHOLE_PASSES` (one sweep of the key each), if not done yet. Safe to call
        from another thread while Cascade runs (the daemons do, so that the sweeps run
        beside the first passes' rounds); the pass that needs them waits for them, or
        computes them itself if nobody has started."""
        with self._later_lock:
            if self._later is None:
                self._later = ck.block_parities(
                    self._original, self._perms[WHOLE_PASSES - 1 :], self.top_levels[WHOLE_PASSES:]
                )

    # --- driving ------------------------------------------------------------------
    def set_block_parities(self, parities: U8) -> None:
        """Alice's top-level block parities of all passes (as sent by
        :meth:`CascadeResponder.block_parities`); raises CascadeError on a wrong length or a
        second call."""
        parities = np.asarray(parities, dtype=np.uint8)
        want = int(self.layout.block_offsets[-1])
        if self._blocks is not None:
            raise CascadeError("block parities given twice")
        if parities.shape != (want,):
            raise CascadeError(f"{parities.shape} block parities, expected {want}")
        self._blocks = parities & np.uint8(1)
        self.stats.disclosed_bits += want
        self.stats.rounds += 1

    def _begin_next_pass(self) -> None:
        assert self._blocks is not None
        p = self._started
        lay = self.layout
        top = self.top_levels[p]
        ids = lay.top_ids(p)
        off = lay.block_offsets
        mine = ck.get(self._state, ids) & 1  # later passes: the flips' parities (_flip)
        if p >= WHOLE_PASSES:
            self.prepare_later_passes()
            assert self._later is not None
            mine ^= self._later[p - WHOLE_PASSES]
        known = mine ^ self._blocks[off[p] : off[p + 1]]
        ck.put(self._state, ids, known)
        self._started += 1
        self.stats.passes += 1
        odd = np.flatnonzero(known == 1)
        self._pass_searches = max(1, odd.shape[0])
        new = np.stack([ids[odd], np.full(odd.shape[0], p), np.full(odd.shape[0], top), odd])
        self._add_searches(new)

    def _add_searches(self, new: I64) -> None:
        self._trees.ensure(new[0], _UNKNOWN, keep_root=True)
        self._set_active(np.concatenate([self._s, new], axis=1))

    def _set_active(self, s: I64) -> None:
        """Keep one search per node (searches on the same node would ask the same parity)."""
        self._s = ck.distinct_searches(self._state, s) if s.shape[1] > 1 else s

    def _descend(self) -> I64:
        """Move every search down through nodes of known parity; returns the real positions
        of the errors found (searches that reached one bit are removed)."""
        if not self._s.shape[1]:
            return np.zeros(0, np.int64)
        lay = self.layout
        self._s, leaf = ck.descend(self._state, lay.pass_base, lay.tops, self.n, self._s)
        return ck.locate(leaf, self._perms, self._perm_args)

    def _flip(self, found: I64) -> None:
        """Flip Bob's bits at the distinct, sorted real positions ``found``, update the
        parities of the started passes' trees (every ancestor of a flipped bit toggles once
        per flip inside it), drop searches whose node turned even and queue the flips for
        back-tracking (:meth:`_start_cascades`) after ``defer_rounds`` rounds."""
        self._bits[found] ^= 1
        ck.toggle_bits(self._trees.packed, found)
        self.stats.errors_corrected += int(found.shape[0])
        lay, st, built = self.layout, self._state, self._trees.built
        permuted = ck.flip_all_passes(
            st,
            lay.pass_base,
            lay.tops,
            found,
            self._perms,
            self._perm_args,
            lay.block_offsets,
            built,
        )
        # searches whose node turned even are done (their error was found elsewhere)
        self._s = ck.odd_searches(st, self._s)
        self._deferred.append((self.stats.rounds + self.defer_rounds, found, permuted))

    def _start_cascades(self, force: bool) -> bool:
        """Start searches for the deferred flips that are due (all if ``force``): on the
        smallest known odd node containing each flipped bit, in every started pass."""
        due = [d for d in self._deferred if force or d[0] <= self.stats.rounds]
        if not due:
            return False
        self._deferred = [] if force else [d for d in self._deferred if d[0] > self.stats.rounds]
        found = np.concatenate([f for _, f, _ in due])
        permuted = np.concatenate([k for _, _, k in due], axis=1)[: self._started]
        if len(due) > 1:  # one search per bit, even if it was flipped in two rounds
            _, first = np.unique(found, return_index=True)
            permuted = permuted[:, first]
        lay = self.layout
        rows = ck.smallest_odd(
            self._state, lay.pass_base, lay.tops, permuted, lay.block_offsets, self._trees.built
        )
        if rows.shape[1]:
            self._add_searches(rows)
        return True

    def next_queries(self) -> I64 | None:
        """Node ids whose parity Bob needs next (distinct, never asked before; encode with
        ``layout.encode``), or None when Cascade is finished. Raises CascadeError before
        :meth:`set_block_parities` or while answers are outstanding."""
        if self._blocks is None:
            raise CascadeError("block parities not given yet")
        if self._pending:
            raise CascadeError("answers to the previous queries are outstanding")
        for _ in range(MAX_LOCAL_STEPS):
            found = self._descend()
            if found.size:
                self._flip(_sorted_unique(found))
            if self._start_cascades(force=not self._s.shape[1]):
                continue
            if self._s.shape[1]:
                if (
                    self._started == self.layout.passes
                    or self._s.shape[1] + sum(f.shape[0] for _, f, _ in self._deferred)
                    > self.early_pass_fraction * self._pass_searches
                ):
                    break
            elif self._started == self.layout.passes:
                return None
            self._begin_next_pass()
        else:
            # Consistent parities settle in a few steps (cascade chains are short); answers
            # that contradict each other (a tampered channel) could flip bits forever.
            raise CascadeError(
                f"no settled state after {MAX_LOCAL_STEPS} local steps: the peer's parities "
                "contradict each other"
            )
        # searches that descended onto the same node would ask the same parity twice
        self._set_active(self._s)
        self.stats.rounds += 1
        self._pending = True
        self._q_left = ck.left_children(self.layout.pass_base, self.layout.tops, self._s)
        return self._q_left

    def give_answers(self, parities: U8) -> None:
        """Alice's parities for the last :meth:`next_queries` (0/1 per id, same order)."""
        parities = np.asarray(parities, dtype=np.uint8)
        if not self._pending:
            raise CascadeError("no queries outstanding")
        gl = self._q_left
        if parities.shape != gl.shape:
            raise CascadeError(f"{parities.shape[0]} answers for {gl.shape[0]} queries")
        ck.apply_answers(self._state, gl, self._s[0], parities)
        self.stats.disclosed_bits += int(gl.shape[0])
        self._pending = False

    def corrected(self) -> U8:
        """Bob's key with every flip applied (a new array)."""
        return self._bits.copy()


def frame_responder(
    key_bits: U8, top_levels: Sequence[int], seed: int, frames: int, frame: int
) -> CascadeResponder:
    """Alice's side of frame ``frame`` of ``frames`` of ``key_bits`` (:func:`frame_bounds`,
    :func:`frame_seed`)."""
    a, b = frame_bounds(int(key_bits.shape[0]), frames)[frame]
    return CascadeResponder(key_bits[a:b], top_levels, frame_seed(seed, frame))


def frame_corrector(
    key_bits: U8, top_levels: Sequence[int], seed: int, frames: int, frame: int
) -> CascadeCorrector:
    """Bob's side of frame ``frame`` of ``frames`` of ``key_bits``; the frames'
    :meth:`CascadeCorrector.corrected` keys joined in order are the corrected key."""
    a, b = frame_bounds(int(key_bits.shape[0]), frames)[frame]
    return CascadeCorrector(key_bits[a:b], top_levels, frame_seed(seed, frame))


def reconcile_local(
    alice_bits: U8, bob_bits: U8, qber: float, params: CascadeParams, seed: int
) -> tuple[U8, CascadeStats]:
    """Run the whole Cascade in-process (tests and benchmarks of the core)."""
    if alice_bits.shape != bob_bits.shape:
        raise CascadeError("keys differ in length")
    levels = schedule(int(alice_bits.shape[0]), qber, params)
    alice = CascadeResponder(alice_bits, levels, seed)
    bob = CascadeCorrector(bob_bits, levels, seed)
    bob.set_block_parities(alice.block_parities())
    while (q := bob.next_queries()) is not None:
        bob.give_answers(alice.node_parities(q))
    assert bob.stats.disclosed_bits == alice.disclosed_bits
    return bob.corrected(), bob.stats


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernels of Cascade and of its pass
    permutations, so that the first key block does not."""
    rng = np.random.default_rng(0)
    alice = rng.integers(0, 2, 4096, dtype=np.uint8)
    bob = alice.copy()
    bob[::37] ^= 1
    reconcile_local(alice, bob, 0.03, CascadeParams(), 1)
    # the daemons' path: node ids as they travel (uint32), later passes prepared apart
    levels = schedule(4096, 0.03, CascadeParams())
    responder = CascadeResponder(alice, levels, 2)
    corrector = CascadeCorrector(bob, levels, 2)
    corrector.prepare_later_passes()
    corrector.set_block_parities(responder.block_parities())
    while (q := corrector.next_queries()) is not None:
        wire = corrector.layout.encode(q).tobytes()
        corrector.give_answers(responder.answer(wire, q.shape[0]))
