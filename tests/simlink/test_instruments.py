"""Simulated instruments are views of the world; faults reach the drivers."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pytest

from drivers.errors import ConnectionLostError, NotConnectedError, OutOfRangeError
from drivers.interfaces import BB84State, DetectorStatus, IntensityClass, LaserStatus
from drivers.simlink import instruments as si
from drivers.simlink.optics import photons_per_pulse
from drivers.simlink.params import LinkParams
from drivers.simlink.registry_entries import ENTRIES
from drivers.simlink.world import ReceiverWorld, TransmitterWorld, start_world, stop_world
from tests.simlink.helpers import link


@pytest.fixture
def tx_world() -> Iterator[TransmitterWorld]:
    params = link(fiber={"drift_rad_per_sqrt_s": 0.0}).transmitter_side()
    world = start_world("transmitter", params, None, False)
    assert isinstance(world, TransmitterWorld)
    yield world
    stop_world()


def _connected(cls, name="x", **opts):
    inst = cls(name, options=cls.options_model(**opts))
    inst.connect()
    return inst


def test_registry_entries_point_at_real_classes() -> None:
    import importlib

    from drivers import interfaces

    names = {e[0] for e in ENTRIES}
    assert len(names) == len(ENTRIES) == 9
    for _, target, iface, _ in ENTRIES:
        module, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert issubclass(cls, getattr(interfaces, iface))


def test_connect_without_world_fails_clearly() -> None:
    laser = si.SimLaser("laser")
    with pytest.raises(ConnectionLostError, match="laser: connect"):
        laser.connect()
    with pytest.raises(NotConnectedError):
        laser.power_dbm()


def test_attenuator_sets_mean_photon_number(tx_world: TransmitterWorld) -> None:
    voa = _connected(si.SimAttenuator, "voa")
    mu0 = tx_world.mu_per_class()[0]
    assert mu0 == pytest.approx(0.5, rel=1e-6)
    voa.set_attenuation_db(voa.attenuation_db() + 3.0)
    assert tx_world.mu_per_class()[0] == pytest.approx(mu0 * 10**-0.3, rel=1e-9)
    n_before = tx_world.photons_sent
    tx_world.step()
    voa.set_shutter(False)
    tx_world.step()
    assert tx_world.photons_sent > n_before  # the first chunk had light...
    assert tx_world.mu_per_class() == (0.0, 0.0, 0.0)  # ...closed shutter: none
    with pytest.raises(OutOfRangeError, match=r"voa: set_attenuation_db: 99"):
        voa.set_attenuation_db(99.0)


def test_power_meter_reads_what_laser_and_attenuation_imply(tx_world: TransmitterWorld) -> None:
    meter = _connected(si.SimPowerMeter, "pm")
    laser = _connected(si.SimLaser, "laser")
    voa = _connected(si.SimAttenuator, "voa")
    meter.set_wavelength_nm(laser.wavelength_nm())
    p1 = np.median([meter.power_w() for _ in range(20)])
    voa.set_attenuation_db(voa.attenuation_db() - 10.0)
    p2 = np.median([meter.power_w() for _ in range(20)])
    assert p2 / p1 == pytest.approx(10.0, rel=0.01)
    # mu = P_meter * fixed attenuation / (photon energy * slot rate) * T_signal / <T>
    hw = tx_world.hardware
    photons_per_pulse_per_w = photons_per_pulse(0.0, laser.wavelength_nm(), 25e6) / 1e-3
    t = tx_world.optics.im_transmission(hw)
    src = tx_world.source
    mean_t = src.p_signal * t[0] + src.p_decoy * t[1] + src.p_vacuum * t[2]
    mu_from_meter = p2 * 10 ** (-hw.tap_to_output_db / 10) * photons_per_pulse_per_w * t[0] / mean_t
    assert mu_from_meter == pytest.approx(tx_world.mu_per_class()[0], rel=0.01)
    laser.safe_state()
    assert laser.status() == LaserStatus.OFF
    assert abs(meter.power_w()) < 1e-10


def test_modulator_bias_away_from_optimum_changes_levels(tx_world: TransmitterWorld) -> None:
    im = _connected(si.SimIntensityModulator, "im")
    mu = tx_world.mu_per_class()
    assert mu[1] / mu[0] == pytest.approx(0.2, rel=1e-6)
    im.set_bias_v(im.bias_v() + 0.5)
    mu2 = tx_world.mu_per_class()
    assert mu2[0] < mu[0] and mu2[1] / mu2[0] != pytest.approx(0.2, rel=0.05)
    assert im.level_v(IntensityClass.VACUUM) > 0


def _qber(world_tx: TransmitterWorld, params: LinkParams, n_chunks: int = 1) -> float:
    rx = ReceiverWorld(params.receiver_side())
    errs = n = 0
    for _ in range(n_chunks):
        idx = world_tx.chunk_index
        chunk = world_tx.step()
        rec = rx.process(world_tx.fiber_header(idx, chunk), chunk.photons)
        prep = world_tx.prepared(rec.slot)
        sifted = (rec.channel < 2) & (prep.basis == 0)
        errs += int(np.count_nonzero((rec.channel[sifted] % 2) != prep.bit[sifted]))
        n += int(sifted.sum())
    return errs / n


def test_encoder_bias_compensates_an_encoding_drift_step(tx_world: TransmitterWorld) -> None:
    params = link(fiber={"drift_rad_per_sqrt_s": 0.0})
    enc = _connected(si.SimEncoder, "enc")
    base = _qber(tx_world, params)
    tx_world.inject("encoding_drift", angle_rad=0.3)
    drifted = _qber(tx_world, params)
    assert drifted == pytest.approx(base + math.sin(0.3) ** 2 * (1 - 2 * 0.01), abs=0.01)
    # compensate: rotate back by -0.3 rad through the bias (the test knows V_pi)
    v_pi = tx_world.hardware.encoder_v_pi_v
    enc.set_bias_v(enc.bias_v() - 0.3 / (math.pi / 2) * v_pi)
    assert _qber(tx_world, params) == pytest.approx(base, abs=0.004)
    enc.set_drive_v(BB84State.V, 0.0)  # V prepared as H: half the Z errors
    assert _qber(tx_world, params) > 0.3


def test_detector_delay_gate_faults_and_latch() -> None:
    params = link(fiber={"drift_rad_per_sqrt_s": 0.0})
    tx = TransmitterWorld(params.transmitter_side())
    world = start_world("receiver", params.receiver_side(), None, False)
    assert isinstance(world, ReceiverWorld)
    try:
        det = _connected(si.SimDetector, "spd_h", channel=0)
        tagger = _connected(si.SimTimeTagger, "tagger")

        def chunk_counts() -> np.ndarray:
            idx = tx.chunk_index
            c = tx.step()
            rec = world.process(tx.fiber_header(idx, c), c.photons)
            return np.bincount(rec.channel, minlength=4)

        tagger.start_stream()
        on = chunk_counts()
        assert det.count_rate_hz() == pytest.approx(on[0] / (params.chunk_slots / 25e6))
        block = tagger.read_block(1.0)
        assert block is not None and len(block) == on.sum()
        det.set_delay_ps(det.delay_ps() + 2000.0)  # gate off the pulse: counts lost
        assert chunk_counts()[0] < on[0] / 100
        det.set_delay_ps(params.receiver.true_delay_ps + 300.0)  # still inside the gate
        assert chunk_counts()[0] > on[0] * 0.9

        world.inject("bright_light")
        assert det.status() == DetectorStatus.LATCHED
        assert chunk_counts().sum() == 0
        world.clear("bright_light")
        det.reset_latch()
        assert det.status() == DetectorStatus.DISARMED
        det.arm()
        assert chunk_counts()[0] > 0

        world.inject("fiber_cut")
        assert chunk_counts().sum() < 10  # dark counts only
        world.clear("fiber_cut")

        # blocks tile tagger time: each spans its whole chunk, the next starts where it ends
        while tagger.read_block(0.0) is not None:
            pass
        chunk_counts()
        chunk_counts()
        first, second = tagger.read_block(1.0), tagger.read_block(1.0)
        assert first is not None and second is not None
        chunk_ps = params.chunk_slots / 25e6 * 1e12
        assert first.stop_ps - first.start_ps == pytest.approx(chunk_ps, rel=1e-3)
        assert abs(second.start_ps - first.stop_ps) < 1e-3 * chunk_ps
        assert first.start_ps <= int(first.tags["time_ps"][0])
        assert int(first.tags["time_ps"][-1]) <= first.stop_ps
        # a clock step: tagger time jumps by step_ps, once
        world.inject("clock_step", step_ps=5_000_000)
        chunk_counts()
        stepped = tagger.read_block(1.0)
        assert stepped is not None
        assert stepped.start_ps - second.stop_ps == pytest.approx(5_000_000, abs=1e-3 * chunk_ps)
        world.clear("clock_step")  # nothing to end

        world.inject("detector_disconnect")
        with pytest.raises(ConnectionLostError, match="spd_h: delay_ps"):
            det.delay_ps()
        world.clear("detector_disconnect")
        det.safe_state()
        assert det.status() == DetectorStatus.DISARMED
        with pytest.raises(OutOfRangeError, match="tagger: set_input_delay_ps"):
            tagger.set_input_delay_ps(7, 0)
    finally:
        stop_world()
        tx.close()


def test_a_reading_after_a_setting_change_is_made_with_the_new_setting() -> None:
    """The worlds paced in real time over a fiber, as in the daemons: a detector's count
    rate read right after its delay changed is the rate at the new delay, not the last
    batch's at the old one. (A batch lasts longer than a calibration's integration wait
    at low pulse rates; a stale reading made the detector-timing scan skip the one delay
    inside the gate, and the detectors stayed off the pulse.)"""
    params = link(fiber={"drift_rad_per_sqrt_s": 0.0}, chunk_slots=1 << 20)  # 42 ms
    tx = start_world("transmitter", params.transmitter_side(), "tcp://127.0.0.1:*", name="t")
    try:
        rx = start_world("receiver", params.receiver_side(), tx.fiber_endpoint, name="r")
        assert isinstance(rx, ReceiverWorld)
        det = si.SimDetector("spd_h", "r", options=si.SimDetectorOptions(channel=0))
        tagger = si.SimTimeTagger("tagger", "r")
        det.connect()
        tagger.connect()
        in_gate = params.receiver.true_delay_ps
        deadline = time.monotonic() + 10.0
        while rx.chunk_index < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        on = det.count_rate_hz()
        assert on > 1e4, "no light through the fiber"
        for _ in range(3):
            det.set_delay_ps(in_gate + 2000.0)  # gate off the pulse: dark counts only
            assert det.count_rate_hz() < on / 100
            assert tagger.count_rates_hz()[0] < on / 100
            det.set_delay_ps(in_gate)
            assert det.count_rate_hz() > on / 2
            assert tagger.count_rates_hz()[0] > on / 2
    finally:
        stop_world()


def test_state_source_answers_any_slot_and_follows_sync_pattern(
    tx_world: TransmitterWorld,
) -> None:
    from drivers.syncpattern import slot_bright

    src = _connected(si.SimStateSource, "states")
    slots = np.array([5, 10**12, 3, 5], dtype=np.int64)
    a = src.prepared(slots)
    assert a.basis[0] == a.basis[3] and a.bit[0] == a.bit[3]
    tx_world.step()
    src.set_sync_pattern(77)
    tx_world.step()
    later = np.arange(tx_world.chunk_slots, tx_world.chunk_slots + 4096, dtype=np.int64)
    states = src.prepared(later)
    assert np.array_equal(states.intensity == 0, slot_bright(77, later))
    assert np.array_equal(src.prepared(slots[:3]).bit, a.bit[:3])  # history kept
    with pytest.raises(OutOfRangeError):
        src.prepared(np.array([-1]))


def test_state_source_class_probabilities_change_from_the_returned_slot(
    tx_world: TransmitterWorld,
) -> None:
    from drivers.interfaces import IntensityClass

    src = _connected(si.SimStateSource, "states")
    before = np.arange(0, 200_000, dtype=np.int64)
    old = src.prepared(before)
    tx_world.step()
    first = src.set_class_probabilities(0.9, 0.05, 0.95)
    assert first == tx_world.next_slot
    assert src.class_probabilities() == (0.9, 0.05, 0.95)
    tx_world.step()
    after = np.arange(first, first + 200_000, dtype=np.int64)
    new = src.prepared(after)
    assert np.mean(new.intensity == IntensityClass.SIGNAL) == pytest.approx(0.9, abs=0.005)
    assert np.mean(new.intensity == IntensityClass.VACUUM) == pytest.approx(0.05, abs=0.003)
    assert np.mean(new.basis == 0) == pytest.approx(0.95, abs=0.003)
    again = src.prepared(before)  # earlier slots keep the probabilities they were drawn with
    assert np.array_equal(again.intensity, old.intensity)
    assert np.mean(again.intensity == IntensityClass.SIGNAL) == pytest.approx(0.6, abs=0.005)
    for bad in ((0.0, 0.1, 0.5), (0.7, 0.4, 0.5), (0.6, 0.2, 1.0), (float("nan"), 0.2, 0.5)):
        with pytest.raises(OutOfRangeError, match="states: set_class_probabilities"):
            src.set_class_probabilities(*bad)


def test_a_process_on_two_simulated_links_keeps_them_apart() -> None:
    """A node in the middle of a line transmits on one simulated link and receives on
    another: each instrument is a view of the link its resource names, faults go to the
    named link only, and an instrument that names none is refused with the choices."""
    from drivers.simulation import open_backend

    ab = link(transmitter_seed=1).receiver_side()
    bc = link(transmitter_seed=2).transmitter_side()
    rx = open_backend("receiver", ab, None, "alpha-bravo")
    tx = open_backend("transmitter", bc, None, "bravo-charlie")
    rx.start()
    tx.start()
    try:
        laser = si.SimLaser("laser", resource="bravo-charlie")
        laser.connect()  # the transmitter's world, by name
        wrong = si.SimLaser("laser", resource="alpha-bravo")
        with pytest.raises(ConnectionLostError, match="simulates the receiver"):
            wrong.connect()
        unnamed = si.SimLaser("laser")
        with pytest.raises(ConnectionLostError, match="several simulated links"):
            unnamed.connect()
        missing = si.SimLaser("laser", resource="charlie-delta")
        with pytest.raises(ConnectionLostError, match="no simulated link 'charlie-delta'"):
            missing.connect()
        # a receiver's fault reaches the receiving link's world, and is refused by the
        # transmitting link's world (so each injector talks to its own link)
        rx.faults.inject("bright_light")
        rx.faults.clear("bright_light")
        with pytest.raises(ValueError):
            tx.faults.inject("bright_light")
        with pytest.raises(RuntimeError, match="'alpha-bravo' already runs"):
            open_backend("receiver", ab, None, "alpha-bravo").start()
    finally:
        tx.stop()
        rx.stop()
    with pytest.raises(ConnectionLostError, match="no simulated link world"):
        si.SimLaser("laser", resource="bravo-charlie").connect()
