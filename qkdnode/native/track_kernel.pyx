# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Ahead-of-time twin of the compiled slot-tracking loop of
:mod:`qkdnode.procedures.track_kernel`.

Same names, arguments and results as the ``@njit`` kernels there (a line-by-line
translation, same floating-point operations in the same order: update both together);
:mod:`qkdnode.jit` puts these in their place when numba cannot run. Times are int64
picoseconds, residuals float64 picoseconds.
"""

import numpy as np

from libc.math cimport NAN, fabs, floor, rint
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc, realloc

#: as qkdnode.procedures.track_kernel.MEDIAN_SAMPLE
cdef enum:
    MEDIAN_SAMPLE = 1024


cdef double _median(double* a, int64_t n) noexcept nogil:
    # np.median of a[:n] (reorders a): the middle value, or the mean of the two middle
    # ones as numpy and numba compute it, (lo + hi) / 2. Wirth's selection of the upper
    # middle leaves the lower half <= it, so the lower middle is that half's maximum.
    cdef int64_t k = n >> 1, lo = 0, hi = n - 1, i, j
    cdef double x, t, below
    while lo < hi:
        x = a[k]
        i = lo
        j = hi
        while True:
            while a[i] < x:
                i += 1
            while x < a[j]:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
            if i > j:
                break
        if j < k:
            lo = i
        if k < i:
            hi = j
    if n & 1:
        return a[k]
    below = a[0]
    for i in range(1, k):
        if a[i] > below:
            below = a[i]
    return (below + a[k]) / 2


cdef inline int64_t _floordiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef void c_residuals(const int64_t* times, int64_t a, int64_t b, double offset, double rate,
                      double period, int64_t* n_out, double* r_out) noexcept nogil:
    cdef double off_int = floor(offset)
    cdef double off_frac = offset - off_int
    cdef double t_int = floor(period)
    cdef double t_frac = period - t_int
    cdef double scale = rate * period
    cdef int64_t i, d, n
    cdef double res
    for i in range(a, b):
        d = times[i] - <int64_t>off_int
        n = <int64_t>rint((<double>d - off_frac) / scale)
        res = <double>(d - n * <int64_t>t_int)
        if t_frac:
            res -= <double>n * t_frac
        res -= off_frac + (rate - 1.0) * (<double>n * period)
        n_out[i] = n
        r_out[i] = res


def _residuals(const int64_t[::1] times, int64_t a, int64_t b, double offset, double rate,
               double period, int64_t[::1] n_out, double[::1] r_out):
    if not (0 <= a <= b <= times.shape[0] and b <= n_out.shape[0] and b <= r_out.shape[0]):
        raise ValueError(f"segment [{a}, {b}) outside the arrays")
    if a == b:
        return
    with nogil:
        c_residuals(&times[0], a, b, offset, rate, period, &n_out[0], &r_out[0])


cdef int c_track(const int64_t* times, int64_t size, int64_t seg_ps, double* offset_io,
                 double* rate_io, double period, double capture_half, double window_half,
                 int64_t min_fit, double gp, double gr, int64_t* n_out, double* r_out,
                 uint8_t* inw, double** seg_io, int64_t* k_io) noexcept nogil:
    # qkdnode.procedures.track_kernel._track; returns -1 when out of memory
    cdef double offset = offset_io[0], rate = rate_io[0]
    cdef int64_t t0 = times[0], a = 0, k = 0, cap = 64, sid, b, m, i, step, ns, kept, first
    cdef int64_t last, j, n_mid, n_in
    cdef double err, sig, med, cut, d_off, d_rate, sx, sy, xbar, ybar, den, num, xc
    cdef double slope, a_mid, new_offset, new_rate, mx
    cdef bint ok
    cdef double* seg = <double*>malloc(cap * 4 * sizeof(double))
    cdef double* grown
    cdef int64_t* cap_n = NULL
    cdef double* cap_r = NULL
    cdef double* sample = NULL
    cdef int64_t room = 0
    if seg == NULL:
        return -1
    while a < size:
        sid = _floordiv(times[a] - t0, seg_ps)
        b = a + 1
        while b < size and _floordiv(times[b] - t0, seg_ps) == sid:
            b += 1
        if b - a > room:
            room = b - a
            free(cap_n)
            free(cap_r)
            free(sample)
            cap_n = <int64_t*>malloc(room * sizeof(int64_t))
            cap_r = <double*>malloc(room * sizeof(double))
            sample = <double*>malloc(room * sizeof(double))
            if cap_n == NULL or cap_r == NULL or sample == NULL:
                free(cap_n)
                free(cap_r)
                free(sample)
                free(seg)
                return -1
        c_residuals(times, a, b, offset, rate, period, n_out, r_out)
        m = 0
        for i in range(a, b):
            if fabs(r_out[i]) <= capture_half and n_out[i] >= 0:
                cap_n[m] = n_out[i]
                cap_r[m] = r_out[i]
                m += 1
        err = NAN
        sig = NAN
        if m >= min_fit:
            step = max(1, m // MEDIAN_SAMPLE)
            ns = 0
            i = 0
            while i < m:  # sample = cap_r[:m:step]
                sample[ns] = cap_r[i]
                ns += 1
                i += step
            med = _median(sample, ns)
            for i in range(ns):  # x = sample - med
                sample[i] = sample[i] - med
            mx = _median(sample, ns)
            for i in range(ns):
                sample[i] = fabs(sample[i] - mx)
            sig = 1.4826 * _median(sample, ns)
            err = med
            cut = max(4.0 * sig, 1.0)
            kept = 0
            first = -1
            last = -1
            for i in range(m):
                if fabs(cap_r[i] - med) <= cut:
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
                    if fabs(cap_r[i] - med) <= cut:
                        if j == kept // 2:
                            n_mid = cap_n[i]
                            break
                        j += 1
                sx = 0.0
                sy = 0.0
                for i in range(first, last + 1):
                    if fabs(cap_r[i] - med) <= cut:
                        sx += <double>(cap_n[i] - n_mid)
                        sy += cap_r[i]
                xbar = sx / kept
                ybar = sy / kept
                den = 0.0
                num = 0.0
                for i in range(first, last + 1):
                    if fabs(cap_r[i] - med) <= cut:
                        xc = <double>(cap_n[i] - n_mid) - xbar
                        den += xc * xc
                        num += xc * (cap_r[i] - ybar)
                slope = num / den if den > 0 else 0.0
                a_mid = ybar - slope * xbar  # residual at n_mid
                new_offset = offset + gp * a_mid - gr * slope * <double>n_mid
                new_rate = rate + gr * slope / period
                d_off = new_offset - offset
                d_rate = new_rate - rate
                offset = new_offset
                rate = new_rate
            for i in range(a, b):
                r_out[i] -= d_off + d_rate * period * <double>n_out[i]
        n_in = 0
        for i in range(a, b):
            ok = fabs(r_out[i]) <= window_half and n_out[i] >= 0
            inw[i] = ok
            n_in += ok
        if k == cap:
            grown = <double*>realloc(seg, 2 * cap * 4 * sizeof(double))
            if grown == NULL:
                free(cap_n)
                free(cap_r)
                free(sample)
                free(seg)
                return -1
            seg = grown
            cap *= 2
        seg[4 * k] = err
        seg[4 * k + 1] = sig
        seg[4 * k + 2] = n_in
        seg[4 * k + 3] = b - a
        k += 1
        a = b
    free(cap_n)
    free(cap_r)
    free(sample)
    offset_io[0] = offset
    rate_io[0] = rate
    seg_io[0] = seg
    k_io[0] = k
    return 0


def _track(const int64_t[::1] times, int64_t seg_ps, double offset, double rate, double period,
           double capture_half, double window_half, int64_t min_fit, double gp, double gr,
           int64_t[::1] n_out, double[::1] r_out, inw):
    """Returns (segments, their count, offset, rate) as the numba kernel (the segments
    array here holds exactly the rows written)."""
    cdef uint8_t[::1] inw_v = np.asarray(inw).view(np.uint8)
    cdef int64_t size = times.shape[0], k = 0
    cdef double* seg = NULL
    cdef int rc
    if size == 0 or n_out.shape[0] < size or r_out.shape[0] < size or inw_v.shape[0] < size:
        raise ValueError("no times, or output arrays shorter than the times")
    if seg_ps <= 0:
        raise ValueError(f"segment length must be > 0 ps, got {seg_ps}")
    with nogil:
        rc = c_track(&times[0], size, seg_ps, &offset, &rate, period, capture_half,
                     window_half, min_fit, gp, gr, &n_out[0], &r_out[0], &inw_v[0], &seg, &k)
    if rc:
        raise MemoryError()
    out = np.empty((k, 4), np.float64)
    cdef double[:, ::1] ov = out
    cdef int64_t i
    for i in range(k):
        ov[i, 0] = seg[4 * i]
        ov[i, 1] = seg[4 * i + 1]
        ov[i, 2] = seg[4 * i + 2]
        ov[i, 3] = seg[4 * i + 3]
    free(seg)
    return out, k, offset, rate
