"""Compiled per-event loops of the link model (numba, compiled once and cached on disk).

The vectorised numpy version of the model spent its time in passes over arrays and in
the 64-bit slot hash (about 20 ns per element); compiled loops do the same physics at a
few nanoseconds per candidate slot, photon and detection. :mod:`drivers.simlink.source`
and :mod:`drivers.simlink.receiver` keep the public functions and prepare the per-chunk
constants; this module holds only loops.

What makes them fast (each measured on the default link, see ``drivers.simlink.bench``):
work in blocks of about a thousand candidates or pulses, with the random draws and
hashes in vectorisable loops and scratch arrays that stay in the L1 cache; random
decisions taken by compares whose result advances an output index (a branch on a
random outcome is mispredicted about as often as it is taken either way); the pulse
records read and written in place (``PHOTON_DTYPE``, no field-by-field copies); and no
fresh memory per chunk for the receiver's intermediate clicks (a first touch of a page
costs a fault, as much as the work done in it).

Randomness: each call gets a 64-bit seed from the caller's counter-based streams and
runs a SplitMix64 stream from it (``mix(seed + i * golden)``, the generator of Java's
``SplittableRandom``; it passes BigCrush). The sequence is fixed by the seed, so the
same seeds give the same tags.

The slot hash is the same ``splitmix64`` as :func:`drivers.syncpattern.splitmix64`, so
the choices made here equal those of :func:`drivers.simlink.source.slot_choices`.
"""

# ruff: noqa: PLR0917  (numba kernels take flat positional arguments)
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

