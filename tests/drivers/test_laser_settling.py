"""Lasers that need time: the 816x settling after switch-on, ITLA pending operations.

Each test here fails on drivers that take ``*OPC?`` for "settled" (816x) or a CP reply for
"done" (ITLA): see the module docstrings of the drivers for the manuals' wording.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from drivers.errors import InstrumentReportedError, InstrumentTimeoutError
from drivers.interfaces import LaserStatus
from drivers.keysight_816x import Keysight816xLaser
from drivers.oif_itla import OifItlaLaser, OifItlaOptions, Reg, Status, encode_reply, encode_request
from drivers.scpisim import ScpiModelTransport
from drivers.scpisim.keysight_816x import Keysight816xModel
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import SimServer
from tests.drivers.helpers import ScriptedPtyDevice

# --- Keysight 816x ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _816x(model: Keysight816xModel) -> Keysight816xLaser:
    laser = Keysight816xLaser("tls", "unused", transport=ScpiModelTransport("tls", model))
    laser.connect()
    return laser


def test_816x_reports_warming_up_until_the_module_has_settled() -> None:
    clock = FakeClock()
    model = Keysight816xModel(settle_time_s=2.0, clock=clock)
    laser = _816x(model)
    assert laser.status() is LaserStatus.OFF
    laser.set_emission(True)
    assert laser.status() is LaserStatus.WARMING_UP  # QUES bit 4 set; *OPC? would say 1
    clock.now_s += 1.9
    assert laser.status() is LaserStatus.WARMING_UP
    clock.now_s += 0.2
    assert laser.status() is LaserStatus.LOCKED
    laser.set_emission(False)
    laser.set_emission(True)  # each switch-on settles again
    assert laser.status() is LaserStatus.WARMING_UP
    laser.close()


def test_816x_laser_protection_is_a_fault() -> None:
    model = Keysight816xModel(settle_time_s=0.0)
    laser = _816x(model)
    laser.set_emission(True)
    assert laser.status() is LaserStatus.LOCKED
    model.set_laser_protection(True)
    assert laser.status() is LaserStatus.FAULT
    laser.close()


def test_816x_model_speaks_the_status_registers_of_the_guide() -> None:
    model = Keysight816xModel(slot=0, settle_time_s=1.0, clock=FakeClock())
    assert model.handle(":STAT0:OPER:COND?") == "+0"
    assert model.handle(":SOURce0:POWer:STATe ON") is None
    assert model.handle(":STATus0:OPERation:CONDition?") == "+1"  # bit 0: laser on
    assert model.handle(":STATus0:QUEStionable:CONDition?") == "+16"  # bit 4: not settled
    assert model.handle(":STAT1:QUES:COND?") is None  # no module in slot 1
    assert model.handle(":SYST:ERR?") == '-113,"Undefined header"'
    assert model.handle(":SOUR0:POW 11.000DBM") is None  # above this module's +10 dBm
    assert model.handle(":SYST:ERR?") == '-222,"Data out of range"'
    assert model.handle(":SYST:ERR?") == '+0,"No error"'


# --- OIF-ITLA --------------------------------------------------------------------------


@pytest.fixture
def slow_itla() -> Iterator[tuple[SimServer, ItlaSimulator]]:
    sim = ItlaSimulator(tune_time_s=0.3)
    with SimServer(sim) as srv:
        yield srv, sim


def _itla(srv: SimServer, **options: float) -> OifItlaLaser:
    opts = OifItlaOptions(reconnect_timeout_s=1.0, **options)  # type: ignore[arg-type]
    laser = OifItlaLaser("itla", srv.url, 0.5, opts)
    laser.connect()
    return laser


def test_itla_retune_returns_once_the_module_has_tuned(
    slow_itla: tuple[SimServer, ItlaSimulator],
) -> None:
    srv, _ = slow_itla
    laser = _itla(srv)
    start = time.monotonic()
    laser.set_wavelength_nm(1552.0)
    assert time.monotonic() - start >= 0.25  # the Channel write was answered CP
    assert laser.wavelength_nm() == pytest.approx(1552.0, abs=0.01)  # LF1/LF2: tuned
    laser.close()


def test_itla_enable_returns_once_the_laser_is_on(
    slow_itla: tuple[SimServer, ItlaSimulator],
) -> None:
    srv, _ = slow_itla
    laser = _itla(srv)
    laser.set_emission(True)
    assert laser.status() is LaserStatus.LOCKED  # NOP pending flags already clear
    assert laser.output_power_dbm() == pytest.approx(laser.power_dbm())
    laser.close()


def test_itla_pending_timeout_names_instrument_command_and_register(
    slow_itla: tuple[SimServer, ItlaSimulator],
) -> None:
    srv, _ = slow_itla
    laser = _itla(srv, pending_timeout_s=0.1)
    with pytest.raises(InstrumentTimeoutError) as info:
        laser.set_emission(True)
    err = info.value
    assert err.instrument == "itla" and err.command == "write RES_ENA 0x0008"
    assert "NOP (0x00)" in err.reason and "pending" in err.reason
    laser.safe_state()  # disabling is accepted mid-operation and abandons it
    assert laser.status() is LaserStatus.OFF
    laser.close()


def test_itla_module_refuses_a_retune_while_an_operation_is_pending(
    slow_itla: tuple[SimServer, ItlaSimulator],
) -> None:
    srv, _ = slow_itla
    laser = _itla(srv)
    # start a tune behind the driver's back (a raw frame: the driver would wait for it)
    raw = laser.transport.exchange("raw", encode_request(Reg.CHANNEL, 1, write=True), None)
    assert raw == b""
    time.sleep(0.05)
    laser.transport.discard_input()
    with pytest.raises(InstrumentReportedError, match="CIP"):
        laser.write_register(Reg.FCF2, 0)
    laser.close()


def _scripted_itla(script: list[tuple[bytes, bytes]]) -> tuple[OifItlaLaser, ScriptedPtyDevice]:
    dev = ScriptedPtyDevice(script)
    laser = OifItlaLaser("itla", dev.path, 1.0)
    laser.transport.open()
    return laser, dev


def test_itla_cp_is_not_done_bytes() -> None:
    laser, dev = _scripted_itla(
        [
            # Channel write answered CP: poll NOP until bits 15:8 clear
            (encode_request(Reg.CHANNEL, 1, write=True), encode_reply(Status.CP, Reg.CHANNEL, 1)),
            (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0110)),
            (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0110)),
            (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0010)),
            # a read answered CP carries no value: wait, then read again
            (encode_request(Reg.LF1), encode_reply(Status.CP, Reg.LF1, 0)),
            (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0010)),
            (encode_request(Reg.LF1), encode_reply(Status.OK, Reg.LF1, 193)),
            # Channel answered OK but the pending flag is up: still waited for
            (encode_request(Reg.CHANNEL, 2, write=True), encode_reply(Status.OK, Reg.CHANNEL, 2)),
            (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0110)),
            (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0010)),
            # the operation ends with an error in NOP's error field (EXF)
            (encode_request(Reg.CHANNEL, 3, write=True), encode_reply(Status.CP, Reg.CHANNEL, 3)),
            (encode_request(Reg.NOP), encode_reply(Status.OK, Reg.NOP, 0x0018)),
        ]
    )
    laser.write_register(Reg.CHANNEL, 1)
    assert laser.read_register(Reg.LF1) == 193
    laser.write_register(Reg.CHANNEL, 2)
    with pytest.raises(InstrumentReportedError, match=r"pending operation failed.*EXF"):
        laser.write_register(Reg.CHANNEL, 3)
    laser.close()
    dev.finish()
