"""Thorlabs PM100D/PM100USB/PM101 optical power meter (OpticalPowerMeter).

Command set (Thorlabs PM100 SCPI reference)::

    SENS:POW:UNIT W             report power in watts
    SENS:CORR:WAV 1550.0        correction wavelength in nm;  SENS:CORR:WAV? -> nm
    MEAS:POW?                   one measurement -> 1.234560E-06 (W)
    SYST:ERR?                   error queue, 0,"No error" when empty

The wavelength limits are the sensor's (``options.wavelength_range_nm``; default S122C
InGaAs head, 700-1800 nm). Simulation: ``resource="USB0::0x1313::0x8078::P0000001::INSTR@sim"``.
"""

from __future__ import annotations

from drivers.common import check_range
from drivers.interfaces import OpticalPowerMeter
from drivers.scpi import ScpiInstrument, VisaOptions
from drivers.transports.base import MessageTransport


class ThorlabsPM100Options(VisaOptions):
    wavelength_range_nm: tuple[float, float] = (700.0, 1800.0)


class ThorlabsPM100(ScpiInstrument, OpticalPowerMeter):
    Options = ThorlabsPM100Options
    SIM_YAML = "thorlabs_pm100.yaml"
    IDN_PATTERN = r"Thorlabs,PM1"
    ERROR_QUERY = "SYST:ERR?"

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: ThorlabsPM100Options | None = None,
        transport: MessageTransport | None = None,
    ) -> None:
        self.options = options or ThorlabsPM100Options()
        super().__init__(name, resource, timeout_s, self.options, transport)
        self.wavelength_range_nm = self.options.wavelength_range_nm

    def _configure(self) -> None:
        self._set("SENS:POW:UNIT W")

    def _safe_commands(self) -> list[str]:
        return []  # a power meter emits nothing

    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        wl = check_range(
            self.name, "SENS:CORR:WAV", "wavelength", wavelength_nm, self.wavelength_range_nm, "nm"
        )
        self._set(f"SENS:CORR:WAV {wl:.1f}")

    def wavelength_nm(self) -> float:
        """Correction wavelength currently set, in nm (an addition to the interface)."""
        return self._query_float("SENS:CORR:WAV?")

    def power_w(self) -> float:
        return self._query_float("MEAS:POW?")