__all__ = ["normal_samples", "receiver_events", "transmitter_photons"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _jit(fn: _F) -> _F:
    """Compile ``fn`` in nopython mode, without the GIL, cached next to this file.

    ``error_model="numpy"``: no zero-division checks (they cost a branch per division).
    Small helpers are inlined by LLVM when their callers are compiled."""
    return cast(_F, numba.njit(cache=True, nogil=True, error_model="numpy")(fn))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S11 = np.uint64(11)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
_LOW31 = np.uint64(0x7FFF_FFFF)
_LOW52 = np.uint64((1 << 52) - 1)
_FRAME_SHIFT = np.uint64(8)  # drivers.syncpattern.FRAME_SLOTS == 256
_TWO_M52 = 2.0**-52
_TWO_M53 = 2.0**-53
_TWO_PI = 2.0 * math.pi


@_jit
def _mix(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@_jit
def _unit(x: np.uint64) -> float:
    """Uniform in [0, 1) from the top 53 bits of ``x``."""
    return float(np.int64(x >> _S11)) * _TWO_M53  # signed: one instruction


@_jit
def _unit_open(x: np.uint64) -> float:
    """Uniform in (0, 1] from the top 53 bits of ``x`` (safe for a logarithm)."""
    return (float(np.int64(x >> _S11)) + 1.0) * _TWO_M53


# --- transmitter -------------------------------------------------------------------

_TABLE_BITS = 12
_TABLE_SHIFT = np.uint64(64 - _TABLE_BITS)


@_jit
def _gap_table(gap_scale: float) -> npt.NDArray[np.int64]:
    """``floor(-log(u) * gap_scale)`` for each bucket of the top bits of a draw when it is
    the same over the whole bucket, else -1 (then the caller takes the logarithm)."""
    n = 1 << _TABLE_BITS
    table = np.full(n, -1, np.int64)
    hi = math.inf  # value at the bucket's lower edge, u = b / n
    for b in range(n):
        lo = -math.log((b + 1) / n) * gap_scale
        if hi < 2.0**62 and math.floor(lo) == math.floor(hi):
            table[b] = int(lo)
        hi = lo
    return table


#: Candidates per block of the transmitter loop: its scratch arrays stay in the L1 cache.
_BLOCK = 1024


@_jit
def transmitter_photons(
    photons: npt.NDArray[np.void],
    m: int,
    pos: int,
    counter: np.uint64,
    key: np.uint64,
    slot_stop: int,
    gap_scale: float,
    gap_table: npt.NDArray[np.int64],
    class_threshold: npt.NDArray[np.uint64],
    z_threshold: np.uint64,
    sync_mix: np.uint64,
    use_sync: bool,
    keep_threshold: npt.NDArray[np.uint64],
    multi_threshold: npt.NDArray[np.uint64],
    inverse_ratio: npt.NDArray[np.float64],
    photon_cdf: npt.NDArray[np.float64],
    state_angle_rad: npt.NDArray[np.float32],
) -> tuple[int, int, np.uint64, bool]:
    """Pulses after slot ``pos`` (up to ``slot_stop``) that reached the receiver, written
    in slot order into the records ``photons`` (``PHOTON_DTYPE``) from index ``m`` on.

    Returns (m, pos, counter, done); not done means ``photons`` has no room for another
    block (``_BLOCK`` records): the caller grows it and calls again with the returned
    state, so the result does not depend on the capacity.

    Candidate slots are Bernoulli(p_max), drawn as geometric gaps ``floor(E * gap_scale)
    + 1`` with ``E`` exponential and ``gap_scale = -1 / log(1 - p_max)`` (0 when every
    slot is a candidate). A candidate's class comes from the slot hash (``h >> 32``
    against ``class_threshold``, or the sync pattern's frame bit when ``use_sync``), its
    basis from bits 1..31 against ``z_threshold`` and its bit from bit 0. The uniform
    ``u`` (52 bits of the gap's draw, independent of the bits the table used) keeps it
    with ``accept_ratio[class]`` (``u * 2**52 < keep_threshold[class]``) and, rescaled
    by ``inverse_ratio``, picks the photon number from ``photon_cdf[class]``
    (zero-truncated Poisson CDF over n = 1, 2, ...; ``multi_threshold[class, j]`` is
    the kept ``u * 2**52`` from which n > j + 1).

    Per block: the draws (a vectorised loop), the gaps and slots (a short serial
    loop), the slot hashes, classes, keep decisions and angles (vectorisable loops),
    then one pass that writes every candidate and keeps it by advancing ``m``, so the
    random keep decision costs no mispredicted branch; only n > 2 (a few per mille)
    branches.
    """
    cap = photons.shape[0]
    n_cdf = photon_cdf.shape[1]
    draw = np.empty(_BLOCK, np.uint64)
    cand_slot = np.empty(_BLOCK, np.int64)
    cand_hash = np.empty(_BLOCK, np.uint64)
    cand_class = np.empty(_BLOCK, np.uint8)
    cand_n = np.empty(_BLOCK, np.uint8)
    cand_keep = np.empty(_BLOCK, np.uint8)
    cand_angle = np.empty(_BLOCK, np.float32)
    t_signal = class_threshold[0]
    t_decoy = class_threshold[1]
    keep_0, keep_1, keep_2 = keep_threshold[0], keep_threshold[1], keep_threshold[2]
    multi_0, multi_1, multi_2 = multi_threshold[0, 0], multi_threshold[1, 0], multi_threshold[2, 0]
    angle_h, angle_v = state_angle_rad[0], state_angle_rad[1]
    angle_d, angle_a = state_angle_rad[2], state_angle_rad[3]
    while m + _BLOCK <= cap:
        for b in range(_BLOCK):
            draw[b] = _mix(counter + np.uint64(b + 1) * _GOLDEN)
        counter += np.uint64(_BLOCK) * _GOLDEN
        n_cand = _BLOCK
        for b in range(_BLOCK):
            x = draw[b]
            gap = gap_table[x >> _TABLE_SHIFT]
            if gap < 0:  # rare: the bucket straddles a gap boundary
                gap = int(min(-math.log(_unit_open(x)) * gap_scale, 2.0**62))
                draw[b] = _mix(x ^ _M1)  # the gap used all the bits: fresh ones for u
            if gap >= slot_stop - 1 - pos:
                n_cand = b
                break
            pos += gap + 1
            cand_slot[b] = pos
        for b in range(n_cand):
            cand_hash[b] = _mix((np.uint64(cand_slot[b]) ^ key) + _GOLDEN)
        if use_sync:
            for b in range(n_cand):
                frame = np.uint64(cand_slot[b]) >> _FRAME_SHIFT
                cand_class[b] = 2 - 2 * (_mix((frame ^ sync_mix) + _GOLDEN) & _ONE)
        else:
            for b in range(n_cand):
                u_class = cand_hash[b] >> _S32
                cand_class[b] = (u_class >= t_signal) + (u_class >= t_decoy)
        # vectorisable: keep, photon number 1 or 2 and angle of every candidate
        for b in range(n_cand):
            h = cand_hash[b]
            c = cand_class[b]
            u52 = draw[b] & _LOW52
            keep = u52 < (keep_0 if c == 0 else (keep_1 if c == 1 else keep_2))
            u52 = u52 if keep else np.uint64(0)  # 0 when dropped: one photon
            draw[b] = u52
            multi = multi_0 if c == 0 else (multi_1 if c == 1 else multi_2)
            cand_n[b] = 1 + np.uint8(u52 >= multi)
            cand_keep[b] = keep
            basis = ((h >> _ONE) & _LOW31) >= z_threshold
            bit = (h & _ONE) != 0
            cand_angle[b] = (
                (angle_v if bit else angle_h) if not basis else (angle_a if bit else angle_d)
            )
        for b in range(n_cand):  # n > 2: a few per mille
            c = cand_class[b]
            if draw[b] >= multi_threshold[c, 1]:
                u_n = float(np.int64(draw[b])) * _TWO_M52 * inverse_ratio[c]
                n = 3
                while n < n_cdf and u_n >= photon_cdf[c, n - 1]:
                    n += 1
                cand_n[b] = min(n, 255)
        # every candidate is written and kept by advancing m: no branch on keep
        for b in range(n_cand):
            record = photons[m]
            record.slot = cand_slot[b]
            record.angle_rad = cand_angle[b]
            record.n_photons = cand_n[b]
            m += int(cand_keep[b])
        if n_cand < _BLOCK:
            return m, pos, counter, True
    return m, pos, counter, False


@_jit
def slot_choices_into(
    key: np.uint64,
    slots: npt.NDArray[np.int64],
    z_threshold: np.uint64,
    class_threshold: npt.NDArray[np.uint64],
    basis: npt.NDArray[np.uint8],
    bit: npt.NDArray[np.uint8],
    intensity: npt.NDArray[np.uint8],
) -> None:  # pragma: no cover - jit
    """Basis, bit and intensity class of each slot, from the same slot hash and thresholds
    as :func:`transmitter_photons` (the transmitter's answer to sifting; one pass instead
    of the dozen numpy passes over 1e7 slots per block)."""
    t_signal, t_decoy = class_threshold[0], class_threshold[1]
    for i in range(slots.shape[0]):
        h = _mix((np.uint64(slots[i]) ^ key) + _GOLDEN)
        bit[i] = np.uint8(h & _ONE)
        basis[i] = np.uint8(((h >> _ONE) & _LOW31) >= z_threshold)
        u_class = h >> _S32
        intensity[i] = np.uint8(u_class >= t_signal) + np.uint8(u_class >= t_decoy)


# --- receiver ----------------------------------------------------------------------


def _normal_tables() -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]
]:
    """Tables of a 256-layer ziggurat for the standard normal (Marsaglia and Tsang, laid
    out as numpy's): per layer the fast-accept bound on a 52-bit magnitude, the scale of
    that magnitude and the density at the layer's edge."""
    m = float(1 << 52)
    dn = tn = _ZIG_R
    q = _ZIG_V / math.exp(-0.5 * dn * dn)
    ki = np.zeros(256, np.int64)
    wi = np.zeros(256)
    fi = np.zeros(256)
    ki[0] = int(dn / q * m)
    wi[0], wi[255] = q / m, dn / m
    fi[0], fi[255] = 1.0, math.exp(-0.5 * dn * dn)
    for i in range(254, 0, -1):
        dn = math.sqrt(-2.0 * math.log(_ZIG_V / dn + math.exp(-0.5 * dn * dn)))
        ki[i + 1] = int(dn / tn * m)
        tn = dn
        fi[i] = math.exp(-0.5 * dn * dn)
        wi[i] = dn / m
    return ki, wi, fi


