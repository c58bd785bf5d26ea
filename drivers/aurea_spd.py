"""Aurea Technology gated InGaAs detector (SPD OEM / CPC) through the vendor's wrapper.

Aurea ships, with the detector's USB library (``OEM.so`` / ``CPC.dll``), a Python module of
ctypes wrappers around the library's ``CPC_*`` C functions. Two public sources were read
and agree on every function used here:

* the wrapper module itself, as a QKD receiver's control code carries it
  (``SPD_OEM.py``, "SPD OEM Lib Python wrapper", around ``OEM.so``), with that code's
  use of it (gated/continuous mode, dead time in us, efficiency in %, body temperature);
* Aurea's own example application ``AllFunctionsCtrl.py`` (Aurea Technology, "CPC - All
  functions control", v1.0 "all user functions tested"), importing the same functions
  from ``CPC_wrapper``.

The module name is ``options.vendor_module`` (``SPD_OEM`` by default). It is not on PyPI;
when it is missing :meth:`AureaSpd.connect` raises :class:`DriverUnavailableError`, and it
is imported only then (never when listing drivers).

What this driver relies on, as the wrapper defines it (``iDev`` the device index)::

    listDevices() -> (names, count)           the devices found on USB
    openDevice(iDev) / closeDevice(iDev)      0, or -1 on failure
    getSystemVersion(iDev) -> (ret, text)     "part/serial/firmware" as one string
    getEfficiencyRange(iDev) -> (ret, text)   the efficiencies offered, in %
    getEfficiency(iDev) -> (ret, pct)         setEfficiency(iDev, pct)  (integer %)
    getDeadtimeRange(iDev) -> (ret, min, max) in us
    getDeadtime(iDev) -> (ret, us)            setDeadtime(iDev, us)
    getDetectionMode(iDev) -> (ret, mode)     setDetectionMode(iDev, mode)  0 continuous, 1 gated
    getOutputState(iDev) -> (ret, state)      setOutputState(iDev, state)
    getClockDetData(iDev) -> (ret, clock, detections)   ctypes numbers: clock in Hz,
                                              detections in counts per second
    getBodySocketTemp(iDev) -> (ret, celsius) temperature of the body socket

Every ``ret`` below zero is a failure (both sources test ``ret < 0``); the wrapper raises
nothing itself, so every code is checked here and every value checked for plausibility.
Any exception from the library (an ``OSError`` from ctypes) or a value of the wrong shape
leaves the public methods as a typed :class:`InstrumentError`.

**Unconfirmed** (the sources disagree or are silent; check on a device):

* The output state's codes: the wrapper's comments say "0=ON or 1=OFF", Aurea's example
  asks for "0=OFF or 1=ON" and prints 0 as OFF. The example is followed here
  (``options.output_on_code``, 1 by default, lets a site invert it).
* Whether output OFF also removes the APD's bias, or only stops the output pulses. The
  wrapper has no other switch, so DISARMED here means output off.
* The format of the efficiency range text: no source shows it. Every number in it is taken
  as one offered efficiency.
* The clock reading in gated mode is taken as the gate frequency (the gate follows the
  clock input); in continuous mode it is not used.

Not in the wrapper, so :class:`NotSupportedError` with nothing sent: gate delay, gate width,
discriminator threshold, setting the gate frequency (it is the external clock), bias
current. The detector has no latch: :meth:`AureaSpd.reset_latch` only disarms.

The library cannot be opened again at once after a close: the receiver's control code
measured a crash on an immediate re-open and spaces them by 0.5 s; :meth:`AureaSpd.connect`
waits out ``options.reopen_gap_s`` since this driver's last close. The same code found the
library aborting the process when several processes open the device in turn, so one
process (the node) should own the detector; this driver does not guard against others.
That code also lets the detector settle after a mode change (it sleeps about 0.5 s); no
source gives a settling time, and this driver does not wait: counts read at once after
:meth:`AureaSpd.set_mode` may belong to the old mode.

Power cycles (:mod:`drivers.restore`): the identity (system version) is compared and the
efficiency, dead time, mode and output state set through this driver are read back at
every :meth:`health` and at a connect after a close; lost ones are put back, the output
(arming) last.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

from pydantic import Field

from drivers.common import DriverOptions, check_choice, check_range, health_check
from drivers.errors import (
    DriverConfigError,
    DriverUnavailableError,
    InstrumentError,
    InstrumentReportedError,
    NotConnectedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.interfaces import (
    DetectorMode,
    DetectorStatus,
    HealthLevel,
    InstrumentHealth,
    SinglePhotonDetector,
    not_supported,
)
from drivers.restore import SettingsMemory

#: the wrapper's detection-mode codes
MODE_CODE = {DetectorMode.FREE_RUNNING: 0, DetectorMode.GATED: 1}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def load_vendor_module(module: str) -> ModuleType:
    """Import Aurea's wrapper module or raise DriverUnavailableError."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DriverUnavailableError(
            "aurea_spd",
            f"import {module}",
            f"Aurea's {module} wrapper (and its OEM library) is not installed; it ships "
            "with the detector's software",
        ) from exc


