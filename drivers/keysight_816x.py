"""Keysight (Agilent) 8164B/8163B mainframe with an 816xx tunable laser module (Laser).

Command set (Keysight 8164B programming guide, slot ``n`` = ``options.slot``)::

    :SOURn:POW:UNIT 0          power unit dBm (0 = dBm, 1 = W)
    :SOURn:POW -3.000DBM       set power;  :SOURn:POW?  -> +<value>E+00 (dBm)
    :SOURn:WAV 1.55000000E-06  set wavelength in metres;  :SOURn:WAV? -> metres
    :SOURn:POW:STAT 1|0        laser current on/off;  :SOURn:POW:STAT? -> 0|1
    *OPC?                      1 once the laser has settled (used for LOCKED)
    :SYST:ERR?                 error queue, +0,"No error" when empty

The 816x command set reports no laser-diode temperature: :meth:`temperature_c` returns
NaN unless ``options.temperature_query`` names a command that returns degrees Celsius.
Simulation: ``resource="GPIB0::20::INSTR@sim"`` uses ``drivers/sim/keysight_816x.yaml``.
"""

from __future__ import annotations

import math

from pydantic import Field

from drivers.common import check_range
from drivers.interfaces import Laser, LaserStatus
from drivers.scpi import ScpiInstrument, VisaOptions
from drivers.transports.base import MessageTransport


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

    def _configure(self) -> None:
        self._set(f"{self._src}:POW:UNIT 0")

    def _safe_commands(self) -> list[str]:
        return [f"{self._src}:POW:STAT 0"]

    def set_emission(self, on: bool) -> None:
        self._set(f"{self._src}:POW:STAT {1 if on else 0}")

    def emission_on(self) -> bool:
        return self._query_bool(f"{self._src}:POW:STAT?")

    def set_power_dbm(self, power_dbm: float) -> None:
        cmd = f"{self._src}:POW"
        p = check_range(self.name, cmd, "power", power_dbm, self.power_range_dbm, "dBm")
        self._set(f"{cmd} {p:.3f}DBM")

    def power_dbm(self) -> float:
        return self._query_float(f"{self._src}:POW?")

    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        cmd = f"{self._src}:WAV"
        wl = check_range(
            self.name, cmd, "wavelength", wavelength_nm, self.wavelength_range_nm, "nm"
        )
        self._set(f"{cmd} {wl * 1e-9:.8E}")

    def wavelength_nm(self) -> float:
        return self._query_float(f"{self._src}:WAV?") * 1e9

    def temperature_c(self) -> float:
        if self.options.temperature_query is None:
            return math.nan
        return self._query_float(self.options.temperature_query)

    def status(self) -> LaserStatus:
        with self.transport.lock:
            if not self.emission_on():
                return LaserStatus.OFF
            settled = self._query_bool("*OPC?")
        return LaserStatus.LOCKED if settled else LaserStatus.WARMING_UP
