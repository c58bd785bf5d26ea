"""Hidden hardware truths: drawn per box from documented spreads, never a node default."""

from __future__ import annotations

import importlib
import math
import pkgutil
from typing import Any

import pytest
from pydantic import BaseModel

import qkdnode.procedures
from drivers.simlink.optics import ENCODER_NOMINAL_V_PI_V
from drivers.simlink.params import (
    ClockParams,
    LinkParams,
    ReceiverParams,
    ReceiverSimParams,
    TransmitterHardwareParams,
    TransmitterSimParams,
)
from drivers.simlink.truths import (
    RECEIVER_SPREADS,
    TAP_COMMISSIONING_UNCERTAINTY_DB,
    TRANSMITTER_SPREADS,
    Spread,
    commissioning_record,
    receiver_truths,
    resolve_receiver,
    resolve_transmitter,
    resolve_truths,
    transmitter_truths,
)
from drivers.simlink.world import ReceiverWorld, TransmitterWorld
from qkdnode.config.model import NodeConfig
from qkdnode.config.sections import CalibrationSection

SEEDS = range(40)


def _deviation(truth: float, nominal: float, spread: Spread) -> float:
    return abs(truth / nominal - 1.0) if spread.relative else abs(truth - nominal)


def _within(truth: float, nominal: float, spread: Spread, scale: float = 1.0) -> bool:
    d = _deviation(truth, nominal, spread)
    return spread.min * scale - 1e-9 <= d <= spread.max * scale + 1e-9


def _drawn_values(link: LinkParams) -> dict[str, float]:
    """Every drawn truth of ``link``'s two boxes, by a readable name."""
    out: dict[str, float] = {}
    truths = resolve_truths(link)
    for name in TRANSMITTER_SPREADS:
        out[f"transmitter.{name}"] = getattr(truths.transmitter, name)
    for name in RECEIVER_SPREADS:
        owner, _, field = name.rpartition(".")
        value = getattr(truths.clock if owner == "clock" else truths.receiver, field)
        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            out[f"receiver.{name}[{i}]"] = v
    return out


def _link(seed: int) -> LinkParams:
    return LinkParams(
        transmitter=TransmitterHardwareParams(hardware_seed=seed),
        receiver=ReceiverParams(hardware_seed=seed),
    )


def test_truths_lie_within_the_documented_spreads_and_never_on_the_nominal() -> None:
    nominal_tx = TransmitterHardwareParams()
    nominal_rx, nominal_clock = ReceiverParams(), ClockParams()
    for seed in SEEDS:
        tx = transmitter_truths(nominal_tx.model_copy(update={"hardware_seed": seed}))
        for name, spread in TRANSMITTER_SPREADS.items():
            assert _within(getattr(tx, name), getattr(nominal_tx, name), spread), (seed, name)
        rx, clock = receiver_truths(
            nominal_rx.model_copy(update={"hardware_seed": seed}), nominal_clock
        )
        for name, spread in RECEIVER_SPREADS.items():
            owner, _, field = name.rpartition(".")
            truth = getattr(clock if owner else rx, field)
            nominal = getattr(nominal_clock if owner else nominal_rx, field)
            pairs = (
                zip(truth, nominal, strict=True) if isinstance(truth, tuple) else [(truth, nominal)]
            )
            for t, n in pairs:
                assert _within(t, n, spread), (seed, name, t, n)


def test_draws_are_deterministic_per_seed_and_scaled_by_the_spread() -> None:
    a, b = _drawn_values(_link(5)), _drawn_values(_link(5))
    assert a == b
    other = _drawn_values(_link(6))
    assert all(a[k] != other[k] for k in a)
    # resolved parameters hold the truths with no spread left: resolving again is a no-op
    resolved = resolve_truths(_link(5))
    assert resolved.transmitter.spread_scale == resolved.receiver.spread_scale == 0.0
    assert resolve_truths(resolved) == resolved
    # spread 0: the configured values are the truths; a half spread halves the bounds
    pinned = TransmitterHardwareParams(spread_scale=0.0)
    assert transmitter_truths(pinned) == pinned
    half = transmitter_truths(TransmitterHardwareParams(spread_scale=0.5))
    spread = TRANSMITTER_SPREADS["encoder_v_pi_v"]
    assert _within(half.encoder_v_pi_v, 3.0, spread, scale=0.5)


def test_each_box_draws_only_its_own_truths_and_its_world_simulates_them() -> None:
    base = _link(3)
    moved_rx = base.model_copy(update={"receiver": ReceiverParams(hardware_seed=99)})
    moved_tx = base.model_copy(update={"transmitter": TransmitterHardwareParams(hardware_seed=99)})
    assert resolve_truths(moved_rx).transmitter == resolve_truths(base).transmitter
    assert resolve_truths(moved_tx).receiver == resolve_truths(base).receiver
    assert resolve_truths(moved_tx).clock == resolve_truths(base).clock
    # the receiver's truths depend on nothing of the transmitter's side
    rx_side = base.receiver_side()
    assert resolve_receiver(rx_side) == resolve_truths(base).receiver_side()
    assert resolve_transmitter(base.transmitter_side()) == resolve_truths(base).transmitter_side()
    tx = TransmitterWorld(base.transmitter_side())
    rx = ReceiverWorld(rx_side)
    try:
        truths = resolve_truths(base)
        assert tx.hardware == truths.transmitter
        assert rx.rx == truths.receiver and rx.clock_params == truths.clock
        # a world built from resolved parameters is the same box
        assert TransmitterWorld(truths.transmitter_side()).hardware == tx.hardware
    finally:
        tx.close()
        rx.close()


