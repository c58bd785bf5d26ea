"""The simulated link as a satellite downlink: pass windows on the wall clock, the pass's
transmittance and time of flight per fiber batch, and clouds.

:class:`SatelliteChannelParams` (the ``satellite`` table of the transmitter's simulation
parameters) replaces the fiber's fixed loss and delay by those of satellite passes
(:mod:`drivers.satellite_pass`): pass ``k`` rises above the minimum elevation at
``rises_unix_s[k]`` (seconds since the Unix epoch, on the transmitter's wall clock) and
sets ``time_above_elevation_s / time_scale`` seconds later. Outside a pass the channel
carries no light.

``time_scale`` compresses a pass for demonstrations and tests: the satellite moves
``time_scale`` times faster along its orbit, so a 274 s pass lasts 274 / ``time_scale``
seconds. The time of flight is compressed with it, ``tau(t) = L_min / c + (L(k t) - L_min)
/ (k c)``, so its rate of change (range rate / c, tens of ppm) is the real pass's while
its curvature is ``k`` times the real one: the receiver's clock must follow the true
Doppler drift, faster. With ``time_scale = 1`` the pass is the real one.

Per fiber batch (:meth:`SatelliteChannel.batch`) the transmittance is the pass's at the
batch's middle times the cloud factor in force then, and the time of flight is linear
between the batch's ends: the batch's pulses arrive ``period * (1 + (tau_end - tau_start)
/ duration)`` apart, so consecutive batches join without gap or overlap.

Clouds (:class:`CloudParams`): from ``start_s`` to ``stop_s`` after a pass's rise (that
pass's compressed time) the transmittance is multiplied by ``transmittance`` (0: an opaque
cloud). Background light is not modelled here: set the receiver's dark-count rates.

Failure modes: pydantic ``ValidationError`` on inconsistent parameters (passes that
overlap or are not in order, a cloud that ends before it starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.satellite_pass import (
    SPEED_OF_LIGHT_M_S,
    SatellitePassParams,
    pass_profile,
    time_above_elevation_s,
)

__all__ = ["BatchChannel", "CloudParams", "SatelliteChannel", "SatelliteChannelParams"]

#: Sampling of the pass profile in the pass's own (uncompressed) time, seconds.
_PROFILE_DT_S = 0.05


class CloudParams(BaseModel):
    """A cloud over the ground station during one pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pass_index: int = Field(0, ge=0, description="which pass (0: the first)")
    start_s: float = Field(ge=0.0, description="seconds after the pass's rise (compressed)")
    stop_s: float = Field(gt=0.0, description="seconds after the pass's rise (compressed)")
    transmittance: float = Field(
        0.0, ge=0.0, le=1.0, description="factor on the link transmittance (0: opaque)"
    )

    @model_validator(mode="after")
    def _order(self) -> CloudParams:
        if self.stop_s <= self.start_s:
            raise ValueError(f"cloud: stop_s ({self.stop_s}) must be after start_s")
        return self


