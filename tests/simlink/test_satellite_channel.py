"""The satellite channel of the simulated link: pass windows on the wall clock, per-batch
transmittance and time of flight (Doppler), clouds, and the transmitter world's fiber
headers built from them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError

from drivers.satellite_pass import (
    SPEED_OF_LIGHT_M_S,
    SatellitePassParams,
    pass_geometry,
    time_above_elevation_s,
)
from drivers.simlink.params import TransmitterSimParams
from drivers.simlink.satellite_channel import (
    CloudParams,
    SatelliteChannel,
    SatelliteChannelParams,
)
from drivers.simlink.world import TransmitterWorld

ORBIT = SatellitePassParams(max_elevation_deg=49.0, min_elevation_deg=20.0)
RISE = 1_000_000.0


def _channel(**kw: object) -> SatelliteChannel:
    return SatelliteChannel(SatelliteChannelParams(orbit=ORBIT, rises_unix_s=(RISE,), **kw))


def test_no_light_outside_the_window_and_the_pass_inside() -> None:
    ch = _channel()
    duration = time_above_elevation_s(ORBIT, 20.0)
    assert ch.duration_s == pytest.approx(duration)
    assert ch.transmittance_at(RISE - 0.01) == 0.0
    assert ch.transmittance_at(RISE + duration + 0.01) == 0.0
    # the middle of the window is the closest approach: the geometry's range there
    _, range_m, _ = pass_geometry(ORBIT, np.zeros(1))
    assert ch.tof_s_at(RISE + duration / 2) == pytest.approx(
        float(range_m[0]) / SPEED_OF_LIGHT_M_S, rel=1e-6
    )
    mid = ch.transmittance_at(RISE + duration / 2)
    edge = ch.transmittance_at(RISE + 1.0)
    assert mid > 3 * edge > 0  # about 6 dB more loss at the ends (range, air mass)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_time_of_flight_drift_is_the_real_range_rate_whatever_the_compression(
    scale: float,
) -> None:
    ch = _channel(time_scale=scale)
    duration = time_above_elevation_s(ORBIT, 20.0)
    for frac in (0.05, 0.3, 0.7, 0.95):
        since = frac * duration / scale
        t_pass = -duration / 2 + frac * duration
        _, _, rate = pass_geometry(ORBIT, np.array([t_pass]))
        want_ppm = float(rate[0]) / SPEED_OF_LIGHT_M_S * 1e6
        assert ch.tof_drift_ppm_at(RISE + since) == pytest.approx(want_ppm, rel=2e-3, abs=0.02)
    # approaching first (time of flight shrinking), receding after
    assert ch.tof_drift_ppm_at(RISE + 1) < -10
    assert ch.tof_drift_ppm_at(RISE + duration / scale - 1) > 10


def test_a_cloud_multiplies_the_transmittance_in_its_window_only() -> None:
    cloud = CloudParams(pass_index=0, start_s=100.0, stop_s=140.0, transmittance=0.0)
    ch = _channel(clouds=(cloud,))
    clear = _channel()
    assert ch.transmittance_at(RISE + 120) == 0.0
    assert ch.transmittance_at(RISE + 99.9) == clear.transmittance_at(RISE + 99.9) > 0
    assert ch.transmittance_at(RISE + 140.1) == clear.transmittance_at(RISE + 140.1) > 0


def test_inconsistent_passes_and_clouds_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="rises_unix_s"):
        SatelliteChannelParams(orbit=ORBIT, rises_unix_s=(RISE, RISE + 10))
    with pytest.raises(ValidationError, match="pass_index"):
        SatelliteChannelParams(
            orbit=ORBIT,
            rises_unix_s=(RISE,),
            clouds=(CloudParams(pass_index=3, start_s=1, stop_s=2),),
        )
    with pytest.raises(ValidationError, match="stop_s"):
        CloudParams(start_s=5, stop_s=2)


def test_world_batches_join_and_carry_the_doppler_rate() -> None:
    """Consecutive fiber headers: each batch starts where the previous one ended (to the
    picosecond), its pulses arriving at ``rate / (1 + drift)``."""
    slot_rate = 100e6
    params = TransmitterSimParams.model_validate(
        {
            "chunk_slots": 1 << 20,
            "source": {"slot_rate_hz": slot_rate},
            "satellite": {"orbit": ORBIT.model_dump(), "rises_unix_s": [RISE], "time_scale": 2},
        }
    )
    world = TransmitterWorld(params)
    world.epoch_unix_s = RISE + 10.0  # slot 0 leaves 10 s into the pass
    headers = []
    for _ in range(5):
        index, chunk = world._next_chunk()
        headers.append(world.fiber_header(index, chunk))
    assert world.satellite is not None
    for h, nxt in itertools.pairwise(headers):
        n = h["slot_stop"] - h["slot_start"]
        end = h["t0_ps"] + n * 1e12 / h["slot_rate_hz"]
        assert abs(nxt["t0_ps"] - end) <= 2.0
        drift = world.satellite.tof_drift_ppm_at(RISE + 10.0) * 1e-6
        assert h["slot_rate_hz"] == pytest.approx(slot_rate / (1 + drift), rel=1e-7)
    # the light of the first batch: the pass's transmittance there
    settings_eta = world.satellite.transmittance_at(RISE + 10.0 + 0.5 * (1 << 20) / slot_rate)
    assert settings_eta > 0
    world.close()


def test_world_sends_no_light_between_passes() -> None:
    params = TransmitterSimParams.model_validate(
        {
            "start_calibrated": True,
            "satellite": {"orbit": ORBIT.model_dump(), "rises_unix_s": [RISE]},
        }
    )
    world = TransmitterWorld(params)
    world.epoch_unix_s = RISE - 100.0
    assert world.emission_settings().transmittance == 0.0
    world.epoch_unix_s = RISE + 100.0
    eta = world.emission_settings().transmittance
    assert 1e-5 < eta < 1e-2 and math.isfinite(eta)
    world.close()


def test_receiver_takes_every_batch_of_a_pass() -> None:
    """The receiver's world processes consecutive Doppler-shifted batches (their joins
    are rounded to the picosecond) without refusing one, and its tags follow the pass."""
    from drivers.simlink.params import ReceiverSimParams
    from drivers.simlink.world import ReceiverWorld

    tx_params = TransmitterSimParams.model_validate(
        {
            "start_calibrated": True,
            "chunk_slots": 1 << 16,
            "source": {"slot_rate_hz": 100e6},
            "satellite": {"orbit": ORBIT.model_dump(), "rises_unix_s": [RISE], "time_scale": 4},
        }
    )
    tx = TransmitterWorld(tx_params)
    rx = ReceiverWorld(ReceiverSimParams(start_calibrated=True))
    tx.epoch_unix_s = RISE + 20.0
    detections = 0
    for _ in range(200):
        index, chunk = tx._next_chunk()
        records = rx.process(tx.fiber_header(index, chunk), chunk.photons)
        detections += len(records)
    assert rx.chunk_index == 200 and detections > 0
    tx.close()
    rx.close()


def test_counters_integrate_over_their_period_and_restart_on_a_setting_change() -> None:
    """A slow link's detector counters integrate over ``counter_integration_s`` (many
    batches), counting only batches made with the settings now in force."""
    from drivers.simlink.params import ReceiverSimParams
    from drivers.simlink.world import ReceiverWorld

    tx = TransmitterWorld(
        TransmitterSimParams.model_validate(
            {"start_calibrated": True, "chunk_slots": 1 << 16, "source": {"slot_rate_hz": 100e6}}
        )
    )
    rx = ReceiverWorld(
        ReceiverSimParams.model_validate(
            {"start_calibrated": True, "hardware": {"counter_integration_s": 0.02}}
        )
    )
    per_batch = []
    for _ in range(60):
        index, chunk = tx._next_chunk()
        rx.process(tx.fiber_header(index, chunk), chunk.photons)
        per_batch.append(rx.last_counts.sum())
    seconds = (1 << 16) / 100e6
    n = int(np.ceil(0.02 / seconds))  # batches in one integration period
    total = float(rx.count_rates_hz().sum())
    assert total == pytest.approx(sum(per_batch[-n:]) / (n * seconds), rel=1e-9)
    # after a setting change only the batches counted since then count
    rx.detectors.armed[0] = False
    index, chunk = tx._next_chunk()
    rx.process(tx.fiber_header(index, chunk), chunk.photons)
    assert float(rx.count_rates_hz().sum()) == pytest.approx(
        rx.last_counts.sum() / seconds, rel=1e-9
    )
    tx.close()
    rx.close()
