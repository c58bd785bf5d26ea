"""Exact messages and bytes each real driver exchanges (both directions end empty)."""

from __future__ import annotations

import pytest

from drivers.ascii_spd import AsciiSpd, encode_line
from drivers.errors import InstrumentReportedError, ProtocolError
from drivers.interfaces import IntensityClass
from drivers.keysight_816x import Keysight816xLaser
from drivers.keysight_8157x import Keysight8157xAttenuator
from drivers.keysight_33500 import Keysight33500IntensityModulator
from drivers.oif_itla import OifItlaLaser, Reg, Status, encode_reply, encode_request
from drivers.thorlabs_pm100 import ThorlabsPM100
from tests.drivers.helpers import ExpectedProtocolTransport, ScriptedPtyDevice

IDN_816X = "Keysight Technologies,8164B,MY1,V5.25"
OK_816X = '+0,"No error"'


def test_816x_messages() -> None:
    t = ExpectedProtocolTransport(
        [
            ("*IDN?", IDN_816X),
            (":SYST:ERR?", '-410,"Query INTERRUPTED"'),  # stale entry drained at connect
            (":SYST:ERR?", OK_816X),
            (":SOUR2:POW:UNIT 0", None),
            (":SYST:ERR?", OK_816X),
            (":SOUR2:POW -3.250DBM", None),
            (":SYST:ERR?", OK_816X),
            (":SOUR2:WAV 1.55012000E-06", None),
            (":SYST:ERR?", OK_816X),
            (":SOUR2:WAV?", "+1.55012000E-006"),
            (":SOUR2:POW:STAT 1", None),
            (":SYST:ERR?", '-222,"Data out of range"'),
            (":SYST:ERR?", OK_816X),
            (":SOUR2:POW:STAT?", "1"),
            (":STAT2:QUES:COND?", "+16"),  # bit 4: module has not settled
            (":SOUR2:POW:STAT?", "1"),
            (":STAT2:QUES:COND?", "+0"),
            (":SOUR2:POW:STAT?", "1"),
            (":STAT2:QUES:COND?", "+8"),  # bit 3: laser protection on
            (":SOUR2:POW:STAT 0", None),
            (":SYST:ERR?", OK_816X),
        ]
    )
    laser = Keysight816xLaser(
        "laser", "unused", options=Keysight816xLaser.Options(slot=2), transport=t
    )
    laser.connect()
    laser.set_power_dbm(-3.25)
    laser.set_wavelength_nm(1550.12)
    assert laser.wavelength_nm() == pytest.approx(1550.12)
    with pytest.raises(InstrumentReportedError, match=r":SOUR2:POW:STAT 1.*-222"):
        laser.set_emission(True)
    assert laser.status().name == "WARMING_UP"
    assert laser.status().name == "LOCKED"
    assert laser.status().name == "FAULT"
    laser.safe_state()
    t.assert_done()


def test_816x_refuses_wrong_identity_and_garbled_numbers() -> None:
    t = ExpectedProtocolTransport([("*IDN?", "Rigol,DG1022,1,2")])
    with pytest.raises(ProtocolError, match=r"\*IDN\?"):
        Keysight816xLaser("laser", "unused", transport=t).connect()
    t.assert_done()
    t2 = ExpectedProtocolTransport(
        [
            ("*IDN?", IDN_816X),
            (":SYST:ERR?", OK_816X),
            (":SOUR1:POW:UNIT 0", None),
            (":SYST:ERR?", OK_816X),
            (":SOUR1:POW?", "+1.0E+00\x00garbage"),
        ]
    )
    laser = Keysight816xLaser("laser", "unused", transport=t2)
    laser.connect()
    with pytest.raises(ProtocolError, match="expected a number"):
        laser.power_dbm()
    t2.assert_done()