_ZIG_R = 3.6541528853610088
_ZIG_V = 0.00492867323399
_ZIG_K, _ZIG_W, _ZIG_F = _normal_tables()
_BYTE = np.uint64(0xFF)
_S12 = np.uint64(12)
_S38 = np.uint64(38)
_LOW26 = np.uint64((1 << 26) - 1)
_TWO_M26 = 2.0**-26
_S8 = np.uint64(8)
_S9 = np.uint64(9)


@_jit
def _normal_fast(x: np.uint64) -> tuple[float, bool]:
    """Ziggurat fast path from one draw: (z, accepted); 99 % accepted. The sign is
    applied arithmetically: a branch on a random bit would be mispredicted half the time."""
    layer = np.int64(x & _BYTE)
    sign = 1.0 - 2.0 * float(np.int64((x >> _S8) & _ONE))
    mag = np.int64((x >> _S9) & _LOW52)
    return sign * float(mag) * _ZIG_W[layer], mag < _ZIG_K[layer]


@_jit
def _normal_slow(x: np.uint64, counter: np.uint64) -> tuple[float, np.uint64]:
    """Ziggurat slow path after the draw ``x`` failed the fast test: wedge or tail test,
    then new draws until one is accepted. Returns (z, counter)."""
    while True:
        layer = np.int64(x & _BYTE)
        sign = 1.0 - 2.0 * float(np.int64((x >> _S8) & _ONE))
        mag = np.int64((x >> _S9) & _LOW52)
        z = float(mag) * _ZIG_W[layer]
        if mag < _ZIG_K[layer]:
            return sign * z, counter
        if layer == 0:  # tail beyond r
            while True:
                counter += _GOLDEN
                xx = -math.log(_unit_open(_mix(counter))) / _ZIG_R
                counter += _GOLDEN
                yy = -math.log(_unit_open(_mix(counter)))
                if yy + yy > xx * xx:
                    return sign * (_ZIG_R + xx), counter
        counter += _GOLDEN
        f0 = _ZIG_F[layer]
        if f0 + _unit(_mix(counter)) * (_ZIG_F[layer - 1] - f0) < math.exp(-0.5 * z * z):
            return sign * z, counter
        counter += _GOLDEN
        x = _mix(counter)


_MEMO_SLOTS = 256  # direct-mapped memo of the click probabilities per distinct angle
_PULSE_BLOCK = 2048  # pulses per block of the receiver's first two passes
_NO_ANGLE = np.uint32(0x7FC0_0001)  # a NaN pattern the transmitter never sends
_S56 = np.uint64(56)
_TWO53 = float(1 << 53)
_ONE53 = 1 << 53


