"""Acquisition cores of the clock synchronization (:mod:`qkdnode.procedures.sync`): from
tag times taken while the transmitter sends the public pattern to a :class:`ClockModel`.

1. **Slot clock** (:func:`estimate_slot_clock`): the receiver-side slot comb (period and
   phase, in ps) from the tags' phasors, their spectrum and segment phases; the frequency
   offset is searched within ``+/-max_ppm``.
2. **Slot index** (:func:`resolve_slot_index`): the integer slot offset ``K`` by FFT
   cross-correlation of the tags, counted per frame, with the public pattern of
   :mod:`drivers.syncpattern`; :func:`check_pattern` tests a final numbering against it.

:func:`acquire` runs both and checks the model it finds. Pure functions of arrays, no
I/O; failures raise :class:`AcquisitionError`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from drivers.syncpattern import FRAME_SLOTS, frame_bright
from qkdnode.procedures.sync_model import (
    AcquisitionError,
    ClockModel,
    SyncConfig,
    SyncResult,
    _slot_residuals,
    slot_period_ps,
)

__all__ = [
    "PatternCheck",
    "SlotClockEstimate",
    "SlotIndexEstimate",
    "acquire",
    "check_pattern",
    "estimate_slot_clock",
    "resolve_slot_index",
    "robust_sigma",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def robust_sigma(x: F64) -> float:
    """1.4826 * median absolute deviation (a Gaussian sigma robust to outliers)."""
    if x.size == 0:
        return math.inf
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


# --- step 1: slot clock ----------------------------------------------------------------


@dataclass(frozen=True)
class SlotClockEstimate:
    """The receiver-side slot comb: pulses at ``t0_ps + phase_ps + m * period_rx_ps``."""

    t0_ps: int
    phase_ps: float
    period_rx_ps: float
    strength: float  # z-score of the phasor concentration (sqrt of Rayleigh statistic)
    sigma_ps: float  # robust spread of the timing residuals (jitter)

    def rate(self, slot_rate_hz: float) -> float:
        return self.period_rx_ps / slot_period_ps(slot_rate_hz)


def _segment_phase_fit(t: F64, period: float, nseg: int) -> tuple[float, float, float] | None:
    """Fit the phase of the comb of ``period`` vs time: returns (slope cycles/ps, phase
    cycles at t=0, strength) from per-segment mean phasors, or None if too weak."""
    cyc = t / period
    z = np.exp(2j * np.pi * (cyc - np.floor(cyc)))
    seg = np.minimum((t / (t[-1] + 1.0) * nseg).astype(np.int64), nseg - 1)
    zs = np.bincount(seg, z.real, nseg) + 1j * np.bincount(seg, z.imag, nseg)
    cnt = np.bincount(seg, minlength=nseg).astype(np.float64)
    tm = np.bincount(seg, t, nseg) / np.maximum(cnt, 1)
    strength = float(abs(zs.sum()) / math.sqrt(len(t)))
    good = np.abs(zs) > 2.0 * np.sqrt(np.maximum(cnt, 1))
    if good.sum() < 2:
        return None
    ph = np.unwrap(np.angle(zs[good])) / (2 * np.pi)
    w = np.abs(zs[good])
    slope, icpt = np.polyfit(tm[good], ph, 1, w=w)
    return float(slope), float(icpt), strength


def estimate_slot_clock(
    time_ps: I64, slot_rate_hz: float, max_ppm: float = 120.0
) -> SlotClockEstimate:
    """Find the receiver-side slot comb (period and phase) in sorted tag times.

    Raises :class:`AcquisitionError` when no comb stands out of the noise.
    """
    time_ps = np.asarray(time_ps, dtype=np.int64)
    if time_ps.size < 50:
        raise AcquisitionError(f"only {time_ps.size} tags: cannot find the slot clock")
    period = slot_period_ps(slot_rate_hz)
    t0 = int(time_ps[0])
    t = (time_ps - t0).astype(np.float64)
    span = float(t[-1])
    if span <= 0:
        raise AcquisitionError("all tags at the same time")
    # coarse frequency: phasors heterodyned at the nominal rate, binned, FFT
    f_max = max_ppm * 1e-6 / period * 1.05  # cycles per ps
    tau = 1.0 / (4.0 * f_max)
    nbin = max(int(span / tau) + 1, 8)
    cyc = t / period
    z = np.exp(2j * np.pi * (cyc - np.floor(cyc)))
    b = np.minimum((t / tau).astype(np.int64), nbin - 1)
    zb = np.bincount(b, z.real, nbin) + 1j * np.bincount(b, z.imag, nbin)
    nfft = 1 << math.ceil(math.log2(nbin * 8))
    spec = np.abs(np.fft.fft(zb, nfft))
    freqs = np.fft.fftfreq(nfft, d=tau)
    allowed = np.abs(freqs) <= f_max
    spec_a = np.where(allowed, spec, 0.0)
    k = int(np.argmax(spec_a))
    strength0 = float(spec_a[k] / math.sqrt(len(t)))
    # parabolic interpolation of the peak
    y0, y1, y2 = spec[(k - 1) % nfft], spec[k], spec[(k + 1) % nfft]
    den = y0 - 2 * y1 + y2
    delta = 0.5 * (y0 - y2) / den if den != 0 else 0.0
    df = (freqs[k] + delta / (nfft * tau)) if abs(delta) < 1 else freqs[k]
    period_rx = period / (1.0 - df * period)
    if strength0 < 3.0:
        raise AcquisitionError(f"no slot comb found (strength {strength0:.1f})")
    # refine period and phase with segment phases (twice: coarse then fine segments)
    phase_cyc = 0.0
    strength = strength0
    for nseg in (16, 64):
        fit = _segment_phase_fit(t, period_rx, nseg)
        if fit is None:
            break
        slope, phase_cyc, strength = fit
        period_rx = period_rx / (1.0 - slope * period_rx)
    phase_ps = (phase_cyc % 1.0) * period_rx
    if phase_ps > period_rx / 2:
        phase_ps -= period_rx
    # final: robust linear fit of residuals in ps
    phase_ps, period_rx, sigma = _residual_fit(t, phase_ps, period_rx)
    return SlotClockEstimate(t0, phase_ps, period_rx, strength, sigma)


def _residual_fit(t: F64, phase: float, period: float) -> tuple[float, float, float]:
    """Robust least-squares refinement of a comb ``phase + m * period`` on times ``t``."""
    sigma = period / 4
    for _ in range(4):
        m = np.rint((t - phase) / period)
        res = t - phase - m * period
        med = float(np.median(res[np.abs(res) < max(2 * sigma, 1.0)])) if res.size else 0.0
        sig = robust_sigma(res[np.abs(res - med) < max(2 * sigma, 1.0)])
        keep = np.abs(res - med) < max(4 * sig, 1.0)
        if keep.sum() < 10:
            break
        mc = m[keep] - m[keep].mean()
        a = float(np.mean(res[keep]))
        denom = float(np.dot(mc, mc))
        bslope = float(np.dot(mc, res[keep] - a) / denom) if denom > 0 else 0.0
        # res ~ a + b (m - mean m)
        phase += a - bslope * float(m[keep].mean())
        period += bslope
        sigma = max(sig, 1.0)
    m = np.rint((t - phase) / period)
    res = t - phase - m * period
    return phase, period, robust_sigma(res[np.abs(res) < 4 * sigma])


# --- step 2: integer slot index from the public pattern ---------------------------------


@dataclass(frozen=True)
class SlotIndexEstimate:
    slot_offset: int  # K: tx slot index of comb tooth m = 0
    significance: float
    bright_fraction: float
    margin: float  # fine score of the best K minus the best other K, in units of its noise


def resolve_slot_index(
    comb_index: I64,
    public_seed: int,
    k_min: int,
    k_max: int,
) -> SlotIndexEstimate:
    """Find ``K`` such that tag ``i`` (comb tooth ``comb_index[i]`` >= 0) belongs to tx slot
    ``comb_index[i] + K``, for ``K`` in ``[k_min, k_max]``, by correlation with the
    public pattern ``public_seed``."""
    m = np.asarray(comb_index, dtype=np.int64)
    if m.size == 0:
        raise AcquisitionError("no tags to correlate with the pattern")
    m_min = int(m.min())
    # Work on comb indices shifted to start at 0: tag i is then in tx slot m[i] + k with
    # k = K + m_min (K for the original indices). Search k; return K = k - m_min. Only
    # k >= 0 (the earliest tag in a non-negative slot) is allowed.
    m = m - m_min
    k_min += m_min
    k_max += m_min
    k_min = max(k_min, 0)
    if k_max < k_min:
        raise AcquisitionError("empty slot-offset search range")
    g_min = k_min // FRAME_SLOTS - 1
    g_max = k_max // FRAME_SLOTS + 1
    n_frames_data = int(m.max()) // FRAME_SLOTS + 2
    lag_count = g_max - g_min + 1
    # overlap-save over chunks of lags: memory stays bounded for searches of 1e7+ frames
    chunk = max(min(lag_count, _MAX_CHUNK_LAGS), 1)
    nfft = _next_fast_len(chunk + n_frames_data + 2)
    h_specs = [
        np.conj(
            np.fft.rfft(
                np.bincount((m + q) // FRAME_SLOTS, minlength=n_frames_data).astype(np.float64),
                nfft,
            )
        )
        for q in range(0, FRAME_SLOTS, FRAME_SLOTS // 4)
    ]
    corr_best = np.full(lag_count, -np.inf)
    q_of = np.zeros(lag_count, dtype=np.int64)
    for c0 in range(0, lag_count, chunk):
        n_lags = min(chunk, lag_count - c0)
        frames = np.arange(g_min + c0, g_min + c0 + n_lags + n_frames_data + 1, dtype=np.int64)
        p_chunk = _pattern_values(public_seed, frames)
        p_spec = np.fft.rfft(p_chunk, nfft)
        for qi, h_spec in enumerate(h_specs):
            corr = np.fft.irfft(h_spec * p_spec, nfft)[:n_lags]
            better = corr > corr_best[c0 : c0 + n_lags]
            corr_best[c0 : c0 + n_lags][better] = corr[better]
            q_of[c0 : c0 + n_lags][better] = qi * (FRAME_SLOTS // 4)
    k_best = int(np.argmax(corr_best))
    q_best = int(q_of[k_best])
    others = np.delete(corr_best, np.arange(max(k_best - 2, 0), min(k_best + 3, lag_count)))
    if others.size > 1:
        sig = (float(corr_best[k_best]) - float(np.median(others))) / max(
            float(np.std(others)), 1e-9
        )
    else:
        sig = 0.0
    k_coarse = FRAME_SLOTS * (g_min + k_best) + q_best
    fine_frames = np.arange(
        (k_coarse - FRAME_SLOTS) // FRAME_SLOTS - 1,
        (k_coarse + FRAME_SLOTS) // FRAME_SLOTS + n_frames_data + 2,
        dtype=np.int64,
    )
    g_min = int(fine_frames[0])
    p = _pattern_values(public_seed, fine_frames)
    # fine search: every K within +/- FRAME_SLOTS/4 of the coarse one
    sub = m if m.size <= 400_000 else m[:: m.size // 400_000 + 1]
    cands = np.arange(k_coarse - FRAME_SLOTS // 4 - 2, k_coarse + FRAME_SLOTS // 4 + 3)
    scores = np.empty(cands.size)
    for i, kc in enumerate(cands):
        f = (sub + kc) // FRAME_SLOTS - g_min
        f = np.clip(f, 0, p.size - 1)
        scores[i] = p[f].sum()
    i_best = int(np.argmax(scores))
    k_fine = int(cands[i_best])
    others = np.delete(scores, [i_best])
    # fine-score noise: tags crossing one frame boundary per step ~ sqrt(N/256)*2
    step_noise = 2.0 * math.sqrt(max(sub.size / FRAME_SLOTS, 1.0))
    margin = float((scores[i_best] - others.max()) / step_noise) if others.size else 0.0
    k_abs = k_fine - m_min
    # bright fraction of the returned K, on the absolute slots (original comb indices)
    bright_fraction = float(
        np.mean(_pattern_values(public_seed, (sub + m_min + k_abs) // FRAME_SLOTS) > 0)
    )
    return SlotIndexEstimate(k_abs, sig, bright_fraction, margin)


_MAX_CHUNK_LAGS = 1 << 20


@dataclass(frozen=True)
class PatternCheck:
    """How well tags, numbered by a final clock model, follow the public pattern."""

    bright_fraction: float  # fraction of the tags in bright frames
    z: float  # pattern score over its spread for a numbering not aligned with the pattern
    peak: bool  # moving the numbering by one slot either way does not raise the score


def check_pattern(slots: I64, public_seed: int) -> PatternCheck:
    """Test the slot numbering ``slots`` of detections against the pattern ``public_seed``.

    With ``c_f`` tags in frame ``f`` and ``p_f = +/-1`` (bright/dark), the score is
    ``S = sum c_f p_f`` and ``z = S / sqrt(sum c_f^2)``: about N(0, 1) when the numbering is
    off by whole frames (independent pattern bits), large when it is right; the best of
    the ~1e7 offsets a search tries reaches ~sqrt(2 ln 1e7) ~ 6 by chance, hence
    ``min_significance`` 8. A numbering off by part of a frame still has a large ``z`` but
    is not a ``peak``.
    """
    slots = np.asarray(slots, dtype=np.int64)
    if slots.size == 0:
        return PatternCheck(0.0, 0.0, False)
    fr = slots // FRAME_SLOTS
    uf, inv, cnt = np.unique(fr, return_inverse=True, return_counts=True)
    pv = _pattern_values(public_seed, uf)
    score = float(np.dot(cnt, pv))
    z = score / math.sqrt(float(np.dot(cnt, cnt)))
    bright_fraction = float(cnt[pv > 0].sum()) / slots.size
    pos = slots - fr * FRAME_SLOTS
    last = pos == FRAME_SLOTS - 1  # these tags change frame when moved by +1 slot
    first = pos == 0  # ... and these by -1 slot
    inv = inv.reshape(-1)
    gain_up = float(np.sum(_pattern_values(public_seed, fr[last] + 1) - pv[inv[last]]))
    gain_down = float(np.sum(_pattern_values(public_seed, fr[first] - 1) - pv[inv[first]]))
    return PatternCheck(bright_fraction, z, gain_up <= 0 and gain_down <= 0)


def _pattern_values(public_seed: int, frames: I64) -> F64:
    """+1 for bright frames, -1 for dark ones (and for frames before the stream)."""
    bright = frame_bright(public_seed, np.maximum(frames, 0)) & (frames >= 0)
    return np.where(bright, 1.0, -1.0)


def _next_fast_len(n: int) -> int:
    try:
        from scipy.fft import next_fast_len

        return int(next_fast_len(n, real=True))
    except ImportError:  # pragma: no cover
        return 1 << math.ceil(math.log2(n))


# --- full acquisition -------------------------------------------------------------------


def _choose_window(sigma_ps: float, period: float, cfg: SyncConfig) -> float:
    if cfg.window_ps is not None:
        return min(cfg.window_ps, period * cfg.max_window_fraction)
    return float(min(max(10.0 * sigma_ps, 20.0), period * cfg.max_window_fraction))


def acquire(
    time_ps: I64,
    public_seed: int,
    slot_rate_hz: float,
    cfg: SyncConfig,
    offset_hint_ps: float = 0.0,
) -> SyncResult:
    """Coarse acquisition + fine model from sorted tag times taken during the pattern.

    The clock offset is searched within ``offset_hint_ps +/- cfg.max_offset_s``; the cost
    of the pattern search grows with that range over the frame duration (a hint from the
    peer exchange narrows it at GHz slot rates).
    """
    started = time.perf_counter()
    time_ps = np.sort(np.asarray(time_ps, dtype=np.int64))
    period = slot_period_ps(slot_rate_hz)
    comb = estimate_slot_clock(time_ps, slot_rate_hz, cfg.max_ppm)
    if comb.strength < cfg.min_comb_strength:
        raise AcquisitionError(f"slot comb too weak (strength {comb.strength:.1f})")
    t = (time_ps - comb.t0_ps).astype(np.float64)
    m = np.rint((t - comb.phase_ps) / comb.period_rx_ps).astype(np.int64)
    res = t - comb.phase_ps - m * comb.period_rx_ps
    window = _choose_window(comb.sigma_ps, period, cfg)
    m_in = m[np.abs(res) <= window / 2]
    # offset = t0 + phase - K * P_rx must satisfy |offset| <= max_offset
    base = comb.t0_ps + comb.phase_ps - offset_hint_ps
    max_off = cfg.max_offset_s * 1e12
    k_lo = math.floor((base - max_off) / comb.period_rx_ps)
    k_hi = math.ceil((base + max_off) / comb.period_rx_ps)
    idx = resolve_slot_index(m_in, public_seed, k_lo, k_hi)
    offset = comb.t0_ps + comb.phase_ps - idx.slot_offset * comb.period_rx_ps
    rate = comb.rate(slot_rate_hz)
    model = ClockModel(float(offset), float(rate))
    n, r = _slot_residuals(time_ps, model, period)
    inw = np.abs(r) <= window / 2
    err = float(np.median(r[inw])) if inw.any() else math.inf
    # the pattern, checked on the slots of the final model (those the key exchange uses)
    pat = check_pattern(n[inw], public_seed)
    ok = (
        idx.significance >= cfg.min_significance
        and pat.z >= cfg.min_significance
        and pat.peak
        and abs(err) <= cfg.lock_fraction * period
        and comb.sigma_ps <= cfg.max_spread_fraction * period
    )
    msg = (
        ""
        if ok
        else (
            f"acquisition not trusted: significance {idx.significance:.1f}, "
            f"pattern z {pat.z:.1f}{'' if pat.peak else ' (not at its peak)'}, "
            f"bright fraction {pat.bright_fraction:.3f}, "
            f"timing error {err:.1f} ps, spread {comb.sigma_ps:.1f} ps"
        )
    )
    return SyncResult(
        locked=ok,
        offset_ps=model.offset_ps,
        rate=model.rate,
        ppm=model.ppm,
        slot_rate_hz=slot_rate_hz,
        window_ps=window,
        n_tags=int(time_ps.size),
        span_s=float(time_ps[-1] - time_ps[0]) * 1e-12,
        comb_strength=comb.strength,
        significance=idx.significance,
        slot_margin=idx.margin,
        bright_fraction=pat.bright_fraction,
        pattern_z=pat.z,
        residual_sigma_ps=comb.sigma_ps,
        timing_error_ps=err,
        in_window_fraction=float(inw.mean()),
        duration_s=time.perf_counter() - started,
        message=msg,
    )
