"""The externally gated detector: the Aurea detector (through a stand-in of its vendor
wrapper) gated by the Time Controller's generator (its simulator over ZeroMQ), built
from the node's config the way the node builds it, down to the detector-timing scan."""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from drivers import registry
from drivers.errors import DriverConfigError, InstrumentError, ProtocolError
from drivers.gated_detector import ExternallyGatedDetector
from drivers.idq_gate_generator import IdqGateGenerator, IdqGateGeneratorOptions
from drivers.interfaces import DetectorMode, DetectorStatus, HealthLevel
from drivers.scpisim.idq_time_controller import IdqTimeControllerSim
from qkdnode.cli import main
from qkdnode.hardware import InstrumentSet
from qkdnode.procedures.detector_timing import DetectorTimingConfig, calibrate_detector_timing
from tests.drivers import aurea_standin
from tests.drivers.aurea_standin import SimDevice

PERIOD_PS = 100_000  # 10 MHz gates
WIDTH_PS = 2_500
PULSE_PS = 61_300.0  # where the photons arrive after the slot clock (hidden from the node)


@dataclass
class GatedByController(SimDevice):
    """The stand-in's detector with its clock input wired to the simulated controller's
    output 1: the clock it reads and the photons per gate follow the gate train (the
    fraction of a Gaussian pulse of ``jitter_ps`` inside each gate)."""

    controller: Any = None
    mean_photons: float = 0.5
    jitter_ps: float = 80.0

    def _train(self) -> Any:
        return None if self.controller is None else self.controller.gate_output(1)

    @property  # type: ignore[override]
    def clock_hz(self) -> float:
        train = self._train()
        return 0.0 if train is None else 1e12 / train.period_ps

    @clock_hz.setter
    def clock_hz(self, value: float) -> None:
        pass  # the clock is the controller's

    def detections_hz(self) -> float:
        train = self._train()
        if train is None:
            self.photons_per_gate = 0.0
            return 0.0 if self.mode == 1 else super().detections_hz()
        lo = train.delay_ps % train.period_ps
        s = math.sqrt(2) * self.jitter_ps
        inside = 0.0
        for k in (-1, 0, 1):  # the pulse repeats every period
            p = PULSE_PS + k * train.period_ps
            hi_edge = lo + train.width_ps
            inside += 0.5 * (math.erf((hi_edge - p) / s) - math.erf((lo - p) / s))
        self.photons_per_gate = self.mean_photons * inside
        return super().detections_hz()


@pytest.fixture
def sim() -> Iterator[IdqTimeControllerSim]:
    with IdqTimeControllerSim() as s:
        yield s


@pytest.fixture
def device(sim: IdqTimeControllerSim, monkeypatch: pytest.MonkeyPatch) -> GatedByController:
    dev = GatedByController(controller=sim, dead_time_us=0.1)
    monkeypatch.setattr(aurea_standin, "DEVICE", dev)
    monkeypatch.setitem(sys.modules, "SPD_OEM", aurea_standin)
    return dev


def _options(sim: IdqTimeControllerSim, **generator_options: Any) -> dict[str, Any]:
    return {
        "generator": {
            "driver": "idq_gate_generator",
            "resource": sim.endpoint,
            "timeout_s": 0.3,
            "options": {
                "gate_period_ps": PERIOD_PS,
                "gate_width_ps": WIDTH_PS,
                **generator_options,
            },
        },
        "detector": {"driver": "aurea_spd", "options": {"reopen_gap_s": 0.0}},
    }


@pytest.fixture
def spd(sim: IdqTimeControllerSim, device: GatedByController) -> Iterator[ExternallyGatedDetector]:
    det = registry.open_instrument("externally_gated_detector", "spd0", "", 0.3, _options(sim))
    assert isinstance(det, ExternallyGatedDetector)
    yield det
    det.close()


def test_built_from_config_the_gate_goes_to_the_generator_the_rest_to_the_detector(
    sim: IdqTimeControllerSim, device: GatedByController, spd: ExternallyGatedDetector
) -> None:
    assert spd.identify() == (
        "gate: ID Quantique,ID1000,SIM00042,2.0.0 (simulated); "
        "detector: Aurea Technology,SPD_OEM_A/0042/v1.3"
    )
    assert device.mode == 1  # gated: the gates follow the clock input
    spd.set_delay_ps(12_345.4)
    spd.set_gate_frequency_hz(12.5e6)
    spd.set_gate_width_ns(1.5)
    assert (sim.generators[1].trigger_delay_ps, sim.generators[1].period_ps) == (12_345, 80_000)
    assert sim.generators[1].width_ps == 1_500
    assert spd.delay_ps() == 12_345.0 and spd.gate_width_ns() == 1.5
    assert spd.gate_frequency_hz() == pytest.approx(12.5e6)
    spd.set_efficiency_pct(20)
    spd.set_dead_time_ns(1_000)
    assert (device.efficiency_pct, device.dead_time_us) == (20, 1.0)
    assert spd.efficiency_pct() == 20 and spd.temperature_k() == pytest.approx(298.15)
    assert spd.delay_range_ps == (0.0, 3.6e12)
    assert spd.mode() is DetectorMode.GATED
    with pytest.raises(InstrumentError):  # not in Aurea's wrapper, nothing sent
        spd.set_threshold_v(0.1)