@_jit
def _u26(x: np.uint64) -> float:
    """Uniform in [0, 1) from the low 26 bits of ``x``."""
    return float(np.int64(x & _LOW26)) * _TWO_M26


@_jit
def _threshold_53(p: float) -> np.uint64:
    """The integer ``t`` with ``u < p  <=>  u * 2**53 < t`` for a 53-bit uniform ``u``."""
    return np.uint64(min(max(math.ceil(p * _TWO53), 0), _ONE53))


@_jit
def _memo_fill(
    h: int,
    bits: np.uint32,
    angle: float,
    memo: tuple[npt.NDArray[np.uint32], npt.NDArray[np.float64], npt.NDArray[np.uint64]],
    analysis: npt.NDArray[np.float64],
    misalignment: float,
    p_basis_z: float,
    efficiency: npt.NDArray[np.float64],
) -> None:
    """Fill memo entry ``h`` for a pulse at ``angle`` (float32 bit pattern ``bits``).

    The pulse's Stokes vector ``(cos 2 angle, sin 2 angle, 0)`` is turned by the rotation
    between the fiber's end and the analysers, of which only the 2x2 block ``analysis``
    = ``(r00, r01, r10, r11)`` matters (:func:`drivers.simlink.polarization.
    analysis_block`): ``s1``, ``s2`` after it. Per arm (Z measures ``S1``, X ``S2``),
    ``p1[h, a]`` is p(port 1) = ``e_d + (1 - s_a) / 2 (1 - 2 e_d)`` (with the identity,
    ``sin^2(angle - analyser)``); ``threshold[h]`` is the cumulative distribution over
    the channel that clicks for a single photon (arm Z with ``p_basis_z``, then the port,
    then the detector's efficiency) on a 53-bit uniform, so the channel is one draw
    against four thresholds, 4 meaning no click.
    """
    memo_bits, p1, threshold = memo
    e_d = misalignment
    c2 = math.cos(2.0 * angle)
    s2 = math.sin(2.0 * angle)
    stokes_1 = analysis[0] * c2 + analysis[1] * s2
    stokes_2 = analysis[2] * c2 + analysis[3] * s2
    p1_z = e_d + 0.5 * (1.0 - stokes_1) * (1.0 - 2.0 * e_d)
    p1_x = e_d + 0.5 * (1.0 - stokes_2) * (1.0 - 2.0 * e_d)
    memo_bits[h] = bits
    p1[h, 0] = p1_z
    p1[h, 1] = p1_x
    cum = p_basis_z * (1.0 - p1_z) * efficiency[0]
    threshold[h, 0] = _threshold_53(cum)
    cum += p_basis_z * p1_z * efficiency[1]
    threshold[h, 1] = _threshold_53(cum)
    cum += (1.0 - p_basis_z) * (1.0 - p1_x) * efficiency[2]
    threshold[h, 2] = _threshold_53(cum)
    cum += (1.0 - p_basis_z) * p1_x * efficiency[3]
    threshold[h, 3] = _threshold_53(cum)


@_jit
def _clicked_arms(
    ev_slot: npt.NDArray[np.int64],
    ev_channel: npt.NDArray[np.int16],
    draw: npt.NDArray[np.uint64],
    photons: npt.NDArray[np.void],
    photon_bits: npt.NDArray[np.void],
    first: int,
    stop: int,
    memo: tuple[npt.NDArray[np.uint32], npt.NDArray[np.float64], npt.NDArray[np.uint64]],
    counter: np.uint64,
    p_basis_z: float,
    passive: bool,
    efficiency: npt.NDArray[np.float64],
    analysis: npt.NDArray[np.float64],
    misalignment: float,
) -> tuple[int, np.uint64]:
    """Basis, port and click of the photons of pulses ``first`` .. ``stop - 1``: writes
    (slot, channel) of the detectors that click (room for two per pulse); returns their
    number and the stream counter. ``memo`` (see :func:`_memo_fill`) lasts the chunk;
    ``photon_bits`` is ``photons`` viewed with the angle's float32 bit pattern
    (``drivers.simlink.source.PHOTON_BITS_DTYPE``); ``draw`` is scratch.

    One draw per pulse (a vectorised loop). A single photon (most pulses) compares it
    with the memo's four thresholds; each candidate is written and kept by advancing
    the count, so the random decisions cost no mispredicted branch. A multi-photon
    pulse (a few per cent) runs a sub-stream seeded by its draw."""
    memo_bits, p1, threshold = memo
    n_block = stop - first
    for b in range(n_block):
        draw[b] = _mix(counter + np.uint64(b + 1) * _GOLDEN)
    counter += np.uint64(n_block) * _GOLDEN
    k = 0
    for b in range(n_block):
        record = photon_bits[first + b]
        bits = record.angle_bits
        n = int(record.n_photons)
        slot = record.slot
        h = int((np.uint64(bits) * _GOLDEN) >> _S56)
        if memo_bits[h] != bits:  # a chunk holds a handful of angles: rarely taken
            angle = float(photons[first + b].angle_rad)
            _memo_fill(h, bits, angle, memo, analysis, misalignment, p_basis_z, efficiency)
        x = draw[b]
        if n == 1:
            u53 = x >> _S11
            ch = (
                int(u53 >= threshold[h, 0])
                + int(u53 >= threshold[h, 1])
                + int(u53 >= threshold[h, 2])
                + int(u53 >= threshold[h, 3])
            )
            ev_slot[k] = slot
            ev_channel[k] = ch
            k += int(ch < 4)
            continue
        # multi-photon pulse: per-photon basis if passive
        sub = x
        u_basis = _u26(x >> _S38)
        n_z = n * int(u_basis < p_basis_z)
        if passive:
            n_z = int(u_basis < p_basis_z)
            for _ in range(n - 1):
                sub += _GOLDEN
                n_z += int(_unit(_mix(sub)) < p_basis_z)
        for arm in range(2):
            n_arm = n_z if arm == 0 else n - n_z
            if n_arm == 0:
                continue
            sub += _GOLDEN
            y = _mix(sub)
            ch = 2 * arm + int(_u26(y >> _S12) < p1[h, arm])
            p_none = 1.0
            for _ in range(n_arm):
                p_none *= 1.0 - efficiency[ch]
            ev_slot[k] = slot
            ev_channel[k] = ch
            k += int(_u26(y >> _S38) < 1.0 - p_none)
    return k, counter


