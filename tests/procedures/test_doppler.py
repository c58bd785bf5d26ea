"""Doppler pre-compensation on the ground station: the predicted time of flight removed
from the tags leaves a clock a linear model fits, where the raw tags do not."""

from __future__ import annotations

import time

import numpy as np

from drivers.interfaces import TAG_DTYPE, TagBlock
from drivers.satellite_pass import SatellitePassParams
from drivers.simlink.satellite_channel import SatelliteChannel, SatelliteChannelParams
from qkdnode.doppler import ANCHOR_BLOCKS, DopplerCorrectedTagger, TofPrediction

ORBIT = SatellitePassParams(max_elevation_deg=49.0, min_elevation_deg=20.0)
PERIOD_PS = 10_000.0  # 100 MHz
CLOCK_OFFSET_PS = 123_456_789  # the tagger's own clock against the wall clock


class _Blocks:
    """A stand-in time tagger that hands out prepared blocks (the wrapper's input)."""

    def __init__(self) -> None:
        self.blocks: list[TagBlock] = []
        self.other_calls = 0

    def read_block(self, timeout_s: float) -> TagBlock | None:
        return self.blocks.pop(0) if self.blocks else None

    def channels(self) -> list[int]:
        self.other_calls += 1
        return [1, 2, 3, 4]


def _linear_residual_ps(x: np.ndarray, y: np.ndarray) -> float:
    a, b = np.polyfit(x, y, 1)
    return float(np.max(np.abs(y - (a * x + b))))


def test_the_predicted_time_of_flight_straightens_the_clock() -> None:
    rise = time.time() - 30.0  # 30 s into a pass compressed 4 times: strong curvature
    channel = SatelliteChannel(
        SatelliteChannelParams(orbit=ORBIT, rises_unix_s=(rise,), time_scale=4.0)
    )
    prediction = TofPrediction(ORBIT, [rise], 4.0)
    grid = time.time() + np.arange(-2000, 8000) * 1e-3  # the truth on a 1 ms grid
    grid_tof = np.array([channel.tof_s_at(float(u)) for u in grid])
    rng = np.random.default_rng(1)

    def tags_of(since_rise_s: np.ndarray) -> np.ndarray:
        """Tags of pulses emitted ``since_rise_s`` after the rise (relative times: a Unix
        time in a float64 resolves only 0.2 microseconds)."""
        tof = np.interp(rise + since_rise_s, grid, grid_tof)
        out = np.empty(since_rise_s.size, TAG_DTYPE)
        out["channel"] = 1
        out["time_ps"] = CLOCK_OFFSET_PS + np.rint((since_rise_s + tof) * 1e12).astype(np.int64)
        return out

    inner = _Blocks()
    tagger = DopplerCorrectedTagger(inner, prediction)
    # What calibration reads first: blocks of light that arrived just before each read.
    for _ in range(ANCHOR_BLOCKS):
        now = time.time()
        tags = tags_of(now - rise - 0.01 - np.sort(rng.uniform(0.0, 0.01, 50))[::-1])
        inner.blocks.append(
            TagBlock(tags=tags, start_ps=int(tags["time_ps"][0]), stop_ps=int(tags["time_ps"][-1]))
        )
        assert tagger.read_block(0.1) is not None
    # Then 5 s of key exchange (the anchor is frozen by now).
    t0 = time.time()
    n_slots = int(5.0 * 1e12 / PERIOD_PS)
    slots = np.sort(rng.choice(n_slots, 20_000, replace=False)).astype(np.int64)
    tags = tags_of((t0 - rise) + slots * PERIOD_PS * 1e-12)
    for h in np.array_split(np.arange(slots.size), 2):
        inner.blocks.append(
            TagBlock(
                tags=tags[h],
                start_ps=int(tags["time_ps"][h[0]]),
                stop_ps=int(tags["time_ps"][h[-1]]),
            )
        )
    out = [tagger.read_block(0.1), tagger.read_block(0.1)]
    assert tagger.read_block(0.1) is None
    corrected = np.concatenate([b.tags["time_ps"] for b in out if b is not None])
    d = np.diff(corrected)
    assert np.all(d > 0), (np.flatnonzero(d <= 0)[:5], d[d <= 0][:5])  # still in order
    raw = _linear_residual_ps(slots.astype(float), tags["time_ps"].astype(float))
    fixed = _linear_residual_ps(slots.astype(float), corrected.astype(float))
    assert raw > 100 * PERIOD_PS  # the raw tags leave any line by a hundred slots
    assert fixed < 0.05 * PERIOD_PS  # the corrected ones sit on one within 5 % of a slot
    # everything else goes to the instrument
    assert tagger.channels() == [1, 2, 3, 4] and inner.other_calls == 1