def test_8157x_pm100_messages() -> None:
    ok = OK_816X
    t = ExpectedProtocolTransport(
        [
            ("*IDN?", "Keysight Technologies,8164B,MY2,V5"),
            (":SYST:ERR?", ok),
            (":INP1:WAV 1.31000000E-06", None),
            (":SYST:ERR?", ok),
            (":INP1:ATT 12.500", None),
            (":SYST:ERR?", ok),
            (":OUTP1:STAT?", "0"),
            (":OUTP1:STAT 0", None),
            (":SYST:ERR?", ok),
        ]
    )
    voa = Keysight8157xAttenuator(
        "voa", "unused", options=Keysight8157xAttenuator.Options(wavelength_nm=1310), transport=t
    )
    voa.connect()
    voa.set_attenuation_db(12.5)
    assert voa.shutter_open() is False
    voa.safe_state()
    t.assert_done()
    ok = '0,"No error"'
    t = ExpectedProtocolTransport(
        [
            ("*IDN?", "Thorlabs,PM100USB,P1,1.7.0"),
            ("SYST:ERR?", ok),
            ("SENS:POW:UNIT W", None),
            ("SYST:ERR?", ok),
            ("SENS:CORR:WAV 1550.0", None),
            ("SYST:ERR?", ok),
            ("MEAS:POW?", "1.234000E-06"),
        ]
    )
    pm = ThorlabsPM100("pm", "unused", transport=t)
    pm.connect()
    pm.set_wavelength_nm(1550)
    assert pm.power_w() == pytest.approx(1.234e-6)
    t.assert_done()


def test_33500_level_upload() -> None:
    ok = '+0,"No error"'

    def setting(cmd: str) -> list[tuple[str, str | None]]:
        return [(cmd, None), ("SYST:ERR?", ok)]

    zeros = ",".join(["0.000000"] * 12)
    script: list[tuple[str, str | None]] = [
        ("*IDN?", "Agilent Technologies,33522B,MY3,4.00"),
        ("SYST:ERR?", ok),
    ]
    # expected loads: high impedance on both channels, read back as the instrument answers
    script += setting("OUTP1:LOAD INF") + [("OUTP1:LOAD?", "+9.900000000000000E+37")]
    script += setting("OUTP2:LOAD INF") + [("OUTP2:LOAD?", "+9.900000000000000E+37")]
    script += [("SOUR1:VOLT:HIGH?", "+5.0E-02"), ("SOUR1:VOLT:LOW?", "-5.0E-02")]
    for cmd in [
        "SOUR1:DATA:VOL:CLE",
        f"SOUR1:DATA:ARB QKDIM1,{zeros}",
        "SOUR1:FUNC:ARB QKDIM1",
        "SOUR1:FUNC ARB",
        "SOUR1:FUNC:ARB:SRAT 4000000",  # 1 MHz slots x 4 samples per level
        "SOUR1:VOLT:HIGH 0.001000",
        "SOUR1:VOLT:LOW -0.001000",
        "TRIG1:SOUR EXT",
        "TRIG1:SLOP POS",
        "SOUR1:BURS:MODE TRIG",
        "SOUR1:BURS:NCYC 1",
        "SOUR1:BURS:STAT 1",
        "SOUR2:FUNC DC",
    ]:
        script += setting(cmd)
    # signal 2.0 V, others 0 V: new points under a fresh name, then the high level
    for cmd in [
        "SOUR1:DATA:ARB QKDIM2," + ",".join(["1.000000"] * 4 + ["-1.000000"] * 8),
        "SOUR1:FUNC:ARB QKDIM2",
        "SOUR1:FUNC:ARB:SRAT 4000000",
        "SOUR1:VOLT:HIGH 2.000000",
        "SOUR1:VOLT:LOW 0.000000",
    ]:
        script += setting(cmd)
    # then decoy 0.4 V: an interior level, the high and low levels stay
    upload = ",".join(["1.000000"] * 4 + ["-0.600000"] * 4 + ["-1.000000"] * 4)
    for cmd in [
        f"SOUR1:DATA:ARB QKDIM3,{upload}",
        "SOUR1:FUNC:ARB QKDIM3",
        "SOUR1:FUNC:ARB:SRAT 4000000",
    ]:
        script += setting(cmd)
    script += [
        ("SOUR1:VOLT:HIGH?", "+2.00000000000000E+00"),
        ("SOUR1:VOLT:LOW?", "+0.00000000000000E+00"),
    ]
    t = ExpectedProtocolTransport(script)
    im = Keysight33500IntensityModulator("im", "unused", transport=t)
    im.connect()
    im.set_level_v(IntensityClass.SIGNAL, 2.0)
    im.set_level_v(IntensityClass.DECOY, 0.4)
    assert im.level_v(IntensityClass.DECOY) == pytest.approx(0.4)
    t.assert_done()