@_jit
def _click_times(
    out_c: npt.NDArray[np.int16],
    out_t: npt.NDArray[np.int64],
    out_s: npt.NDArray[np.int64],
    ev_slot: npt.NDArray[np.int64],
    ev_channel: npt.NDArray[np.int16],
    n_events: int,
    counter: np.uint64,
    slot_start: int,
    chunk_t0_ps: int,
    period_ps: float,
    delay_ps: npt.NDArray[np.float64],
    true_delay_ps: float,
    jitter_ps: float,
    gate_width_ps: float,
    k: int,
    last_t: int,
) -> tuple[int, int, np.uint64]:
    """Jittered true times of the clicks; those inside their detector's gate are written
    (channel, time, slot) in time order after the ``k`` written so far (the latest at
    ``last_t``). Returns (k, last_t, counter)."""
    inv_period = 1.0 / period_ps
    half_gate = gate_width_ps / 2
    for e in range(n_events):
        ch = ev_channel[e]
        slot = ev_slot[e]
        counter += _GOLDEN
        x = _mix(counter)
        z, ok = _normal_fast(x)
        if not ok:
            z, counter = _normal_slow(x, counter)
        offset = true_delay_ps + z * jitter_ps
        # distance to the nearest gate centre (gates repeat every period); floor, not %
        d = offset - delay_ps[ch]
        miss = d - period_ps * np.floor(d * inv_period + 0.5)
        rel = max((slot - slot_start) * period_ps + offset, 0.0)
        t = chunk_t0_ps + int(np.floor(rel + 0.5))
        keep = abs(miss) < half_gate
        out_c[k] = ch
        out_t[k] = t
        out_s[k] = slot
        if keep & (t < last_t):  # rare: both arms of a pulse, or jitter > period
            j = k
            while j > 0 and out_t[j - 1] > t:
                out_c[j], out_t[j], out_s[j] = out_c[j - 1], out_t[j - 1], out_s[j - 1]
                j -= 1
            out_c[j], out_t[j], out_s[j] = ch, t, slot
        else:
            last_t += (t - last_t) * int(keep)
        k += int(keep)
    return k, last_t, counter


@_jit
def _heap_push(
    ht: npt.NDArray[np.int64],
    hc: npt.NDArray[np.int16],
    hs: npt.NDArray[np.int64],
    n: int,
    t: int,
    c: int,
    s: int,
) -> None:
    """Push (t, c, s) onto the min-heap (by t) of size ``n`` (capacity checked by caller)."""
    i = n
    while i > 0:
        parent = (i - 1) >> 1
        if ht[parent] <= t:
            break
        ht[i], hc[i], hs[i] = ht[parent], hc[parent], hs[parent]
        i = parent
    ht[i], hc[i], hs[i] = t, c, s


@_jit
def _heap_pop(
    ht: npt.NDArray[np.int64], hc: npt.NDArray[np.int16], hs: npt.NDArray[np.int64], n: int
) -> None:
    """Remove the root of the min-heap of size ``n`` (the caller read it first)."""
    n -= 1
    t, c, s = ht[n], hc[n], hs[n]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and ht[child + 1] < ht[child]:
            child += 1
        if ht[child] >= t:
            break
        ht[i], hc[i], hs[i] = ht[child], hc[child], hs[child]
        i = child
    if n > 0:
        ht[i], hc[i], hs[i] = t, c, s


