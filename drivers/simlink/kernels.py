"""Compiled per-event loops of the link model (numba, compiled once and cached on disk).

The vectorised numpy version of the model spent its time in passes over arrays and in
the 64-bit slot hash (about 20 ns per element); one fused loop per side does the same
physics in a single pass, so the cost is a few nanoseconds per candidate slot, photon
and detection. :mod:`drivers.simlink.source` and :mod:`drivers.simlink.receiver` keep
the public functions and prepare the per-chunk constants; this module holds only loops.

Randomness: each call gets one 64-bit seed drawn from the caller's seeded
``numpy.random.Generator`` and runs a SplitMix64 stream from it (``mix(seed + i *
golden)``, the generator of Java's ``SplittableRandom``; it passes BigCrush). The
sequence is fixed by the seed, so the same seeds give the same tags.

The slot hash is the same ``splitmix64`` as :func:`drivers.syncpattern.splitmix64`, so
the choices made here equal those of :func:`drivers.simlink.source.slot_choices`.
"""

# ruff: noqa: PLR0917  (numba kernels take flat positional arguments)
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba  # type: ignore[import-untyped]
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
    return z ^ (z >> _S31)  # type: ignore[no-any-return]


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


@_jit
def _fill_photons(
    slot: npt.NDArray[np.int64],
    angle: npt.NDArray[np.float32],
    n_photons: npt.NDArray[np.uint8],
    cls_out: npt.NDArray[np.uint8],
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
    accept_ratio: npt.NDArray[np.float64],
    inverse_ratio: npt.NDArray[np.float64],
    photon_cdf: npt.NDArray[np.float64],
    state_angle_rad: npt.NDArray[np.float32],
) -> tuple[int, int, np.uint64, bool]:
    """Fill the outputs from index ``m`` on, after slot ``pos``, until the slots or the
    arrays run out; returns (m, pos, counter, done). No array is (re)allocated here: the
    hot loop then holds no reference counting."""
    cap = slot.shape[0]
    n_cdf = photon_cdf.shape[1]
    while m < cap:
        counter += _GOLDEN
        x = _mix(counter)
        gap = int(gap_table[x >> _TABLE_SHIFT])
        if gap >= 0:
            # the gap used only the top bits: the low 52 are a fresh uniform
            u = float(np.int64(x & _LOW52)) * _TWO_M52
        else:
            gap = int(min(-math.log(_unit_open(x)) * gap_scale, 2.0**62))
            counter += _GOLDEN
            u = _unit(_mix(counter))
        if gap >= slot_stop - 1 - pos:
            return m, pos, counter, True
        pos += gap + 1
        h = _mix((np.uint64(pos) ^ key) + _GOLDEN)
        if use_sync:
            frame = np.uint64(pos) >> _FRAME_SHIFT
            c = 2 - 2 * int(np.int64(_mix((frame ^ sync_mix) + _GOLDEN) & _ONE))
        else:
            u_class = h >> _S32
            c = int(u_class >= class_threshold[0]) + int(u_class >= class_threshold[1])
        keep = u < accept_ratio[c]
        # written for every candidate and kept by advancing m: no unpredictable branch
        u_n = u * inverse_ratio[c] * keep
        j = 0
        while j < n_cdf - 1 and u_n >= photon_cdf[c, j]:
            j += 1
        basis = int(((h >> _ONE) & _LOW31) >= z_threshold)
        slot[m] = pos
        angle[m] = state_angle_rad[2 * basis + int(h & _ONE)]
        n_photons[m] = min(j + 1, 255)
        cls_out[m] = c
        m += int(keep)
    return m, pos, counter, False


