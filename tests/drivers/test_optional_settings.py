"""The optional interface members: the power meter's range, averaging and zero on the PM100,
and NotSupportedError (nothing sent) on instruments that lack a setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.ascii_spd import AsciiSpd
from drivers.errors import InstrumentTimeoutError, NotSupportedError, OutOfRangeError
from drivers.interfaces import DetectorMode, Edge, ReferenceClock
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator
from drivers.thorlabs_pm100 import ThorlabsPM100, ThorlabsPM100Options
from drivers.timetag_file import TagFileReplayTagger, TagFileWriter
from tests.drivers.helpers import ExpectedProtocolTransport, sim_copy

OK = '0,"No error"'
CONNECT = [("*IDN?", "Thorlabs,PM100USB,P1,1.7.0"), ("SYST:ERR?", OK), ("SENS:POW:UNIT W", None)]


def test_pm100_range_averaging_zero_messages() -> None:
    t = ExpectedProtocolTransport(
        [
            *CONNECT,
            ("SYST:ERR?", OK),
            ("SENS:POW:RANG:AUTO 0", None),
            ("SYST:ERR?", OK),
            ("SENS:POW:RANG 1.000000E-04", None),
            ("SYST:ERR?", OK),
            ("SENS:POW:RANG:AUTO?", "0"),  # what the meter picked, remembered
            ("SENS:POW:RANG?", "1.100000E-04"),  # the meter rounds up to its range
            ("SENS:POW:RANG:AUTO?", "0"),
            ("SENS:POW:RANG?", "1.100000E-04"),
            ("SENS:AVER:COUN 300", None),
            ("SYST:ERR?", OK),
            ("SENS:CORR:COLL:ZERO:INIT", None),
            ("SYST:ERR?", OK),
            ("SENS:CORR:COLL:ZERO:STAT?", "1"),
            ("SENS:CORR:COLL:ZERO:STAT?", "1"),
            ("SENS:CORR:COLL:ZERO:STAT?", "0"),
        ]
    )
    pm = ThorlabsPM100("pm", "unused", transport=t)
    pm.connect()
    pm.set_range_w(1e-4)
    assert pm.range_w() == pytest.approx(1.1e-4)
    pm.set_averaging(300)
    pm.zero()  # waits while STAT? reads 1
    t.assert_done()


def test_pm100_zero_that_never_ends_times_out() -> None:
    t = ExpectedProtocolTransport(
        [
            *CONNECT,
            ("SYST:ERR?", OK),
            ("SENS:CORR:COLL:ZERO:INIT", None),
            ("SYST:ERR?", OK),
            ("SENS:CORR:COLL:ZERO:STAT?", "1"),
        ]
    )
    pm = ThorlabsPM100(
        "pm", "unused", options=ThorlabsPM100Options(zero_timeout_s=0.0), transport=t
    )
    pm.connect()
    with pytest.raises(InstrumentTimeoutError, match="still running"):
        pm.zero()
    t.assert_done()


def test_pm100_options_against_pyvisa_sim(tmp_path: Path) -> None:
    opts = ThorlabsPM100Options(visa_library=sim_copy(tmp_path, "thorlabs_pm100.yaml"))
    pm = ThorlabsPM100("pm", "USB0::0x1313::0x8078::P0000001::INSTR", 1.0, opts)
    pm.connect()
    assert pm.range_w() is None  # auto-ranging by default
    pm.set_range_w(2e-3)
    assert pm.range_w() == pytest.approx(2e-3)
    pm.set_range_w(None)
    assert pm.range_w() is None
    pm.set_averaging(50)
    assert pm.averaging() == 50
    pm.zero()
    for bad in (
        lambda: pm.set_range_w(1.0),
        lambda: pm.set_averaging(0),
        lambda: pm.set_averaging(2.5),
    ):  # type: ignore[arg-type]
        with pytest.raises(OutOfRangeError):
            bad()
    pm.close()


def test_instruments_without_a_setting_say_so_and_send_nothing(tmp_path: Path) -> None:
    with SimServer(SpdSimulator()) as srv:
        spd = AsciiSpd("spd0", srv.url, 0.5)
        spd.connect()
        before = srv.requests_seen
        for call in (
            lambda: spd.set_bias_current_ua(10.0),
            lambda: spd.set_gate_frequency_hz(1e8),
            lambda: spd.set_mode(DetectorMode.FREE_RUNNING),
            spd.temperature_k,
        ):
            with pytest.raises(NotSupportedError) as info:
                call()
            assert info.value.instrument == "spd0" and "AsciiSpd has no" in info.value.reason
        assert srv.requests_seen == before
        spd.close()
    path = tmp_path / "rec.qkdtags"
    with TagFileWriter(path, [1]):
        pass
    tagger = TagFileReplayTagger("tt", str(path))
    for call in (
        lambda: tagger.set_edge(1, Edge.FALLING),
        lambda: tagger.set_dead_time_ps(1, 100),
        lambda: tagger.set_reference_clock(ReferenceClock.EXTERNAL),
        tagger.resolution_ps,
    ):
        with pytest.raises(NotSupportedError):
            call()
