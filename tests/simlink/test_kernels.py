"""The compiled loops of the link model: samplers, choices and event ordering."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from drivers.simlink import kernels
from drivers.simlink.world import TransmitterWorld
from drivers.syncpattern import slot_bright
from tests.simlink.helpers import link, run_link


def test_jitter_sampler_is_standard_normal() -> None:
    z = kernels.normal_samples(np.uint64(12345), 400_000)
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # the tails (wedges and the region beyond the base layer) are sampled too
    beyond = np.count_nonzero(np.abs(z) > 3.6541528853610088)
    expected = z.size * 2 * stats.norm.sf(3.6541528853610088)
    assert abs(beyond - expected) < 5 * math.sqrt(expected) + 1
    assert np.array_equal(z[:100], kernels.normal_samples(np.uint64(12345), 100))


def test_gap_table_equals_the_logarithm() -> None:
    scale = -1.0 / math.log1p(-0.118)
    table = kernels._gap_table(scale)
    assert 0.9 < np.mean(table >= 0) < 1.0
    rng = np.random.default_rng(3)
    x = rng.integers(0, 1 << 64, size=200_000, dtype=np.uint64)
    bucket = (x >> np.uint64(64 - 12)).astype(np.int64)
    u = ((x >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    direct = np.floor(-np.log(u) * scale).astype(np.int64)
    hit = table[bucket] >= 0
    assert np.array_equal(table[bucket][hit], direct[hit])


def test_emitted_states_are_the_prepared_ones_with_and_without_sync() -> None:
    # a fiber without misalignment and drift: the pulses arrive as prepared
    params = link(chunk_slots=1 << 18, fiber={"misalignment": 0.0, "drift_rad_per_sqrt_s": 0.0})
    for sync_seed in (None, 4242):
        tx = TransmitterWorld(params.transmitter_side())
        if sync_seed is not None:
            tx.set_sync_pattern(sync_seed)
        chunk = tx.step()
        photons = chunk.photons
        prep = tx.prepared(photons["slot"])
        angles = np.asarray(tx.emission_settings().state_angle_rad, np.float32)
        assert np.array_equal(angles[prep.basis * 2 + prep.bit], photons["angle_rad"])
        assert np.all(np.diff(photons["slot"]) > 0)
        if sync_seed is not None:
            bright = slot_bright(sync_seed, photons["slot"])
            assert np.array_equal(prep.intensity == 0, bright)
        tx.close()


def test_photon_numbers_follow_the_poisson_tail() -> None:
    params = link(chunk_slots=1 << 20, fiber={"length_km": 0.0, "insertion_loss_db": 0.0})
    tx = TransmitterWorld(params.transmitter_side())
    photons = tx.step().photons
    prep = tx.prepared(photons["slot"])
    n = photons["n_photons"][prep.intensity == 0]
    mu = params.source.mu_signal
    p_multi = (1 - math.exp(-mu) - mu * math.exp(-mu)) / (1 - math.exp(-mu))
    observed = float(np.mean(n > 1))
    assert abs(observed - p_multi) < 5 * math.sqrt(p_multi * (1 - p_multi) / n.size)
    tx.close()


def test_records_stay_in_time_order_when_jitter_exceeds_the_slot_period() -> None:
    params = link(
        source={"slot_rate_hz": 1e9},
        receiver={"jitter_ps": 1500.0, "gate_width_ps": 1e6, "dead_time_ns": 0.0},
        chunk_slots=1 << 16,
    )
    _, _, rec = run_link(params, 6)
    assert len(rec) > 10_000
    assert np.all(np.diff(rec.true_time_ps) >= 0)
    assert np.all(np.diff(rec.time_ps) >= 0)


def test_fiber_batches_of_any_size_share_one_compiled_receiver() -> None:
    """An empty or one-photon batch off the fiber socket is a read-only buffer; it must
    not make numba compile a second receiver kernel (seconds, holding the GIL) in the
    middle of a session."""
    from drivers.simlink.world import PHOTON_DTYPE, ReceiverWorld

    params = link(source={"slot_rate_hz": 25e6}, chunk_slots=4096)
    tx = TransmitterWorld(params.transmitter_side())
    rx = ReceiverWorld(params.receiver_side())
    try:
        chunk = tx.step()
        assert chunk.photons.shape[0] > 1
        header = tx.fiber_header(0, chunk)
        for photons in (chunk.photons, chunk.photons[:1], chunk.photons[:0]):
            rx.process(header, np.frombuffer(photons.tobytes(), dtype=PHOTON_DTYPE))
            rx.process(header, photons)
        assert len(kernels.receiver_events.signatures) == 1, kernels.receiver_events.signatures
    finally:
        rx.close()
        tx.close()


def test_transmitter_output_does_not_depend_on_its_capacity() -> None:
    """The transmitter loop stops when its output is full and resumes in a larger one;
    the pulses are the same as with room for all of them from the start."""
    from drivers.simlink.source import generate_photons, secret_key

    tx = TransmitterWorld(link(chunk_slots=1 << 18).transmitter_side())
    settings = tx.emission_settings()
    key = secret_key(7)
    roomy = generate_photons(key, 1000, 1000 + (1 << 18), settings, np.uint64(2**63 + 5))
    tight = generate_photons(
        key, 1000, 1000 + (1 << 18), settings, np.uint64(2**63 + 5), capacity=10
    )
    assert roomy.photons.shape[0] > 10_000
    assert np.array_equal(roomy.photons.view(np.uint8), tight.photons.view(np.uint8))
    assert len(kernels.transmitter_photons.signatures) == 1
    tx.close()


def test_slot_choices_kernel_matches_the_hash_definition_and_compiles_once() -> None:
    """The compiled slot choices (the transmitter's side of sifting) are the documented
    hash thresholds bit for bit, and the warm-up's compile serves any block."""
    from drivers.simlink.source import slot_choices
    from drivers.simlink.world import warm_up
    from drivers.syncpattern import splitmix64

    warm_up(link().transmitter_side())
    key = np.uint64(0xDEADBEEF12345678)
    slots = np.sort(np.random.default_rng(3).integers(0, 2**45, 200_001))
    basis, bit, cls = slot_choices(key, slots, p_signal=0.6, p_decoy=0.2, p_basis_z=0.8)
    h = splitmix64(slots.astype(np.uint64) ^ key)
    want_basis = ((h >> np.uint64(1)) & np.uint64(0x7FFF_FFFF)) >= np.uint64(int(0.8 * 2**31))
    u = h >> np.uint64(32)
    want_cls = (u >= np.uint64(int(0.6 * 2**32))).astype(np.uint8) + (
        u >= np.uint64(int(0.8 * 2**32))
    )
    assert np.array_equal(basis, want_basis)
    assert np.array_equal(bit, (h & np.uint64(1)).astype(np.uint8))
    assert np.array_equal(cls, want_cls)
    assert len(kernels.slot_choices_into.signatures) == 1
