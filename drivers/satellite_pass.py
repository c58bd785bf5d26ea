"""Satellite downlink pass model: geometry, link loss, background and time of flight.

A satellite on a circular low-Earth orbit passes over a ground station; the pass is fixed by
the orbit altitude and the largest elevation the station sees (90 degrees: the orbit goes
through the station's zenith). Everything here is pure numpy and deterministic.

Geometry (Earth-centred frame, Earth's rotation neglected over a pass, as in SatQuMA): the
station sits at ``r_gs = R_E + h_gs`` on the z axis; the orbit, of radius ``r_sat = R_E +
h_sat`` and angular rate ``omega = sqrt(GM / r_sat**3)``, lies in a plane tilted by the
central angle ``xi`` from the station's zenith, so that the satellite's smallest central
angle to the station, reached at ``t = 0``, is ``xi``::

    S(t) = r_sat * (sin(omega t), sin(xi) cos(omega t), cos(xi) cos(omega t))

The elevation is ``asin((S - G) . z / |S - G|)``, the range ``|S - G|`` and the range rate
``(S - G) . dS/dt / |S - G|`` (negative while the satellite approaches). ``xi`` follows from
the largest elevation ``e``: ``xi = acos(r_gs cos(e) / r_sat) - e``.

Link transmittance, a product of independent factors (each documented on its function):

* diffraction of a Gaussian beam (waist ``w0`` at the transmitter, wavelength ``lambda``):
  transmitter truncation ``1 - exp(-2 a_T^2 / w0^2)`` and collection by the receiver
  aperture ``1 - exp(-2 a_R^2 / w(L)^2)`` with ``w(L) = w0 sqrt(1 + (L / z_R)^2)``,
  ``z_R = pi w0^2 / lambda`` (:func:`gaussian_collection`);
* pointing jitter of rms ``sigma`` per axis: ``w^2 / (w^2 + 4 sigma^2 L^2)``, the mean
  on-axis intensity factor of a Gaussian beam whose centre wanders with a Rayleigh-distributed
  offset (exact for a receiver aperture much smaller than the beam) (:func:`pointing_factor`);
* the atmosphere: ``T_zenith ** (1 / sin(elevation))`` (Beer-Lambert along a plane-parallel
  air mass; valid above about 5 degrees, the air mass is capped below 0.5 degrees)
  (:func:`atmospheric_transmittance`);
* a fixed system loss in dB (telescope optics, receiver optics, detector efficiency,
  coupling), :attr:`SatellitePassParams.system_loss_db`.

Sources for the defaults: Micius (Liao et al., Nature 549, 43 (2017)): about 500 km
altitude, a 300 mm transmitter and a 1 m receiver telescope at 850 nm, decoy-state BB84
ranging 645 km to 1200 km over a pass; the finite-key pass study of Sidhu et al., npj
Quantum Information 8, 18 (2022) and its SatQuMA code (github.com/cnqo-qcomms/SatQuMA):
500 km altitude, zenith pass, 10 degree minimum elevation, link loss quoted at zenith.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "SPEED_OF_LIGHT_M_S",
    "PassProfile",
    "SatellitePassParams",
    "atmospheric_transmittance",
    "beam_radius_m",
    "gaussian_collection",
    "horizon_half_time_s",
    "orbit_rate_rad_s",
    "pass_geometry",
    "pass_profile",
    "pointing_factor",
    "time_above_elevation_s",
    "with_zenith_loss_db",
    "xi_for_max_elevation_rad",
]

FloatArray = npt.NDArray[np.float64]

SPEED_OF_LIGHT_M_S = 299_792_458.0
_MIN_AIRMASS_ELEVATION_RAD = math.radians(0.5)


class SatellitePassParams(BaseModel):
    """One satellite pass over one ground station. Every field carries its unit.

    Defaults: a Sidhu et al. (2022) / SatQuMA-like 500 km zenith pass with a 10 degree
    minimum elevation; Micius-class optics (Liao et al. 2017: 300 mm transmitter, here a
    0.15 m aperture radius with the beam waist filling it; 1 m receiver, radius 0.5 m;
    850 nm); a clear-sky zenith transmittance of 0.85 at 850 nm; 1 microradian rms pointing
    jitter; 10 dB of fixed system loss (optics, detectors). Background rates are order-of-
    magnitude figures for a narrow-filtered 1 m telescope (night about 100 counts/s, day
    about 1e5 counts/s).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    altitude_m: float = Field(500e3, gt=0.0)
    earth_radius_m: float = Field(6371e3, gt=0.0)
    earth_gm_m3_s2: float = Field(3.986004418e14, gt=0.0)
    ground_altitude_m: float = Field(0.0, ge=0.0)
    max_elevation_deg: float = Field(90.0, gt=0.0, le=90.0)
    min_elevation_deg: float = Field(10.0, ge=0.0, lt=90.0)
    wavelength_m: float = Field(850e-9, gt=0.0)
    tx_aperture_radius_m: float = Field(0.15, gt=0.0)
    tx_beam_waist_m: float = Field(0.15, gt=0.0)
    rx_aperture_radius_m: float = Field(0.5, gt=0.0)
    pointing_jitter_rad: float = Field(1e-6, ge=0.0)
    zenith_transmittance: float = Field(0.85, gt=0.0, le=1.0)
    system_loss_db: float = Field(10.0, ge=0.0)
    background_night_hz: float = Field(100.0, ge=0.0)
    background_day_hz: float = Field(1e5, ge=0.0)
    daylight: bool = False

    @model_validator(mode="after")
    def _check_geometry(self) -> SatellitePassParams:
        if self.ground_altitude_m >= self.altitude_m:
            raise ValueError("the satellite must orbit above the ground station")
        if self.min_elevation_deg >= self.max_elevation_deg:
            raise ValueError("min_elevation_deg must be below max_elevation_deg")
        return self

    @property
    def orbit_radius_m(self) -> float:
        return self.earth_radius_m + self.altitude_m

    @property
    def station_radius_m(self) -> float:
        return self.earth_radius_m + self.ground_altitude_m

    @property
    def background_hz(self) -> float:
        """Background count rate at the receiver for this pass (day or night)."""
        return self.background_day_hz if self.daylight else self.background_night_hz


