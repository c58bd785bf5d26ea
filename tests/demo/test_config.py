"""The demo TOML, its overrides and the node configs built from it."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from drivers.simlink.params import LinkParams
from qkdnode.bus.keys import load_keypair
from qkdnode.config import ConfigError, load_config
from qkdnode.demo.config import (
    DemoConfig,
    apply_overrides,
    link_seeds,
    load_demo_config,
    parse_eve,
)
from qkdnode.demo.nodeconfig import (
    RECEIVER_INSTRUMENTS,
    TRANSMITTER_INSTRUMENTS,
    Endpoints,
    to_toml,
    write_node_configs,
)

REPO = Path(__file__).resolve().parents[2]
DEMO_TOML = REPO / "configs" / "demo.toml"


def _missing_fields(model: type[BaseModel], data: dict[str, Any], prefix: str) -> list[str]:
    missing = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}"
        if info.default is None and name not in data:
            continue  # an optional table the fibre demo leaves out (``satellite``)
        if name not in data:
            missing.append(path)
            continue
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            missing += _missing_fields(ann, data[name], path)
    return missing


def test_demo_toml_sets_every_simulation_parameter() -> None:
    data = tomllib.loads(DEMO_TOML.read_text("utf-8"))
    assert _missing_fields(LinkParams, data["link"], "link") == []
    assert load_demo_config(DEMO_TOML) == DemoConfig()


def test_default_link_is_25_km() -> None:
    cfg = load_demo_config(None)
    assert cfg.link.fiber.length_km == 25.0
    assert cfg.link.eve.mode == "none"


def test_unknown_key_is_an_error_naming_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "demo.toml"
    bad.write_text("[link.fiber]\nlenght_km = 10\n")
    with pytest.raises(ConfigError) as err:
        load_demo_config(bad)
    assert "link.fiber.lenght_km" in str(err.value)
    assert str(bad) in str(err.value)


def test_out_of_range_value_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "demo.toml"
    bad.write_text("[link.source]\np_signal = 0.9\np_decoy = 0.3\n")
    with pytest.raises(ConfigError, match=r"link\.source"):
        load_demo_config(bad)


def test_overrides() -> None:
    cfg = apply_overrides(
        DemoConfig(),
        distance_km=50,
        duration_s=7,
        seed=11,
        eve=parse_eve("intercept-resend:0.25"),
    )
    assert cfg.link.fiber.length_km == 50
    assert cfg.demo.duration_s == 7
    assert (cfg.link.transmitter_seed, cfg.link.receiver_seed) == link_seeds(11)
    assert cfg.link.transmitter_seed != cfg.link.receiver_seed
    assert link_seeds(11) != link_seeds(12)
    assert cfg.link.eve.mode == "intercept-resend"
    assert cfg.link.eve.fraction == 0.25
    # everything else untouched
    assert cfg.link.receiver == DemoConfig().link.receiver


def test_override_out_of_range_distance_is_rejected() -> None:
    with pytest.raises(ConfigError, match="length_km"):
        apply_overrides(DemoConfig(), distance_km=-3)


@pytest.mark.parametrize(
    "spec", ["intercept-resend", "intercept-resend:x", "intercept-resend:1.5", "mitm:0.1", ""]
)
def test_bad_eve_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="--eve"):
        parse_eve(spec)


def test_node_configs_validate_and_hold_one_side_of_the_link_each(tmp_path: Path) -> None:
    cfg = apply_overrides(DemoConfig(), distance_km=40, seed=3)
    tx, rx, keys = write_node_configs(cfg, tmp_path)
    assert keys is not None
    tx_cfg, rx_cfg = load_config(tx.config_path), load_config(rx.config_path)
    assert tx_cfg.node.role == "transmitter" and rx_cfg.node.role == "receiver"
    assert tx_cfg.node.peer_id == rx_cfg.node.id and rx_cfg.node.peer_id == tx_cfg.node.id
    assert tx_cfg.simulation is not None and rx_cfg.simulation is not None
    assert tx_cfg.simulation.transmitter == cfg.link.transmitter_side()
    assert rx_cfg.simulation.receiver == cfg.link.receiver_side()
    assert tx_cfg.simulation.receiver is None and rx_cfg.simulation.transmitter is None
    assert tx_cfg.simulation.fiber_endpoint == rx_cfg.simulation.fiber_endpoint
    assert tx_cfg.bus.peer_endpoint == rx_cfg.bus.peer_endpoint
    endpoints = {
        tx_cfg.bus.control_endpoint,
        tx_cfg.bus.telemetry_endpoint,
        rx_cfg.bus.control_endpoint,
        rx_cfg.bus.telemetry_endpoint,
        tx_cfg.bus.peer_endpoint,
        tx_cfg.simulation.fiber_endpoint,
    }
    assert len(endpoints) == 6
    assert all(e.startswith("tcp://127.0.0.1:") for e in endpoints)
    # the node's calibration targets are the simulated source
    assert tx_cfg.source.mu_signal == cfg.link.source.mu_signal
    assert tx_cfg.source.slot_rate_hz == cfg.link.source.slot_rate_hz
    assert tx_cfg.protocol == cfg.protocol
    assert tx_cfg.node.state_dir.is_absolute()
    assert tx_cfg.node.state_dir.parent == tmp_path.resolve()


def test_curve_keys_are_consistent_and_private(tmp_path: Path) -> None:
    tx, rx, keys = write_node_configs(DemoConfig(), tmp_path)
    assert keys is not None
    tx_cfg, rx_cfg = tx.config, rx.config
    assert not tx_cfg.bus.allow_plaintext and not rx_cfg.bus.allow_plaintext
    for secret_file in (keys.tx_secret_file, keys.rx_secret_file, keys.client_secret_file):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    tx_pub, _ = load_keypair(keys.tx_secret_file)
    rx_pub, _ = load_keypair(keys.rx_secret_file)
    client_pub, _ = load_keypair(keys.client_secret_file)
    assert tx_cfg.bus.peer_public_key == rx_pub.decode()
    assert rx_cfg.bus.peer_public_key == tx_pub.decode()
    for node_cfg in (tx_cfg, rx_cfg):
        roles = {c.public_key: c.role for c in node_cfg.bus.clients}
        assert roles[client_pub.decode()] == "operator"
    # no secret key text in the written configs
    for path in (tx.config_path, rx.config_path):
        text = path.read_text()
        for secret_file in (keys.tx_secret_file, keys.rx_secret_file, keys.client_secret_file):
            assert secret_file.read_text().strip() not in text


def test_plaintext_mode(tmp_path: Path) -> None:
    cfg = apply_overrides(DemoConfig(), security="plaintext")
    tx, rx, keys = write_node_configs(cfg, tmp_path)
    assert keys is None
    assert tx.config.bus.allow_plaintext and rx.config.bus.allow_plaintext
    assert not (tmp_path / "keys").exists()


def test_endpoints_are_distinct_ports() -> None:
    ep = Endpoints.allocate()
    urls = [ep.tx_control, ep.tx_telemetry, ep.rx_control, ep.rx_telemetry, ep.peer, ep.fiber]
    assert len(set(urls)) == 6


@pytest.mark.parametrize(
    ("name", "instruments"),
    [("transmitter", TRANSMITTER_INSTRUMENTS), ("receiver", RECEIVER_INSTRUMENTS)],
)
def test_instruments_match_the_sim_configs(name: str, instruments: dict[str, Any]) -> None:
    shipped = tomllib.loads((REPO / "configs" / f"{name}.sim.toml").read_text())["instruments"]
    assert instruments == shipped


_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=8)
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
_values = st.one_of(_scalars, st.lists(st.floats(allow_nan=False), max_size=4))
_tables = st.recursive(
    st.dictionaries(_keys, _values, max_size=4),
    lambda children: st.dictionaries(_keys, st.one_of(_values, children), max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(_tables)
def test_toml_writer_round_trips(data: dict[str, Any]) -> None:
    assert tomllib.loads(to_toml(data)) == data
