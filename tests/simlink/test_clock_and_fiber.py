"""Clock recovery from tags, determinism, and the ZeroMQ fiber between two worlds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import zmq

from drivers.simlink.world import ReceiverWorld, TransmitterWorld
from drivers.syncpattern import slot_bright
from tests.simlink.helpers import link, run_link


def test_clock_offset_and_frequency_recovered_from_tags_alone() -> None:
    params = link(
        clock={"offset_s": 0.3717, "frequency_offset_ppm": 12.5, "wander_ppm_per_sqrt_s": 0.0},
        receiver={"dark_count_rates_hz": 0.0},
    )
    sync_seed = 4242
    tx = TransmitterWorld(params.transmitter_side())
    tx.set_sync_pattern(sync_seed)
    _, _, rec = run_link(params, 4, tx=tx)
    t = rec.time_ps
    period_ps = 1e12 / params.source.slot_rate_hz
    # 1) unwrap slot numbers from tag spacings (gaps are far below 1/ppm slots)
    steps = np.rint(np.diff(t) / period_ps).astype(np.int64)
    rel_slot = np.concatenate([[0], np.cumsum(steps)])
    slope, _ = np.polyfit(rel_slot * period_ps, t - t[0], 1)
    ppm = (slope - 1) * 1e6
    assert ppm == pytest.approx(12.5, abs=0.01)
    # 2) find the slot of the first tag: the alignment with (almost) no tag in a dark
    # frame. Not none: the intensity modulator's finite extinction (40 dB) leaves the
    # vacuum pulses mu_signal * 1e-4, about 2 expected tags here (0 to 7 over seeds),
    # against 25 to 50 for the next best alignment.
    head = rel_slot[:20000]
    in_dark = [int(np.count_nonzero(~slot_bright(sync_seed, head + k0))) for k0 in range(2048)]
    k0 = int(np.argmin(in_dark))
    assert in_dark[k0] <= 10 < sorted(in_dark)[1]
    # 3) offset: tag time minus the scaled arrival time of that slot's pulse
    arrival_ps = k0 * period_ps + params.fiber.delay_s * 1e12 + params.receiver.true_delay_ps
    offset_s = (t[0] - slope * arrival_ps) * 1e-12
    assert offset_s == pytest.approx(0.3717, abs=200e-12)
    assert k0 == rec.slot[0]  # consistent with the simulation's truth


def test_clock_wander_moves_frequency_slowly() -> None:
    params = link(
        clock={"frequency_offset_ppm": 12.5, "wander_ppm_per_sqrt_s": 0.05},
        receiver={"dark_count_rates_hz": 0.0},
    )
    _, rx, rec = run_link(params, 8)
    drift = abs(rx.model.clock.frequency_offset * 1e6 - 12.5)
    seconds = 8 * params.chunk_slots / params.source.slot_rate_hz
    assert 0 < drift < 6 * 0.05 * np.sqrt(seconds)


def test_same_seed_same_tags_and_other_seed_other_tags() -> None:
    params = link()
    _, _, a = run_link(params, 2)
    _, _, b = run_link(params, 2)
    assert np.array_equal(a.time_ps, b.time_ps) and np.array_equal(a.channel, b.channel)
    _, _, c = run_link(link(receiver_seed=99), 2)
    assert not np.array_equal(a.time_ps[:1000], c.time_ps[:1000])


def test_photons_cross_a_zmq_fiber_and_give_the_same_tags() -> None:
    params = link(chunk_slots=1 << 18)
    ctx = zmq.Context()
    tx = TransmitterWorld(params.transmitter_side(), "tcp://127.0.0.1:*", context=ctx)
    rx = ReceiverWorld(params.receiver_side(), tx.fiber_endpoint, context=ctx)
    n_chunks = 6
    sender = threading.Thread(target=tx.run_for, args=(n_chunks * (1 << 18) / 25e6,))
    sender.start()
    got = []
    while len(got) < n_chunks:
        rec = rx.receive(timeout_s=10.0)
        assert rec is not None, "no batch on the fiber"
        got.append(rec)
    sender.join()
    tx.close()
    rx.close()
    ctx.term()
    _, _, local = run_link(params, n_chunks)
    assert np.array_equal(np.concatenate([g.time_ps for g in got]), local.time_ps)


_TX_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from drivers.simlink.params import TransmitterSimParams
    from drivers.simlink.world import start_world, stop_world
    world = start_world(
        "transmitter", TransmitterSimParams(start_calibrated=True), "tcp://127.0.0.1:*"
    )
    print(world.fiber_endpoint, flush=True)
    sys.stdin.readline()
    stop_world()
    """
)


def test_transmitter_in_another_process_drives_the_receiver_tagger() -> None:
    from drivers.simlink.instruments import SimTimeTagger
    from drivers.simlink.params import ReceiverSimParams
    from drivers.simlink.world import start_world, stop_world

    proc = subprocess.Popen(
        [sys.executable, "-c", _TX_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("tcp://127.0.0.1:")
        world = start_world("receiver", ReceiverSimParams(start_calibrated=True), endpoint)
        tagger = SimTimeTagger("tagger")
        tagger.connect()
        tagger.start_stream()
        tags = []
        span_ps = 0
        while span_ps < 0.2e12:
            block = tagger.read_block(timeout_s=10.0)
            assert block is not None, "no tags from the transmitter process"
            tags.append(block.tags)
            span_ps = int(tags[-1]["time_ps"][-1] - tags[0]["time_ps"][0])
        all_tags = np.concatenate(tags)
        assert np.all(np.diff(all_tags["time_ps"]) >= 0)
        rate_hz = all_tags.shape[0] / (span_ps * 1e-12)
        assert 1e6 < rate_hz < 3e6
        assert set(np.unique(all_tags["channel"])) == {0, 1, 2, 3}
        assert world.detections > 0
    finally:
        stop_world()
        if proc.stdin:
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.wait(timeout=10)