@_jit
def _photon_run(
    out: tuple[
        npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
    ],
    clicks: tuple[npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64]],
    k: int,
    i: int,
    stop: int,
    t_stop: int,
    last_click_ps: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    dead_ps: npt.NDArray[np.int64],
    on: npt.NDArray[np.int64],
    chunk_t0_ps: int,
    tagger: tuple[float, float, int],
) -> tuple[int, int]:
    """Photon clicks ``i`` .. before ``stop`` with times before ``t_stop`` (no other
    event in between, no afterpulsing): dead time and detector state decide by a
    compare, and each click is written and kept by advancing ``k`` (no branch on the
    random outcome). The per-channel state lives in locals meanwhile. Returns (k, i)."""
    out_c, out_t, out_s, out_tag = out
    ph_c, ph_t, ph_s = clicks
    tagger_scale, tagger_frac, tagger_base = tagger
    last = last_click_ps.copy()
    kept = np.zeros(4, np.int64)
    while i < stop:
        t = ph_t[i]
        if t >= t_stop:
            break
        c = ph_c[i]
        keep = on[c] & int(t - last[c] >= dead_ps[c])
        last[c] += (t - last[c]) * keep
        kept[c] += keep
        out_c[k] = c
        out_t[k] = t
        out_s[k] = ph_s[i]
        out_tag[k] = tagger_base + np.int64(
            np.floor(float(t - chunk_t0_ps) * tagger_scale + tagger_frac)
        )
        k += keep
        i += 1
    for c in range(4):
        last_click_ps[c] = last[c]
        counts[c] += kept[c]
    return k, i


@_jit
def _fill_events(
    out: tuple[
        npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
    ],
    heap: tuple[npt.NDArray[np.int64], npt.NDArray[np.int16], npt.NDArray[np.int64]],
    state: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    counter: np.uint64,
    clicks: tuple[npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64]],
    dark: tuple[npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64]],
    pending: tuple[npt.NDArray[np.int16], npt.NDArray[np.int64], npt.NDArray[np.int64]],
    last_click_ps: npt.NDArray[np.int64],
    slot_start: int,
    chunk_t0_ps: int,
    chunk_end_ps: int,
    period_ps: float,
    enabled: npt.NDArray[np.bool_],
    delay_ps: npt.NDArray[np.float64],
    dead_time_ps: npt.NDArray[np.float64],
    gate_width_ps: float,
    afterpulse_probability: float,
    afterpulse_delay_ps: float,
    tagger: tuple[float, float, int],
) -> tuple[np.uint64, bool]:
    """The time-ordered event loop of :func:`receiver_events`, resumable: ``state`` holds
    (kept, next photon click, next dark click, next pending event, heap size). Returns
    (counter, done); not done means the output is full.

    Kept events are written as (channel, true time, slot, tagger time) to ``out`` and
    counted per channel. Without afterpulsing, the photon clicks up to the next other
    event go through :func:`_photon_run`."""
    out_c, out_t, out_s, out_tag = out
    ht, hc, hs = heap
    ph_c, ph_t, ph_s = clicks
    dark_channel, dark_time_ps, dark_slot = dark
    pending_channel, pending_time_ps, pending_slot = pending
    tagger_scale, tagger_frac, tagger_base = tagger
    k, i, j, p, n_heap = state[0], state[1], state[2], state[3], state[4]
    n_ph = ph_t.shape[0]
    n_dark = dark_time_ps.shape[0]
    n_pend = pending_time_ps.shape[0]
    cap = out_t.shape[0]
    gate_half = gate_width_ps / 2
    big = 1 << 62
    # t - last < dead  <=>  t - last < ceil(dead) for whole picoseconds
    dead_ps = np.empty(4, np.int64)
    on = np.empty(4, np.int64)
    for c in range(4):
        dead_ps[c] = math.ceil(dead_time_ps[c])
        on[c] = int(enabled[c])
    done = False
    while k < cap:
        t_dk = dark_time_ps[j] if j < n_dark else big
        t_pd = pending_time_ps[p] if p < n_pend else big
        t_ap = ht[0] if n_heap > 0 else big
        if afterpulse_probability <= 0.0:
            k, i = _photon_run(
                out,
                clicks,
                k,
                i,
                min(n_ph, i + cap - k),
                min(t_dk, t_pd, t_ap, chunk_end_ps),
                last_click_ps,
                counts,
                dead_ps,
                on,
                chunk_t0_ps,
                tagger,
            )
            if k >= cap:
                break
        t_ph = ph_t[i] if i < n_ph else big
        t = min(t_ph, t_dk, t_pd, t_ap)
        if t >= chunk_end_ps:
            done = True
            break
        if t == t_ph:
            c, s = int(ph_c[i]), ph_s[i]
            i += 1
        elif t == t_dk:
            c, s = int(dark_channel[j]), dark_slot[j]
            j += 1
        elif t == t_pd:
            c, s = int(pending_channel[p]), pending_slot[p]
            p += 1
        else:
            c, s = int(hc[0]), hs[0]
            _heap_pop(ht, hc, hs, n_heap)
            n_heap -= 1
        if not enabled[c] or t - last_click_ps[c] < dead_ps[c]:
            continue
        last_click_ps[c] = t
        counts[c] += 1
        out_c[k], out_t[k], out_s[k] = c, t, s
        out_tag[k] = tagger_base + math.floor(float(t - chunk_t0_ps) * tagger_scale + tagger_frac)
        k += 1
        if afterpulse_probability <= 0.0:
            continue
        counter += _GOLDEN
        if _unit(_mix(counter)) >= afterpulse_probability:
            continue
        counter += _GOLDEN
        release = (
            t
            + dead_time_ps[c]
            - afterpulse_delay_ps * math.log(_unit_open(_mix(counter)))
            - chunk_t0_ps
        )
        gate = math.ceil((release - delay_ps[c] + gate_half) / period_ps)
        t_new = chunk_t0_ps + math.floor(gate * period_ps + delay_ps[c] + 0.5)
        s_new = slot_start + math.floor((t_new - chunk_t0_ps - delay_ps[c]) / period_ps)
        _heap_push(ht, hc, hs, n_heap, t_new, c, s_new)
        n_heap += 1
    state[0], state[1], state[2], state[3], state[4] = k, i, j, p, n_heap
    return counter, done