def test_itla_bytes_on_pty() -> None:
    limits = [  # register, reply data
        (Reg.OPSL, 700),
        (Reg.OPSH, 1350),
        (Reg.LFL1, 191),
        (Reg.LFL2, 5000),
        (Reg.LFH1, 196),
        (Reg.LFH2, 2500),
    ]
    script = [(bytes([0x00, 0x00, 0x00, 0x00]), encode_reply(Status.OK, 0x00, 0x0010))]
    script += [  # the serial number, remembered to tell another module on this port
        (encode_request(Reg.SER_NO), encode_reply(Status.AEA, Reg.SER_NO, 2)),
        (encode_request(Reg.AEA_EAR), encode_reply(Status.OK, Reg.AEA_EAR, 0x3037)),
    ]
    script += [(encode_request(r), encode_reply(Status.OK, r, d)) for r, d in limits]
    script += [  # the settings check at connect compares it again
        (encode_request(Reg.SER_NO), encode_reply(Status.AEA, Reg.SER_NO, 2)),
        (encode_request(Reg.AEA_EAR), encode_reply(Status.OK, Reg.AEA_EAR, 0x3037)),
    ]
    script += [
        # set power 10.00 dBm = 1000 = 0x03E8
        (encode_request(Reg.PWR, 1000, write=True), encode_reply(Status.OK, Reg.PWR, 1000)),
        # emission on: ResEna SENA; hand-computed frame 81 32 00 08; the module answers
        # CP (pending) and the driver polls NOP until the pending flags (15:8) clear
        (bytes([0x81, 0x32, 0x00, 0x08]), encode_reply(Status.CP, Reg.RES_ENA, 8)),
        (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0110)),
        (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0010)),
        # retune while on: XE, then NOP says CIE (9)
        (encode_request(Reg.FCF1, 193, write=True), encode_reply(Status.XE, Reg.FCF1, 0)),
        (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0019)),
        # MFGR AEA string "AB C" (4 chars) through AEA-EAR
        (bytes([0x20, 0x02, 0x00, 0x00]), encode_reply(Status.AEA, Reg.MFGR, 4)),
        (encode_request(Reg.AEA_EAR), encode_reply(Status.OK, Reg.AEA_EAR, 0x4142)),
        (encode_request(Reg.AEA_EAR), encode_reply(Status.OK, Reg.AEA_EAR, 0x2043)),
    ]
    dev = ScriptedPtyDevice(script)
    laser = OifItlaLaser("itla", dev.path, timeout_s=1.0)
    laser.connect()
    assert laser.power_range_dbm == (7.0, 13.5)
    laser.set_power_dbm(10.0)
    laser.set_emission(True)
    with pytest.raises(InstrumentReportedError, match="CIE"):
        laser.set_wavelength_nm(1550.0)
    assert laser.read_string(Reg.MFGR) == "AB C"
    assert laser.transport._port.in_waiting == 0
    laser.close()
    dev.finish()


def test_spd_bytes_on_pty() -> None:
    # checksums by hand: L^I^M^? = 0x4C^0x49^0x4D^0x3F = 0x77; O^K = 0x04; A^R^M = 0x5E
    lim_reply = encode_line("OK EFF=5:30 DEAD=1000:100000 DELAY=0:100000 THR=0:3")
    script = [
        (encode_line("IDN?"), encode_line("OK ACME,SPD-1,SN42,1.0")),  # remembered identity
        (b"LIM?*77\n", lim_reply),
        (encode_line("IDN?"), encode_line("OK ACME,SPD-1,SN42,1.1")),  # compared at the check
        (encode_line("EFF 12.500"), b"OK*04\n"),
        (b"ARM*5E\n", encode_line("ERR 4 STATE LATCHED")),
        (encode_line("STATE?"), encode_line("OK LATCHED")),
    ]
    dev = ScriptedPtyDevice(script)
    spd = AsciiSpd("spd", dev.path, timeout_s=1.0)
    spd.connect()
    spd.set_efficiency_pct(12.5)
    with pytest.raises(InstrumentReportedError, match="ARM: detector reports: 4 STATE LATCHED"):
        spd.arm()
    assert spd.status().name == "LATCHED"
    assert spd.transport._port.in_waiting == 0
    spd.close()
    dev.finish()
