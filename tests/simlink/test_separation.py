"""The simulator's data paths stay apart from the protocol, and the receiver's world
holds nothing of the transmitter's secrets."""

from __future__ import annotations

import ast
import gc
import types
from pathlib import Path

import numpy as np

from drivers.simlink.params import (
    EveParams,
    FiberParams,
    LinkParams,
    SourceParams,
    TransmitterHardwareParams,
    TransmitterSimParams,
)
from drivers.simlink.source import secret_key
from drivers.simlink.world import ReceiverWorld, TransmitterWorld
from tests.simlink.helpers import link
from tests.source_trees import parse_file

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(parse_file(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_drivers_never_import_qkdnode() -> None:
    files = sorted((ROOT / "drivers").rglob("*.py"))
    assert files
    for path in files:
        bad = {m for m in _imports(path) if m == "qkdnode" or m.startswith("qkdnode.")}
        assert not bad, f"{path} imports {bad}"


def test_qkdnode_uses_only_the_simulator_front_door() -> None:
    allowed = {
        "drivers.simlink.params",
        "drivers.simlink.world",
        "drivers.simlink.bench",
        "drivers.simlink.registry_entries",
        # the drawn hardware truths: the demo's theory and commissioning values
        "drivers.simlink.truths",
        # the simulated instruments are the simulator's front door (the same classes the
        # driver registry opens); the procedures' test harness drives them directly
        "drivers.simlink.instruments",
        # the simulated sky of a satellite link (passes, clouds): part of the simulation's
        # parameters, which the satellite demo writes and computes its theory on
        "drivers.simlink.satellite_channel",
    }
    for path in sorted((ROOT / "qkdnode").rglob("*.py")):
        used = {m for m in _imports(path) if m.startswith("drivers.simlink")}
        assert used <= allowed, f"{path} reaches into simulator internals: {used - allowed}"
        if "protocol" in path.parts:
            assert not used, f"protocol code {path} imports the simulator"


def _reachable(root: object) -> list[object]:
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, types.FunctionType)):
            continue
        seen[id(obj)] = obj
        stack.extend(gc.get_referents(obj))
    return list(seen.values())


def test_receiver_world_holds_no_transmitter_secret() -> None:
    tx_seed = 0x5EC12E7_5EED
    params = link(transmitter_seed=tx_seed, transmitter={"spread_scale": 1.0})
    rx = ReceiverWorld(params.receiver_side())
    tx = TransmitterWorld(params.transmitter_side())
    idx = tx.chunk_index
    chunk = tx.step()
    rx.process(tx.fiber_header(idx, chunk), chunk.photons)
    key = int(secret_key(tx_seed))
    # the transmitter's drawn hardware truths (floats no receiver object may hold)
    tx_truths = {
        v for v in tx.hardware.model_dump().values() if isinstance(v, float) and v not in (0, 1)
    }
    private = (
        SourceParams,
        EveParams,
        FiberParams,
        TransmitterHardwareParams,
        TransmitterSimParams,
        LinkParams,
    )
    for obj in _reachable(rx):
        assert not isinstance(obj, private), obj
        assert not isinstance(obj, TransmitterWorld)
        if isinstance(obj, float):
            assert obj not in tx_truths, obj
        if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
            assert int(obj) not in (tx_seed, key)
        if isinstance(obj, str):
            assert "transmitter_seed" not in obj
    # the secret does sit in the transmitter's world (the search can find it)
    assert any(
        isinstance(o, int) and not isinstance(o, bool) and o == tx_seed for o in _reachable(tx)
    )
    tx.close()
    rx.close()