class AureaSpdOptions(DriverOptions):
    vendor_module: str = Field("SPD_OEM", pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")
    output_on_code: int = Field(
        1, ge=0, le=1, description="output state code meaning ON (sources disagree, see module)"
    )
    reopen_gap_s: float = Field(
        0.5, ge=0, le=10, description="minimum time between a close and the next open"
    )
    temperature_range_c: tuple[float, float] = Field(
        (5.0, 50.0), description="body temperature outside this range: health DEGRADED"
    )


class AureaSpd(SinglePhotonDetector):
    """``resource``: a device name as ``listDevices`` gives it, or '' for the first one."""

    Options = AureaSpdOptions

    def __init__(
        self,
        name: str,
        resource: str = "",
        timeout_s: float = 2.0,
        options: AureaSpdOptions | None = None,
    ) -> None:
        self.name = name
        self.resource = resource
        self.timeout_s = timeout_s
        self.options = options or AureaSpdOptions()
        self._lock = threading.RLock()
        self._lib: ModuleType | None = None
        self._dev = 0
        self._closed_at = -math.inf
        self.efficiencies_pct: tuple[int, ...] = ()
        self.dead_time_range_ns = (0.0, 0.0)
        self.delay_range_ps = (0.0, 0.0)
        #: settings made through this driver, put back when the detector lost them
        self.memory = SettingsMemory(name)

    # --- vendor calls ---------------------------------------------------------------------

    @contextmanager
    def _vendor(self, command: str) -> Iterator[None]:
        try:
            yield
        except InstrumentError:
            raise
        except Exception as exc:
            raise ProtocolError(self.name, command, f"vendor library: {exc!r}") from exc

    def _raw(self, command: str, *args: Any) -> Any:
        """One library call at a time (the receiver's code serialises them too)."""
        with self._lock:
            lib = self._lib
            if lib is None:
                raise NotConnectedError(self.name, command, "not connected")
            with self._vendor(command):
                return getattr(lib, command)(self._dev, *args)

    def _code(self, command: str, ret: Any) -> None:
        if not isinstance(ret, int) or isinstance(ret, bool):
            raise ProtocolError(self.name, command, f"return code {ret!r:.60}")
        if ret < 0:
            raise InstrumentReportedError(self.name, command, f"library returned {ret}")

    def _set(self, command: str, value: Any) -> None:
        """A setter: its return code must not be negative."""
        self._code(command, self._raw(command, value))

    def _get(self, command: str, count: int = 1) -> tuple[Any, ...]:
        """A getter returning ``(ret, value...)``: the values after the code is checked."""
        reply = self._raw(command)
        with self._vendor(command):
            ret, *values = reply
        if len(values) != count:
            raise ProtocolError(self.name, command, f"{len(values)} values, expected {count}")
        self._code(command, ret)
        return tuple(getattr(v, "value", v) for v in values)  # ctypes numbers carry .value

    def _number(self, command: str, value: Any, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(self.name, command, f"not a number: {value!r:.60}")
        v = float(value)
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ProtocolError(self.name, command, f"implausible value {v:g}")
        return v

    # --- Instrument ---------------------------------------------------------------------

    def connect(self) -> None:
        with self._lock:
            if self._lib is not None:
                return
            lib = load_vendor_module(self.options.vendor_module)
            wait = self._closed_at + self.options.reopen_gap_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self._vendor("listDevices"):
                names, count = lib.listDevices()
                names = [str(n) for n in names][: int(count)]
            if not names:
                raise DriverUnavailableError(self.name, "listDevices", "no Aurea detector found")
            if self.resource and self.resource not in names:
                raise DriverConfigError(
                    self.name, "resource", f"{self.resource!r} is not one of {names}"
                )
            dev = names.index(self.resource) if self.resource else 0
            with self._vendor("openDevice"):
                ret = lib.openDevice(dev)
            self._code("openDevice", ret)
            self._lib, self._dev = lib, dev
            try:
                self._read_limits()
                identity = self.identify()
                self.memory.remember_identity(identity, self.identify)
                self.check_settings()  # after a close: the detector may have been cycled
            except InstrumentError:
                self._release()
                raise

    def _read_limits(self) -> None:
        (text,) = self._get("getEfficiencyRange")
        effs = tuple(sorted({round(float(m)) for m in _NUMBER.findall(str(text))}))
        if not effs or not all(0 < e <= 100 for e in effs):
            raise ProtocolError(self.name, "getEfficiencyRange", f"no efficiencies in {text!r:.60}")
        lo, hi = self._get("getDeadtimeRange", 2)
        lo_us = self._number("getDeadtimeRange", lo, 0, 1e6)
        hi_us = self._number("getDeadtimeRange", hi, lo_us, 1e6)
        self.efficiencies_pct = effs
        self.dead_time_range_ns = (lo_us * 1e3, hi_us * 1e3)

    def check_settings(self) -> None:
        """Compare the identity and read back what was set through this driver; put it back
        if the detector lost it. On failure the library is closed: NotConnectedError until
        the next connect."""
        with self._lock:
            self.memory.restore(self._read_limits, self._release)

    def _release(self) -> None:
        lib, self._lib = self._lib, None
        if lib is not None:
            with suppress(Exception):  # closing must not fail
                lib.closeDevice(self._dev)
            self._closed_at = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._release()

    def identify(self) -> str:
        (version,) = self._get("getSystemVersion")
        if not isinstance(version, str) or not version.strip():
            raise ProtocolError(self.name, "getSystemVersion", f"got {version!r:.60}")
        return f"Aurea Technology,{version.strip()}"

    def safe_state(self) -> None:
        """Output off (DISARMED). Nothing to do when not connected."""
        if self._lib is not None:
            self.disarm()
            self.memory.made_safe()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.check_settings()
            state = self.status().name
            celsius = self.temperature_k() - 273.15
            lo, hi = self.options.temperature_range_c
            if not lo <= celsius <= hi:
                return InstrumentHealth(
                    HealthLevel.DEGRADED, f"{state}, body at {celsius:.1f} C outside [{lo}, {hi}]"
                )
            return InstrumentHealth(HealthLevel.OK, f"{state}, body at {celsius:.1f} C")

        return self.memory.report(health_check(self.name, probe))

    # --- settings ----------------------------------------------------------------------

    def set_efficiency_pct(self, efficiency_pct: float) -> None:
        """One of the efficiencies the detector offers (``efficiencies_pct``, read at
        connect), in %; any other value is refused before anything is sent."""
        v = float(efficiency_pct)
        if self._lib is None:
            raise NotConnectedError(self.name, "setEfficiency", "not connected")
        if not any(v == e for e in self.efficiencies_pct):
            raise OutOfRangeError(
                self.name,
                "setEfficiency",
                f"efficiency {v:g} % is not one the detector offers {list(self.efficiencies_pct)}",
            )
        pct = round(v)
        self._set("setEfficiency", pct)
        self.memory.remember(
            "efficiency_pct", float(pct), lambda: self.set_efficiency_pct(pct), self.efficiency_pct
        )

    def efficiency_pct(self) -> float:
        (value,) = self._get("getEfficiency")
        return self._number("getEfficiency", value, 0, 100)

    def set_dead_time_ns(self, dead_time_ns: float) -> None:
        """Dead time (hold-off) in ns, within ``dead_time_range_ns`` (sent in us)."""
        if self._lib is None:
            raise NotConnectedError(self.name, "setDeadtime", "not connected")
        v = check_range(
            self.name, "setDeadtime", "dead time", dead_time_ns, self.dead_time_range_ns, "ns"
        )
        self._set("setDeadtime", v / 1e3)
        self.memory.remember(
            "dead_time_ns", v, lambda: self.set_dead_time_ns(v), self.dead_time_ns, tolerance=1.0
        )

    def dead_time_ns(self) -> float:
        (value,) = self._get("getDeadtime")
        return self._number("getDeadtime", value, 0, 1e6) * 1e3

    def set_mode(self, mode: DetectorMode) -> None:
        chosen = check_choice(self.name, "setDetectionMode", DetectorMode, mode)
        self._set("setDetectionMode", MODE_CODE[chosen])
        self.memory.remember(
            "mode", chosen.name, lambda: self.set_mode(chosen), lambda: self.mode().name
        )

    def mode(self) -> DetectorMode:
        (value,) = self._get("getDetectionMode")
        for mode, code in MODE_CODE.items():
            if value == code and not isinstance(value, bool):
                return mode
        raise ProtocolError(self.name, "getDetectionMode", f"unknown mode {value!r:.60}")

    def _output(self, on: bool) -> None:
        if not on:
            self.memory.switching_off("armed")
        code = self.options.output_on_code
        self._set("setOutputState", code if on else 1 - code)
        self.memory.remember("armed", on, lambda: self._output(on), self._output_on, enables=True)

    def _output_on(self) -> bool:
        (value,) = self._get("getOutputState")
        if value not in (0, 1) or isinstance(value, bool):
            raise ProtocolError(self.name, "getOutputState", f"unknown state {value!r:.60}")
        return bool(value == self.options.output_on_code)

    def arm(self) -> None:
        """Output on (see the module: whether this also biases the APD is unconfirmed)."""
        self._output(True)

    def disarm(self) -> None:
        self._output(False)

    def reset_latch(self) -> None:
        """No latch on this detector: disarms; DISARMED afterwards."""
        self._output(False)

    def status(self) -> DetectorStatus:
        return DetectorStatus.ARMED if self._output_on() else DetectorStatus.DISARMED

    def _clock_and_counts(self) -> tuple[float, float]:
        clock, detections = self._get("getClockDetData", 2)
        return (
            self._number("getClockDetData", clock, 0, 1e10),
            self._number("getClockDetData", detections, 0, 1e10),
        )

    def count_rate_hz(self) -> float:
        """Detections per second as the library reports them."""
        return self._clock_and_counts()[1]

    def gate_frequency_hz(self) -> float:
        """The clock input's frequency in Hz, which the gates follow in gated mode."""
        return self._clock_and_counts()[0]

    def temperature_k(self) -> float:
        """Body socket temperature (the only one the wrapper gives), in kelvin."""
        (value,) = self._get("getBodySocketTemp")
        return self._number("getBodySocketTemp", value, -60, 150) + 273.15

    # --- not in the wrapper ---------------------------------------------------------------

    def set_delay_ps(self, delay_ps: float) -> None:
        raise not_supported(self, "set_delay_ps", "gate delay setting")

    def delay_ps(self) -> float:
        raise not_supported(self, "delay_ps", "gate delay setting")

    def set_threshold_v(self, threshold_v: float) -> None:
        raise not_supported(self, "set_threshold_v", "discriminator threshold setting")

    def threshold_v(self) -> float:
        raise not_supported(self, "threshold_v", "discriminator threshold setting")
