"""Synthetic time tags with known truth, for tests and benchmarks of the sync core.

Not a link simulator (that is :mod:`drivers.simlink`): just detections on a slot comb
seen through a receiver clock ``t_rx = offset + rate * t_tx + wander``, with jitter and
dark counts, during the public sync pattern or during key exchange (every slot lit).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from drivers.interfaces import TAG_DTYPE
from drivers.syncpattern import slot_bright

__all__ = ["synthetic_tags"]


def synthetic_tags(
    *,
    slot_rate_hz: float = 25e6,
    start_slot: int = 0,
    duration_s: float = 0.05,
    click_probability: float = 0.03,
    offset_s: float = 0.37,
    ppm: float = 12.5,
    wander_ppm_per_sqrt_s: float = 0.0,
    jitter_ps: float = 30.0,
    delay_ps: float = 12345.0,
    dark_rate_hz: float = 1000.0,
    pattern_seed: int | None = 7,
    channels: int = 4,
    seed: int = 0,
) -> npt.NDArray[np.void]:
    """Tags (dtype TAG_DTYPE, sorted) for slots ``[start_slot, start_slot + duration)``.

    With ``pattern_seed`` the slots follow the public pattern (dark frames send nothing);
    with None every slot is lit. ``click_probability`` is per lit slot.
    """
    rng = np.random.default_rng(seed)
    period = 1e12 / slot_rate_hz
    n_slots = int(duration_s * slot_rate_hz)
    n_clicks = rng.poisson(click_probability * n_slots)
    slots = np.unique(rng.integers(start_slot, start_slot + n_slots, n_clicks))
    if pattern_seed is not None:
        slots = slots[slot_bright(pattern_seed, slots)]
    rate = 1.0 + ppm * 1e-6
    tx = slots.astype(np.float64) * period + delay_ps
    t_rel = (slots - start_slot).astype(np.float64) * period
    rx = offset_s * 1e12 + rate * tx + rng.normal(0.0, jitter_ps, slots.size)
    if wander_ppm_per_sqrt_s > 0:
        # random walk of the frequency on a 1 ms grid, integrated to a time error
        step_s = 1e-3
        n_grid = int(duration_s / step_s) + 2
        dfreq = np.cumsum(rng.normal(0, wander_ppm_per_sqrt_s * 1e-6 * np.sqrt(step_s), n_grid))
        terr = np.concatenate([[0.0], np.cumsum(dfreq * step_s * 1e12)])[:n_grid]
        rx += np.interp(t_rel, np.arange(n_grid) * step_s * 1e12, terr)
    n_dark = rng.poisson(dark_rate_hz * duration_s)
    rx0 = offset_s * 1e12 + rate * (start_slot * period)
    dark = rx0 + rng.uniform(0, duration_s * 1e12 * rate, n_dark)
    times = np.concatenate([rx, dark])
    chan = rng.integers(0, channels, times.size)
    order = np.argsort(times, kind="stable")
    out = np.empty(times.size, dtype=TAG_DTYPE)
    out["time_ps"] = np.rint(times[order]).astype(np.int64)
    out["channel"] = chan[order]
    return out
