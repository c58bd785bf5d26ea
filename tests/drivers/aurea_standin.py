"""A stand-in for Aurea's ``SPD_OEM`` Python wrapper, shaped like the vendor's module.

Module-level functions with the wrapper's names, arguments and habits (see
``drivers/aurea_spd.py``): ``listDevices()`` returns ``(names, count)``; open/close return
0 or -1; setters return a code (negative on failure) and raise nothing; getters return
``(ret, value...)``, with ``getClockDetData`` handing back ctypes ``c_ulong`` objects as
the wrapper does. Codes follow Aurea's example: mode 0 continuous / 1 gated, output 1 ON.

Behind it a :class:`SimDevice`, a gated InGaAs avalanche detector:

* gated mode: per gate of the clock input, a click with probability
  ``1 - (1 - p_dark) * exp(-eta * mu)`` (``mu`` photons per gate, ``eta`` the efficiency
  setting), ``p_dark`` the dark-count rate times the effective gate width; after a click
  the gates within the dead time are lost, so ``rate = f p / (1 + p n)`` with
  ``n = floor(dead time * f)``;
* continuous mode: ``r = eta * photon rate + dark rate``, non-paralysable dead time
  ``r / (1 + r * dead time)``;
* the dark-count rate grows with the efficiency setting (a higher excess bias) as
  ``(eta / 10 %) ** 2`` and doubles every 10 C of body temperature (a warmer body leaves
  the cooler less margin).

The rates are expectations (no noise), so tests can compare them exactly. The output
off reports no detections. Faults: ``fail_next`` makes the next call return -1,
``garbage`` makes getters return nonsense, ``raise_next`` raises an OSError inside the
next call (as ctypes does), ``power_cycle()`` brings back the defaults, ``version``
changed is another unit, and an open within ``min_reopen_s`` of a close raises (the
crash the library shows on an immediate re-open).
"""

from __future__ import annotations

import math
import time
from ctypes import c_ulong
from dataclasses import dataclass, field
from typing import Any

DEFAULTS = {"efficiency_pct": 10, "dead_time_us": 10.0, "mode": 1, "output": 0}


@dataclass
class SimDevice:
    names: list[str] = field(default_factory=lambda: ["SPD_OEM_0042"])
    version: str = "SPD_OEM_A/0042/v1.3"
    efficiency_text: str = "10 20 25 30"
    dead_time_range_us: tuple[float, float] = (0.1, 100.0)
    efficiency_pct: int = 10
    dead_time_us: float = 10.0
    mode: int = 1
    output: int = 0
    clock_hz: float = 10e6
    photons_per_gate: float = 0.0
    photon_rate_hz: float = 0.0
    dark_rate_hz_at_10pct_25c: float = 2_000.0
    gate_width_ns: float = 1.0
    body_temp_c: float = 25.0
    min_reopen_s: float = 0.0
    is_open: bool = False
    closed_at: float = -math.inf
    fail_next: bool = False
    garbage: bool = False
    raise_next: bool = False
    calls: list[str] = field(default_factory=list)

    def power_cycle(self) -> None:
        for key, value in DEFAULTS.items():
            setattr(self, key, value)
        self.is_open = False

    def dark_rate_hz(self) -> float:
        return (
            self.dark_rate_hz_at_10pct_25c
            * (self.efficiency_pct / 10) ** 2
            * 2 ** ((self.body_temp_c - 25.0) / 10)
        )

    def detections_hz(self) -> float:
        if self.output != 1:
            return 0.0
        eta = self.efficiency_pct / 100
        dead_s = self.dead_time_us * 1e-6
        if self.mode == 1:
            p_dark = self.dark_rate_hz() * self.gate_width_ns * 1e-9
            p = 1 - (1 - p_dark) * math.exp(-eta * self.photons_per_gate)
            n = math.floor(dead_s * self.clock_hz)
            return self.clock_hz * p / (1 + p * n)
        r = eta * self.photon_rate_hz + self.dark_rate_hz()
        return r / (1 + r * dead_s)


DEVICE = SimDevice()


def _enter(name: str) -> bool:
    """Record the call; False when it is to fail with -1."""
    DEVICE.calls.append(name)
    if DEVICE.raise_next:
        DEVICE.raise_next = False
        raise OSError(f"exception: access violation in CPC_{name}")
    if DEVICE.fail_next:
        DEVICE.fail_next = False
        return False
    return True


def _getter(name: str, *values: Any) -> tuple[Any, ...]:
    if not _enter(name):
        return (-1, *(0 for _ in values))
    if DEVICE.garbage:
        return ("nonsense", *("?" for _ in values))
    return (0, *values)


def listDevices() -> tuple[list[str], int]:
    DEVICE.calls.append("listDevices")
    return list(DEVICE.names), len(DEVICE.names)


def openDevice(iDev: int) -> int:
    if not _enter("openDevice"):
        return -1
    if time.monotonic() - DEVICE.closed_at < DEVICE.min_reopen_s:
        raise OSError("segmentation fault in CPC_openDevice (re-opened too soon)")
    if not 0 <= iDev < len(DEVICE.names):
        return -1
    DEVICE.is_open = True
    return 0


def closeDevice(iDev: int) -> int:
    DEVICE.calls.append("closeDevice")
    DEVICE.is_open = False
    DEVICE.closed_at = time.monotonic()
    return 0


def getSystemVersion(iDev: int) -> tuple[Any, ...]:
    return _getter("getSystemVersion", DEVICE.version)


def getEfficiencyRange(iDev: int) -> tuple[Any, ...]:
    return _getter("getEfficiencyRange", DEVICE.efficiency_text)


def getEfficiency(iDev: int) -> tuple[Any, ...]:
    return _getter("getEfficiency", DEVICE.efficiency_pct)


def setEfficiency(iDev: int, eff: int) -> int:
    if not _enter("setEfficiency"):
        return -1
    DEVICE.efficiency_pct = int(eff)
    return 0


def getDeadtimeRange(iDev: int) -> tuple[Any, ...]:
    return _getter("getDeadtimeRange", *DEVICE.dead_time_range_us)


def getDeadtime(iDev: int) -> tuple[Any, ...]:
    return _getter("getDeadtime", DEVICE.dead_time_us)


def setDeadtime(iDev: int, val: float) -> int:
    if not _enter("setDeadtime"):
        return -1
    DEVICE.dead_time_us = float(val)
    return 0


def getDetectionMode(iDev: int) -> tuple[Any, ...]:
    return _getter("getDetectionMode", DEVICE.mode)


def setDetectionMode(iDev: int, val: int) -> int:
    if not _enter("setDetectionMode"):
        return -1
    DEVICE.mode = int(val)
    return 0


def getOutputState(iDev: int) -> tuple[Any, ...]:
    return _getter("getOutputState", DEVICE.output)


def setOutputState(iDev: int, val: int) -> int:
    if not _enter("setOutputState"):
        return -1
    DEVICE.output = int(val)
    return 0


def getClockDetData(iDev: int) -> tuple[Any, ...]:
    return _getter(
        "getClockDetData", c_ulong(round(DEVICE.clock_hz)), c_ulong(round(DEVICE.detections_hz()))
    )


def getBodySocketTemp(iDev: int) -> tuple[Any, ...]:
    return _getter("getBodySocketTemp", DEVICE.body_temp_c)