def _numeric_defaults(model: type[BaseModel], prefix: str) -> list[tuple[str, float]]:
    """(dotted name, value) of every numeric default of ``model`` and its sub-models."""
    out: list[tuple[str, float]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}"
        default: Any = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            out += _numeric_defaults(type(default), path)
        elif isinstance(default, bool) or default is None:
            continue
        elif isinstance(default, int | float):
            out.append((path, float(default)))
        elif isinstance(default, tuple | list):
            out += [
                (f"{path}[{i}]", float(v))
                for i, v in enumerate(default)
                if isinstance(v, int | float) and not isinstance(v, bool)
            ]
    return out


def _node_defaults() -> list[tuple[str, float]]:
    """The node's configuration defaults and those of every calibration procedure."""
    out: list[tuple[str, float]] = []
    for name, field in NodeConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and name != "simulation":
            out += _numeric_defaults(ann, name)
    for info in pkgutil.iter_modules(qkdnode.procedures.__path__):
        module = importlib.import_module(f"qkdnode.procedures.{info.name}")
        for attr, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseModel)
                and attr.endswith("Config")
                and obj.__module__ == module.__name__
            ):
                out += _numeric_defaults(obj, f"{info.name}.{attr}")
    out.append(("drivers.simlink.optics.ENCODER_NOMINAL_V_PI_V", ENCODER_NOMINAL_V_PI_V))
    return out


def test_no_node_default_equals_a_drawn_truth() -> None:
    defaults = _node_defaults()
    names = {n for n, _ in defaults}
    assert "calibration.encoder_v_pi_v" in names and "sync.max_ppm" in names
    assert any(n.startswith("mean_photon_number.") for n in names)
    for seed in [*SEEDS, 11, 12]:
        for truth_name, truth in _drawn_values(_link(seed)).items():
            for name, value in defaults:
                assert not math.isclose(truth, value, rel_tol=1e-9, abs_tol=1e-12), (
                    f"hardware_seed {seed}: the truth {truth_name} = {truth} equals the node "
                    f"default {name}"
                )
    # and the defaults a node would use in place of a measurement are clearly wrong
    cal = CalibrationSection()
    spread = TRANSMITTER_SPREADS["encoder_v_pi_v"]
    for seed in SEEDS:
        box = resolve_truths(_link(seed)).transmitter
        assert _deviation(box.encoder_v_pi_v, cal.encoder_v_pi_v, spread) >= spread.min
        if cal.tap_to_output_db is not None:
            assert abs(box.tap_to_output_db - cal.tap_to_output_db) >= 0.3


def test_commissioning_record_is_the_truth_within_its_stated_uncertainty() -> None:
    errors = []
    for seed in SEEDS:
        hw = TransmitterHardwareParams(hardware_seed=seed)
        record = commissioning_record(hw)
        truth = transmitter_truths(hw).tap_to_output_db
        assert record.tap_to_output_uncertainty_db == TAP_COMMISSIONING_UNCERTAINTY_DB
        error = record.tap_to_output_db - truth
        assert 0.0 < abs(error) <= TAP_COMMISSIONING_UNCERTAINTY_DB + 1e-3
        assert commissioning_record(transmitter_truths(hw)) == record  # same box
        errors.append(error)
    assert min(errors) < 0 < max(errors)


def test_side_models_hold_only_their_side() -> None:
    tx_fields = set(TransmitterSimParams.model_fields)
    rx_fields = set(ReceiverSimParams.model_fields)
    assert "transmitter_seed" in tx_fields and "transmitter_seed" not in rx_fields
    assert {"source", "fiber", "eve"} <= tx_fields and not {"source", "fiber", "eve"} & rx_fields
    assert "receiver_seed" in rx_fields and "receiver_seed" not in tx_fields
    with pytest.raises(ValueError, match="transmitter_seed: the transmitter's side"):
        ReceiverSimParams.model_validate({"transmitter_seed": 7})
    with pytest.raises(ValueError, match=r"hardware\.im_v_pi_v"):
        ReceiverSimParams.model_validate({"hardware": {"im_v_pi_v": 3.1}})
    with pytest.raises(ValueError, match="receiver_seed: the receiver's side"):
        TransmitterSimParams.model_validate({"receiver_seed": 7})


def test_the_documented_table_is_the_one_drawn_from() -> None:
    import re

    import drivers.simlink.truths as truths

    doc = truths.__doc__ or ""
    for name, spread in {**TRANSMITTER_SPREADS, **RECEIVER_SPREADS}.items():
        field = name.rpartition(".")[2]
        row = next(line for line in doc.splitlines() if f"``{field}``" in line)
        low, high = (float(x) for x in re.findall(r"([\d.]+) - ([\d.]+)", row)[0])
        scale = 100.0 if spread.relative else 1.0
        assert (low, high) == pytest.approx((spread.min * scale, spread.max * scale)), row
        assert ("%" in row) == spread.relative, row
