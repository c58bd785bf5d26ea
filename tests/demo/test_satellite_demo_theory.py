"""The satellite demo's theory of a pass (what the per-pass figures are compared with):
one block per pass beats blocks of a fixed size, settings optimised for the pass beat
Micius's, and intensity intervals cost key as they do in the node's pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.simlink.satellite_channel import (
    CloudParams,
    SatelliteChannel,
    SatelliteChannelParams,
)
from qkdnode.demo.satellite_run import (
    load_satellite_config,
    optimise_for_pass,
    pass_theory,
)
from qkdnode.procedures.mean_photon_number import MeanPhotonResult

ROOT = Path(__file__).resolve().parents[2]
CFG = load_satellite_config(ROOT / "configs" / "satellite.toml")


def _channel(**kw: object) -> SatelliteChannel:
    return SatelliteChannel(
        SatelliteChannelParams(orbit=CFG.satellite.orbit, rises_unix_s=(0.0,), **kw)
    )


def test_one_block_per_pass_gives_more_key_than_four() -> None:
    ch = _channel()
    whole = pass_theory(CFG, ch, 0.0, ch.duration_s)
    q = ch.duration_s / 4
    four = sum(pass_theory(CFG, ch, k * q, (k + 1) * q).secret_bits for k in range(4))
    assert whole.secret_bits > 1.1 * four > 0
    assert whole.qber_z == pytest.approx(0.0102, abs=0.001)  # misalignment 1 % plus darks


def test_a_cloud_costs_the_key_of_its_time() -> None:
    clear = _channel()
    cloudy = _channel(clouds=(CloudParams(start_s=100, stop_s=180),))
    a = pass_theory(CFG, clear, 0.0, clear.duration_s)
    b = pass_theory(CFG, cloudy, 0.0, cloudy.duration_s)
    assert b.detections < 0.6 * a.detections and b.secret_bits < a.secret_bits


def test_settings_optimised_for_the_pass_give_more_key() -> None:
    ch = _channel()
    best = optimise_for_pass(CFG, ch, 0.0, ch.duration_s)
    assert set(best) == {"p_basis_z", "p_signal", "p_decoy", "mu_signal", "mu_decoy"}
    assert (
        pass_theory(CFG, ch, 0.0, ch.duration_s, best).secret_bits
        > pass_theory(CFG, ch, 0.0, ch.duration_s).secret_bits
    )


def test_calibrated_intensity_intervals_cost_key() -> None:
    """With the transmitter's calibration record of a satellite demo run (mean photon
    numbers within about +/-10 %), the bound takes the worst case inside the intervals."""
    ch = _channel()
    m = MeanPhotonResult.model_validate_json(
        (Path(__file__).parent / "data" / "mean_photon_number.json").read_text()
    )
    exact = pass_theory(CFG, ch, 0.0, ch.duration_s).secret_bits
    bounded = pass_theory(CFG, ch, 0.0, ch.duration_s, intensities=m).secret_bits
    assert 0.6 * exact < bounded < 0.95 * exact