@_jit
def receiver_events(
    photons: npt.NDArray[np.void],
    photon_bits: npt.NDArray[np.void],
    dark_channel: npt.NDArray[np.int16],
    dark_time_ps: npt.NDArray[np.int64],
    dark_slot: npt.NDArray[np.int64],
    pending_channel: npt.NDArray[np.int16],
    pending_time_ps: npt.NDArray[np.int64],
    pending_slot: npt.NDArray[np.int64],
    last_click_ps: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    click_c: npt.NDArray[np.int16],
    click_t: npt.NDArray[np.int64],
    click_s: npt.NDArray[np.int64],
    seed: np.uint64,
    slot_start: int,
    chunk_t0_ps: int,
    chunk_end_ps: int,
    period_ps: float,
    analysis: npt.NDArray[np.float64],
    misalignment: float,
    p_basis_z: float,
    passive: bool,
    enabled: npt.NDArray[np.bool_],
    efficiency: npt.NDArray[np.float64],
    delay_ps: npt.NDArray[np.float64],
    dead_time_ps: npt.NDArray[np.float64],
    true_delay_ps: float,
    jitter_ps: float,
    gate_width_ps: float,
    afterpulse_probability: float,
    afterpulse_delay_ps: float,
    tagger_scale: float,
    tagger_frac: float,
    tagger_base: int,
) -> tuple[
    npt.NDArray[np.int16],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int16],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]:
    """Kept detections of one chunk in true-time order, and the events left for the next.

    ``photons`` are the fiber batch's records (``PHOTON_DTYPE``), ``photon_bits`` the
    same memory as ``PHOTON_BITS_DTYPE`` (the angle's bit pattern keys a memo). Photon
    clicks (see the receiver module's docstring) are merged in time order with the dark
    clicks and the pending events (both sorted by time), and afterpulses as they are
    released; each event is then, in time order: dropped if its detector is off,
    dropped inside the detector's (non-paralysable) dead time, otherwise kept, and with
    ``afterpulse_probability`` it schedules an afterpulse at the first gate after
    ``dead time + Exp(afterpulse_delay_ps)``. Events at or after ``chunk_end_ps`` are
    returned unprocessed as the next pending events. ``last_click_ps`` is updated and
    the kept events are added to ``counts`` (per channel). ``click_c``, ``click_t``
    and ``click_s`` are scratch space for the photon clicks (room for two per pulse),
    kept by the caller from chunk to chunk: fresh memory costs a page fault per 4 KiB
    on first touch, which is as much as the work done in it. The tagger time of a true
    time ``t`` is ``tagger_base + floor((t - chunk_t0_ps) * tagger_scale +
    tagger_frac)`` (see :class:`drivers.simlink.receiver.ReceiverClock`).

    Returns (channel, true time, slot, tagger time) of the kept clicks and (channel,
    true time, slot) of the pending events.
    """
    # Clicks, then their times, block by block: the events between stay in the L1 cache.
    n_pulses = photons.shape[0]
    ev_slot = np.empty(2 * _PULSE_BLOCK, np.int64)
    ev_channel = np.empty(2 * _PULSE_BLOCK, np.int16)
    draw = np.empty(_PULSE_BLOCK, np.uint64)
    memo = (
        np.full(_MEMO_SLOTS, _NO_ANGLE, np.uint32),
        np.zeros((_MEMO_SLOTS, 2)),
        np.zeros((_MEMO_SLOTS, 4), np.uint64),
    )
    ph_c, ph_t, ph_s = click_c, click_t, click_s
    n_ph = 0
    last_t = -(1 << 62)
    counter = seed
    for first in range(0, n_pulses, _PULSE_BLOCK):
        n_ev, counter = _clicked_arms(
            ev_slot,
            ev_channel,
            draw,
            photons,
            photon_bits,
            first,
            min(first + _PULSE_BLOCK, n_pulses),
            memo,
            counter,
            p_basis_z,
            passive,
            efficiency,
            analysis,
            misalignment,
        )
        n_ph, last_t, counter = _click_times(
            ph_c,
            ph_t,
            ph_s,
            ev_slot,
            ev_channel,
            n_ev,
            counter,
            slot_start,
            chunk_t0_ps,
            period_ps,
            delay_ps,
            true_delay_ps,
            jitter_ps,
            gate_width_ps,
            n_ph,
            last_t,
        )
    ph_c, ph_t, ph_s = ph_c[:n_ph], ph_t[:n_ph], ph_s[:n_ph]
    n_dark = dark_time_ps.shape[0]
    n_pend = pending_time_ps.shape[0]
    # each kept click schedules at most one afterpulse: the heap never outgrows the output
    cap = n_ph + n_dark + n_pend + 16
    out_c = np.empty(cap, np.int16)
    out_t = np.empty(cap, np.int64)
    out_s = np.empty(cap, np.int64)
    out_tag = np.empty(cap, np.int64)
    ht = np.empty(cap, np.int64)
    hc = np.empty(cap, np.int16)
    hs = np.empty(cap, np.int64)
    state = np.zeros(5, np.int64)  # k, next photon click, next dark, next pending, heap size
    if afterpulse_probability <= 0.0 and n_dark == 0 and n_pend == 0:
        # the common case: only photon clicks, no afterpulses
        on = np.empty(4, np.int64)
        dead_ps = np.empty(4, np.int64)
        for c in range(4):
            on[c] = int(enabled[c])
            dead_ps[c] = math.ceil(dead_time_ps[c])
        state[0], state[1] = _photon_run(
            (out_c, out_t, out_s, out_tag),
            (ph_c, ph_t, ph_s),
            0,
            0,
            n_ph,
            chunk_end_ps,
            last_click_ps,
            counts,
            dead_ps,
            on,
            chunk_t0_ps,
            (tagger_scale, tagger_frac, tagger_base),
        )
    while True:
        counter, done = _fill_events(
            (out_c, out_t, out_s, out_tag),
            (ht, hc, hs),
            state,
            counts,
            counter,
            (ph_c, ph_t, ph_s),
            (dark_channel, dark_time_ps, dark_slot),
            (pending_channel, pending_time_ps, pending_slot),
            last_click_ps,
            slot_start,
            chunk_t0_ps,
            chunk_end_ps,
            period_ps,
            enabled,
            delay_ps,
            dead_time_ps,
            gate_width_ps,
            afterpulse_probability,
            afterpulse_delay_ps,
            (tagger_scale, tagger_frac, tagger_base),
        )
        if done:
            break
        k = cap
        cap *= 2
        out_c = np.concatenate((out_c, np.empty(cap - k, np.int16)))
        out_t = np.concatenate((out_t, np.empty(cap - k, np.int64)))
        out_s = np.concatenate((out_s, np.empty(cap - k, np.int64)))
        out_tag = np.concatenate((out_tag, np.empty(cap - k, np.int64)))
        ht = np.concatenate((ht, np.empty(cap - k, np.int64)))
        hc = np.concatenate((hc, np.empty(cap - k, np.int16)))
        hs = np.concatenate((hs, np.empty(cap - k, np.int64)))
    k, i, j, p, n_heap = state[0], state[1], state[2], state[3], state[4]
    # everything left is at or after the chunk's end
    n_left = (n_ph - i) + (n_dark - j) + (n_pend - p) + n_heap
    left_c = np.empty(n_left, np.int16)
    left_t = np.empty(n_left, np.int64)
    left_s = np.empty(n_left, np.int64)
    q = 0
    for x in range(i, n_ph):
        left_c[q], left_t[q], left_s[q] = ph_c[x], ph_t[x], ph_s[x]
        q += 1
    for x in range(j, n_dark):
        left_c[q], left_t[q], left_s[q] = dark_channel[x], dark_time_ps[x], dark_slot[x]
        q += 1
    for x in range(p, n_pend):
        left_c[q], left_t[q], left_s[q] = pending_channel[x], pending_time_ps[x], pending_slot[x]
        q += 1
    for x in range(n_heap):
        left_c[q], left_t[q], left_s[q] = hc[x], ht[x], hs[x]
        q += 1
    order = np.argsort(left_t, kind="mergesort")
    return (
        out_c[:k],
        out_t[:k],
        out_s[:k],
        out_tag[:k],
        left_c[order],
        left_t[order],
        left_s[order],
    )


@_jit
def normal_samples(seed: np.uint64, n: int) -> npt.NDArray[np.float64]:
    """``n`` standard normals from the stream seeded ``seed`` (the jitter's sampler; for
    validating it)."""
    out = np.empty(n)
    counter = seed
    for i in range(n):
        counter += _GOLDEN
        x = _mix(counter)
        z, ok = _normal_fast(x)
        if not ok:
            z, counter = _normal_slow(x, counter)
        out[i] = z
    return out
