"""A power-cycled instrument comes back at its factory defaults: the driver finds that out
(settings read-back) and puts back what it had set before the instrument is used again,
or raises a typed error; the next health check says what happened.

Without this the driver silently went on with the defaults: the detector's efficiency
fell from 20 % to its default 10 % and it came back DISARMED (no clicks), the laser came
back dark, and health() said OK throughout.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.ascii_spd import AsciiSpd, AsciiSpdOptions
from drivers.errors import (
    ConnectionLostError,
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    SettingsLostError,
)
from drivers.idq_time_controller import IdqTimeController, IdqTimeControllerOptions
from drivers.interfaces import DetectorStatus, Edge, HealthLevel, LaserStatus
from drivers.keysight_816x import Keysight816xLaser
from drivers.netsim.single_quantum import SingleQuantumSim
from drivers.oif_itla import SENA, OifItlaLaser, OifItlaOptions, Reg
from drivers.restore import SettingsMemory
from drivers.scpisim import ScpiModelTransport
from drivers.scpisim.idq_time_controller import IdqTimeControllerSim
from drivers.scpisim.keysight_816x import Keysight816xModel
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from drivers.single_quantum import SingleQuantumOptions, SingleQuantumSnspd
from drivers.thorlabs_pm100 import ThorlabsPM100, ThorlabsPM100Options
from tests.drivers.helpers import sim_copy


def _server(handler: SpdSimulator | ItlaSimulator, mode: str) -> SimServer:
    link = os.path.join(tempfile.mkdtemp(prefix="pc"), "tty")
    return SimServer(handler, mode=mode, link_path=link).start()


@pytest.fixture(params=["tcp", "pty"])
def spd(request: pytest.FixtureRequest) -> Iterator[tuple[AsciiSpd, SimServer, SpdSimulator]]:
    sim = SpdSimulator(dark_count_rate_hz=0.0)
    srv = _server(sim, request.param)
    det = AsciiSpd("spd0", srv.url, 0.5, AsciiSpdOptions(reconnect_timeout_s=2.0))
    det.connect()
    yield det, srv, sim
    det.close()
    srv.stop()


def test_detector_power_cycle_is_restored_before_the_next_reading(
    spd: tuple[AsciiSpd, SimServer, SpdSimulator],
) -> None:
    det, srv, sim = spd
    sim.illuminate(100_000.0)
    det.set_efficiency_pct(20.0)
    det.set_delay_ps(1234.5)
    det.arm()
    assert det.health().level is HealthLevel.OK

    srv.power_cycle(off_s=0.05)
    assert sim.values["EFF"] == 10.0 and sim.state is DetectorStatus.DISARMED

    # The first reading after the power cycle reopens the port, finds the defaults and
    # puts the settings back before the reading is sent again: 20 % of 100 k photons/s.
    rate = det.count_rate_hz()
    assert rate == pytest.approx(20_000.0, rel=0.05)
    assert sim.values["EFF"] == 20.0 and sim.values["DELAY"] == 1234.5
    assert sim.state is DetectorStatus.ARMED
    assert det.efficiency_pct() == 20.0 and det.status() is DetectorStatus.ARMED

    health = det.health()
    assert health.level is HealthLevel.DEGRADED
    assert "efficiency_pct: 10 -> 20" in health.restored
    assert "armed: False -> True" in health.restored
    assert "delay_ps: 0 -> 1234.5" in health.restored
    assert "power cycle" in health.message
    assert det.health().level is HealthLevel.OK  # reported once


def test_without_the_memory_a_power_cycle_goes_unnoticed(
    spd: tuple[AsciiSpd, SimServer, SpdSimulator],
) -> None:
    """What the driver did before it kept a memory (and what one that forgets does): the
    detector silently runs at its defaults, and health() says OK."""
    det, srv, sim = spd
    det.memory = SettingsMemory("spd0")  # remembers nothing from here on
    det.transport.after_reopen.callback = None
    sim.illuminate(100_000.0)
    det.set_efficiency_pct(20.0)
    det.arm()
    det.memory = SettingsMemory("spd0")
    srv.power_cycle()
    assert det.count_rate_hz() == 0.0
    assert det.efficiency_pct() == 10.0 and det.status() is DetectorStatus.DISARMED
    assert det.health().level is HealthLevel.OK


def test_a_silent_power_cycle_is_found_by_the_next_health_check() -> None:
    """A link that does not drop (GPIB, a serial server that stays up): the health check
    reads the settings back and restores them."""
    model = Keysight816xModel(settle_time_s=0.0)
    laser = Keysight816xLaser("laser", "unused", transport=ScpiModelTransport("laser", model))
    laser.connect()
    laser.set_power_dbm(5.0)
    laser.set_wavelength_nm(1551.0)
    laser.set_emission(True)
    model.power_cycle()
    assert laser.emission_on() is False  # what the driver sees before the next check

    health = laser.health()
    assert health.level is HealthLevel.DEGRADED, health
    assert set(health.restored) == {
        "power_dbm: 0 -> 5",
        "wavelength_nm: 1550 -> 1551",
        "emission_on: False -> True",
    }
    assert model.laser_on and model.power_dbm == 5.0
    assert model.wavelength_m == pytest.approx(1551e-9)
    assert laser.status() is LaserStatus.LOCKED
    assert laser.health().level is HealthLevel.OK


@pytest.mark.parametrize("mode", ["tcp", "pty"])
def test_laser_power_cycle_restores_wavelength_before_emission(mode: str) -> None:
    sim = ItlaSimulator(tune_time_s=0.02)
    srv = _server(sim, mode)
    opts = OifItlaOptions(reconnect_timeout_s=2.0, pending_poll_s=0.01)
    laser = OifItlaLaser("laser", srv.url, 0.5, opts)
    try:
        laser.connect()
        laser.set_power_dbm(12.0)
        laser.set_wavelength_nm(1545.0)
        laser.set_emission(True)
        srv.power_cycle()
        # The ITLA refuses to retune with the output on: the restore must tune first.
        assert laser.output_power_dbm() == pytest.approx(12.0)
        assert laser.wavelength_nm() == pytest.approx(1545.0, abs=0.002)
        assert laser.emission_on() is True
        lines = laser.health().restored
        assert "emission_on: False -> True" in lines and "power_dbm: 10 -> 12" in lines
    finally:
        laser.close()
        srv.stop()


def test_a_safe_instrument_is_not_switched_on_by_a_restore() -> None:
    sim = SpdSimulator()
    srv = _server(sim, "pty")
    det = AsciiSpd("spd0", srv.url, 0.5, AsciiSpdOptions(reconnect_timeout_s=2.0))
    try:
        det.connect()
        det.set_efficiency_pct(25.0)
        det.arm()
        det.safe_state()
        srv.power_cycle()
        assert det.status() is DetectorStatus.DISARMED
        health = det.health()
        assert health.restored == ("efficiency_pct: 10 -> 25",)
        assert sim.state is DetectorStatus.DISARMED
    finally:
        det.close()
        srv.stop()


class _BrokenAfterPowerCycle(SpdSimulator):
    """A detector that comes back from a power cycle in FAULT: it refuses to arm."""

    def factory_reset(self) -> None:
        super().factory_reset()
        self.state = DetectorStatus.FAULT


def test_a_restore_that_fails_raises_a_typed_error_and_health_reports_fault() -> None:
    sim = _BrokenAfterPowerCycle()
    srv = _server(sim, "pty")
    det = AsciiSpd("spd0", srv.url, 0.5, AsciiSpdOptions(reconnect_timeout_s=2.0))
    try:
        det.connect()
        det.arm()
        srv.power_cycle()
        with pytest.raises(InstrumentReportedError) as info:
            det.count_rate_hz()  # nothing is read from a detector not in its configured state
        assert info.value.instrument == "spd0" and "STATE FAULT" in info.value.reason
        health = det.health()
        assert health.level is HealthLevel.FAULT and "spd0" in health.message
        with pytest.raises(InstrumentError):
            det.count_rate_hz()  # and still not on the next call
    finally:
        det.close()
        srv.stop()


def test_memory_reapplies_in_order_with_enables_last_and_verifies() -> None:
    state = {"a": 0.0, "on": False, "b": 0.0}
    applied: list[str] = []

    def setter(key: str, value: float | bool) -> None:
        applied.append(key)
        state[key] = value

    mem = SettingsMemory("dut")
    mem.remember("on", True, lambda: setter("on", True), lambda: state["on"], enables=True)
    mem.remember("a", 1.0, lambda: setter("a", 1.0), lambda: state["a"])
    mem.remember("b", 2.0, lambda: setter("b", 2.0), lambda: state["b"], tolerance=0.01)
    reconfigured: list[int] = []
    record = mem.restore(lambda: reconfigured.append(1), lambda: None)
    assert record is not None and reconfigured == [1]
    assert applied == ["a", "b", "on"]
    assert record.lines() == ("on: False -> True", "a: 0 -> 1", "b: 0 -> 2")
    assert mem.restore(lambda: None, lambda: None) is None  # nothing lost now

    state["b"] = 2.005  # within tolerance: not a lost setting
    assert mem.restore(lambda: None, lambda: None) is None

    stuck = SettingsMemory("dut")
    stuck.remember("x", 3.0, lambda: None, lambda: 0.0)
    with pytest.raises(SettingsLostError) as info:
        stuck.restore(lambda: None, lambda: None)
    assert "x: 0 -> 3" in info.value.reason and info.value.instrument == "dut"


def test_a_power_meter_switched_to_dbm_behind_the_drivers_back_reads_watts_again(
    tmp_path: Path,
) -> None:
    """Connect-time settings are remembered too: a meter that came back reporting dBm
    would have power_w() return dBm numbers."""
    opts = ThorlabsPM100Options(visa_library=sim_copy(tmp_path, "thorlabs_pm100.yaml"))
    meter = ThorlabsPM100("pm", "USB0::0x1313::0x8078::P0000001::INSTR", 1.0, opts)
    meter.connect()
    meter.set_wavelength_nm(1310.0)
    meter.transport.write("SENS:POW:UNIT DBM")  # the front panel, or a power cycle
    meter.transport.write("SENS:CORR:WAV 1550")
    health = meter.health()
    assert set(health.restored) == {"power_unit: DBM -> W", "wavelength_nm: 1550 -> 1310"}
    assert meter.transport.query("SENS:POW:UNIT?") == "W"
    assert meter.wavelength_nm() == 1310.0
    meter.close()


def test_snspd_controller_power_cycle_is_restored_before_the_next_reading() -> None:
    with SingleQuantumSim(detectors=4) as sim:
        opts = SingleQuantumOptions(
            channel=2, counts_port=sim.counts_port, measurement_period_ms=20, reconnect_timeout_s=1
        )
        det = SingleQuantumSnspd("snspd0", sim.url, 0.5, opts)
        det.connect()
        det.set_bias_current_ua(11.5)
        det.set_threshold_v(0.08)
        det.arm()
        sim.power_cycle()
        assert sim.state.enabled is False and sim.state.period_ms == 100

        # This driver does not resend after a loss: the call that finds the connection
        # gone fails (typed); the next one reopens, finds the defaults and restores first.
        with contextlib.suppress(ConnectionLostError):
            det.status()
        assert det.status() is DetectorStatus.ARMED
        assert sim.state.bias_ua[1] == 11.5 and sim.state.trigger_mv[1] == pytest.approx(80.0)
        assert sim.state.period_ms == 20  # count_rate_hz divides by it
        health = det.health()
        assert health.level is HealthLevel.DEGRADED
        assert {
            "bias_current_ua: 0 -> 11.5",
            "armed: False -> True",
            "measurement_period_ms: 100 -> 20",
        } <= set(health.restored)
        det.close()


def test_time_controller_restart_is_restored_at_the_first_command_after_the_outage() -> None:
    with IdqTimeControllerSim() as sim:
        opts = IdqTimeControllerOptions(dlt_endpoint=sim.dlt_endpoint, channels=[1, 2])
        tc = IdqTimeController("tc0", sim.endpoint, 0.2, opts)
        tc.connect()
        tc.set_input_delay_ps(2, 120)
        tc.set_trigger_level_v(1, 0.25)
        tc.set_edge(2, Edge.FALLING)
        sim.inject("down")  # switched off: the next command times out
        with pytest.raises(InstrumentTimeoutError):
            tc.trigger_level_v(1)
        sim.power_cycle()
        sim.inject("up")
        assert tc.trigger_level_v(1) == pytest.approx(0.25)  # restored before it is read
        assert sim.inputs[1].enabled and sim.inputs[2].enabled and sim.inputs[2].edge == "FALLING"
        assert tc.input_delay_ps(2) == 120
        lines = set(tc.health().restored)
        assert {"trigger_level_v[1]: 0.1 -> 0.25", "input_enabled[1]: False -> True"} <= lines
        tc.close()


class _ItlaRecordingEnables(ItlaSimulator):
    """Counts the writes that switch the output on."""

    def __init__(self) -> None:
        super().__init__(tune_time_s=0.02)
        self.enables = 0

    def _write(self, register: int, data: int) -> bytes:
        if register == Reg.RES_ENA and data & SENA:
            self.enables += 1
        return super()._write(register, data)


@pytest.mark.parametrize("mode", ["tcp", "pty"])
def test_safe_state_after_a_power_cycle_never_switches_the_laser_on(mode: str) -> None:
    """The switch-off reopens the connection; the check that runs then must not put the
    emission back on before the switch-off is sent (exit paths leave lasers dark)."""
    sim = _ItlaRecordingEnables()
    srv = _server(sim, mode)
    opts = OifItlaOptions(reconnect_timeout_s=2.0, pending_poll_s=0.01)
    laser = OifItlaLaser("laser", srv.url, 0.5, opts)
    try:
        laser.connect()
        laser.set_power_dbm(12.0)
        laser.set_emission(True)
        srv.power_cycle()
        sim.enables = 0
        laser.safe_state()
        assert sim.enables == 0
        assert laser.emission_on() is False
        assert sim.regs[Reg.PWR] == 1200  # the other settings were put back
    finally:
        laser.close()
        srv.stop()