@dataclass(frozen=True)
class PassProfile:
    """A pass sampled every ``dt_s`` seconds from horizon to horizon (elevation >= 0).

    ``t_s`` is 0 at the closest approach. Arrays share one length; ``loss_db`` and
    ``transmittance`` are the whole link (diffraction, pointing, atmosphere, system loss).
    ``tof_drift_ppm`` is the rate of change of the time of flight (range rate / c, in parts
    per million): the clock-rate offset the receiver's time tagger must follow.
    """

    dt_s: float
    t_s: FloatArray
    elevation_deg: FloatArray
    range_m: FloatArray
    range_rate_m_s: FloatArray
    loss_db: FloatArray
    transmittance: FloatArray
    tof_s: FloatArray
    tof_drift_ppm: FloatArray
    background_hz: float
    min_elevation_deg: float

    def above(self, min_elevation_deg: float | None = None) -> npt.NDArray[np.bool_]:
        """Mask of the samples at or above ``min_elevation_deg`` (default: the pass's)."""
        limit = self.min_elevation_deg if min_elevation_deg is None else min_elevation_deg
        return self.elevation_deg >= limit

    def time_above_s(self, min_elevation_deg: float | None = None) -> float:
        """Sampled time (s) at or above the elevation limit: samples times ``dt_s``."""
        return float(np.count_nonzero(self.above(min_elevation_deg))) * self.dt_s

    @property
    def closest_range_m(self) -> float:
        return float(self.range_m.min())


def orbit_rate_rad_s(params: SatellitePassParams) -> float:
    """Angular rate (rad/s) of the circular orbit: ``sqrt(GM / r^3)``."""
    return math.sqrt(params.earth_gm_m3_s2 / params.orbit_radius_m**3)


def _central_angle_rad(elevation_rad: float, r_gs_m: float, r_sat_m: float) -> float:
    return math.acos(r_gs_m * math.cos(elevation_rad) / r_sat_m) - elevation_rad


