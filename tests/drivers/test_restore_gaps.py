"""What a power cycle or a swap used to get past the drivers' settings memory:

* the quTAG driver remembered nothing: a power-cycled quTAG came back with its delays,
  thresholds, edges and clock source at their defaults and ``health()`` said OK;
* the power meter's range and averaging (optional interface settings) were not
  remembered: a meter back on auto-ranging and single samples went unnoticed;
* the identity of the instrument was never compared: another unit of the same model
  (another serial number) answering on the same port or address after a reconnect was
  silently configured and driven as if it were the one calibrated.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.ascii_spd import AsciiSpd, AsciiSpdOptions
from drivers.errors import InstrumentChangedError, InstrumentError
from drivers.interfaces import DetectorStatus, Edge, HealthLevel, ReferenceClock
from drivers.keysight_816x import Keysight816xLaser
from drivers.oif_itla import OifItlaLaser, OifItlaOptions, Reg
from drivers.qutag import QutagOptions, QutagTimeTagger
from drivers.scpisim import ScpiModelTransport
from drivers.scpisim.keysight_816x import Keysight816xModel
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from drivers.thorlabs_pm100 import ThorlabsPM100, ThorlabsPM100Options
from tests.drivers import qutag_standin
from tests.drivers.helpers import sim_copy
from tests.drivers.qutag_standin import SimDevice


@pytest.fixture
def qutag(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[QutagTimeTagger, SimDevice]]:
    dev = SimDevice()
    monkeypatch.setattr(qutag_standin, "DEVICE", dev)
    monkeypatch.setitem(sys.modules, "QuTAG_MC", qutag_standin)
    tt = QutagTimeTagger("qt0", "", 1.0, QutagOptions(channels=[1, 2], exposure_ms=50))
    tt.connect()
    yield tt, dev
    tt.close()


def test_a_power_cycled_qutag_is_found_by_health_and_put_back(
    qutag: tuple[QutagTimeTagger, SimDevice],
) -> None:
    tt, dev = qutag
    tt.set_input_delay_ps(2, -1200)
    tt.set_trigger_level_v(1, 0.35)
    tt.set_edge(1, Edge.FALLING)
    tt.set_reference_clock(ReferenceClock.EXTERNAL)
    assert tt.health().level is HealthLevel.OK
    dev.power_cycle()
    assert dev.enabled_mask == 0 and dev.exposure_ms == 100

    health = tt.health()
    assert health.level is HealthLevel.DEGRADED, health
    assert {
        "input_delay_ps[2]: 0 -> -1200",
        "trigger_level_v[1]: 0.1 -> 0.35",
        "edge[1]: RISING -> FALLING",
        "reference_clock: INTERNAL -> EXTERNAL",
    } == set(health.restored)
    assert dev.delays_ps[2] == -1200 and dev.conditioning[1] == (3, False, 0.35)
    assert dev.external_clock
    # the connect-time setup, which the wrapper cannot read back, was made again first
    assert dev.enabled_mask == 0b11 and dev.exposure_ms == 50
    assert tt.health().level is HealthLevel.OK


def test_a_qutag_that_will_not_take_its_settings_back_is_released(
    qutag: tuple[QutagTimeTagger, SimDevice],
) -> None:
    tt, dev = qutag
    tt.set_input_delay_ps(1, 500)
    dev.power_cycle()
    dev.fail_next = 1  # the first setter of the restore refuses
    health = tt.health()
    assert health.level is HealthLevel.FAULT and "qt0" in health.message
    with pytest.raises(InstrumentError):
        tt.input_delay_ps(1)  # released: not used until connected again
    tt.connect()
    assert tt.input_delay_ps(1) == 500


def test_a_power_meter_back_on_auto_range_and_single_samples_is_put_back(
    tmp_path: Path,
) -> None:
    opts = ThorlabsPM100Options(visa_library=sim_copy(tmp_path, "thorlabs_pm100.yaml"))
    meter = ThorlabsPM100("pm", "USB0::0x1313::0x8078::P0000001::INSTR", 1.0, opts)
    meter.connect()
    meter.set_range_w(1e-3)
    meter.set_averaging(300)
    picked = meter.range_w()
    assert picked is not None
    meter.transport.write("SENS:POW:RANG:AUTO 1")  # a power cycle, or the front panel
    meter.transport.write("SENS:AVER:COUN 1")
    health = meter.health()
    assert health.level is HealthLevel.DEGRADED
    assert {f"range_w: auto -> {picked:g}", "averaging: 1 -> 300"} == set(health.restored)
    assert meter.range_w() == picked and meter.averaging() == 300
    meter.set_range_w(None)  # auto-ranging chosen through the driver is remembered as such
    meter.transport.write("SENS:POW:RANG:AUTO 0")
    assert f"range_w: {picked:g} -> auto" in meter.health().restored
    assert meter.range_w() is None
    meter.close()


def test_another_scpi_instrument_at_the_same_address_is_refused() -> None:
    """GPIB keeps the link: the swap is found at the next health check, and at the next
    connect; nothing is set on the stranger."""
    model = Keysight816xModel(settle_time_s=0.0)
    transport = ScpiModelTransport("laser", model)
    laser = Keysight816xLaser("laser", "unused", transport=transport)
    laser.connect()
    laser.set_power_dbm(5.0)
    stranger = Keysight816xModel(settle_time_s=0.0)
    stranger.identity = "Keysight Technologies,8164B,MY00000099,V5.25(72637)"
    transport.model = stranger

    health = laser.health()
    assert health.level is HealthLevel.FAULT
    assert "MY00000002" in health.message and "MY00000099" in health.message
    assert stranger.power_dbm == 0.0, "nothing may be set on another instrument"
    laser.close()
    with pytest.raises(InstrumentChangedError) as info:
        laser.connect()
    err = info.value
    assert err.instrument == "laser"
    assert err.expected_identity == "Keysight Technologies,8164B,MY00000002"
    assert err.found_identity == "Keysight Technologies,8164B,MY00000099"
    # the calibrated instrument back: accepted, its settings checked
    transport.model = model
    laser.connect()
    assert laser.health().level is HealthLevel.OK


def test_a_firmware_update_is_not_another_instrument() -> None:
    model = Keysight816xModel(settle_time_s=0.0)
    laser = Keysight816xLaser("laser", "unused", transport=ScpiModelTransport("laser", model))
    laser.connect()
    model.identity = "Keysight Technologies,8164B,MY00000002,V6.00(80000)"
    assert laser.health().level is HealthLevel.OK


def _server(handler: SpdSimulator | ItlaSimulator, mode: str) -> SimServer:
    link = os.path.join(tempfile.mkdtemp(prefix="swap"), "tty")
    return SimServer(handler, mode=mode, link_path=link).start()


@pytest.mark.parametrize("mode", ["tcp", "pty"])
def test_another_detector_on_the_port_after_a_reconnect_is_never_armed(mode: str) -> None:
    """A USB-serial detector unplugged and another unit plugged in its place: the first
    command after the reopen finds the other serial number, arms nothing and says so."""
    sim = SpdSimulator()
    srv = _server(sim, mode)
    det = AsciiSpd("spd0", srv.url, 0.5, AsciiSpdOptions(reconnect_timeout_s=2.0))
    try:
        det.connect()
        det.set_efficiency_pct(20.0)
        det.arm()
        srv.power_cycle()
        sim.identity = "QKDNODE-SIM,SPD-ASCII-1,SN000099,1.0"
        with pytest.raises(InstrumentChangedError) as info:
            det.count_rate_hz()
        assert "SN000007" in str(info.value) and "SN000099" in str(info.value)
        assert sim.state is DetectorStatus.DISARMED and sim.values["EFF"] == 10.0
        health = det.health()
        assert health.level is HealthLevel.FAULT and "SN000099" in health.message
        assert sim.state is DetectorStatus.DISARMED
    finally:
        det.close()
        srv.stop()


def test_another_laser_module_on_the_port_is_refused_at_connect() -> None:
    sim = ItlaSimulator(tune_time_s=0.02)
    srv = _server(sim, "pty")
    opts = OifItlaOptions(reconnect_timeout_s=2.0, pending_poll_s=0.01)
    laser = OifItlaLaser("laser", srv.url, 0.5, opts)
    try:
        laser.connect()
        laser.set_power_dbm(12.0)
        laser.close()
        srv.power_cycle()
        sim.strings[Reg.SER_NO] = "SN000077"  # another module on the port
        with pytest.raises(InstrumentChangedError, match=r"SN000042.*SN000077"):
            laser.connect()
        assert sim.regs[Reg.PWR] == 1000, "nothing may be set on another module"
    finally:
        laser.close()
        srv.stop()


def test_another_time_controller_at_the_endpoint_is_found_by_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from drivers.idq_time_controller import IdqTimeController, IdqTimeControllerOptions
    from drivers.scpisim import idq_time_controller as tc_sim
    from drivers.scpisim.idq_time_controller import IdqTimeControllerSim

    with IdqTimeControllerSim() as sim:
        opts = IdqTimeControllerOptions(dlt_endpoint=sim.dlt_endpoint, channels=[1, 2])
        tc = IdqTimeController("tc0", sim.endpoint, 0.5, opts)
        tc.connect()
        tc.set_input_delay_ps(2, 120)
        assert tc.health().level is HealthLevel.OK
        monkeypatch.setattr(tc_sim, "IDN", "ID Quantique,ID1000,SIM00077,2.0.0 (simulated)")
        health = tc.health()
        assert health.level is HealthLevel.FAULT
        assert "SIM00042" in health.message and "SIM00077" in health.message
        tc.close()


def test_another_swabian_tagger_found_at_connect_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resource "" takes the first tagger found: after a close, another one may be it."""
    from drivers.swabian import SwabianOptions, SwabianTimeTagger
    from tests.drivers.swabian_standin import SimDevice as SwabianDevice
    from tests.drivers.swabian_standin import make_module

    first = SwabianDevice(serial="2138000ABC", channels=(1, 2, 3, 4))
    monkeypatch.setitem(sys.modules, "TimeTagger", make_module(first))
    tt = SwabianTimeTagger("tt0", "", 1.0, SwabianOptions(channels=[1, 2]))
    tt.connect()
    tt.set_input_delay_ps(1, 250)
    tt.close()
    other = SwabianDevice(serial="2138000XYZ", channels=(1, 2, 3, 4))
    monkeypatch.setitem(sys.modules, "TimeTagger", make_module(other))
    with pytest.raises(InstrumentChangedError) as info:
        tt.connect()
    assert "2138000ABC" in info.value.expected_identity
    assert "2138000XYZ" in info.value.found_identity
    assert other.input_delay_ps.get(1, 0) == 0, "nothing may be set on another tagger"
    tt.close()
