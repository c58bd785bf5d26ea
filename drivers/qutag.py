"""qutools quTAG (MC / HR) time tagger through the vendor's Python wrapper.

qutools ships, with the quTAG's DLL ``tdcbase``, a Python wrapper module (``QuTAG_MC.py``
or ``QuTAG_HR.py`` depending on the model; the module name is ``options.vendor_module``)
holding a class ``QuTAG`` around the DLL's C API (``tdcbase.h``, ``tdcmultidev.h``; the
wrapper, read here, declares every function it wraps). It is not on PyPI; when it is missing
:meth:`QutagTimeTagger.connect` raises :class:`DriverUnavailableError`, and the module is
imported only then (never when listing drivers).

What this driver relies on, as the wrapper defines it:

* ``QuTAG()`` initialises the library and connects the first device; ``deInitialize()``.
  ``getDeviceType()`` is ``DEVTYPE_QUTAG`` (0) for a real device, ``DEVTYPE_NONE`` (1)
  when none was found; ``getChannelCount()``, ``getVersion()``.
* ``getTimebase()``: seconds per time unit of the timestamps.
* Setters return the DLL's error code (0 = success, ``err_dict`` has the texts) and only
  *print* a failure; getters print and return whatever the DLL left in the output
  variable. So every code is checked here, and getters' values are checked for plausibility.
* ``enableChannels(enStart, channels)``: ``channels`` a bit string, channel 1 rightmost.
* ``setSignalConditioning(channel, conditioning, edge, threshold)`` (``SCOND_MISC`` = 3 lets
  edge and threshold be chosen; edge True = rising; threshold in V) and
  ``getSignalConditioning(channel)`` -> ``(rising, threshold_v)``.
* ``setChannelDelay(channel, delay)`` / ``getChannelDelay(channel)``, in ps.
* ``setExposureTime(ms)`` and ``getCoincCounters()`` -> ``(counts, updates)``: the counts of
  the last exposure period, index 0 the start input, 1..N the channels.
* ``getLastTimestamps(reset)`` -> ``(timestamps, channels, valid)``: the first ``valid``
  entries are the tags (in time units) since the last reset; ``getDataLost()`` is nonzero
  when the buffer (``getBufferSize()`` tags) overflowed; channel numbers of 100 and above
  are markers, not tags.
* ``enableExternalClock(enable)`` and ``getClockState()`` -> ``(locked, uplink)``.

Not stated in the wrapper and taken from the C header's conventions as remembered, to be
checked on a device: the delay unit (ps) and the counter order (0 the start input, 1..N the
channels). The wrapper has no dead-time setting: :meth:`set_dead_time_ps` raises
NotSupportedError.
Every vendor exception or surprising value leaves the public methods as a typed
:class:`InstrumentError`.

Power cycles (:mod:`drivers.restore`): the delays, thresholds, edges and clock source set
through this driver are read back at every :meth:`health` and at a connect after a close;
lost ones are put back after the connect-time setup (channels enabled, exposure) is made
again. The wrapper offers no serial number, so a swapped quTAG is not told apart.
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import Field

from drivers.common import DriverOptions, check_choice, check_range, health_check
from drivers.errors import (
    DriverUnavailableError,
    InstrumentError,
    InstrumentReportedError,
    NotConnectedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.interfaces import (
    TAG_DTYPE,
    Edge,
    HealthLevel,
    InstrumentHealth,
    ReferenceClock,
    TagBlock,
    TimeTagger,
)
from drivers.restore import SettingsMemory

SCOND_MISC = 3
DEVTYPE_NONE = 1


def load_vendor_module(module: str) -> ModuleType:
    """Import qutools' wrapper module or raise DriverUnavailableError."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DriverUnavailableError(
            "qutag",
            f"import {module}",
            f"qutools' {module} wrapper (and its tdcbase library) is not installed; it ships "
            "with the quTAG software",
        ) from exc


class QutagOptions(DriverOptions):
    vendor_module: str = Field("QuTAG_MC", pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")
    channels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], min_length=1)
    exposure_ms: int = Field(100, ge=1, le=65_535, description="counter exposure period")
    threshold_range_v: tuple[float, float] = (-2.0, 3.0)
    delay_range_ps: tuple[int, int] = (-100_000, 100_000)