def xi_for_max_elevation_rad(params: SatellitePassParams) -> float:
    """Central angle (rad) between the station and the orbit plane's closest point."""
    return _central_angle_rad(
        math.radians(params.max_elevation_deg), params.station_radius_m, params.orbit_radius_m
    )


def _half_time_s(params: SatellitePassParams, elevation_deg: float) -> float:
    gamma = _central_angle_rad(
        math.radians(elevation_deg), params.station_radius_m, params.orbit_radius_m
    )
    xi = xi_for_max_elevation_rad(params)
    # The central angle to the station is acos(cos(xi) cos(omega t)).
    cos_wt = math.cos(gamma) / math.cos(xi)
    return math.acos(min(1.0, cos_wt)) / orbit_rate_rad_s(params)


def horizon_half_time_s(params: SatellitePassParams) -> float:
    """Time (s) from the closest approach to the horizon (elevation 0)."""
    return _half_time_s(params, 0.0)


def time_above_elevation_s(params: SatellitePassParams, min_elevation_deg: float) -> float:
    """Exact time (s) the satellite spends at or above ``min_elevation_deg`` (0 if the pass
    never gets that high)."""
    if min_elevation_deg >= params.max_elevation_deg:
        return 0.0
    return 2.0 * _half_time_s(params, min_elevation_deg)


