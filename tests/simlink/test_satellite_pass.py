"""Satellite pass geometry and link loss (drivers.satellite_pass)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.satellite_pass import (
    SatellitePassParams,
    atmospheric_transmittance,
    gaussian_collection,
    pass_profile,
    time_above_elevation_s,
    with_zenith_loss_db,
)


def test_zenith_pass_geometry() -> None:
    p = SatellitePassParams(altitude_m=500e3, max_elevation_deg=90.0)
    pr = pass_profile(p, 1.0)
    mid = int(np.argmin(pr.range_m))
    assert pr.t_s[mid] == 0.0
    assert pr.range_m[mid] == pytest.approx(500e3, rel=1e-9)
    assert pr.elevation_deg[mid] == pytest.approx(90.0, abs=1e-6)
    assert pr.tof_s[mid] == pytest.approx(500e3 / 299_792_458.0)
    # symmetric: range rate odd in t, range even
    np.testing.assert_allclose(pr.range_rate_m_s, -pr.range_rate_m_s[::-1], atol=1e-6)
    np.testing.assert_allclose(pr.range_m, pr.range_m[::-1], rtol=1e-12)
    assert pr.range_rate_m_s[mid] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(pr.range_m[mid:]) > 0)
    # several km/s near the horizon (orbital speed 7.6 km/s), approaching before t = 0
    low = pr.elevation_deg < 10
    assert np.all(np.abs(pr.range_rate_m_s[low]) > 5e3)
    assert pr.range_rate_m_s[0] < 0 < pr.range_rate_m_s[-1]
    assert np.all(pr.elevation_deg >= 0)
    # about 7.4 min above 10 deg for a 500 km zenith pass (SatQuMA's window: |t| <= 221 s)
    assert time_above_elevation_s(p, 10.0) == pytest.approx(442.6, abs=1.0)
    assert pr.time_above_s(10.0) == pytest.approx(time_above_elevation_s(p, 10.0), abs=1.0)


def test_lower_pass_reaches_its_max_elevation() -> None:
    p = SatellitePassParams(max_elevation_deg=40.0)
    pr = pass_profile(p, 2.0)
    assert pr.elevation_deg.max() == pytest.approx(40.0, abs=1e-6)
    assert time_above_elevation_s(p, 45.0) == 0.0
    assert time_above_elevation_s(p, 10.0) < time_above_elevation_s(
        SatellitePassParams(max_elevation_deg=90.0), 10.0
    )


def test_loss_monotone_in_range_for_fixed_elevation() -> None:
    ranges = np.linspace(300e3, 3000e3, 50)
    eta = gaussian_collection(ranges, 850e-9, 0.05, 0.05, 0.5)
    assert np.all(np.diff(eta) < 0)
    # far field: 1/L^2
    assert eta[-1] / eta[-10] == pytest.approx((ranges[-10] / ranges[-1]) ** 2, rel=0.01)


def test_atmosphere_model() -> None:
    t = atmospheric_transmittance(np.radians([90.0, 30.0]), 0.8)
    assert t[0] == pytest.approx(0.8)
    assert t[1] == pytest.approx(0.64)
    with pytest.raises(ValueError):
        atmospheric_transmittance(np.radians([90.0]), 0.0)


def test_zenith_loss_helper() -> None:
    p = with_zenith_loss_db(SatellitePassParams(), 30.0)
    pr = pass_profile(p, 5.0)
    assert pr.loss_db[np.argmin(pr.range_m)] == pytest.approx(30.0, abs=1e-9)
    with pytest.raises(ValueError):
        with_zenith_loss_db(SatellitePassParams(), 1.0)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        SatellitePassParams(max_elevation_deg=5.0, min_elevation_deg=10.0)
    with pytest.raises(ValueError):
        pass_profile(SatellitePassParams(), 0.0)


def test_micius_like_pass() -> None:
    """A Micius-like pass (Liao et al., Nature 549, 43 (2017): ~500 km orbit, ranges from
    about 1200 km to 645 km and back, 850 nm, 300 mm transmitter, 1 m receiver). Assumed here:
    a beam of ~10 microradian full divergence (waist 5.4 cm inside the 15 cm aperture radius),
    1 microradian rms pointing jitter, zenith transmittance 0.85, 15 dB of fixed optics and
    detector loss. Model: 29.9 dB at 645 km (elevation 49 deg), 36.3 dB at 1199 km and 36.2 dB
    at 1186 km (elevation 20 deg); the ~40 dB ends need more low-elevation loss (turbulence)
    than this model has."""
    r_e, a = 6371e3, 6871e3
    closest = 645e3
    max_elev = math.degrees(math.asin((a**2 - r_e**2 - closest**2) / (2 * r_e * closest)))
    p = SatellitePassParams(
        max_elevation_deg=max_elev,
        wavelength_m=850e-9,
        tx_aperture_radius_m=0.15,
        tx_beam_waist_m=850e-9 / (math.pi * 5e-6),
        rx_aperture_radius_m=0.5,
        pointing_jitter_rad=1e-6,
        zenith_transmittance=0.85,
        system_loss_db=15.0,
    )
    pr = pass_profile(p, 1.0)
    mid = int(np.argmin(pr.range_m))
    assert pr.range_m[mid] == pytest.approx(closest, rel=1e-6)
    assert 27.0 < pr.loss_db[mid] < 33.0
    ends = [int(np.argmin(np.abs(pr.range_m[:mid] - 1196e3)))]
    ends.append(mid + int(np.argmin(np.abs(pr.range_m[mid:] - 1189e3))))
    for i in ends:
        assert 35.0 < pr.loss_db[i] < 42.0
    assert np.all(np.abs(pr.tof_drift_ppm) < 25.0)
