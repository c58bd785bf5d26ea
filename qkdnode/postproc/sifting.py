"""Sifting core: squash double clicks, encode the receiver's announcement, match bases.

Channels: 0 = H, 1 = V (Z basis, bits 0/1), 2 = D, 3 = A (X basis, bits 0/1); so
``basis = channel >> 1`` and ``bit = channel & 1``.

Squashing model (several clicks in one slot): all clicks in one basis -> that basis and a
uniformly random bit; clicks in both bases -> a uniformly random basis and a uniformly random
bit. This is the standard squashing map of passive-basis BB84 receivers: it keeps every
multi-click event (discarding them would open a detector-control loophole) at the price of
a 50 % error on them. The randomness is the receiver's private ``rng``.

Announcement wire format (all little-endian): slots as the first slot (int64) plus gaps
between consecutive slots in ``width`` bytes each; a gap that does not fit is written as the
escape value ``2**(8*width) - 1`` and stored in a separate uint64 list. ``width`` in
{1, 2, 4} is chosen per block to minimise the size. Bases and bits travel as packed bits.

Which slots may enter a key at all is the transmitter's :class:`KeySlotFloor`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]


class SiftingError(ValueError):
    """Malformed detections or announcement."""


_GAP_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {
    1: np.dtype(np.uint8),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
}


def squash(
    slot_index: npt.NDArray[np.int64], channel: npt.NDArray[np.int8], rng: np.random.Generator
) -> tuple[I64, U8, U8]:
    """Resolve multi-click slots. Returns ``(slots, basis, bit)`` with unique sorted slots.

    Raises :class:`SiftingError` if the arrays differ in length, slots are not sorted or a
    channel is outside 0..3.
    """
    slot_index = np.asarray(slot_index, dtype=np.int64)
    channel = np.asarray(channel)
    if slot_index.shape != channel.shape or slot_index.ndim != 1:
        raise SiftingError(
            f"slot_index and channel must be 1-d of equal length, got {slot_index.shape} "
            f"and {channel.shape}"
        )
    n = slot_index.shape[0]
    if n == 0:
        return slot_index.copy(), np.zeros(0, np.uint8), np.zeros(0, np.uint8)
    ch = channel.astype(np.uint8, copy=False)
    if int(ch.max()) > 3:  # uint8 view maps negative int8 values above 3 too
        raise SiftingError("channel values must be 0..3 (H, V, D, A)")
    gaps = np.diff(slot_index)
    if n > 1 and int(gaps.min()) < 0:
        raise SiftingError("slot_index must be sorted ascending")
    # a click that shares its slot with the click before it: few (multi-photon pulses,
    # dark counts), so the groups are worked out on them alone
    follower = np.flatnonzero(gaps == 0) + 1
    if follower.shape[0] == 0:
        return slot_index.copy(), (ch >> 1).astype(np.uint8), (ch & 1).astype(np.uint8)
    keep = np.ones(n, dtype=np.bool_)
    keep[follower] = False
    out_ch = ch[keep]
    out_basis: U8 = (out_ch >> 1).astype(np.uint8, copy=False)
    out_bit: U8 = (out_ch & 1).astype(np.uint8, copy=False)
    # each multi-click slot: its first click (a group start) and its followers
    opens = np.ones(follower.shape[0], dtype=np.bool_)
    opens[1:] = follower[1:] != follower[:-1] + 1
    starts = follower[opens] - 1  # index of each group's first click
    members = np.sort(np.concatenate((starts, follower)))
    bounds = np.searchsorted(members, starts)  # where each group begins in ``members``
    counts = np.diff(np.append(bounds, members.shape[0]))
    n_z = np.add.reduceat(((ch[members] >> 1) == 0).astype(np.int64), bounds)
    mixed = (n_z > 0) & (n_z < counts)
    # a group start's place among the kept clicks: its index less the followers before it
    at = starts - np.searchsorted(follower, starts)
    out_basis[at[mixed]] = rng.integers(0, 2, int(mixed.sum()), dtype=np.uint8)
    out_bit[at] = rng.integers(0, 2, at.shape[0], dtype=np.uint8)
    return slot_index[keep], out_basis, out_bit


def encode_slots(slots: npt.NDArray[np.int64]) -> tuple[dict[str, int], list[bytes]]:
    """Compact encoding of sorted, unique, non-negative slots: ``(header, [gaps, escapes])``."""
    slots = np.asarray(slots, dtype=np.int64)
    n = int(slots.shape[0])
    if n == 0:
        return {"n": 0, "first": 0, "width": 1}, [b"", b""]
    gaps = np.diff(slots)
    best: tuple[int, int] | None = None
    for width in (1, 2, 4):
        escape = (1 << (8 * width)) - 1
        size = (n - 1) * width + 8 * int(np.count_nonzero(gaps >= escape))
        if best is None or size < best[1]:
            best = (width, size)
    assert best is not None
    width = best[0]
    escape = (1 << (8 * width)) - 1
    big = gaps >= escape
    dtype = _GAP_DTYPES[width]
    packed = np.where(big, escape, gaps).astype(dtype)
    return (
        {"n": n, "first": int(slots[0]), "width": width},
        [packed.tobytes(), gaps[big].astype("<u8").tobytes()],
    )


def decode_slots(header: dict[str, int], buffers: list[bytes]) -> I64:
    """Inverse of :func:`encode_slots`; raises :class:`SiftingError` on inconsistent sizes."""
    try:
        n, first, width = int(header["n"]), int(header["first"]), int(header["width"])
    except (KeyError, TypeError, ValueError):
        raise SiftingError("slot announcement header needs integer n, first, width") from None
    if width not in (1, 2, 4) or n < 0 or len(buffers) != 2:
        raise SiftingError(f"bad slot announcement (width={width}, n={n})")
    if n == 0:
        return np.zeros(0, np.int64)
    dtype = _GAP_DTYPES[width]
    if len(buffers[0]) != (n - 1) * width:
        raise SiftingError(f"slot gaps: {len(buffers[0])} bytes, expected {(n - 1) * width}")
    gaps = np.frombuffer(buffers[0], dtype=dtype).astype(np.int64)
    big = np.flatnonzero(gaps == (1 << (8 * width)) - 1)
    escapes = np.frombuffer(buffers[1], dtype="<u8").astype(np.int64)
    if escapes.shape[0] != big.shape[0]:
        raise SiftingError("slot announcement: escape count does not match")
    gaps[big] = escapes
    out = np.empty(n, dtype=np.int64)
    out[0] = first
    np.cumsum(gaps, out=out[1:])
    out[1:] += first
    return out


def pack_bits(bits: npt.NDArray[np.uint8]) -> bytes:
    return np.packbits(bits).tobytes()


def unpack_bits(data: bytes, n: int) -> U8:
    """Unpack ``n`` bits; raises :class:`SiftingError` if ``data`` is too short or too long."""
    if len(data) != (n + 7) // 8:
        raise SiftingError(f"packed bits: {len(data)} bytes for {n} bits")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n)


def pack_trits(values: npt.NDArray[np.uint8]) -> bytes:
    """Values 0..3 as two bit planes (intensity classes 0, 1, 2)."""
    v = np.asarray(values, dtype=np.uint8)
    return np.packbits(v & 1).tobytes() + np.packbits(v >> 1).tobytes()


def unpack_trits(data: bytes, n: int) -> U8:
    half = (n + 7) // 8
    if len(data) != 2 * half:
        raise SiftingError(f"packed classes: {len(data)} bytes for {n} values")
    low = unpack_bits(data[:half], n)
    high = unpack_bits(data[half:], n)
    return (low | (high << 1)).astype(np.uint8)


def basis_match(alice_basis: npt.NDArray[np.uint8], bob_basis: npt.NDArray[np.uint8]) -> Bool:
    """Mask of detections where both chose the same basis."""
    if alice_basis.shape != bob_basis.shape:
        raise SiftingError("basis arrays differ in length")
    return np.asarray(alice_basis == bob_basis, dtype=np.bool_)


class KeySlotFloor:
    """The transmitter's own bound on the slots a block may use.

    A slot may enter a key only once: not a slot of the public synchronisation pattern or
    of anything else emitted before the key states started (calibration light), not a slot
    an earlier block announced, not a slot whose detection the receiver disclosed (the
    QBER probe). The receiver filters its detections the same way, but from a start slot
    it learns over the pair-coordination channel, which is not authenticated
    information-theoretically; this floor is kept by the transmitter from its own state
    source and checked against every announcement, so a forged start slot can only make
    a block abort. The floor only moves up. Slots disclosed while key flows around them
    (drift-tracking windows, :meth:`withhold`) are refused wherever they lie.
    """

    def __init__(self, first_key_slot: int = 0) -> None:
        self.floor = max(0, int(first_key_slot))
        self._withheld: list[tuple[int, int]] = []  # [start, stop) ranges, kept sorted

    def withhold(self, start_slot: int, stop_slot: int) -> None:
        """Slots ``[start_slot, stop_slot)`` are disclosed while key flows around them (a
        drift-tracking window): no block may announce any of them, wherever the floor is."""
        if stop_slot > start_slot:
            self._withheld.append((int(start_slot), int(stop_slot)))
            self._withheld.sort()

    def shorten(self, start_slot: int, stop_slot: int, new_stop_slot: int) -> None:
        """The withheld range ``[start_slot, stop_slot)`` ends at ``new_stop_slot`` instead
        (the light in it was back to its calibrated state from there on): its slots from
        ``new_stop_slot`` may carry key again. Raises :class:`SiftingError` when no such
        range is withheld or ``new_stop_slot`` is not inside it (a range only shrinks)."""
        start, stop, new_stop = int(start_slot), int(stop_slot), int(new_stop_slot)
        if (start, stop) not in self._withheld:
            raise SiftingError(f"no withheld range [{start}, {stop}) to shorten")
        if not start < new_stop < stop:
            raise SiftingError(
                f"withheld range [{start}, {stop}) cannot end at slot {new_stop} "
                "(a range only shrinks and keeps at least one slot)"
            )
        self._withheld.remove((start, stop))
        self._withheld.append((start, new_stop))
        self._withheld.sort()

    @property
    def withheld(self) -> list[tuple[int, int]]:
        """The withheld ranges not yet below the floor."""
        return list(self._withheld)

    def key_states_from(self, first_key_slot: int) -> None:
        """Key states (again) from ``first_key_slot`` on (what the state source returned
        when the synchronisation pattern ended)."""
        self.floor = max(self.floor, int(first_key_slot))

    def disclosed(self, slots: npt.NDArray[np.int64]) -> None:
        """Detections in ``slots`` were disclosed (a probe): no key from them or before."""
        if slots.shape[0]:
            self.floor = max(self.floor, int(np.max(slots)) + 1)

    def claim(self, slots: npt.NDArray[np.int64]) -> int:
        """Take a block's announced ``slots`` before anything about them is disclosed: they
        must be strictly increasing and at or above the floor, which then moves past them,
        whatever becomes of the block. Raises :class:`SiftingError` otherwise (the floor
        stays: nothing was disclosed about refused slots).

        Returns the number of withheld slots (tracking windows) between the block's first
        and last slot: slots the block spans that could carry no key."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.shape[0] == 0:
            return 0
        if slots.shape[0] > 1 and int(np.diff(slots).min()) <= 0:
            raise SiftingError("announced slots repeat or are out of order")
        if int(slots[0]) < self.floor:
            raise SiftingError(
                f"announced slot {int(slots[0])} is below the first usable slot {self.floor} "
                "(synchronisation pattern, probe or an earlier block)"
            )
        for start, stop in self._withheld:
            i = int(np.searchsorted(slots, start, side="left"))
            if i < slots.shape[0] and int(slots[i]) < stop:
                raise SiftingError(
                    f"announced slot {int(slots[i])} lies in the disclosed tracking window "
                    f"[{start}, {stop})"
                )
        first, self.floor = int(slots[0]), int(slots[-1]) + 1
        spanned = sum(
            max(0, min(stop, self.floor) - max(start, first)) for start, stop in self._withheld
        )
        self._withheld = [(a, b) for a, b in self._withheld if b > self.floor]
        return spanned