class SatelliteChannelParams(BaseModel):
    """Satellite passes in place of the fiber (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    orbit: SatellitePassParams = SatellitePassParams()
    rises_unix_s: tuple[float, ...] = Field(
        (), description="rise above the minimum elevation of each pass (Unix time, s)"
    )
    time_scale: float = Field(1.0, ge=1.0, le=100.0, description="pass compression factor")
    clouds: tuple[CloudParams, ...] = ()

    @property
    def pass_duration_s(self) -> float:
        """Wall-clock seconds of one pass above the minimum elevation (compressed)."""
        return time_above_elevation_s(self.orbit, self.orbit.min_elevation_deg) / self.time_scale

    @model_validator(mode="after")
    def _passes_in_order(self) -> SatelliteChannelParams:
        d = self.pass_duration_s
        if d <= 0:
            raise ValueError(
                "orbit: the pass never reaches min_elevation_deg "
                f"({self.orbit.min_elevation_deg} deg)"
            )
        for a, b in zip(self.rises_unix_s, self.rises_unix_s[1:], strict=False):
            if b < a + d:
                raise ValueError(
                    f"rises_unix_s: a pass rises at {b} before the one at {a} has set "
                    f"(passes last {d:.1f} s)"
                )
        for c in self.clouds:
            if c.pass_index >= max(1, len(self.rises_unix_s)):
                raise ValueError(f"clouds: pass_index {c.pass_index} names no pass")
        return self


@dataclass(frozen=True)
class BatchChannel:
    """What the channel does to one fiber batch."""

    transmittance: float
    tof_start_s: float  # time of flight of the batch's first slot
    tof_stop_s: float  # time of flight of the slot after its last
    pass_index: int | None  # the pass the batch's middle falls in, None between passes


class SatelliteChannel:
    """The passes of :class:`SatelliteChannelParams` as functions of the wall clock."""

    def __init__(self, params: SatelliteChannelParams) -> None:
        self.params = params
        orbit = params.orbit
        profile = pass_profile(orbit, _PROFILE_DT_S)
        above = profile.above()
        self._t_s = profile.t_s  # pass time, 0 at closest approach (uncompressed)
        self._eta = profile.transmittance
        self._range_m = profile.range_m
        self._half_s = time_above_elevation_s(orbit, orbit.min_elevation_deg) / 2.0
        self._range_min_m = float(profile.range_m.min())
        # Between passes the time of flight holds its value at the pass's edge.
        edge = self._range_at(np.array([self._half_s]))
        self._tof_edge_s = self._tof_of_range(float(edge[0]))
        self.duration_s = params.pass_duration_s
        if not above.any():  # pragma: no cover - refused by the params' validator
            raise ValueError("the pass never rises above the minimum elevation")

    # --- pass time --------------------------------------------------------------------
    def pass_at(self, unix_s: float) -> tuple[int, float] | None:
        """(pass index, seconds since its rise) of a wall-clock time inside a pass."""
        for k, rise in enumerate(self.params.rises_unix_s):
            if rise <= unix_s < rise + self.duration_s:
                return k, unix_s - rise
        return None

    def _pass_time_s(self, since_rise_s: float) -> float:
        """Uncompressed pass time (0 at the closest approach)."""
        return -self._half_s + since_rise_s * self.params.time_scale

    def _range_at(self, t_s: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.interp(t_s, self._t_s, self._range_m)
        return out

    def _tof_of_range(self, range_m: float) -> float:
        k = self.params.time_scale
        return (self._range_min_m + (range_m - self._range_min_m) / k) / SPEED_OF_LIGHT_M_S

    # --- per time -----------------------------------------------------------------------
    def transmittance_at(self, unix_s: float) -> float:
        """Link transmittance (pass and clouds) at a wall-clock time; 0 between passes."""
        where = self.pass_at(unix_s)
        if where is None:
            return 0.0
        k, since = where
        eta = float(np.interp(self._pass_time_s(since), self._t_s, self._eta))
        for c in self.params.clouds:
            if c.pass_index == k and c.start_s <= since < c.stop_s:
                eta *= c.transmittance
        return eta

    def tof_s_at(self, unix_s: float) -> float:
        """Time of flight (s) of a pulse emitted at ``unix_s`` (compressed as documented)."""
        where = self.pass_at(unix_s)
        if where is None:
            return self._tof_edge_s
        _, since = where
        r = float(self._range_at(np.array([self._pass_time_s(since)]))[0])
        return self._tof_of_range(r)

    def batch(self, start_unix_s: float, stop_unix_s: float) -> BatchChannel:
        """The channel over one batch emitted from ``start_unix_s`` to ``stop_unix_s``."""
        mid = 0.5 * (start_unix_s + stop_unix_s)
        where = self.pass_at(mid)
        return BatchChannel(
            transmittance=self.transmittance_at(mid),
            tof_start_s=self.tof_s_at(start_unix_s),
            tof_stop_s=self.tof_s_at(stop_unix_s),
            pass_index=None if where is None else where[0],
        )

    def windows_unix_s(self) -> list[tuple[float, float]]:
        """(rise, set) of every pass, Unix seconds."""
        return [(r, r + self.duration_s) for r in self.params.rises_unix_s]

    def tof_drift_ppm_at(self, unix_s: float) -> float:
        """Rate of change of the time of flight, ppm (range rate / c)."""
        h = 1e-3
        return (self.tof_s_at(unix_s + h) - self.tof_s_at(unix_s - h)) / (2 * h) * 1e6
