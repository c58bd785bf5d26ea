"""A stand-in for qutools' ``QuTAG_MC`` Python wrapper, shaped like the vendor's module.

Only the part the driver uses, with the wrapper's habits (see ``drivers/qutag.py``):
setters return the DLL's error code and *print* a failure instead of raising; getters
print and return whatever value the call left (0 after a failure); ``getLastTimestamps``
returns the whole buffer-sized arrays with a count of valid entries; ``getCoincCounters``
returns 59 counters, index 0 the start input. Time unit 1 ps (``getTimebase()`` = 1e-12).

Behind it a :class:`SimDevice` with a clock the test advances (:meth:`SimDevice.advance_s`):
each channel ticks at a set rate, evenly spaced (counts are exact); the delay shifts the
channel's tags; a threshold above ``pulse_amplitude_v`` sees nothing; more tags than the
buffer holds between two reads sets the data-lost flag and keeps the newest ones.
``SimDevice.fail_next`` makes the next setter return an error code; ``SimDevice.garbage``
makes getters return nonsense; ``SimDevice.raise_next`` raises an OSError inside the next
call, as a ctypes call into an unloaded library would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SimDevice:
    present: bool = True
    channel_count: int = 8
    rates_hz: dict[int, float] = field(default_factory=dict)
    delays_ps: dict[int, int] = field(default_factory=dict)
    conditioning: dict[int, tuple[int, bool, float]] = field(default_factory=dict)
    pulse_amplitude_v: float = 1.0
    enabled_mask: int = 0
    exposure_ms: int = 100
    external_clock: bool = False
    buffer_size: int = 1_000_000
    now_ps: int = 0
    read_until_ps: int = 0
    lost: int = 0
    fail_next: int = 0
    garbage: bool = False
    raise_next: bool = False
    calls: list[str] = field(default_factory=list)

    def power_cycle(self) -> None:
        """Off and on: delays, signal conditioning, enabled channels, exposure and clock
        source back at their power-on defaults (the tags already read stay read)."""
        self.delays_ps = {}
        self.conditioning = {}
        self.enabled_mask = 0
        self.exposure_ms = 100
        self.external_clock = False

    def advance_s(self, seconds: float) -> None:
        self.now_ps += round(seconds * 1e12)

    def _period_ps(self, ch: int) -> int | None:
        rate = self.rates_hz.get(ch, 0.0)
        _, _, threshold = self.conditioning.get(ch, (1, True, 0.1))
        if (
            rate <= 0
            or not (self.enabled_mask >> (ch - 1)) & 1
            or threshold >= self.pulse_amplitude_v
        ):
            return None
        return round(1e12 / rate)

    def events(
        self, start_ps: int, stop_ps: int
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        times, chans = [], []
        for ch in range(1, self.channel_count + 1):
            period = self._period_ps(ch)
            if period is None:
                continue
            d = self.delays_ps.get(ch, 0)
            k0 = -(-(start_ps - d) // period)
            k1 = -(-(stop_ps - d) // period)
            t = d + np.arange(max(k0, 0), max(k1, 0), dtype=np.int64) * period
            times.append(t)
            chans.append(np.full(len(t), ch, dtype=np.int8))
        if not times:
            return np.zeros(0, np.int64), np.zeros(0, np.int8)
        t_all, c_all = np.concatenate(times), np.concatenate(chans)
        order = np.argsort(t_all, kind="stable")
        return t_all[order], c_all[order]


DEVICE = SimDevice()


class QuTAG:
    """The wrapper class: connects on construction, as the vendor's does."""

    def __init__(self) -> None:
        self.DEVTYPE_QUTAG = 0
        self.DEVTYPE_NONE = 1
        self.SCOND_LVTTL, self.SCOND_NIM, self.SCOND_MISC, self.SCOND_NONE = 1, 2, 3, 4
        self.err_dict = {
            -1: "unspecified error",
            0: "No error",
            1: "Receive timed out",
            2: "No connection was established",
            10: "Parameter in fct. call is out of range",
            12: "Library has not been initialized",
        }
        self._dev = DEVICE
        self._bufferSize = DEVICE.buffer_size
        self._initialised = True

    # --- helpers -----------------------------------------------------------------------

    def _enter(self, name: str) -> None:
        self._dev.calls.append(name)
        if self._dev.raise_next:
            self._dev.raise_next = False
            raise OSError(f"exception: access violation reading 0x00000000 in {name}")

    def _code(self, name: str, ok: bool = True) -> int:
        code = 0 if ok else 10
        if not self._initialised or not self._dev.present:
            code = 12 if not self._initialised else 2
        elif self._dev.fail_next:
            self._dev.fail_next -= 1
            code = 1
        if code:
            print(f"Error in TDC_{name}: {self.err_dict[code]}")
        return code

    # --- device info --------------------------------------------------------------------

    def deInitialize(self) -> int:
        self._enter("deInitialize")
        self._initialised = False
        return 0

    def getVersion(self) -> float:
        self._enter("getVersion")
        return 1.5

    def getTimebase(self) -> float:
        self._enter("getTimebase")
        return "garbage" if self._dev.garbage else 1e-12  # type: ignore[return-value]

    def getDeviceType(self) -> int:
        self._enter("getDeviceType")
        return self.DEVTYPE_QUTAG if self._dev.present else self.DEVTYPE_NONE

    def getChannelCount(self) -> int:
        self._enter("getChannelCount")
        return self._dev.channel_count

    # --- channels -----------------------------------------------------------------------

    def enableChannels(self, enStart: bool, channels: Any = False) -> int:
        self._enter("enableChannels")
        mask = int(str(channels), 2) if channels else (1 << self._dev.channel_count) - 1
        code = self._code("enableChannels", mask < (1 << self._dev.channel_count))
        if code == 0:
            self._dev.enabled_mask = mask
        return code

    def getSignalConditioning(self, channel: int) -> tuple[bool, float]:
        self._enter("getSignalConditioning")
        if self._dev.garbage:
            return (None, "nan?")  # type: ignore[return-value]
        _, rising, threshold = self._dev.conditioning.get(channel, (1, True, 0.1))
        return (rising, threshold)

    def setSignalConditioning(
        self, channel: int, conditioning: int, edge: bool, threshold: float
    ) -> int:
        self._enter("setSignalConditioning")
        ok = 1 <= channel <= self._dev.channel_count and -2.0 <= threshold <= 3.0
        code = self._code("configureSignalConditioning", ok)
        if code == 0:
            self._dev.conditioning[channel] = (conditioning, bool(edge), float(threshold))
        return code

    def getChannelDelay(self, channel: int) -> int:
        self._enter("getChannelDelay")
        return self._dev.delays_ps.get(channel, 0)

    def setChannelDelay(self, channel: int, delays: int) -> int:
        self._enter("setChannelDelay")
        code = self._code("setChannelDelays", -100_000 <= int(delays) <= 100_000)
        if code == 0:
            self._dev.delays_ps[int(channel)] = int(delays)
        return code

    def enableExternalClock(self, enable: bool) -> int:
        self._enter("enableExternalClock")
        code = self._code("enableExternalClock")
        if code == 0:
            self._dev.external_clock = bool(enable)
        return code

    def getClockState(self) -> tuple[int, int]:
        self._enter("getClockState")
        return (1 if self._dev.external_clock else 0, 0)

    # --- counting and timestamps --------------------------------------------------------

    def setExposureTime(self, expTime: int) -> int:
        self._enter("setExposureTime")
        code = self._code("setExposureTime", 0 <= expTime <= 65535)
        if code == 0:
            self._dev.exposure_ms = expTime
        return code

    def getCoincCounters(self) -> tuple[np.ndarray[Any, Any], int]:
        self._enter("getCoincCounters")
        data = np.zeros(59, dtype=np.int32)
        stop = self._dev.now_ps
        _, chans = self._dev.events(stop - self._dev.exposure_ms * 10**9, stop)
        for ch in range(1, self._dev.channel_count + 1):
            data[ch] = int(np.sum(chans == ch))
        return (data, 1)

    def getBufferSize(self) -> int:
        self._enter("getBufferSize")
        return self._bufferSize

    def getDataLost(self) -> int:
        self._enter("getDataLost")
        lost, self._dev.lost = self._dev.lost, 0
        return lost

    def getLastTimestamps(
        self, reset: bool
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int]:
        self._enter("getLastTimestamps")
        timestamps = np.zeros(int(self._bufferSize), dtype=np.int64)
        channels = np.zeros(int(self._bufferSize), dtype=np.int8)
        if self._dev.garbage:
            return (timestamps[:3], channels, 10)
        t, c = self._dev.events(self._dev.read_until_ps, self._dev.now_ps)
        if len(t) > self._bufferSize:
            self._dev.lost = 1
            t, c = t[-self._bufferSize :], c[-self._bufferSize :]
        timestamps[: len(t)] = t
        channels[: len(c)] = c
        if reset:
            self._dev.read_until_ps = self._dev.now_ps
        return (timestamps, channels, len(t))
