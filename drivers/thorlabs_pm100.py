"""Thorlabs PM100D/PM100USB/PM101 optical power meter (OpticalPowerMeter).

Command set (Thorlabs PM100 SCPI reference)::

    SENS:POW:UNIT W             report power in watts
    SENS:CORR:WAV 1550.0        correction wavelength in nm;  SENS:CORR:WAV? -> nm
    MEAS:POW?                   one measurement -> 1.234560E-06 (W)
    SENS:POW:RANG:AUTO 0|1      auto-ranging;  SENS:POW:RANG:AUTO? -> 0|1
    SENS:POW:RANG 1.0E-03       full-scale range in W (the meter picks the range that
                                holds it);  SENS:POW:RANG? -> W
    SENS:AVER:COUN 100          samples averaged per reading (about 3 ms each)
    SENS:CORR:COLL:ZERO:INIT    start the dark (zero) adjustment
    SENS:CORR:COLL:ZERO:STAT?   1 while the zero adjustment runs, 0 when done
    SYST:ERR?                   error queue, 0,"No error" when empty

(The PM100D/PM100USB operation manual's SCPI command list, whose long forms
``SENSe:POWer:DC:RANGe[:UPPer]``, ``SENSe:POWer:DC:RANGe:AUTO``, ``SENSe:AVERage[:COUNt]``
and ``SENSe:CORRection:COLLect:ZERO`` the short forms above abbreviate; the short forms,
and the zero state reading 1 while the adjustment runs, as several published PM100
drivers use them. The manual's pages were not read here.)

The wavelength limits are the sensor's (``options.wavelength_range_nm``; default S122C
InGaAs head, 700-1800 nm). Simulation: ``resource="USB0::0x1313::0x8078::P0000001::INSTR@sim"``.
"""

from __future__ import annotations

import math
import time

from pydantic import Field

from drivers.common import check_range
from drivers.errors import InstrumentTimeoutError, OutOfRangeError, ProtocolError
from drivers.interfaces import OpticalPowerMeter
from drivers.scpi import ScpiInstrument, VisaOptions
from drivers.transports.base import MessageTransport


class ThorlabsPM100Options(VisaOptions):
    wavelength_range_nm: tuple[float, float] = (700.0, 1800.0)
    power_range_limits_w: tuple[float, float] = (1e-9, 0.04)
    """Full-scale ranges the sensor offers (default S122C: up to 40 mW)."""
    zero_timeout_s: float = Field(30.0, ge=0, le=600, description="longest zero adjustment")


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
        # a power-cycled meter may come back reporting dBm: power_w() would be wrong
        self.memory.remember(
            "power_unit",
            "W",
            lambda: self._set("SENS:POW:UNIT W"),
            lambda: self.transport.query("SENS:POW:UNIT?").strip().upper(),
        )

    def _safe_commands(self) -> list[str]:
        return []  # a power meter emits nothing

    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        wl = check_range(
            self.name, "SENS:CORR:WAV", "wavelength", wavelength_nm, self.wavelength_range_nm, "nm"
        )
        self._set(f"SENS:CORR:WAV {wl:.1f}")
        self.memory.remember(
            "wavelength_nm",
            wl,
            lambda: self.set_wavelength_nm(wl),
            self.wavelength_nm,
            tolerance=0.05,
        )

    def wavelength_nm(self) -> float:
        """Correction wavelength currently set, in nm (an addition to the interface)."""
        return self._query_float("SENS:CORR:WAV?")

    def power_w(self) -> float:
        return self._query_float("MEAS:POW?")

    def set_range_w(self, range_w: float | None) -> None:
        """Full-scale range in W (None: auto-ranging). The meter picks the range that
        holds the value; what it picked is read back and remembered (power cycles)."""
        with self.transport.lock:
            if range_w is None:
                self._set("SENS:POW:RANG:AUTO 1")
                self._remember_range()
                return
            w = check_range(
                self.name,
                "SENS:POW:RANG",
                "range",
                range_w,
                self.options.power_range_limits_w,
                "W",
            )
            self._set("SENS:POW:RANG:AUTO 0")
            self._set(f"SENS:POW:RANG {w:.6E}")
            self._remember_range()

    def _range_setting(self) -> float | str:
        found = self.range_w()
        return "auto" if found is None else found

    def _remember_range(self) -> None:
        picked = self._range_setting()
        self.memory.remember(
            "range_w",
            picked,
            lambda: self.set_range_w(None if isinstance(picked, str) else picked),
            self._range_setting,
        )

    def range_w(self) -> float | None:
        with self.transport.lock:
            if self._query_bool("SENS:POW:RANG:AUTO?"):
                return None
            return self._query_float("SENS:POW:RANG?")

    def set_averaging(self, count: int) -> None:
        n = check_range(self.name, "SENS:AVER:COUN", "averaging", count, (1, 100_000), "samples")
        if n != int(n):
            raise OutOfRangeError(self.name, "SENS:AVER:COUN", f"averaging {n} is not whole")
        self._set(f"SENS:AVER:COUN {int(n)}")
        count = int(n)
        self.memory.remember(
            "averaging", float(count), lambda: self.set_averaging(count), self._averaging_float
        )

    def _averaging_float(self) -> float:
        return float(self.averaging())

    def averaging(self) -> int:
        value = self._query_float("SENS:AVER:COUN?")
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise ProtocolError(self.name, "SENS:AVER:COUN?", f"averaging {value}")
        return int(value)

    def zero(self) -> None:
        """Start the zero adjustment and wait until ``SENS:CORR:COLL:ZERO:STAT?`` reads 0
        (InstrumentTimeoutError after ``options.zero_timeout_s``)."""
        with self.transport.lock:
            self._set("SENS:CORR:COLL:ZERO:INIT")
            deadline = time.monotonic() + self.options.zero_timeout_s
            while self._query_bool("SENS:CORR:COLL:ZERO:STAT?"):
                if time.monotonic() >= deadline:
                    raise InstrumentTimeoutError(
                        self.name,
                        "SENS:CORR:COLL:ZERO:STAT?",
                        f"zero adjustment still running after {self.options.zero_timeout_s:g} s",
                    )
                time.sleep(0.05)
