"""Config loading: examples validate, errors name file + key path, random input is safe."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdnode.config import ConfigError, NodeConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "configs").glob("*.toml"))


def _node_examples() -> list[Path]:
    return [p for p in EXAMPLES if "node" in tomllib.loads(p.read_text())]


@pytest.mark.parametrize("path", _node_examples(), ids=lambda p: p.name)
def test_example_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.node.role in ("transmitter", "receiver")


def _is_satellite(path: Path) -> bool:
    return "satellite" in tomllib.loads(path.read_text())


@pytest.mark.parametrize(
    "path",
    [p for p in EXAMPLES if "demo" in tomllib.loads(p.read_text()) and not _is_satellite(p)],
    ids=lambda p: p.name,
)
def test_example_demo_configs_validate(path: Path) -> None:
    from qkdnode.demo.config import load_demo_config

    assert load_demo_config(path).link.fiber.length_km > 0


@pytest.mark.parametrize("path", [p for p in EXAMPLES if _is_satellite(p)], ids=lambda p: p.name)
def test_example_satellite_configs_validate(path: Path) -> None:
    from qkdnode.demo.satellite_run import load_satellite_config

    cfg = load_satellite_config(path)
    assert cfg.satellite.passes >= 1 and cfg.link.source.slot_rate_hz > 0


def test_error_names_file_key_path_and_value(tmp_path: Path) -> None:
    p = tmp_path / "tx.toml"
    p.write_text(
        '[node]\nid = "a"\nrole = "transmitter"\npeer_id = "b"\n[source]\nmu_signal = -0.5\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(p)
    text = str(info.value)
    assert f"{p}: source.mu_signal: must be > 0, got -0.5" in text


def test_unknown_key_and_nested_path(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text(
        '[node]\nid = "a"\nrole = "receiver"\npeer_id = "b"\ncolour = "red"\n'
        '[instruments.spd0]\ndriver = "sim_detector"\ntimeout_s = -1\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(p)
    lines = info.value.problems
    assert any(line.startswith("node.colour: unknown key") for line in lines)
    assert any(line.startswith("instruments.spd0.timeout_s: must be > 0") for line in lines)


def test_wildcard_bind_refused() -> None:
    with pytest.raises(ConfigError, match=r"bus.control_endpoint: .*wildcard"):
        parse_config(
            {
                "node": {"id": "a", "role": "transmitter", "peer_id": "b"},
                "bus": {"control_endpoint": "tcp://*:5550"},
            }
        )


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[node\nid=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "absent.toml")


def test_cli_run_with_invalid_config_exits_2_and_names_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[node]\nid = "a"\nrole = "transmitter"\npeer_id = "b"\n[protocol]\neps_sec = 5\n')
    r = subprocess.run(
        [sys.executable, "-m", "qkdnode", "run", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "protocol.eps_sec: must be < 1, got 5" in r.stderr


def test_cli_config_check_and_schema() -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkdnode",
            "config",
            "check",
            str(ROOT / "configs" / "receiver.sim.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    schema = subprocess.run(
        [sys.executable, "-m", "qkdnode", "config", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert schema.returncode == 0
    assert '"node"' in schema.stdout and '"mu_signal"' in schema.stdout


# --- property-based: random TOML documents and values -----------------------------

toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=4),
    ),
    max_leaves=12,
)
section_names = st.sampled_from(
    [
        "node",
        "source",
        "instruments",
        "bus",
        "protocol",
        "keystore",
        "delivery",
        "metrics",
        "simulation",
        "bogus",
    ]
)
field_names = st.sampled_from(
    [
        "id",
        "role",
        "peer_id",
        "mu_signal",
        "mu_decoy",
        "p_signal",
        "driver",
        "resource",
        "control_endpoint",
        "eps_sec",
        "qber_abort",
        "path",
        "link",
        "fiber",
        "length_km",
        "state_dir",
        "x",
    ]
)
documents = st.dictionaries(
    section_names,
    st.one_of(toml_values, st.dictionaries(field_names, toml_values, max_size=5)),
    max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_documents_give_config_or_clear_error(doc: dict[str, object]) -> None:
    try:
        cfg = parse_config(doc, "random.toml")
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert ": " in line  # "<key path>: <what was expected>"
    else:
        assert isinstance(cfg, NodeConfig)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_give_config_or_clear_error(data: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".toml", delete=False) as f:
        f.write(data)
    p = Path(f.name)
    try:
        load_config(p)
    except ConfigError as exc:
        assert str(exc).startswith(str(p))
    finally:
        p.unlink()


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(
        [
            "mu_signal",
            "mu_decoy",
            "p_signal",
            "p_decoy",
            "p_basis_z",
            "slot_rate_hz",
            "wavelength_nm",
        ]
    ),
    value=st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=5), st.booleans()),
)
def test_random_source_values(key: str, value: object) -> None:
    doc = {"node": {"id": "a", "role": "transmitter", "peer_id": "b"}, "source": {key: value}}
    try:
        parse_config(doc)
    except ConfigError as exc:
        assert any(p.startswith("source") for p in exc.problems)


def test_a_store_whose_sync_summary_cannot_reach_the_peer_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "tx.toml"
    p.write_text(
        '[node]\nid = "a"\nrole = "transmitter"\npeer_id = "b"\n'
        "[keystore]\nmax_key_count = 10000000\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(p)
    text = str(info.value)
    assert "keystore.max_key_count = 10000000" in text and "bus.max_peer_header_bytes" in text
    p.write_text(p.read_text() + "[bus]\nmax_peer_header_bytes = 100000000\n")
    assert load_config(p).keystore.max_key_count == 10_000_000
