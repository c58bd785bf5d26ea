"""Per-side secrets, enforced: a node's config and process hold only its side of the link,
and the simulated fiber carries only what light carries."""

from __future__ import annotations

import copy
import json
import socket
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from drivers.simlink import world as world_module
from drivers.simlink.params import ReceiverSimParams, TransmitterSimParams
from drivers.simlink.source import PHOTON_DTYPE
from drivers.simlink.world import (
    FIBER_HEADER_KEYS,
    ReceiverWorld,
    TransmitterWorld,
    start_world,
    stop_world,
    warm_up,
)
from qkdnode.config.loader import ConfigError, parse_config
from tests.simlink.helpers import link

ROOT = Path(__file__).resolve().parents[2]


def _config(role: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / "configs" / f"{role}.sim.toml").read_text("utf-8"))


def _refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "node.toml")
    return str(err.value)


def test_shipped_configs_hold_one_side_each() -> None:
    tx = parse_config(_config("transmitter")).simulation
    rx = parse_config(_config("receiver")).simulation
    assert tx is not None and rx is not None
    assert isinstance(tx.side(), TransmitterSimParams) and tx.receiver is None
    assert isinstance(rx.side(), ReceiverSimParams) and rx.transmitter is None
    # a node without a side table gets its own side's defaults, never the other's
    data = _config("receiver")
    data["simulation"] = {"fiber_endpoint": "tcp://127.0.0.1:5560"}
    bare = parse_config(data).simulation
    assert bare is not None and bare.transmitter is None
    assert bare.side() == ReceiverSimParams()


