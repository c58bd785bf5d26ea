"""Clock synchronization of the receiver to the transmitter's slot clock, from time tags.

The receiver's tagger stamps detections on its own clock:
``t_rx = offset + rate * t_tx (+ slow wander)``, with ``t_tx = slot_index * slot_period``
(every fixed optical and electronic delay is folded into ``offset``). Synchronization
recovers ``offset`` and ``rate`` (a :class:`ClockModel`) from the tags alone, in three steps
(all pure functions of arrays):

1. **Slot clock** (:func:`estimate_slot_clock`): the detections sit on a comb of period
   ``slot_period * rate``. Each tag becomes a phasor ``exp(2 pi i t / T)``; summed in short
   time bins and Fourier-transformed, they show a line at the frequency offset (at most
   +/-``max_ppm``). Segment phases then refine rate and phase, and a robust linear fit of
   the timing residuals finishes it (sub-ps on rate, ~jitter/sqrt(N) on phase).
2. **Slot index** (:func:`resolve_slot_index`): the comb gives the slots up to an unknown
   integer ``K``. The transmitter sends the public pattern of :mod:`drivers.syncpattern`
   (frames of 256 slots, bright or dark by a PRBS): the tags, counted per frame, are
   FFT-cross-correlated with the pattern over every ``K`` allowed by ``max_offset_s``
   (offsets of seconds), at four sub-frame phases; the best frame is then refined to the
   exact slot.
3. **Tracking** (:class:`SlotTracker`): during key exchange each block of tags is mapped
   to slots and a robust linear fit of (slot, residual) corrects the model (a
   phase/frequency loop). Lock is declared when the model's prediction error is within
   ``lock_fraction`` of a slot; loss of lock when the fraction of in-window detections
   collapses or the error leaves the window.

:func:`acquire_lock` is the receiver-side procedure around these cores.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from drivers.interfaces import TAG_DTYPE, TimeTagger
from drivers.syncpattern import FRAME_SLOTS, frame_bright
from qkdnode.procedures.track_kernel import track

__all__ = [
    "AcquisitionError",
    "ClockModel",
    "MappedTags",
    "PatternCheck",
    "SlotClockEstimate",
    "SlotTracker",
    "SyncConfig",
    "SyncResult",
    "TrackStatus",
    "acquire",
    "acquire_lock",
    "check_pattern",
    "estimate_slot_clock",
    "map_tags_to_slots",
    "resolve_slot_index",
    "robust_sigma",
    "slot_period_ps",
]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


class AcquisitionError(RuntimeError):
    """Coarse acquisition failed (too few tags, no slot comb, no pattern match)."""


class SyncConfig(BaseModel):
    """Synchronization settings (a ``[sync]`` config section)."""

    model_config = ConfigDict(extra="forbid")

    acquisition_time_s: float = Field(0.05, gt=0, le=60, description="minimum tag span read")
    max_acquisition_time_s: float = Field(2.0, gt=0, le=600)
    min_acquisition_tags: int = Field(20_000, ge=100)
    read_timeout_s: float = Field(0.5, gt=0, le=60)
    max_offset_s: float = Field(5.0, gt=0, le=1000, description="|clock offset| searched")
    max_ppm: float = Field(120.0, gt=0, le=2000, description="|frequency offset| searched")
    window_ps: float | None = Field(
        None, gt=0, description="acceptance window (full width); None = 10 sigma of the peak"
    )
    max_window_fraction: float = Field(0.5, gt=0, le=1)
    lock_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="lock when |timing error| <= this fraction of a slot"
    )
    max_spread_fraction: float = Field(0.25, gt=0, le=1)
    min_significance: float = Field(8.0, gt=0, description="pattern correlation z-score")
    min_comb_strength: float = Field(6.0, gt=0, description="slot-comb phasor z-score")
    lost_fraction_ratio: float = Field(0.5, gt=0, lt=1)
    lost_after_segments: int = Field(5, ge=1)
    track_segment_s: float = Field(0.002, gt=0, description="tracking loop update period")
    min_fit_tags: int = Field(30, ge=3)
    phase_gain: float = Field(1.0, gt=0, le=1)
    rate_gain: float = Field(0.5, gt=0, le=1)
    confirm_blocks: int = Field(2, ge=0, description="blocks tracked after acquisition")
    channels: list[int] | None = Field(None, description="tagger channels used (None = all)")


def slot_period_ps(slot_rate_hz: float) -> float:
    return 1e12 / slot_rate_hz


@dataclass(frozen=True)
class ClockModel:
    """``rx_time_ps = offset_ps + rate * tx_time_ps`` where ``tx_time_ps = slot * period``."""

    offset_ps: float
    rate: float

    @property
    def ppm(self) -> float:
        return (self.rate - 1.0) * 1e6

    def rx_time_ps(self, tx_time_ps: npt.ArrayLike) -> F64:
        tx = np.asarray(tx_time_ps, dtype=np.float64)
        return np.asarray(self.offset_ps + tx + (self.rate - 1.0) * tx, dtype=np.float64)

    def tx_time_ps(self, rx_time_ps: npt.ArrayLike) -> F64:
        rx = np.asarray(rx_time_ps, dtype=np.float64)
        return np.asarray((rx - self.offset_ps) / self.rate, dtype=np.float64)

    def slot_rx_time_ps(self, slot_index: npt.ArrayLike, slot_rate_hz: float) -> F64:
        return self.rx_time_ps(np.asarray(slot_index, dtype=np.float64) * (1e12 / slot_rate_hz))


def robust_sigma(x: F64) -> float:
    """1.4826 * median absolute deviation (a Gaussian sigma robust to outliers)."""
    if x.size == 0:
        return math.inf
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def _slot_residuals(time_ps: I64, model: ClockModel, period_ps: float) -> tuple[I64, F64]:
    """Nearest slot of each tag and its timing residual (tag - predicted), precisely.

    Integer arithmetic is kept where magnitudes are large so that runs of days lose no
    precision: residual = (t - floor(offset)) - n*floor(T) [int64] - n*frac(T) - frac(offset)
    - (rate - 1) * n * T.
    """
    off_int = math.floor(model.offset_ps)
    off_frac = model.offset_ps - off_int
    d = np.asarray(time_ps, dtype=np.int64) - np.int64(off_int)
    n = np.rint((d.astype(np.float64) - off_frac) / (model.rate * period_ps)).astype(np.int64)
    t_int = math.floor(period_ps)
    t_frac = period_ps - t_int
    res = (d - n * np.int64(t_int)).astype(np.float64)
    if t_frac:
        res -= n.astype(np.float64) * t_frac
    res -= off_frac + (model.rate - 1.0) * (n.astype(np.float64) * period_ps)
    return n, res


def map_tags_to_slots(
    tags: npt.NDArray[np.void], model: ClockModel, slot_rate_hz: float, window_ps: float
) -> tuple[I64, npt.NDArray[np.int8], F64]:
    """Map time tags (dtype TAG_DTYPE) to transmitter slots.

    Returns ``(slot_index, channel, residual_ps)`` for the tags within ``+/- window_ps/2``
    of a slot's predicted detection time (and with a non-negative slot index).
    """
    n, res = _slot_residuals(tags["time_ps"], model, slot_period_ps(slot_rate_hz))
    keep = (np.abs(res) <= window_ps / 2) & (n >= 0)
    return n[keep], tags["channel"][keep].astype(np.int8), res[keep]


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


class SyncResult(BaseModel):
    """Outcome of an acquisition (published on telemetry as ``sync.acquired``)."""

    model_config = ConfigDict(extra="forbid")

    locked: bool
    offset_ps: float
    rate: float
    ppm: float
    slot_rate_hz: float
    window_ps: float
    n_tags: int
    span_s: float
    comb_strength: float
    significance: float
    slot_margin: float
    bright_fraction: float  # of the in-window tags numbered by the final model
    residual_sigma_ps: float
    timing_error_ps: float
    in_window_fraction: float
    duration_s: float = 0.0
    message: str = ""
    pattern_z: float = 0.0  # pattern z-score of the final model's slots (see check_pattern)

    @property
    def model(self) -> ClockModel:
        return ClockModel(self.offset_ps, self.rate)


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


# --- step 3: tracking -------------------------------------------------------------------


@dataclass(frozen=True)
class MappedTags:
    """Tags of one block mapped to slots (only those inside the window)."""

    slot_index: I64
    channel: npt.NDArray[np.int8]
    residual_ps: F64


@dataclass(frozen=True)
class TrackStatus:
    n_tags: int
    n_in_window: int
    in_window_fraction: float
    timing_error_ps: float  # median residual before this block's correction
    residual_sigma_ps: float
    ppm: float
    locked: bool
    lost: bool


@dataclass
class SlotTracker:
    """Phase/frequency loop keeping the :class:`ClockModel` on the detections.

    :meth:`update` takes each block of tags as it arrives and works through it in
    segments of ``cfg.track_segment_s``: per segment, the residuals within the wide
    *capture* window (``max_window_fraction`` of a slot) give the model's timing error
    (median) and a robust linear fit against the slot index corrects phase and rate;
    the segment's tags are then mapped with the corrected model and those within the
    narrow *acceptance* window ``window_ps`` are returned for the key exchange.

    Lock: a segment is good when the timing error is within ``lock_fraction`` of a slot
    and the in-window fraction has not collapsed; ``lost_after_segments`` bad segments
    in a row declare loss of lock (re-acquire with the pattern).
    """

    model: ClockModel
    slot_rate_hz: float
    window_ps: float
    cfg: SyncConfig = field(default_factory=SyncConfig)
    reference_fraction: float | None = None
    locked: bool = False
    lost: bool = False
    bad_segments: int = 0
    history: list[TrackStatus] = field(default_factory=list)
    max_history: int = 10_000

    def update(self, tags: npt.NDArray[np.void]) -> tuple[MappedTags, TrackStatus]:
        if self.cfg.channels is not None and tags.size:
            tags = tags[np.isin(tags["channel"], self.cfg.channels)]
        times = np.asarray(tags["time_ps"], dtype=np.int64)
        period = slot_period_ps(self.slot_rate_hz)
        out = track(
            times,
            segment_ps=max(int(self.cfg.track_segment_s * 1e12), 1),
            offset_ps=self.model.offset_ps,
            rate=self.model.rate,
            period_ps=period,
            capture_ps=self.cfg.max_window_fraction * period,
            window_ps=self.window_ps,
            min_fit_tags=self.cfg.min_fit_tags,
            phase_gain=self.cfg.phase_gain,
            rate_gain=self.cfg.rate_gain,
        )
        self.model = ClockModel(out.offset_ps, out.rate)
        segments = out.segments if times.size else np.array([[math.nan, math.nan, 0.0, 0.0]])
        for err, sig, n_in, n_all in segments.tolist():
            self._judge_segment(err, sig, n_in, int(n_all), period)
        inw = out.in_window
        mapped = MappedTags(
            out.slot[inw], tags["channel"][inw].astype(np.int8), out.residual_ps[inw]
        )
        fitted = segments[~np.isnan(segments[:, 0])]
        n_in_total = int(mapped.slot_index.shape[0])
        status = TrackStatus(
            n_tags=int(times.size),
            n_in_window=n_in_total,
            in_window_fraction=n_in_total / times.size if times.size else 0.0,
            timing_error_ps=float(np.max(np.abs(fitted[:, 0]))) if fitted.size else math.nan,
            residual_sigma_ps=float(np.median(fitted[:, 1])) if fitted.size else math.nan,
            ppm=self.model.ppm,
            locked=self.locked,
            lost=self.lost,
        )
        self.history.append(status)
        if len(self.history) > self.max_history:
            del self.history[: len(self.history) - self.max_history]
        return mapped, status

    def _judge_segment(
        self, err: float, sig: float, n_in: float, n_all: int, period: float
    ) -> None:
        """Lock bookkeeping of one segment (timing error ``err`` and spread ``sig`` in ps,
        NaN when it had too few tags to fit)."""
        good = (
            not math.isnan(err)
            and abs(err) <= self.cfg.lock_fraction * period
            and sig <= self.cfg.max_spread_fraction * period
        )
        frac = n_in / n_all if n_all else 0.0
        ref = self.reference_fraction
        if good and n_all:
            if ref is None:
                self.reference_fraction = frac
            elif frac >= self.cfg.lost_fraction_ratio * ref:
                # follow slow changes of the link's signal-to-noise ratio
                self.reference_fraction = 0.95 * ref + 0.05 * frac
        fraction_ok = ref is None or frac >= self.cfg.lost_fraction_ratio * ref
        if good and fraction_ok:
            self.bad_segments = 0
            self.locked = True
            self.lost = False
        else:
            self.bad_segments += 1
            if self.locked and self.bad_segments >= self.cfg.lost_after_segments:
                self.locked = False
                self.lost = True


# --- receiver-side procedure --------------------------------------------------------------


async def read_tags(
    tagger: TimeTagger,
    *,
    min_span_s: float,
    min_tags: int,
    max_time_s: float,
    read_timeout_s: float,
    channels: list[int] | None = None,
) -> npt.NDArray[np.void]:
    """Read blocks until the tags span ``min_span_s`` and number ``min_tags`` (or the
    tags span ``max_time_s``, or as much wall time passes)."""
    blocks: list[npt.NDArray[np.void]] = []
    count = 0
    first: int | None = None
    last = 0
    wall0 = time.monotonic()
    while True:
        block = await asyncio.to_thread(tagger.read_block, read_timeout_s)
        if block is not None and len(block):
            tags = block.tags
            if channels is not None:
                tags = tags[np.isin(tags["channel"], channels)]
            if tags.size:
                blocks.append(tags)
                count += int(tags.size)
                if first is None:
                    first = int(tags["time_ps"][0])
                last = int(tags["time_ps"][-1])
        span = (last - first) * 1e-12 if first is not None else 0.0
        if (span >= min_span_s and count >= min_tags) or span >= max_time_s:
            break
        if time.monotonic() - wall0 > max_time_s + 10 * read_timeout_s + 5.0:
            break
    if not blocks:
        return np.zeros(0, dtype=TAG_DTYPE)
    return np.concatenate(blocks)


async def acquire_lock(
    tagger: TimeTagger,
    public_seed: int,
    slot_rate_hz: float,
    cfg: SyncConfig | None = None,
    *,
    publish: Any = None,
    offset_hint_ps: float = 0.0,
) -> tuple[SyncResult, SlotTracker]:
    """Receiver side: read tags while the transmitter emits the pattern ``public_seed``,
    acquire, then track ``cfg.confirm_blocks`` blocks to confirm the lock.

    The tag stream must be running (``tagger.start_stream()``) and the transmitter must
    already emit the pattern. Returns the result and a tracker ready for key exchange.
    Raises :class:`AcquisitionError` if no lock could be established.
    """
    cfg = cfg or SyncConfig()
    started = time.monotonic()
    tags = await read_tags(
        tagger,
        min_span_s=cfg.acquisition_time_s,
        min_tags=cfg.min_acquisition_tags,
        max_time_s=cfg.max_acquisition_time_s,
        read_timeout_s=cfg.read_timeout_s,
        channels=cfg.channels,
    )
    if tags.size < 100:
        raise AcquisitionError(f"only {tags.size} tags during acquisition: is the light on?")
    result = await asyncio.to_thread(
        acquire, tags["time_ps"], public_seed, slot_rate_hz, cfg, offset_hint_ps
    )
    tracker = SlotTracker(result.model, slot_rate_hz, result.window_ps, cfg)
    tracker.update(tags)
    for _ in range(cfg.confirm_blocks):
        block = await asyncio.to_thread(tagger.read_block, cfg.read_timeout_s)
        if block is not None and len(block):
            tracker.update(block.tags)
    last = tracker.history[-1]
    locked = result.locked and tracker.locked and not tracker.lost
    result = result.model_copy(
        update={
            "locked": locked,
            "offset_ps": tracker.model.offset_ps,
            "rate": tracker.model.rate,
            "ppm": tracker.model.ppm,
            "timing_error_ps": last.timing_error_ps,
            "in_window_fraction": last.in_window_fraction,
            "duration_s": time.monotonic() - started,
        }
    )
    if publish is not None:
        publish("sync.acquired", result.model_dump())
    return result, tracker
