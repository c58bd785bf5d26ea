from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import drivers
from drivers import registry
from drivers.errors import DriverConfigError
from drivers.interfaces import Laser
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from drivers.transports.visa import sim_library
from qkdnode.cli import main
from tests.source_trees import parse_file


def test_every_entry_resolves_to_its_interface() -> None:
    import drivers.interfaces as interfaces

    for name, entry in registry.known_drivers().items():
        cls = registry.resolve(name)
        assert issubclass(cls, getattr(interfaces, entry.interface)), name
        assert entry.description


def test_register_driver_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "DRIVERS", dict(registry.DRIVERS))
    registry.register_driver("my_laser", "drivers.oif_itla:OifItlaLaser", "Laser", "test entry")
    assert registry.resolve("my_laser").__name__ == "OifItlaLaser"
    with pytest.raises(ValueError):
        registry.register_driver("Bad Name", "x:Y", "Laser", "")
    with pytest.raises(ValueError):
        registry.register_driver("ok_name", "no_colon", "Laser", "")
    with pytest.raises(ValueError):
        registry.register_driver("ok_name", "x:Y", "NoSuchInterface", "")


def test_open_instrument_validates_options_by_key() -> None:
    with pytest.raises(DriverConfigError) as info:
        registry.open_instrument(
            "keysight_816x", "laser", "GPIB0::20::INSTR@sim", options={"slot": 9, "x": 1}
        )
    assert "options.slot" in info.value.reason and "options.x" in info.value.reason
    assert info.value.instrument == "laser"
    with pytest.raises(DriverConfigError, match="unknown driver 'nope'"):
        registry.open_instrument("nope", "laser", "")


def test_open_instrument_connects_sim_and_serial(tmp_path: Path) -> None:
    laser = registry.open_instrument(
        "keysight_816x", "laser", "GPIB0::20::INSTR@sim", 1.0, {"slot": 1}
    )
    assert isinstance(laser, Laser) and "8164B" in laser.identify()
    laser.close()
    relative = registry.open_instrument(
        "thorlabs_pm100",
        "pm",
        "USB0::0x1313::0x8078::P0000001::INSTR",
        1.0,
        {"visa_library": "drivers/sim/thorlabs_pm100.yaml@sim"},
    )
    assert relative.identify().startswith("Thorlabs")
    relative.close()
    with SimServer(ItlaSimulator()) as srv:
        itla = registry.open_instrument(
            "oif_itla", "itla", srv.url, 1.0, {"reconnect_timeout_s": 0.5}
        )
        assert itla.identify().startswith("QKDNODE-SIM")
        itla.close()


def test_probe_visa_and_serial() -> None:
    found = registry.probe("GPIB0::21::INSTR", 1.0, sim_library("keysight_8157x.yaml"))
    assert found["protocol"] == "scpi" and "keysight_8157x" in found["suggested_drivers"]
    with SimServer(ItlaSimulator()) as srv:
        assert registry.probe(srv.url, 1.0)["suggested_drivers"] == ["oif_itla"]
    with SimServer(SpdSimulator()) as srv:
        found = registry.probe(srv.url, 1.0)
        assert found["protocol"] == "spd-ascii-v1" and found["identity"].startswith(
            "QKDNODE-SIM,SPD"
        )


def test_cli_list_and_probe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drivers", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["DRIVER", "INTERFACE", "DESCRIPTION"]
    assert "oif_itla" in out and "SinglePhotonDetector" in out
    assert main(["drivers", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"keysight_816x", "timetag_file", "ascii_spd"}
    lib = sim_library("keysight_33500.yaml")
    code = main(
        [
            "drivers",
            "probe",
            "USB0::0x0957::0x2C07::MY00000003::INSTR",
            "--visa-library",
            lib,
            "--json",
        ]
    )
    assert code == 0
    assert "33522B" in json.loads(capsys.readouterr().out)["identity"]
    assert main(["drivers", "probe", "GPIB0::20::INSTR@sim"]) == 2  # which definition?
    assert "visa-library" in capsys.readouterr().err


def test_cli_probe_nothing_there(capsys: pytest.CaptureFixture[str]) -> None:
    with SimServer(ItlaSimulator()) as srv:
        url = srv.url
    assert main(["drivers", "probe", url, "--timeout-s", "0.2"]) == 1
    assert "probe" in capsys.readouterr().err


def test_drivers_never_import_qkdnode() -> None:
    root = Path(drivers.__file__).parent
    for path in root.rglob("*.py"):
        tree = parse_file(path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "qkdnode" or n.startswith("qkdnode.") for n in names), path


def test_simlink_entries_are_listed_when_present() -> None:
    if not (Path(drivers.__file__).parent / "simlink" / "registry_entries.py").exists():
        pytest.skip("drivers.simlink.registry_entries not written yet")
    names = set(registry.known_drivers())
    assert names >= {
        "sim_laser",
        "sim_intensity_modulator",
        "sim_encoder",
        "sim_attenuator",
        "sim_power_meter",
        "sim_detector",
        "sim_time_tagger",
        "sim_state_source",
    }


def test_cli_lists_and_probes_the_network_instruments(capsys: pytest.CaptureFixture[str]) -> None:
    from drivers.netsim.single_quantum import SingleQuantumSim
    from drivers.scpisim.idq_time_controller import IdqTimeControllerSim

    assert main(["drivers", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["idq_time_controller"]["interface"] == "TimeTagger"
    assert rows["qutag"]["interface"] == "TimeTagger"
    assert rows["single_quantum_snspd"]["interface"] == "SinglePhotonDetector"
    with SingleQuantumSim() as sq, IdqTimeControllerSim() as tc:
        assert main(["drivers", "probe", sq.url, "--timeout-s", "1", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert found["suggested_drivers"] == ["single_quantum_snspd"]
        assert "4 detectors" in found["identity"]
        assert main(["drivers", "probe", tc.endpoint, "--timeout-s", "1", "--json"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert found["suggested_drivers"] == [
            "idq_time_controller",
            "idq_gate_generator",
            "externally_gated_detector",
        ]
        assert found["identity"].startswith("ID Quantique,ID1000")
        url = tc.endpoint
    assert main(["drivers", "probe", url, "--timeout-s", "0.2"]) == 1  # nothing there now
    assert "no known protocol" in capsys.readouterr().err


def test_drivers_doc_describes_every_registered_driver() -> None:
    text = (Path(drivers.__file__).parent.parent / "docs" / "drivers.md").read_text()
    described = set(re.findall(r"^###\s+(.+?)\s+—", text, re.MULTILINE))
    names = {n.strip("`") for heading in described for n in heading.split(", ")}
    assert set(registry.known_drivers()) <= names, sorted(set(registry.known_drivers()) - names)


def test_standalone_simulators_are_probed_as_the_doc_shows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m`` starts each network simulator in its own process; the endpoint it
    prints is what ``qkdnode drivers probe`` identifies."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(drivers.__file__).parent.parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for module in ("drivers.scpisim.idq_time_controller", "drivers.netsim.single_quantum")
    ]
    try:
        endpoints = [p.stdout.readline().split()[0] for p in procs if p.stdout is not None]
        found = []
        for endpoint in endpoints:
            assert main(["drivers", "probe", endpoint, "--timeout-s", "2", "--json"]) == 0
            found += json.loads(capsys.readouterr().out)["suggested_drivers"]
        assert found == [
            "idq_time_controller",
            "idq_gate_generator",
            "externally_gated_detector",
            "single_quantum_snspd",
        ]
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=5)