@_jit
def transmitter_photons(
    key: np.uint64,
    slot_start: int,
    slot_stop: int,
    gap_scale: float,
    seed: np.uint64,
    class_threshold: npt.NDArray[np.uint64],
    z_threshold: np.uint64,
    sync_mix: np.uint64,
    use_sync: bool,
    accept_ratio: npt.NDArray[np.float64],
    photon_cdf: npt.NDArray[np.float64],
    state_angle_rad: npt.NDArray[np.float32],
    capacity: int,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.uint8]
]:
    """Pulses of ``[slot_start, slot_stop)`` that reached the receiver, in slot order.

    Candidate slots are Bernoulli(p_max), drawn as geometric gaps ``floor(E * gap_scale)
    + 1`` with ``E`` exponential and ``gap_scale = -1 / log(1 - p_max)`` (0 when every
    slot is a candidate). A candidate's class comes from the slot hash (``h >> 32``
    against ``class_threshold``, or the sync pattern's frame bit when ``use_sync``), its
    basis from bits 1..31 against ``z_threshold`` and its bit from bit 0; it is kept with
    ``accept_ratio[class]``. The same uniform, rescaled, picks the photon number from
    ``photon_cdf[class]`` (zero-truncated Poisson CDF over n = 1, 2, ...). ``capacity``
    is a first guess of the number kept.

    Returns (slot, angle_rad, n_photons, intensity class) of the kept pulses.
    """
    gap_table = _gap_table(gap_scale)
    inverse_ratio = np.zeros(accept_ratio.shape[0])
    for c in range(accept_ratio.shape[0]):
        if accept_ratio[c] > 0.0:
            inverse_ratio[c] = 1.0 / accept_ratio[c]
    cap = max(capacity, 16)
    slot = np.empty(cap, np.int64)
    angle = np.empty(cap, np.float32)
    n_photons = np.empty(cap, np.uint8)
    cls_out = np.empty(cap, np.uint8)
    m, pos, counter = 0, slot_start - 1, seed
    while True:
        m, pos, counter, done = _fill_photons(
            slot,
            angle,
            n_photons,
            cls_out,
            m,
            pos,
            counter,
            key,
            slot_stop,
            gap_scale,
            gap_table,
            class_threshold,
            z_threshold,
            sync_mix,
            use_sync,
            accept_ratio,
            inverse_ratio,
            photon_cdf,
            state_angle_rad,
        )
        if done:
            return slot[:m], angle[:m], n_photons[:m], cls_out[:m]
        cap *= 2
        slot = np.concatenate((slot, np.empty(cap - m, np.int64)))
        angle = np.concatenate((angle, np.empty(cap - m, np.float32)))
        n_photons = np.concatenate((n_photons, np.empty(cap - m, np.uint8)))
        cls_out = np.concatenate((cls_out, np.empty(cap - m, np.uint8)))


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


_P1_SLOTS = 256  # direct-mapped memo of p(port 1) per distinct angle
_NO_ANGLE = np.uint32(0x7FC0_0001)  # a NaN pattern the transmitter never sends
_S56 = np.uint64(56)


@_jit
def _u26(x: np.uint64) -> float:
    """Uniform in [0, 1) from the low 26 bits of ``x``."""
    return float(np.int64(x & _LOW26)) * _TWO_M26


@_jit
def _p_port1_fill(
    memo_key: npt.NDArray[np.uint32],
    memo_p1: npt.NDArray[np.float64],
    h: int,
    bits: np.uint32,
    angle: float,
    rotation_rad: float,
    misalignment: float,
) -> None:
    """Fill memo entry ``h`` for the angle ``angle`` (float32 bit pattern ``bits``)."""
    e_d = misalignment
    s0 = math.sin(angle + rotation_rad)
    s1 = math.sin(angle + rotation_rad - math.pi / 4)
    memo_key[h] = bits
    memo_p1[h, 0] = e_d + s0 * s0 * (1.0 - 2.0 * e_d)
    memo_p1[h, 1] = e_d + s1 * s1 * (1.0 - 2.0 * e_d)


@_jit
def _p_port1(
    bits: np.uint32,
    angle: float,
    arm: int,
    memo_key: npt.NDArray[np.uint32],
    memo_p1: npt.NDArray[np.float64],
    rotation_rad: float,
    misalignment: float,
) -> float:
    """p(port 1) of arm ``arm`` for a pulse at ``angle`` (float32 bit pattern ``bits``):
    ``e_d + sin^2(angle + rotation - analyser) (1 - 2 e_d)``, from a direct-mapped memo
    keyed by the angle's bits (a chunk holds a handful of distinct angles, so the sine
    is taken a handful of times). ``memo_key`` starts with a pattern no angle has."""
    h = int((np.uint64(bits) * _GOLDEN) >> _S56)
    if memo_key[h] != bits:
        _p_port1_fill(memo_key, memo_p1, h, bits, angle, rotation_rad, misalignment)
    return memo_p1[h, arm]  # type: ignore[no-any-return]