def pass_geometry(
    params: SatellitePassParams, t_s: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Elevation (rad), range (m) and range rate (m/s) at times ``t_s`` from the closest
    approach. Times beyond the horizon give negative elevations (not clipped)."""
    r_sat = params.orbit_radius_m
    omega = orbit_rate_rad_s(params)
    xi = xi_for_max_elevation_rad(params)
    phase = omega * np.asarray(t_s, dtype=np.float64)
    sx = r_sat * np.sin(phase)
    sy = r_sat * math.sin(xi) * np.cos(phase)
    sz = r_sat * math.cos(xi) * np.cos(phase)
    vx = r_sat * omega * np.cos(phase)
    vy = -r_sat * omega * math.sin(xi) * np.sin(phase)
    vz = -r_sat * omega * math.cos(xi) * np.sin(phase)
    dz = sz - params.station_radius_m
    range_m = np.sqrt(sx**2 + sy**2 + dz**2)
    elevation = np.arcsin(dz / range_m)
    range_rate = (sx * vx + sy * vy + dz * vz) / range_m
    return elevation, range_m, range_rate


def gaussian_collection(
    range_m: FloatArray,
    wavelength_m: float,
    tx_beam_waist_m: float,
    tx_aperture_radius_m: float,
    rx_aperture_radius_m: float,
) -> FloatArray:
    """Fraction of the transmitted power a receiver aperture collects from a Gaussian beam.

    Transmitter truncation ``1 - exp(-2 a_T^2 / w0^2)`` times receiver capture
    ``1 - exp(-2 a_R^2 / w(L)^2)``, ``w(L) = w0 sqrt(1 + (L / z_R)^2)``. The diffraction
    ripple a hard-edged transmitter aperture adds is neglected (within about 1 dB for
    ``a_T >= w0``). Raises ``ValueError`` on non-positive inputs.
    """
    if min(wavelength_m, tx_beam_waist_m, tx_aperture_radius_m, rx_aperture_radius_m) <= 0:
        raise ValueError("wavelength, waist and aperture radii must be positive")
    z_r = math.pi * tx_beam_waist_m**2 / wavelength_m
    w2 = tx_beam_waist_m**2 * (1.0 + (np.asarray(range_m, dtype=np.float64) / z_r) ** 2)
    truncation = 1.0 - math.exp(-2.0 * tx_aperture_radius_m**2 / tx_beam_waist_m**2)
    return truncation * -np.expm1(-2.0 * rx_aperture_radius_m**2 / w2)


def beam_radius_m(range_m: FloatArray, wavelength_m: float, tx_beam_waist_m: float) -> FloatArray:
    """Gaussian beam radius (1/e^2 intensity, m) at distance ``range_m``."""
    z_r = math.pi * tx_beam_waist_m**2 / wavelength_m
    return tx_beam_waist_m * np.sqrt(1.0 + (np.asarray(range_m, dtype=np.float64) / z_r) ** 2)


def pointing_factor(range_m: FloatArray, beam_radius: FloatArray, jitter_rad: float) -> FloatArray:
    """Mean loss factor of a pointing jitter of rms ``jitter_rad`` per axis:
    ``w^2 / (w^2 + 4 sigma^2 L^2)``."""
    offset2 = 4.0 * jitter_rad**2 * np.asarray(range_m, dtype=np.float64) ** 2
    w2 = np.asarray(beam_radius, dtype=np.float64) ** 2
    return w2 / (w2 + offset2)


def atmospheric_transmittance(elevation_rad: FloatArray, zenith_transmittance: float) -> FloatArray:
    """``T_zenith ** (1 / sin(elevation))``: Beer-Lambert with a plane-parallel air mass,
    the elevation floored at 0.5 degrees (the model overstates the loss near the horizon,
    where refraction and Earth's curvature cap the air mass near 38)."""
    if not 0.0 < zenith_transmittance <= 1.0:
        raise ValueError(f"zenith_transmittance must be in (0, 1], got {zenith_transmittance}")
    elev = np.maximum(np.asarray(elevation_rad, dtype=np.float64), _MIN_AIRMASS_ELEVATION_RAD)
    return np.power(zenith_transmittance, 1.0 / np.sin(elev))


def _transmittance(
    params: SatellitePassParams, elevation_rad: FloatArray, range_m: FloatArray
) -> FloatArray:
    w = beam_radius_m(range_m, params.wavelength_m, params.tx_beam_waist_m)
    system = 10.0 ** (-params.system_loss_db / 10.0)
    eta: FloatArray = (
        gaussian_collection(
            range_m,
            params.wavelength_m,
            params.tx_beam_waist_m,
            params.tx_aperture_radius_m,
            params.rx_aperture_radius_m,
        )
        * pointing_factor(range_m, w, params.pointing_jitter_rad)
        * atmospheric_transmittance(elevation_rad, params.zenith_transmittance)
        * system
    )
    return eta


def pass_profile(params: SatellitePassParams, dt_s: float = 1.0) -> PassProfile:
    """The pass sampled at ``t = k dt_s`` (k integer, t = 0 at the closest approach) from
    horizon to horizon. Raises ``ValueError`` if ``dt_s`` is not positive or longer than
    half the pass."""
    if not dt_s > 0:
        raise ValueError(f"dt_s must be positive, got {dt_s}")
    half_s = horizon_half_time_s(params)
    n_half = math.floor(half_s / dt_s)
    if n_half < 1:
        raise ValueError(f"dt_s = {dt_s} s is longer than half the pass ({half_s:.1f} s)")
    t_s = np.arange(-n_half, n_half + 1, dtype=np.float64) * dt_s
    elevation, range_m, range_rate = pass_geometry(params, t_s)
    eta = _transmittance(params, elevation, range_m)
    return PassProfile(
        dt_s=dt_s,
        t_s=t_s,
        elevation_deg=np.degrees(elevation),
        range_m=range_m,
        range_rate_m_s=range_rate,
        loss_db=-10.0 * np.log10(eta),
        transmittance=eta,
        tof_s=range_m / SPEED_OF_LIGHT_M_S,
        tof_drift_ppm=range_rate / SPEED_OF_LIGHT_M_S * 1e6,
        background_hz=params.background_hz,
        min_elevation_deg=params.min_elevation_deg,
    )


def with_zenith_loss_db(params: SatellitePassParams, loss_db: float) -> SatellitePassParams:
    """``params`` with ``system_loss_db`` set so the link loss at the closest approach is
    ``loss_db`` (the way SatQuMA and Sidhu et al. quote a system: its loss at zenith).
    Raises ``ValueError`` if the optics and atmosphere alone already lose more."""
    elevation, range_m, _ = pass_geometry(params, np.zeros(1))
    free = params.model_copy(update={"system_loss_db": 0.0})
    optics_db = float(-10.0 * np.log10(_transmittance(free, elevation, range_m))[0])
    if optics_db > loss_db:
        raise ValueError(
            f"optics and atmosphere alone lose {optics_db:.2f} dB at closest approach, "
            f"more than the {loss_db} dB asked for"
        )
    return params.model_copy(update={"system_loss_db": loss_db - optics_db})