class QutagTimeTagger(TimeTagger):
    """``resource`` is unused (the wrapper connects the first quTAG found); '' is fine."""

    Options = QutagOptions

    def __init__(
        self,
        name: str,
        resource: str = "",
        timeout_s: float = 2.0,
        options: QutagOptions | None = None,
    ) -> None:
        self.name = name
        self.resource = resource
        self.timeout_s = timeout_s
        self.options = options or QutagOptions()
        self._lock = threading.RLock()
        self._dev: Any = None
        self._timebase_ps = 0.0
        self._streaming = False
        #: settings made through this driver, put back when the quTAG lost them
        self.memory = SettingsMemory(name)

    # --- vendor calls ---------------------------------------------------------------

    @contextmanager
    def _vendor(self, command: str) -> Iterator[None]:
        try:
            yield
        except InstrumentError:
            raise
        except Exception as exc:
            raise ProtocolError(self.name, command, f"vendor library: {exc!r}") from exc

    def _call(self, command: str, *args: Any) -> Any:
        dev = self._dev
        if dev is None:
            raise NotConnectedError(self.name, command, "not connected")
        with self._vendor(command):
            return getattr(dev, command)(*args)

    def _check(self, command: str, *args: Any) -> None:
        """A setter: its return code must be 0."""
        code = self._call(command, *args)
        if code != 0:
            text = getattr(self._dev, "err_dict", {}).get(code, "unknown error")
            raise InstrumentReportedError(self.name, command, f"error {code!r}: {text}")

    def _channel(self, command: str, channel: int) -> int:
        if channel not in self.options.channels:
            raise OutOfRangeError(
                self.name, command, f"channel {channel} is not one of {self.options.channels}"
            )
        return int(channel)

    # --- Instrument --------------------------------------------------------------------

    def connect(self) -> None:
        with self._lock:
            if self._dev is not None:
                return
            module = load_vendor_module(self.options.vendor_module)
            try:
                dev = module.QuTAG()
            except Exception as exc:
                raise DriverUnavailableError(self.name, "QuTAG()", repr(exc)) from exc
            self._dev = dev
            try:
                if self._call("getDeviceType") == DEVTYPE_NONE:
                    raise DriverUnavailableError(self.name, "getDeviceType", "no quTAG found")
                n = self._call("getChannelCount")
                if not isinstance(n, int) or max(self.options.channels) > n:
                    raise ProtocolError(
                        self.name,
                        "getChannelCount",
                        f"{n!r} channels, need {self.options.channels}",
                    )
                timebase_s = float(self._call("getTimebase"))
                if not 1e-15 <= timebase_s <= 1e-9:
                    raise ProtocolError(self.name, "getTimebase", f"time base {timebase_s} s")
                self._timebase_ps = timebase_s * 1e12
                self._configure()
                self.check_settings()  # after a close: the quTAG may have been power-cycled
            except InstrumentError:
                self._release()
                raise

    def _configure(self) -> None:
        """Connect-time setup: the channels enabled and the counters' exposure (the
        wrapper reads neither back, so they are made again whenever a restore runs)."""
        bits = "".join(
            "1" if c in self.options.channels else "0"
            for c in range(max(self.options.channels), 0, -1)
        )
        self._check("enableChannels", False, bits)
        self._check("setExposureTime", self.options.exposure_ms)

    def check_settings(self) -> None:
        """Read back the delays, thresholds, edges and clock source set through this
        driver; put them back (after the connect-time setup) if the quTAG lost them.
        On failure the library is released: NotConnectedError until the next connect."""
        with self._lock:
            self.memory.restore(self._configure, self._release)

    def _release(self) -> None:
        dev, self._dev = self._dev, None
        self._streaming = False
        if dev is not None:
            with suppress(Exception):  # closing must not fail
                dev.deInitialize()

    def close(self) -> None:
        with self._lock:
            self._release()

    def identify(self) -> str:
        kind = self._call("getDeviceType")
        n = self._call("getChannelCount")
        version = self._call("getVersion")
        return f"qutools,quTAG,type {kind},{n} channels,library {version}"

    def safe_state(self) -> None:
        self.stop_stream()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            if self._call("getDeviceType") == DEVTYPE_NONE:
                return InstrumentHealth(HealthLevel.FAULT, "no quTAG connected")
            self.check_settings()
            return InstrumentHealth(HealthLevel.OK, "vendor library answers")

        return self.memory.report(health_check(self.name, probe))

    # --- settings --------------------------------------------------------------------------

    def channels(self) -> list[int]:
        return list(self.options.channels)

    def set_input_delay_ps(self, channel: int, delay_ps: int) -> None:
        ch = self._channel("setChannelDelay", channel)
        lo, hi = self.options.delay_range_ps
        v = check_range(self.name, "setChannelDelay", "delay", delay_ps, (lo, hi), "ps")
        delay = round(v)
        self._check("setChannelDelay", ch, delay)
        self.memory.remember(
            f"input_delay_ps[{ch}]",
            float(delay),
            lambda: self.set_input_delay_ps(ch, delay),
            lambda: float(self.input_delay_ps(ch)),
        )

    def input_delay_ps(self, channel: int) -> int:
        value = self._call("getChannelDelay", self._channel("getChannelDelay", channel))
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise ProtocolError(self.name, "getChannelDelay", f"got {value!r}")
        return int(value)

    def _conditioning(self, channel: int) -> tuple[bool, float]:
        value = self._call("getSignalConditioning", channel)
        with self._vendor("getSignalConditioning"):
            rising, threshold = value
            threshold_v = float(threshold)
        if not math.isfinite(threshold_v):
            raise ProtocolError(self.name, "getSignalConditioning", f"threshold {threshold_v}")
        return bool(rising), threshold_v

    def set_trigger_level_v(self, channel: int, level_v: float) -> None:
        ch = self._channel("setSignalConditioning", channel)
        v = check_range(
            self.name,
            "setSignalConditioning",
            "threshold",
            level_v,
            self.options.threshold_range_v,
            "V",
        )
        rising, _ = self._conditioning(ch)
        self._check("setSignalConditioning", ch, SCOND_MISC, rising, v)
        self.memory.remember(
            f"trigger_level_v[{ch}]",
            v,
            lambda: self.set_trigger_level_v(ch, v),
            lambda: self.trigger_level_v(ch),
            tolerance=1e-3,
        )

    def trigger_level_v(self, channel: int) -> float:
        return self._conditioning(self._channel("getSignalConditioning", channel))[1]

    def set_edge(self, channel: int, edge: Edge) -> None:
        ch = self._channel("setSignalConditioning", channel)
        chosen = check_choice(self.name, "setSignalConditioning", Edge, edge)
        _, threshold_v = self._conditioning(ch)
        self._check("setSignalConditioning", ch, SCOND_MISC, chosen is Edge.RISING, threshold_v)
        self.memory.remember(
            f"edge[{ch}]",
            chosen.name,
            lambda: self.set_edge(ch, chosen),
            lambda: self.edge(ch).name,
        )

    def edge(self, channel: int) -> Edge:
        rising, _ = self._conditioning(self._channel("getSignalConditioning", channel))
        return Edge.RISING if rising else Edge.FALLING

    def set_reference_clock(self, source: ReferenceClock) -> None:
        chosen = check_choice(self.name, "enableExternalClock", ReferenceClock, source)
        self._check("enableExternalClock", chosen is ReferenceClock.EXTERNAL)
        # read back as the lock state: an external clock that is set but absent is lost
        self.memory.remember(
            "reference_clock",
            chosen.name,
            lambda: self.set_reference_clock(chosen),
            lambda: self.reference_clock().name,
        )

    def reference_clock(self) -> ReferenceClock:
        """EXTERNAL while the quTAG reports itself locked to an external clock."""
        value = self._call("getClockState")
        with self._vendor("getClockState"):
            locked, _uplink = value
        return ReferenceClock.EXTERNAL if locked else ReferenceClock.INTERNAL

    def resolution_ps(self) -> float:
        if self._dev is None:
            raise NotConnectedError(self.name, "getTimebase", "not connected")
        return self._timebase_ps

    def count_rates_hz(self) -> dict[int, float]:
        """Counts of the last exposure period (``options.exposure_ms``) per second."""
        value = self._call("getCoincCounters")
        with self._vendor("getCoincCounters"):
            counts = np.asarray(value[0], dtype=np.float64)
        if counts.ndim != 1 or len(counts) <= max(self.options.channels):
            raise ProtocolError(self.name, "getCoincCounters", f"{counts.shape} counters")
        window_s = self.options.exposure_ms / 1000
        return {c: float(counts[c]) / window_s for c in self.options.channels}

    # --- streaming ---------------------------------------------------------------------

    def start_stream(self) -> None:
        """Empty the library's buffer and the data-lost flag; tags from now on."""
        with self._lock:
            self._call("getLastTimestamps", True)
            self._call("getDataLost")
            self._streaming = True

    def read_block(self, timeout_s: float) -> TagBlock | None:
        """Tags since the previous call, polling until some arrive or ``timeout_s`` ends."""
        if not self._streaming:
            raise NotConnectedError(self.name, "read_block", "stream not started")
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                value = self._call("getLastTimestamps", True)
                with self._vendor("getLastTimestamps"):
                    stamps, chans, valid = value
                    valid = int(valid)
                    stamps = np.asarray(stamps, dtype=np.int64)[:valid]
                    chans = np.asarray(chans, dtype=np.int64)[:valid]
                if len(stamps) != valid or len(chans) != valid or valid < 0:
                    raise ProtocolError(
                        self.name, "getLastTimestamps", f"{valid} valid of {len(stamps)} stamps"
                    )
                lost = self._call("getDataLost")
            if valid or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        overflow = bool(lost)
        if not valid and not overflow:
            return None
        keep = np.isin(chans, self.options.channels)
        tags = np.empty(int(keep.sum()), dtype=TAG_DTYPE)
        tags["channel"] = chans[keep]
        tags["time_ps"] = np.round(stamps[keep].astype(np.float64) * self._timebase_ps).astype(
            np.int64
        )
        if len(tags) > 1 and np.any(np.diff(tags["time_ps"]) < 0):
            tags = tags[np.argsort(tags["time_ps"], kind="stable")]
        start = int(tags["time_ps"][0]) if len(tags) else 0
        stop = int(tags["time_ps"][-1]) + 1 if len(tags) else 0
        return TagBlock(tags, overflow=overflow, start_ps=start, stop_ps=stop)

    def stop_stream(self) -> None:
        self._streaming = False