@_jit
def _clicked_arms(
    ev_pulse: npt.NDArray[np.int64],
    ev_channel: npt.NDArray[np.int16],
    angle_rad: npt.NDArray[np.float32],
    angle_bits: npt.NDArray[np.uint32],
    n_photons: npt.NDArray[np.uint8],
    counter: np.uint64,
    rotation_rad: float,
    misalignment: float,
    p_basis_z: float,
    passive: bool,
    efficiency: npt.NDArray[np.float64],
) -> tuple[int, np.uint64]:
    """Basis, port and click of each pulse's photons: writes (pulse index, channel) of
    the detectors that click (room for two per pulse); returns their number and the
    stream counter. Each candidate is written and kept by advancing the count, so the
    random decisions cost no mispredicted branch."""
    memo_key = np.full(_P1_SLOTS, _NO_ANGLE, np.uint32)
    memo_p1 = np.zeros((_P1_SLOTS, 2))
    k = 0
    for i in range(n_photons.shape[0]):
        n = int(n_photons[i])
        counter += _GOLDEN
        x = _mix(counter)
        u_basis = _u26(x >> _S38)
        if n == 1:
            arm = int(u_basis >= p_basis_z)
            p1 = _p_port1(
                angle_bits[i],
                float(angle_rad[i]),
                arm,
                memo_key,
                memo_p1,
                rotation_rad,
                misalignment,
            )
            ch = 2 * arm + int(_u26(x >> _S12) < p1)
            counter += _GOLDEN
            ev_pulse[k] = i
            ev_channel[k] = ch
            k += int(_u26(_mix(counter)) < efficiency[ch])
            continue
        # multi-photon pulse (a few per cent): per-photon basis if passive
        n_z = n * int(u_basis < p_basis_z)
        if passive:
            n_z = int(u_basis < p_basis_z)
            for _ in range(n - 1):
                counter += _GOLDEN
                n_z += int(_unit(_mix(counter)) < p_basis_z)
        for arm in range(2):
            n_arm = n_z if arm == 0 else n - n_z
            if n_arm == 0:
                continue
            p1 = _p_port1(
                angle_bits[i],
                float(angle_rad[i]),
                arm,
                memo_key,
                memo_p1,
                rotation_rad,
                misalignment,
            )
            counter += _GOLDEN
            x = _mix(counter)
            ch = 2 * arm + int(_u26(x >> _S12) < p1)
            p_click = 1.0 - (1.0 - efficiency[ch]) ** n_arm
            ev_pulse[k] = i
            ev_channel[k] = ch
            k += int(_u26(x >> _S38) < p_click)
    return k, counter


