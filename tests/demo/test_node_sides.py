"""The demo's node configs: one side of the link each, the transmitter's commissioning."""

from __future__ import annotations

import tomllib
from pathlib import Path

from drivers.simlink.params import ReceiverSimParams
from drivers.simlink.truths import TAP_COMMISSIONING_UNCERTAINTY_DB, resolve_truths
from qkdnode.demo.config import DemoConfig, apply_overrides
from qkdnode.demo.nodeconfig import write_node_configs


def test_each_node_config_holds_only_its_side(tmp_path: Path) -> None:
    cfg = apply_overrides(DemoConfig(), seed=5, security="plaintext")
    tx, rx, _ = write_node_configs(cfg, tmp_path)
    rx_text = rx.config_path.read_text("utf-8")
    rx_data = tomllib.loads(rx_text)
    assert set(rx_data["simulation"]) == {"enabled", "fiber_endpoint", "receiver"}
    assert set(rx_data["simulation"]["receiver"]) == set(ReceiverSimParams.model_fields)
    for secret in ("transmitter_seed", "[simulation.transmitter", "length_km", "im_v_pi"):
        assert secret not in rx_text, secret
    assert str(cfg.link.transmitter_seed) not in rx_text
    tx_data = tomllib.loads(tx.config_path.read_text("utf-8"))
    assert set(tx_data["simulation"]) == {"enabled", "fiber_endpoint", "transmitter"}
    assert "receiver_seed" not in tx.config_path.read_text("utf-8")


def test_transmitter_gets_its_commissioning_record(tmp_path: Path) -> None:
    cfg = DemoConfig()
    tx, rx, _ = write_node_configs(cfg, tmp_path)
    truth = resolve_truths(cfg.link).transmitter.tap_to_output_db
    tap = tx.config.calibration.tap_to_output_db
    assert tap is not None
    assert 0 < abs(tap - truth) <= TAP_COMMISSIONING_UNCERTAINTY_DB + 1e-3
    assert tx.config.calibration.tap_to_output_uncertainty_db == TAP_COMMISSIONING_UNCERTAINTY_DB
    assert "tap_to_output" not in rx.config_path.read_text("utf-8")
