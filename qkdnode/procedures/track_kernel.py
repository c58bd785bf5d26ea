"""The slot-clock tracking loop of :class:`qkdnode.procedures.sync_tracking.SlotTracker`, compiled.

The loop runs once per ``track_segment_s`` (2 ms) of tags, each segment's correction
feeding the next, so it cannot be vectorised across segments; in numpy its per-segment
overhead (medians, masks, temporaries) cost ~0.4 of a core at 3.3 M tags/s. Arithmetic is
that of :func:`qkdnode.procedures.sync_model._slot_residuals` (integer parts kept in int64 so runs
of days lose no precision). Lock bookkeeping stays in Python: it never feeds back into
the clock model.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from qkdnode.jit import JIT, njit

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: residuals in the median and sigma of a segment (they centre and scale the outlier cut
#: only; a median of 1024 is within ~4 % of a sigma of the full one)
MEDIAN_SAMPLE = 1024


@njit
def _residuals(  # noqa: PLR0917  # pragma: no cover - jit
    times: Any, a: int, b: int, offset: float, rate: float, period: float, n_out: Any, r_out: Any
) -> None:
    off_int = math.floor(offset)
    off_frac = offset - off_int
    t_int = math.floor(period)
    t_frac = period - t_int
    scale = rate * period
    for i in range(a, b):
        d = times[i] - np.int64(off_int)
        n = np.int64(np.rint((float(d) - off_frac) / scale))
        res = float(d - n * np.int64(t_int))
        if t_frac:
            res -= float(n) * t_frac
        res -= off_frac + (rate - 1.0) * (float(n) * period)
        n_out[i] = n
        r_out[i] = res


@njit
def _track(  # noqa: PLR0917  # pragma: no cover - jit
    times: Any,
    seg_ps: Any,
    offset: float,
    rate: float,
    period: float,
    capture_half: float,
    window_half: float,
    min_fit: int,
    gp: float,
    gr: float,
    n_out: Any,
    r_out: Any,
    inw: Any,
) -> tuple[Any, int, float, float]:
    size = times.shape[0]
    t0 = times[0]
    seg = np.empty((64, 4), np.float64)
    a = 0
    k = 0
    while a < size:
        sid = (times[a] - t0) // seg_ps
        b = a + 1
        while b < size and (times[b] - t0) // seg_ps == sid:
            b += 1
        cap_n = np.empty(b - a, np.int64)
        cap_r = np.empty(b - a, np.float64)
        _residuals(times, a, b, offset, rate, period, n_out, r_out)
        m = 0
        for i in range(a, b):
            if abs(r_out[i]) <= capture_half and n_out[i] >= 0:
                cap_n[m] = n_out[i]
                cap_r[m] = r_out[i]
                m += 1
        err = math.nan
        sig = math.nan
        if m >= min_fit:
            step = max(1, m // MEDIAN_SAMPLE)
            sample = cap_r[:m:step].copy()
            med = np.median(sample)
            x = sample - med
            sig = 1.4826 * np.median(np.abs(x - np.median(x)))
            err = med
            cut = max(4.0 * sig, 1.0)
            kept = 0
            first = -1
            last = -1
            for i in range(m):
                if abs(cap_r[i] - med) <= cut:
                    if first < 0:
                        first = i
                    last = i
                    kept += 1
            d_off = 0.0
            d_rate = 0.0
            if kept >= min_fit:
                # n_mid: the middle kept slot (slots grow with time within a segment)
                j = 0
                n_mid = cap_n[first]
                for i in range(first, last + 1):
                    if abs(cap_r[i] - med) <= cut:
                        if j == kept // 2:
                            n_mid = cap_n[i]
                            break
                        j += 1
                sx = 0.0
                sy = 0.0
                for i in range(first, last + 1):
                    if abs(cap_r[i] - med) <= cut:
                        sx += float(cap_n[i] - n_mid)
                        sy += cap_r[i]
                xbar = sx / kept
                ybar = sy / kept
                den = 0.0
                num = 0.0
                for i in range(first, last + 1):
                    if abs(cap_r[i] - med) <= cut:
                        xc = float(cap_n[i] - n_mid) - xbar
                        den += xc * xc
                        num += xc * (cap_r[i] - ybar)
                slope = num / den if den > 0 else 0.0
                a_mid = ybar - slope * xbar  # residual at n_mid
                new_offset = offset + gp * a_mid - gr * slope * float(n_mid)
                new_rate = rate + gr * slope / period
                d_off = new_offset - offset
                d_rate = new_rate - rate
                offset = new_offset
                rate = new_rate
            for i in range(a, b):
                r_out[i] -= d_off + d_rate * period * float(n_out[i])
        n_in = 0
        for i in range(a, b):
            ok = abs(r_out[i]) <= window_half and n_out[i] >= 0
            inw[i] = ok
            n_in += ok
        if k == seg.shape[0]:
            grown = np.empty((2 * k, 4), np.float64)
            grown[:k] = seg
            seg = grown
        seg[k, 0] = err
        seg[k, 1] = sig
        seg[k, 2] = n_in
        seg[k, 3] = b - a
        k += 1
        a = b
    return seg, k, offset, rate


def _track_np(  # noqa: PLR0917
    times: I64,
    seg_ps: Any,
    offset: float,
    rate: float,
    period: float,
    capture_half: float,
    window_half: float,
    min_fit: int,
    gp: float,
    gr: float,
    n_out: I64,
    r_out: F64,
    inw: npt.NDArray[np.bool_],
) -> tuple[F64, int, float, float]:
    """numpy twin of :func:`_track` (no JIT available: see :mod:`qkdnode.jit`)."""
    seg_id = (times - times[0]) // seg_ps
    edges = [0, *(np.flatnonzero(np.diff(seg_id)) + 1).tolist(), times.shape[0]]
    seg = np.empty((len(edges) - 1, 4), np.float64)
    t_int = math.floor(period)
    t_frac = period - t_int
    for k in range(len(edges) - 1):
        a, b = edges[k], edges[k + 1]
        off_int = math.floor(offset)
        off_frac = offset - off_int
        d = times[a:b] - np.int64(off_int)
        n = np.rint((d.astype(np.float64) - off_frac) / (rate * period)).astype(np.int64)
        res = (d - n * np.int64(t_int)).astype(np.float64)
        if t_frac:
            res -= n.astype(np.float64) * t_frac
        res -= off_frac + (rate - 1.0) * (n.astype(np.float64) * period)
        cap = (np.abs(res) <= capture_half) & (n >= 0)
        m = int(cap.sum())
        err = sig = math.nan
        if m >= min_fit:
            cap_n, cap_r = n[cap], res[cap]
            sample = cap_r[:: max(1, m // MEDIAN_SAMPLE)]
            med = float(np.median(sample))
            x = sample - med
            sig = float(1.4826 * np.median(np.abs(x - np.median(x))))
            err = med
            keep = np.abs(cap_r - med) <= max(4.0 * sig, 1.0)
            kept = int(keep.sum())
            if kept >= min_fit:
                nk = cap_n[keep]
                n_mid = int(nk[kept // 2])
                xk = (nk - n_mid).astype(np.float64)
                y = cap_r[keep]
                xbar, ybar = float(xk.mean()), float(y.mean())
                xc = xk - xbar
                den = float(np.dot(xc, xc))
                slope = float(np.dot(xc, y - ybar)) / den if den > 0 else 0.0
                a_mid = ybar - slope * xbar
                new_offset = offset + gp * a_mid - gr * slope * float(n_mid)
                new_rate = rate + gr * slope / period
                res = res - ((new_offset - offset) + (new_rate - rate) * period * n)
                offset, rate = new_offset, new_rate
        ok = (np.abs(res) <= window_half) & (n >= 0)
        n_out[a:b], r_out[a:b], inw[a:b] = n, res, ok
        seg[k] = (err, sig, float(ok.sum()), float(b - a))
    return seg, seg.shape[0], offset, rate


class TrackResult(NamedTuple):
    """Per tag: slot, residual (ps, after the segment's correction), inside the acceptance
    window; per segment (rows): timing error (median, ps; NaN if too few tags to fit),
    residual sigma (ps), tags in the window, tags; and the clock model after the block."""

    slot: I64
    residual_ps: F64
    in_window: npt.NDArray[np.bool_]
    segments: F64
    offset_ps: float
    rate: float


def track(
    times_ps: I64,
    *,
    segment_ps: int,
    offset_ps: float,
    rate: float,
    period_ps: float,
    capture_ps: float,
    window_ps: float,
    min_fit_tags: int,
    phase_gain: float,
    rate_gain: float,
) -> TrackResult:
    """Run the tracking loop over ``times_ps`` (in arrival order) in segments of
    ``segment_ps``; see :class:`qkdnode.procedures.sync_tracking.SlotTracker`."""
    times = np.ascontiguousarray(times_ps, dtype=np.int64)
    size = times.shape[0]
    n_out = np.empty(size, np.int64)
    r_out = np.empty(size, np.float64)
    inw = np.empty(size, np.bool_)
    if size == 0:
        return TrackResult(n_out, r_out, inw, np.zeros((0, 4)), offset_ps, rate)
    run = _track if JIT else _track_np
    seg, k, offset, new_rate = run(
        times,
        np.int64(max(segment_ps, 1)),
        float(offset_ps),
        float(rate),
        float(period_ps),
        capture_ps / 2,
        window_ps / 2,
        int(min_fit_tags),
        float(phase_gain),
        float(rate_gain),
        n_out,
        r_out,
        inw,
    )
    return TrackResult(n_out, r_out, inw, seg[:k], float(offset), float(new_rate))


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the tracking loop before a session."""
    times = np.arange(0, 4_000_000, 40_000, dtype=np.int64)
    track(
        times,
        segment_ps=1_000_000,
        offset_ps=0.0,
        rate=1.0,
        period_ps=40_000.0,
        capture_ps=20_000.0,
        window_ps=2_000.0,
        min_fit_tags=3,
        phase_gain=0.5,
        rate_gain=0.1,
    )