@_jit
def _click_times(
    out_c: npt.NDArray[np.int16],
    out_t: npt.NDArray[np.int64],
    out_s: npt.NDArray[np.int64],
    ev_pulse: npt.NDArray[np.int64],
    ev_channel: npt.NDArray[np.int16],
    n_events: int,
    slot: npt.NDArray[np.int64],
    counter: np.uint64,
    slot_start: int,
    chunk_t0_ps: int,
    period_ps: float,
    delay_ps: npt.NDArray[np.float64],
    true_delay_ps: float,
    jitter_ps: float,
    gate_width_ps: float,
) -> tuple[int, np.uint64]:
    """Jittered true times of the clicks; those inside their detector's gate are written
    (channel, time, slot) in time order. Returns their number and the stream counter."""
    k = 0
    last_t = -(np.int64(1) << np.int64(62))
    inv_period = 1.0 / period_ps
    half_gate = gate_width_ps / 2
    for e in range(n_events):
        i = ev_pulse[e]
        ch = ev_channel[e]
        counter += _GOLDEN
        x = _mix(counter)
        z, ok = _normal_fast(x)
        if not ok:
            z, counter = _normal_slow(x, counter)
        offset = true_delay_ps + z * jitter_ps
        # distance to the nearest gate centre (gates repeat every period); floor, not %
        d = offset - delay_ps[ch]
        miss = d - period_ps * math.floor(d * inv_period + 0.5)
        rel = max((slot[i] - slot_start) * period_ps + offset, 0.0)
        t = chunk_t0_ps + math.floor(rel + 0.5)
        keep = abs(miss) < half_gate
        out_c[k] = ch
        out_t[k] = t
        out_s[k] = slot[i]
        if keep & (t < last_t):  # rare: both arms of a pulse, or jitter > period
            j = k
            while j > 0 and out_t[j - 1] > t:
                out_c[j], out_t[j], out_s[j] = out_c[j - 1], out_t[j - 1], out_s[j - 1]
                j -= 1
            out_c[j], out_t[j], out_s[j] = ch, t, slot[i]
        else:
            last_t += (t - last_t) * int(keep)
        k += int(keep)
    return k, counter


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
def _fill_events(
    out_c: npt.NDArray[np.int16],
    out_t: npt.NDArray[np.int64],
    out_s: npt.NDArray[np.int64],
    ht: npt.NDArray[np.int64],
    hc: npt.NDArray[np.int16],
    hs: npt.NDArray[np.int64],
    state: npt.NDArray[np.int64],
    counter: np.uint64,
    ph_c: npt.NDArray[np.int16],
    ph_t: npt.NDArray[np.int64],
    ph_s: npt.NDArray[np.int64],
    dark_channel: npt.NDArray[np.int16],
    dark_time_ps: npt.NDArray[np.int64],
    dark_slot: npt.NDArray[np.int64],
    pending_channel: npt.NDArray[np.int16],
    pending_time_ps: npt.NDArray[np.int64],
    pending_slot: npt.NDArray[np.int64],
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
) -> tuple[np.uint64, bool]:
    """The time-ordered event loop of :func:`receiver_events`, resumable: ``state`` holds
    (kept, next photon click, next dark click, next pending event, heap size). Returns
    (counter, done); not done means the output is full."""
    k, i, j, p, n_heap = state[0], state[1], state[2], state[3], state[4]
    n_ph = ph_t.shape[0]
    n_dark = dark_time_ps.shape[0]
    n_pend = pending_time_ps.shape[0]
    cap = out_t.shape[0]
    gate_half = gate_width_ps / 2
    big = np.int64(1) << np.int64(62)
    done = False
    while k < cap:
        t_ph = ph_t[i] if i < n_ph else big
        t_dk = dark_time_ps[j] if j < n_dark else big
        t_pd = pending_time_ps[p] if p < n_pend else big
        t_ap = ht[0] if n_heap > 0 else big
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
        if not enabled[c] or t - last_click_ps[c] < dead_time_ps[c]:
            continue
        last_click_ps[c] = t
        out_c[k], out_t[k], out_s[k] = c, t, s
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
    slot: npt.NDArray[np.int64],
    angle_rad: npt.NDArray[np.float32],
    n_photons: npt.NDArray[np.uint8],
    dark_channel: npt.NDArray[np.int16],
    dark_time_ps: npt.NDArray[np.int64],
    dark_slot: npt.NDArray[np.int64],
    pending_channel: npt.NDArray[np.int16],
    pending_time_ps: npt.NDArray[np.int64],
    pending_slot: npt.NDArray[np.int64],
    last_click_ps: npt.NDArray[np.int64],
    seed: np.uint64,
    slot_start: int,
    chunk_t0_ps: int,
    chunk_end_ps: int,
    period_ps: float,
    rotation_rad: float,
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
) -> tuple[
    npt.NDArray[np.int16],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int16],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]:
    """Kept detections of one chunk in true-time order, and the events left for the next.

    Photon clicks (see the receiver module's docstring) are merged in time order with
    the dark clicks and the pending events (both sorted by time), and afterpulses as
    they are released; each event is then, in time order: dropped if its detector is
    off, dropped inside the detector's (non-paralysable) dead time, otherwise kept, and
    with ``afterpulse_probability`` it schedules an afterpulse at the first gate after
    ``dead time + Exp(afterpulse_delay_ps)``. Events at or after ``chunk_end_ps`` are
    returned unprocessed as the next pending events. ``last_click_ps`` is updated.

    Returns (channel, true time, slot) of the kept clicks and of the pending events.
    """
    cap_ph = 2 * slot.shape[0]
    ev_pulse = np.empty(cap_ph, np.int64)
    ev_channel = np.empty(cap_ph, np.int16)
    n_ev, counter = _clicked_arms(
        ev_pulse,
        ev_channel,
        angle_rad,
        angle_rad.view(np.uint32),
        n_photons,
        seed,
        rotation_rad,
        misalignment,
        p_basis_z,
        passive,
        efficiency,
    )
    ph_c = np.empty(n_ev, np.int16)
    ph_t = np.empty(n_ev, np.int64)
    ph_s = np.empty(n_ev, np.int64)
    n_ph, counter = _click_times(
        ph_c,
        ph_t,
        ph_s,
        ev_pulse,
        ev_channel,
        n_ev,
        slot,
        counter,
        slot_start,
        chunk_t0_ps,
        period_ps,
        delay_ps,
        true_delay_ps,
        jitter_ps,
        gate_width_ps,
    )
    ph_c, ph_t, ph_s = ph_c[:n_ph], ph_t[:n_ph], ph_s[:n_ph]
    n_dark = dark_time_ps.shape[0]
    n_pend = pending_time_ps.shape[0]
    # each kept click schedules at most one afterpulse: the heap never outgrows the output
    cap = n_ph + n_dark + n_pend + 16
    out_c = np.empty(cap, np.int16)
    out_t = np.empty(cap, np.int64)
    out_s = np.empty(cap, np.int64)
    ht = np.empty(cap, np.int64)
    hc = np.empty(cap, np.int16)
    hs = np.empty(cap, np.int64)
    state = np.zeros(5, np.int64)  # k, next photon click, next dark, next pending, heap size
    while True:
        counter, done = _fill_events(
            out_c,
            out_t,
            out_s,
            ht,
            hc,
            hs,
            state,
            counter,
            ph_c,
            ph_t,
            ph_s,
            dark_channel,
            dark_time_ps,
            dark_slot,
            pending_channel,
            pending_time_ps,
            pending_slot,
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
        )
        if done:
            break
        k = cap
        cap *= 2
        out_c = np.concatenate((out_c, np.empty(cap - k, np.int16)))
        out_t = np.concatenate((out_t, np.empty(cap - k, np.int64)))
        out_s = np.concatenate((out_s, np.empty(cap - k, np.int64)))
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
    return out_c[:k], out_t[:k], out_s[:k], left_c[order], left_t[order], left_s[order]


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
