"""Keysight 8157xA/B variable optical attenuator module in an 816x mainframe.

Command set (Keysight 8157x programming guide, slot ``n`` = ``options.slot``)::

    :INPn:WAV 1.55000000E-06   calibration wavelength in metres
    :INPn:ATT 10.000           attenuation in dB;  :INPn:ATT? -> +1.00000000E+001
    :OUTPn:STAT 1|0            shutter open (1) / closed (0);  :OUTPn:STAT? -> 0|1
    :SYST:ERR?                 error queue

Simulation: ``resource="GPIB0::21::INSTR@sim"`` uses ``drivers/sim/keysight_8157x.yaml``.
"""

from __future__ import annotations

from pydantic import Field

from drivers.common import check_range
from drivers.interfaces import VariableAttenuator
from drivers.scpi import ScpiInstrument, VisaOptions
from drivers.transports.base import MessageTransport


class Keysight8157xOptions(VisaOptions):
    slot: int = Field(1, ge=1, le=4)
    attenuation_range_db: tuple[float, float] = (0.0, 60.0)
    wavelength_nm: float = Field(1550.0, ge=1200, le=1700, description="calibration wavelength")


class Keysight8157xAttenuator(ScpiInstrument, VariableAttenuator):
    Options = Keysight8157xOptions
    SIM_YAML = "keysight_8157x.yaml"
    IDN_PATTERN = r"(Keysight|Agilent|Hewlett).*,(816[0-9]|8157)"

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: Keysight8157xOptions | None = None,
        transport: MessageTransport | None = None,
    ) -> None:
        self.options = options or Keysight8157xOptions()
        super().__init__(name, resource, timeout_s, self.options, transport)
        self.attenuation_range_db = self.options.attenuation_range_db
        self._slot = self.options.slot

    def _configure(self) -> None:
        self._set(f":INP{self._slot}:WAV {self.options.wavelength_nm * 1e-9:.8E}")
        self.memory.remember(
            "calibration_wavelength_nm",
            self.options.wavelength_nm,
            self._configure,
            lambda: self._query_float(f":INP{self._slot}:WAV?") * 1e9,
            tolerance=1e-3,
        )

    def _safe_commands(self) -> list[str]:
        return [f":OUTP{self._slot}:STAT 0"]

    def safe_state(self) -> None:
        self.set_shutter(False)

    def set_attenuation_db(self, attenuation_db: float) -> None:
        cmd = f":INP{self._slot}:ATT"
        a = check_range(
            self.name, cmd, "attenuation", attenuation_db, self.attenuation_range_db, "dB"
        )
        self._set(f"{cmd} {a:.3f}")
        self.memory.remember(
            "attenuation_db",
            a,
            lambda: self.set_attenuation_db(a),
            self.attenuation_db,
            tolerance=5e-4,
        )

    def attenuation_db(self) -> float:
        return self._query_float(f":INP{self._slot}:ATT?")

    def set_shutter(self, open_: bool) -> None:
        if not open_:
            self.memory.switching_off("shutter_open")
        self._set(f":OUTP{self._slot}:STAT {1 if open_ else 0}")
        self.memory.remember(
            "shutter_open", open_, lambda: self.set_shutter(open_), self.shutter_open, enables=True
        )

    def shutter_open(self) -> bool:
        return self._query_bool(f":OUTP{self._slot}:STAT?")