def test_receiver_config_with_transmitter_secrets_is_refused_naming_the_key() -> None:
    data = _config("receiver")
    with_tx_side = copy.deepcopy(data)
    with_tx_side["simulation"]["transmitter"] = {"transmitter_seed": 5}
    message = _refused(with_tx_side)
    assert "node.toml: simulation: [simulation.transmitter]" in message
    assert "a receiver node holds only [simulation.receiver]" in message

    seed_in_rx = copy.deepcopy(data)
    seed_in_rx["simulation"]["receiver"]["transmitter_seed"] = 5
    assert "simulation.receiver: transmitter_seed: the transmitter's side" in _refused(seed_in_rx)

    truth_in_rx = copy.deepcopy(data)
    truth_in_rx["simulation"]["receiver"]["hardware"]["encoder_v_pi_v"] = 2.9
    assert "simulation.receiver: hardware.encoder_v_pi_v: the transmitter's side" in _refused(
        truth_in_rx
    )

    fiber_in_rx = copy.deepcopy(data)
    fiber_in_rx["simulation"]["receiver"]["fiber"] = {"length_km": 25.0}
    assert "simulation.receiver: fiber: the transmitter's side" in _refused(fiber_in_rx)

    whole_link = copy.deepcopy(data)
    whole_link["simulation"] = {"link": {"transmitter_seed": 1}}
    assert "simulation: simulation.link is no longer valid" in _refused(whole_link)

    # and the reverse: the receiver's side never sits in the transmitter's config
    tx_data = _config("transmitter")
    tx_data["simulation"]["receiver"] = {"receiver_seed": 3}
    assert "a transmitter node holds only [simulation.transmitter]" in _refused(tx_data)


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_a_receiver_process_cannot_build_the_transmitters_world(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the receiver's config: no transmitter parameters to build from, the worlds
    refuse the wrong side, and the daemon's warm-up and world start never construct a
    transmitter world (they would raise here)."""
    from qkdnode.daemon import DaemonBase

    cfg = parse_config(_config("receiver"))
    sim = cfg.simulation
    assert sim is not None and sim.transmitter is None
    rx_side = sim.side()
    with pytest.raises(TypeError, match="transmitter's side"):
        TransmitterWorld(rx_side)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs TransmitterSimParams"):
        start_world("transmitter", rx_side, None, realtime=False)
    with pytest.raises(TypeError, match="receiver's side"):
        ReceiverWorld(link().transmitter_side())  # type: ignore[arg-type]

    def no_transmitter(*args: object, **kwargs: object) -> None:
        raise AssertionError("a transmitter world was built in the receiver's process")

    monkeypatch.setattr(TransmitterWorld, "__init__", no_transmitter)
    warm_up(rx_side)
    # the daemon's own path, on a private fiber endpoint
    cfg.simulation = sim.model_copy(update={"fiber_endpoint": _free_endpoint()})
    daemon = DaemonBase(cfg, "receiver.toml")
    try:
        daemon._warm_up()
        daemon._start_backend()
        assert isinstance(world_module.get_world(), ReceiverWorld)
    finally:
        stop_world()


def test_the_fiber_carries_only_light() -> None:
    # what a batch is made of: slot (timing), polarisation, photon number
    assert PHOTON_DTYPE.names == ("slot", "angle_rad", "n_photons")
    params = link(chunk_slots=1 << 16, transmitter_seed=0xC0FFEE)
    tx = TransmitterWorld(params.transmitter_side())
    try:
        index = tx.chunk_index
        chunk = tx.step()
        header = tx.fiber_header(index, chunk)
        assert set(header) == FIBER_HEADER_KEYS
        rotation = header.pop("rotation")  # the fiber's polarisation rotation: 3x3 numbers
        assert len(rotation) == 9 and all(isinstance(v, float) for v in rotation)
        assert all(isinstance(v, int | float) for v in header.values())
        assert 0xC0FFEE not in header.values()
        photons = chunk.photons
        prep = tx.prepared(photons["slot"])
        # no label rides in the polarisation: a state's pulses carry the same angle bits
        # whatever their intensity class (as prepared, or turned by the fiber's 90 degree
        # misalignment; the drift moves all alike)
        bits = photons["angle_rad"].view(np.uint32)
        for state in range(4):
            sel = (prep.basis * 2 + prep.bit) == state
            angles, counts = np.unique(bits[sel], return_counts=True)
            assert len(angles) <= 2
            as_prepared = angles[np.argmax(counts)]
            for c in (0, 1):
                values, counts = np.unique(bits[sel & (prep.intensity == c)], return_counts=True)
                assert set(values.tolist()) <= set(angles.tolist())
                assert values[np.argmax(counts)] == as_prepared
        assert len(np.unique(bits)) <= 8
    finally:
        tx.close()


def test_the_receiver_drops_a_batch_that_carries_more_than_light() -> None:
    params = link(chunk_slots=1 << 12)
    ctx: zmq.Context[Any] = zmq.Context()
    tx = TransmitterWorld(params.transmitter_side(), "inproc://fiber-labels", ctx)
    rx = ReceiverWorld(params.receiver_side(), "inproc://fiber-labels", ctx)
    try:
        chunk = tx.step()
        assert rx.receive(5.0) is not None  # an honest batch is processed
        push = tx._sock
        assert push is not None
        header = {**tx.fiber_header(1, chunk), "basis": [0, 1]}
        push.send_multipart([json.dumps(header).encode(), chunk.photons.tobytes()])
        assert rx.receive(5.0) is None
        push.send_multipart([json.dumps(tx.fiber_header(2, chunk)).encode(), b"\x00" * 7])
        assert rx.receive(5.0) is None
        # a polarisation "rotation" that is no rotation (a hidden polariser, a label)
        for bad in ([2.0, 0, 0, 0, 1, 0, 0, 0, 1], [1.0] * 9, [1, 0, 0], "eye"):
            header = {**tx.fiber_header(3, chunk), "rotation": bad}
            push.send_multipart([json.dumps(header).encode(), chunk.photons.tobytes()])
            assert rx.receive(5.0) is None
    finally:
        rx.close()
        tx.close()
        ctx.term()