def test_arming_needs_both_the_gates_and_the_detector(
    sim: IdqTimeControllerSim, device: GatedByController, spd: ExternallyGatedDetector
) -> None:
    assert spd.status() is DetectorStatus.DISARMED and sim.gate_output(1) is None
    spd.arm()
    assert spd.status() is DetectorStatus.ARMED and sim.gate_output(1) is not None
    assert spd.count_rate_hz() >= 0 and device.output == 1
    sim.outputs[1].enabled = False  # the gates stop behind the driver's back
    assert spd.status() is DetectorStatus.DISARMED  # armed detector, no gates: no counts
    spd.arm()
    spd.disarm()
    assert device.output == 0 and not sim.outputs[1].enabled


def test_health_finds_a_clock_that_is_not_the_gates(
    sim: IdqTimeControllerSim, device: GatedByController, spd: ExternallyGatedDetector
) -> None:
    spd.arm()
    assert spd.health().level is HealthLevel.OK
    device.controller = None  # the gate cable comes off: the detector sees no clock
    health = spd.health()
    assert health.level is HealthLevel.DEGRADED and "gate cable" in health.message


def test_safe_state_turns_the_gates_off_when_the_detector_fails(
    sim: IdqTimeControllerSim, device: GatedByController, spd: ExternallyGatedDetector
) -> None:
    spd.arm()
    device.raise_next = True  # the vendor library crashes inside the disarm
    with pytest.raises(ProtocolError):
        spd.safe_state()
    assert sim.gate_output(1) is None  # the gates are off all the same
    spd.arm()
    sim.inject("down")  # now the controller is gone
    with pytest.raises(InstrumentError):
        spd.safe_state()
    assert device.output == 0  # the detector is disarmed all the same
    sim.inject("up")


def test_node_make_safe_reads_both_back(
    sim: IdqTimeControllerSim, spd: ExternallyGatedDetector
) -> None:
    # a generator configured on its own, on output 2
    gate = IdqGateGenerator(
        "gate1", sim.endpoint, 0.3, IdqGateGeneratorOptions(output=2, combiner=10, generator=2)
    )
    gate.connect()
    gate.set_output_enabled(True)
    spd.arm()
    instruments = InstrumentSet({})
    instruments.instruments = {"spd0": spd, "gate1": gate}
    report = instruments.make_safe()
    assert report["spd0"] == {"detector_status": "DISARMED", "armed": False, "safe": True}
    assert report["gate1"] == {"output_on": False, "safe": True}
    assert sim.gate_output(1) is None and sim.gate_output(2) is None
    gate.close()


def test_a_failed_connect_leaves_the_gates_off(
    sim: IdqTimeControllerSim, device: GatedByController
) -> None:
    device.names = []  # no Aurea detector on USB
    det = registry.resolve("externally_gated_detector")(
        "spd0",
        "",
        0.3,
        registry.validate_options("externally_gated_detector", "spd0", _options(sim)),  # type: ignore[call-arg]
    )
    with pytest.raises(InstrumentError, match="no Aurea detector"):
        det.connect()
    assert sim.gate_output(1) is None and not sim.outputs[1].enabled
    assert isinstance(det, ExternallyGatedDetector)
    assert not det.generator.transport.is_open  # type: ignore[attr-defined]


def test_config_errors_name_the_key_path(sim: IdqTimeControllerSim) -> None:
    bad_generator = _options(sim, gate_width_ps=PERIOD_PS)
    with pytest.raises(DriverConfigError, match=r"options\.generator.*options\.gate_width_ps"):
        registry.validate_options("externally_gated_detector", "spd0", bad_generator)
    swapped = _options(sim)
    swapped["generator"], swapped["detector"] = swapped["detector"], swapped["generator"]
    with pytest.raises(DriverConfigError, match=r"options\.generator.*not a GateGenerator"):
        registry.validate_options("externally_gated_detector", "spd0", swapped)
    unknown = _options(sim)
    unknown["detector"]["driver"] = "no_such_spd"
    with pytest.raises(DriverConfigError, match=r"options\.detector.*unknown driver"):
        registry.validate_options("externally_gated_detector", "spd0", unknown)
    with pytest.raises(DriverConfigError, match=r"options\.generator"):
        registry.validate_options(
            "externally_gated_detector", "spd0", {"detector": {"driver": "aurea_spd"}}
        )


