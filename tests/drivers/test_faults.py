"""Bad replies, timeouts, instrument errors, dropped connections and locking."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from drivers.ascii_spd import AsciiSpd
from drivers.errors import (
    ChecksumError,
    ConnectionLostError,
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    NotConnectedError,
    ProtocolError,
)
from drivers.keysight_816x import Keysight816xLaser, Keysight816xOptions
from drivers.oif_itla import OifItlaLaser, OifItlaOptions
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import Fault, SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from tests.drivers.helpers import sim_copy

EXPECTED = {
    Fault.GARBLE: ProtocolError,
    Fault.BAD_CHECKSUM: ChecksumError,
    Fault.NO_REPLY: InstrumentTimeoutError,
    Fault.TRUNCATE: ProtocolError,
}


def _itla(srv: SimServer) -> OifItlaLaser:
    laser = OifItlaLaser(
        "itla", srv.url, timeout_s=0.3, options=OifItlaOptions(reconnect_timeout_s=3)
    )
    laser.connect()
    return laser


def _spd(srv: SimServer) -> AsciiSpd:
    spd = AsciiSpd("spd0", srv.url, timeout_s=0.3, options=AsciiSpd.Options(reconnect_timeout_s=3))
    spd.connect()
    return spd


@pytest.mark.parametrize("fault", list(EXPECTED))
def test_itla_faults_raise_typed_errors_then_recover(itla_server: SimServer, fault: Fault) -> None:
    laser = _itla(itla_server)
    laser.set_power_dbm(9.5)
    itla_server.inject(fault)
    with pytest.raises(EXPECTED[fault]) as info:
        laser.power_dbm()
    err = info.value
    assert (err.instrument, err.command) == ("itla", "read PWR") and err.reason
    assert laser.power_dbm() == 9.5  # next command works: framing resynchronised
    laser.close()


@pytest.mark.parametrize("fault", list(EXPECTED))
def test_spd_faults_raise_typed_errors_then_recover(spd_server: SimServer, fault: Fault) -> None:
    spd = _spd(spd_server)
    spd_server.inject(fault)
    with pytest.raises(EXPECTED[fault]) as info:
        spd.dead_time_ns()
    assert (info.value.instrument, info.value.command) == ("spd0", "DEAD?")
    assert spd.dead_time_ns() == 10_000.0
    spd.close()


def test_itla_module_reports_checksum_error_in_request(itla_server: SimServer) -> None:
    laser = _itla(itla_server)
    bad = bytes([0xF0, 0x31, 0x00, 0x00])  # wrong BIP-4 for this frame
    raw = laser.transport.exchange("raw", bad, lambda r: r.exact(4))
    assert raw[0] & 0x08  # CE flag set by the module
    laser.close()


def test_itla_instrument_errors(itla_server: SimServer) -> None:
    laser = _itla(itla_server)
    with pytest.raises(InstrumentReportedError, match="RNI"):
        laser.read_register(0x7E)
    with pytest.raises(InstrumentReportedError, match="RNW"):
        laser.write_register(0x43, 1)
    laser.close()


def test_spd_instrument_errors(spd_server: SimServer) -> None:
    spd = _spd(spd_server)
    with pytest.raises(InstrumentReportedError, match="UNKNOWN"):
        spd.command("FOO")
    spd_server.handler.latch_photon_rate_hz = 1e6  # type: ignore[attr-defined]
    spd.arm()
    spd_server.handler.illuminate(1e8)  # type: ignore[attr-defined]
    assert spd.status().name == "LATCHED"
    with pytest.raises(InstrumentReportedError, match="STATE"):
        spd.arm()
    spd.reset_latch()
    assert spd.status().name == "DISARMED"
    spd.close()


@pytest.mark.parametrize("make", [_itla, _spd], ids=["itla", "spd"])
@pytest.mark.parametrize("mode", ["tcp", "pty"])
def test_unplug_mid_operation_and_replug(tmp_path: Path, make: object, mode: str) -> None:
    handler = ItlaSimulator() if make is _itla else SpdSimulator()
    with SimServer(handler, mode=mode, link_path=str(tmp_path / "tty")) as srv:
        inst = make(srv)  # type: ignore[operator]
        read = inst.power_dbm if make is _itla else inst.dead_time_ns
        expected = read()
        results: list[object] = []
        stop = threading.Event()

        def worker() -> None:
            while not stop.is_set():
                try:
                    results.append(read())
                except InstrumentError as exc:
                    results.append(exc)

        th = threading.Thread(target=worker)
        th.start()
        time.sleep(0.1)
        srv.unplug()
        time.sleep(0.4)
        srv.replug()
        time.sleep(0.4)
        stop.set()
        th.join(timeout=10)
        assert not th.is_alive()
        # every call either returned the right value or raised a typed driver error
        assert all(r == expected or isinstance(r, InstrumentError) for r in results)
        assert results[-1] == expected  # recovered without restarting anything
        assert read() == expected
        inst.close()


def test_serial_gives_up_after_budget_then_recovers_later(itla_server: SimServer) -> None:
    laser = OifItlaLaser("itla", itla_server.url, 0.3, OifItlaOptions(reconnect_timeout_s=0.3))
    laser.connect()
    itla_server.unplug()
    t0 = time.monotonic()
    with pytest.raises(ConnectionLostError) as info:
        laser.power_dbm()
    assert time.monotonic() - t0 < 2.0 and "reconnect failed" in info.value.reason
    itla_server.replug()
    assert laser.power_dbm() == 10.0
    laser.close()
    with pytest.raises(NotConnectedError):
        laser.power_dbm()


def test_drop_connection_fault_is_survived(itla_server: SimServer) -> None:
    laser = _itla(itla_server)
    itla_server.inject(Fault.DROP)
    assert laser.power_dbm() == 10.0  # reopened and re-sent transparently
    laser.close()


def test_threads_cannot_interleave_queries(itla_server: SimServer) -> None:
    laser = _itla(itla_server)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for _ in range(8):
                if k % 2:
                    assert laser.identify() == "QKDNODE-SIM,ITLA-SIM-1,SN000042,CW ITLA"
                else:
                    assert laser.power_dbm() == 10.0
                    assert laser.temperature_c() == 35.12
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    laser.close()


# --- VISA ------------------------------------------------------------------------------


def _visa_laser(tmp_path: Path, **kw: object) -> Keysight816xLaser:
    opts = Keysight816xOptions(visa_library=sim_copy(tmp_path, "keysight_816x.yaml"), **kw)  # type: ignore[arg-type]
    laser = Keysight816xLaser("laser", "GPIB0::20::INSTR", 0.3, opts)
    laser.connect()
    return laser


def test_visa_error_queue_and_timeout(tmp_path: Path) -> None:
    laser = _visa_laser(tmp_path)
    # within the driver's family limits (+13 dBm) but above this module's (+10 dBm)
    with pytest.raises(InstrumentReportedError) as info:
        laser.set_power_dbm(12.0)
    assert info.value.command == ":SOUR1:POW 12.000DBM" and "-113" in info.value.reason
    with pytest.raises(InstrumentTimeoutError) as tinfo:
        laser.transport.query(":SOUR1:NOSUCH?")
    assert tinfo.value.command == ":SOUR1:NOSUCH?"
    laser._drain_errors()
    assert laser.power_dbm() == 0.0  # unchanged, link still good
    laser.close()


def test_visa_lost_session_is_reopened(tmp_path: Path) -> None:
    laser = _visa_laser(tmp_path)
    laser.set_power_dbm(-2.0)
    laser.transport.session().close()  # the session dies under the driver (cable pulled)
    assert laser.power_dbm() == -2.0  # reopened with backoff, state kept by the instrument
    laser.close()


@pytest.mark.filterwarnings("ignore:read string doesn.t end with termination")
def test_visa_nothing_at_address_fails_identity(tmp_path: Path) -> None:
    # pyvisa-sim opens any address and answers nothing useful there; the identity check
    # is what stops a driver from talking to the wrong (or no) instrument
    opts = Keysight816xOptions(visa_library=sim_copy(tmp_path, "keysight_816x.yaml"))
    with pytest.raises(ProtocolError, match=r"\*IDN\?"):
        Keysight816xLaser("laser", "GPIB0::7::INSTR", 0.3, opts).connect()


def test_visa_threads(tmp_path: Path) -> None:
    laser = _visa_laser(tmp_path)
    laser.set_wavelength_nm(1551.0)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                if k % 2:
                    laser.set_power_dbm(-1.0)  # setting + error check stay together
                else:
                    assert laser.wavelength_nm() == pytest.approx(1551.0)
                    assert laser.identify().startswith("Keysight")
                    del i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    laser.close()
