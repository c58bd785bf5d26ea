"""Keysight (Agilent) 8164B/8163B mainframe with an 816xx tunable laser module (Laser).

Command set (Keysight 8163A/B, 8164A/B & 8166A/B Mainframes Programming Guide; slot ``n``
= ``options.slot``)::

    :SOURn:POW:UNIT 0          power unit dBm (0 = dBm, 1 = W)
    :SOURn:POW -3.000DBM       set power;  :SOURn:POW?  -> +<value>E+00 (dBm)
    :SOURn:WAV 1.55000000E-06  set wavelength in metres;  :SOURn:WAV? -> metres
    :SOURn:POW:STAT 1|0        laser current on/off;  :SOURn:POW:STAT? -> 0|1
    :STATn:QUES:COND?          Questionable Slot Status Condition Register of slot n
    :SYST:ERR?                 error queue, +0,"No error" when empty

Settling. "Status Reporting - The STATus Subsystem", ``:STATusn:QUEStionable:CONDition?``,
and "The Status Model", "Questionable Slot Status Register": a 16-bit value, condition
register (current state, reading it does not clear it), bits for slot n:

    bit 0 (1)   Excessive Value        bit 4 (16)  Module has not settled ("as during the
    bit 1 (2)   Zeroing failed                     automatic settling of a Tunable Laser
    bit 2 (4)   Temperature out of range           module")
    bit 3 (8)   Laser protection on    bit 5 (32)  Module is out of specification
                                       bits 6-10   ARA, duty cycle, coherence control,
                                                   beam path protection, lambda zeroing

:meth:`status` reports OFF when ``:SOURn:POW:STAT?`` is 0, FAULT when bit 3 (laser
protection on: the mainframe's interlock keeps the laser dark) is set, WARMING_UP while
bit 4 (not settled) is set, LOCKED otherwise. The Operation Slot Status Condition
Register (``:STATusn:OPERation:CONDition?``: bit 0 laser switched on, 1 coherence control
on, 3 zeroing ongoing, 4 shutter open, 5-7 wavelength offset) has no settling bit, so it
is not used. ``*OPC?`` is not a settling indicator: "IEEE-Common Commands", ``*OPC?``,
answers 1 when "all modules are ready to execute a new operation" (command processing),
and "GPIB Command Compatibility List", "Timing Behavior": before firmware 3.x "*OPC?
always returns 1".

The 816x command set reports no laser-diode temperature: :meth:`temperature_c` returns
NaN unless ``options.temperature_query`` names a command that returns degrees Celsius.
Simulation: ``resource="GPIB0::20::INSTR@sim"`` uses ``drivers/sim/keysight_816x.yaml``
(command formats and the error queue; always settled: pyvisa-sim has no time);
:class:`drivers.scpisim.keysight_816x.Keysight816xModel` adds the settling period after
the laser is switched on.
"""

from __future__ import annotations

import math

from pydantic import Field

from drivers.common import check_range
from drivers.errors import ProtocolError
from drivers.interfaces import Laser, LaserStatus
from drivers.scpi import ScpiInstrument, VisaOptions
from drivers.transports.base import MessageTransport

#: Questionable Slot Status Register bits (programming guide, "The Status Model").
QUES_LASER_PROTECTION = 1 << 3
QUES_NOT_SETTLED = 1 << 4


class Keysight816xOptions(VisaOptions):
    slot: int = Field(1, ge=0, le=4, description="mainframe slot of the laser module")
    power_range_dbm: tuple[float, float] = (-10.0, 13.0)
    wavelength_range_nm: tuple[float, float] = (1490.0, 1640.0)
    temperature_query: str | None = None


class Keysight816xLaser(ScpiInstrument, Laser):
    """816x tunable laser source; limits from ``options`` (defaults: 81606A-class module)."""

    Options = Keysight816xOptions
    SIM_YAML = "keysight_816x.yaml"
    IDN_PATTERN = r"(Keysight|Agilent|Hewlett).*,816[0-9]"

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: Keysight816xOptions | None = None,
        transport: MessageTransport | None = None,
    ) -> None:
        self.options = options or Keysight816xOptions()
        super().__init__(name, resource, timeout_s, self.options, transport)
        self.power_range_dbm = self.options.power_range_dbm
        self.wavelength_range_nm = self.options.wavelength_range_nm
        self._src = f":SOUR{self.options.slot}"
        self._ques_cond = f":STAT{self.options.slot}:QUES:COND?"

    def _configure(self) -> None:
        self._set(f"{self._src}:POW:UNIT 0")

    def _safe_commands(self) -> list[str]:
        return [f"{self._src}:POW:STAT 0"]

    def safe_state(self) -> None:
        self.set_emission(False)

    def set_emission(self, on: bool) -> None:
        if not on:
            self.memory.switching_off("emission_on")
        self._set(f"{self._src}:POW:STAT {1 if on else 0}")
        self.memory.remember(
            "emission_on", on, lambda: self.set_emission(on), self.emission_on, enables=True
        )

    def emission_on(self) -> bool:
        return self._query_bool(f"{self._src}:POW:STAT?")

    def set_power_dbm(self, power_dbm: float) -> None:
        cmd = f"{self._src}:POW"
        p = check_range(self.name, cmd, "power", power_dbm, self.power_range_dbm, "dBm")
        self._set(f"{cmd} {p:.3f}DBM")
        self.memory.remember(
            "power_dbm", p, lambda: self.set_power_dbm(p), self.power_dbm, tolerance=5e-4
        )

    def power_dbm(self) -> float:
        return self._query_float(f"{self._src}:POW?")

    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        cmd = f"{self._src}:WAV"
        wl = check_range(
            self.name, cmd, "wavelength", wavelength_nm, self.wavelength_range_nm, "nm"
        )
        self._set(f"{cmd} {wl * 1e-9:.8E}")
        self.memory.remember(
            "wavelength_nm",
            wl,
            lambda: self.set_wavelength_nm(wl),
            self.wavelength_nm,
            tolerance=1e-4,
        )

    def wavelength_nm(self) -> float:
        return self._query_float(f"{self._src}:WAV?") * 1e9

    def temperature_c(self) -> float:
        if self.options.temperature_query is None:
            return math.nan
        return self._query_float(self.options.temperature_query)

    def questionable_condition(self) -> int:
        """The slot's Questionable Slot Status Condition Register (bits in the docstring)."""
        reply = self.transport.query(self._ques_cond)
        try:
            return int(reply)
        except ValueError:
            raise ProtocolError(
                self.name, self._ques_cond, f"expected an integer, got {reply!r}"
            ) from None

    def status(self) -> LaserStatus:
        with self.transport.lock:
            if not self.emission_on():
                return LaserStatus.OFF
            ques = self.questionable_condition()
        if ques & QUES_LASER_PROTECTION:
            return LaserStatus.FAULT
        if ques & QUES_NOT_SETTLED:
            return LaserStatus.WARMING_UP
        return LaserStatus.LOCKED