def test_power_cycled_controller_is_found_through_the_composite(
    sim: IdqTimeControllerSim, spd: ExternallyGatedDetector
) -> None:
    spd.arm()
    spd.set_delay_ps(7_000)
    sim.power_cycle()
    health = spd.health()
    assert health.level is HealthLevel.DEGRADED
    assert any(r.startswith("gate_delay_ps: 0 -> 7000") for r in health.restored)
    assert spd.status() is DetectorStatus.ARMED and sim.generators[1].trigger_delay_ps == 7_000


def test_gate_delay_scan_finds_the_pulse_through_the_composite(
    sim: IdqTimeControllerSim, spd: ExternallyGatedDetector
) -> None:
    """The node's detector-timing calibration, unchanged, scans the generator's delay and
    reads the Aurea detector's counts; it sets the gate centred on the hidden pulse."""
    cfg = DetectorTimingConfig(gate_width_ps=WIDTH_PS, fine_step_ps=100.0, fine_half_span_ps=400.0)
    started = time.monotonic()
    result = asyncio.run(calibrate_detector_timing([spd], 1e12 / PERIOD_PS, cfg))
    elapsed = time.monotonic() - started
    assert result.ok, result.message
    (scan,) = result.scans
    centred = PULSE_PS - WIDTH_PS / 2  # the gate [delay, delay + width] around the pulse
    assert scan.delay_set_ps is not None and abs(scan.delay_set_ps - centred) <= 30
    assert sim.generators[1].trigger_delay_ps == round(scan.delay_set_ps)
    assert len(scan.delays_ps) > 40 and elapsed < 3.0
    settings = {s.name: s.value for s in result.instruments[0].settings}
    assert settings["gate.gate_delay_ps"] == sim.generators[1].trigger_delay_ps
    assert settings["detector.mode"] == "GATED" and settings["detector.armed"] is True


def test_cli_lists_the_drivers_and_probe_suggests_them(
    sim: IdqTimeControllerSim, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["drivers", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["idq_gate_generator"]["interface"] == "GateGenerator"
    assert rows["externally_gated_detector"]["interface"] == "SinglePhotonDetector"
    assert main(["drivers", "probe", sim.endpoint, "--timeout-s", "1", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["suggested_drivers"] == [
        "idq_time_controller",
        "idq_gate_generator",
        "externally_gated_detector",
    ]
    assert not any(m.startswith(b"GEN1:ENAB O") for m in sim.received)  # probe sets nothing


@dataclass
class FlakyDevice(SimDevice):
    """The stand-in's detector whose library fails, raises or returns garbage at random."""

    rng: random.Random = field(default_factory=lambda: random.Random(11))

    @property  # type: ignore[override]
    def raise_next(self) -> bool:
        return self.rng.random() < 0.1

    @raise_next.setter
    def raise_next(self, value: bool) -> None:
        pass

    @property  # type: ignore[override]
    def fail_next(self) -> bool:
        return self.rng.random() < 0.1

    @fail_next.setter
    def fail_next(self, value: bool) -> None:
        pass

    @property  # type: ignore[override]
    def garbage(self) -> bool:
        return self.rng.random() < 0.1

    @garbage.setter
    def garbage(self, value: bool) -> None:
        pass


def test_hostile_parts_let_only_typed_errors_out_of_the_composite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The robustness run of the registered drivers, on the composite: a generator on a
    hostile message transport and a detector whose vendor library misbehaves."""
    from drivers.aurea_spd import AureaSpd, AureaSpdOptions
    from tests.drivers.hostile import HostileMessageTransport
    from tests.drivers.test_hostile_transport import exercise

    monkeypatch.setattr(aurea_standin, "DEVICE", FlakyDevice())
    monkeypatch.setitem(sys.modules, "SPD_OEM", aurea_standin)
    transport = HostileMessageTransport("spd0.gate", seed=5)
    transport.identities = ["ID Quantique,ID1000,SN1,1.0", *transport.identities]
    gate = IdqGateGenerator("spd0.gate", "hostile", 0.03, transport=transport)
    detector = AureaSpd("spd0.detector", "", 0.03, AureaSpdOptions(reopen_gap_s=0.0))
    spd = ExternallyGatedDetector("spd0", generator=gate, detector=detector)
    transport.open()

    def reopen() -> None:
        if not transport.is_open:
            transport.open()

    found = exercise(spd, reopen, random.Random(5), 400)
    found.check()
    assert found.typed_errors > 0
