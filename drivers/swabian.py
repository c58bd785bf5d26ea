"""Swabian Instruments Time Tagger (20 / Ultra / X) through the vendor's Python package.

The ``TimeTagger`` module ships with Swabian's installer (it is not on PyPI); when it is
missing, :meth:`SwabianTimeTagger.connect` raises :class:`DriverUnavailableError`.

Vendor API this driver relies on (Swabian's C++ headers ``TimeTagger.h``/``Iterators.h``,
which the Python module wraps, and the Time Tagger API manual at swabianinstruments.com,
pages "Time-tag streaming", "Event counting" and "Common methods"):

- ``createTimeTagger(serial)``, ``freeTimeTagger(tagger)``; on the tagger ``getSerial``,
  ``getModel``, ``setInputDelay``/``getInputDelay`` (ps), ``setTriggerLevel``/
  ``getTriggerLevel`` (V).
- ``TimeTagStream(tagger, n_max_events, channels)``; ``getData()`` "fetches all stored tags
  and clears the internal state" and returns a ``TimeTagStreamBuffer``. That class has the
  methods ``getTimestamps`` (ps), ``getChannels``, ``getEventTypes``, ``getMissedEvents``
  and the public *data members* ``size``, ``hasOverflows``, ``tStart``, ``tGetData`` (ps):
  in Python these are attributes, not methods. Event types: 0 time tag, 1 error,
  2 overflow begin, 3 overflow end, 4 missed events.
- ``Countrate(tagger, channels)``: ``getData()`` is the *average* rate "starting from the very
  first tag arriving after the instantiation or last call to clear()" and
  ``getCountsTotal()`` the counts since then, so neither is a current rate on its own.
- Every measurement (``IteratorBase``) runs from its creation and has ``clear``, ``start``,
  ``stop``, ``isRunning``, ``startFor(capture_duration_ps, clear=True)`` (stops itself after
  the duration) and ``waitUntilFinished(timeout_ms)`` (False on timeout).

So :meth:`SwabianTimeTagger.count_rates_hz` restarts the Countrate for
``options.countrate_window_s`` with ``startFor``, waits with ``waitUntilFinished`` and reads
``getData``: the rate over the last window, not since connect. Vendor calls raise Python
exceptions (``RuntimeError``, ``ValueError``...); every one, and any surprise in what a call
returns, leaves the public methods as a typed :class:`InstrumentError`.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import Field

from drivers.common import DriverOptions, health_check
from drivers.errors import (
    DriverUnavailableError,
    InstrumentError,
    InstrumentTimeoutError,
    NotConnectedError,
    ProtocolError,
)
from drivers.interfaces import TAG_DTYPE, HealthLevel, InstrumentHealth, TagBlock, TimeTagger
from drivers.restore import SettingsMemory

#: Event type 0 is a normal time tag; others (error, overflow begin/end, missed) are flags.
_EVENT_TIMETAG = 0


def load_vendor_module() -> ModuleType:
    """Import Swabian's ``TimeTagger`` package or raise DriverUnavailableError."""
    try:
        return importlib.import_module("TimeTagger")
    except ImportError as exc:
        raise DriverUnavailableError(
            "swabian_time_tagger",
            "import TimeTagger",
            "Swabian's TimeTagger Python package is not installed (it ships with the vendor's "
            "installer); use the 'timetag_file' driver to replay recordings instead",
        ) from exc


class SwabianOptions(DriverOptions):
    channels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    buffer_events: int = Field(10_000_000, ge=1000, description="TimeTagStream buffer size")
    countrate_window_s: float = Field(
        0.1, gt=0, le=10, description="count_rates_hz averages over this window (and blocks)"
    )


class SwabianTimeTagger(TimeTagger):
    """``resource`` is the tagger's serial number ('' = the first one found)."""

    Options = SwabianOptions

    def __init__(
        self,
        name: str,
        resource: str = "",
        timeout_s: float = 2.0,
        options: SwabianOptions | None = None,
    ) -> None:
        self.name = name
        self.serial = resource
        self.timeout_s = timeout_s
        self.options = options or SwabianOptions()
        self._lock = threading.RLock()
        self._tt: ModuleType | None = None
        self._tagger: Any = None
        self._stream: Any = None
        self._countrate: Any = None
        #: settings made through this driver, put back when the tagger lost them
        self.memory = SettingsMemory(name)

    @contextmanager
    def _vendor(self, command: str) -> Iterator[None]:
        """Vendor exceptions, and surprises in what a call returned, as ProtocolError."""
        try:
            yield
        except InstrumentError:
            raise
        except Exception as exc:  # the vendor raises RuntimeError/ValueError for device faults
            raise ProtocolError(self.name, command, f"vendor API: {exc!r}") from exc

    def _vendor_call(self, command: str, fn: Any, *args: Any) -> Any:
        if self._tagger is None:
            raise NotConnectedError(self.name, command, "not connected")
        with self._vendor(command):
            return fn(*args)

    def connect(self) -> None:
        with self._lock:
            if self._tagger is not None:
                return
            tt = load_vendor_module()
            try:
                self._tagger = tt.createTimeTagger(self.serial)
            except Exception as exc:
                raise DriverUnavailableError(self.name, "createTimeTagger", str(exc)) from exc
            try:
                with self._vendor("Countrate"):
                    self._countrate = tt.Countrate(self._tagger, self.options.channels)
            except InstrumentError:
                tagger, self._tagger = self._tagger, None
                with suppress(Exception):
                    tt.freeTimeTagger(tagger)
                raise
            self._tt = tt
            try:
                # another tagger than at the first connect (resource "" takes the first
                # one found): refuse it
                self.memory.check_identity(self.identify())
            except InstrumentError:
                self.close()
                raise
            self.memory.remember_identity(self.identify(), self.identify)
            self.check_settings()  # after a close: the tagger may have been power-cycled

    def check_settings(self) -> None:
        """Read back the input delays and trigger levels set through this driver; put them
        back if the tagger lost them (power-cycled, or replaced). On failure the tagger is
        released (NotConnectedError until the next connect)."""
        with self._lock:
            self.memory.restore(lambda: None, self.close)

    def close(self) -> None:
        with self._lock:
            tagger, self._tagger = self._tagger, None
            self._stream = self._countrate = None
            if tagger is not None and self._tt is not None:
                with suppress(Exception):  # closing must not fail; the handle is gone
                    self._tt.freeTimeTagger(tagger)

    def identify(self) -> str:
        t = self._tagger
        return str(self._vendor_call("identify", lambda: f"Swabian,{t.getModel()},{t.getSerial()}"))

    def safe_state(self) -> None:
        with self._lock:
            if self._stream is not None:
                self.stop_stream()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.check_settings()
            self.identify()
            return InstrumentHealth(HealthLevel.OK, "vendor API answers")

        return self.memory.report(health_check(self.name, probe))

    def channels(self) -> list[int]:
        return list(self.options.channels)

    def set_input_delay_ps(self, channel: int, delay_ps: int) -> None:
        self._vendor_call(
            "setInputDelay",
            self._tagger.setInputDelay if self._tagger else None,
            channel,
            int(delay_ps),
        )
        delay = int(delay_ps)
        self.memory.remember(
            f"input_delay_ps[{channel}]",
            float(delay),
            lambda: self.set_input_delay_ps(channel, delay),
            lambda: float(self.input_delay_ps(channel)),
        )

    def input_delay_ps(self, channel: int) -> int:
        return int(
            self._vendor_call(
                "getInputDelay", self._tagger.getInputDelay if self._tagger else None, channel
            )
        )

    def set_trigger_level_v(self, channel: int, level_v: float) -> None:
        self._vendor_call(
            "setTriggerLevel",
            self._tagger.setTriggerLevel if self._tagger else None,
            channel,
            float(level_v),
        )
        level = float(level_v)
        self.memory.remember(
            f"trigger_level_v[{channel}]",
            level,
            lambda: self.set_trigger_level_v(channel, level),
            lambda: self.trigger_level_v(channel),
            tolerance=1e-3,
        )

    def trigger_level_v(self, channel: int) -> float:
        return float(
            self._vendor_call(
                "getTriggerLevel", self._tagger.getTriggerLevel if self._tagger else None, channel
            )
        )

    def start_stream(self) -> None:
        with self._lock:
            tt = self._tt
            if tt is None or self._tagger is None:
                raise NotConnectedError(self.name, "start_stream", "not connected")
            self._stream = self._vendor_call(
                "TimeTagStream",
                tt.TimeTagStream,
                self._tagger,
                self.options.buffer_events,
                self.options.channels,
            )

    def read_block(self, timeout_s: float) -> TagBlock | None:
        """Poll the stream until events arrive or ``timeout_s`` passes.

        Polls that came back empty still count: the block starts at the first poll's
        ``tStart`` and carries any overflow they reported. Overflow records (error, overflow
        begin/end, missed events) are not tags; they set ``overflow`` and ``missed_events``.
        """
        stream = self._stream
        if stream is None:
            raise NotConnectedError(self.name, "read_block", "stream not started")
        deadline = time.monotonic() + timeout_s
        start_ps: int | None = None
        overflow = False
        with self._vendor("TimeTagStream.getData"):
            while True:
                buf = stream.getData()
                ts = np.asarray(buf.getTimestamps(), dtype=np.int64)
                overflow |= bool(buf.hasOverflows)
                if start_ps is None:
                    start_ps = int(buf.tStart)
                if len(ts) or time.monotonic() >= deadline:
                    break
                time.sleep(0.005)
            stop_ps = int(buf.tGetData)
            if not len(ts):
                if not overflow:
                    return None
                return TagBlock(np.empty(0, dtype=TAG_DTYPE), True, 0, start_ps, stop_ps)
            types = np.asarray(buf.getEventTypes())
            channels = np.asarray(buf.getChannels())
            missed = np.asarray(buf.getMissedEvents(), dtype=np.int64)
            if not (len(types) == len(channels) == len(missed) == len(ts)):
                raise ProtocolError(
                    self.name,
                    "TimeTagStream.getData",
                    f"buffer arrays differ in length ({len(ts)} timestamps, {len(types)} types, "
                    f"{len(channels)} channels, {len(missed)} missed counts)",
                )
        keep = types == _EVENT_TIMETAG
        tags = np.empty(int(keep.sum()), dtype=TAG_DTYPE)
        tags["channel"] = channels[keep]
        tags["time_ps"] = ts[keep]
        return TagBlock(
            tags,
            overflow=overflow or bool((~keep).any()),
            missed_events=int(missed.sum()),
            start_ps=start_ps,
            stop_ps=stop_ps,
        )

    def stop_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
            if stream is not None:
                self._vendor_call("TimeTagStream.stop", stream.stop)

    def count_rates_hz(self) -> dict[int, float]:
        """Rate on each channel over the next ``options.countrate_window_s`` (blocks that long).

        ``Countrate.getData`` alone is the average since connect; restarting the measurement
        with ``startFor`` (which clears it) makes it the average over one window.
        """
        with self._lock:
            countrate = self._countrate
            if self._tagger is None or countrate is None:
                raise NotConnectedError(self.name, "count_rates_hz", "not connected")
            window_s = self.options.countrate_window_s
            with self._vendor("Countrate.startFor"):
                countrate.startFor(round(window_s * 1e12), True)
            with self._vendor("Countrate.waitUntilFinished"):
                finished = bool(
                    countrate.waitUntilFinished(round((window_s + self.timeout_s) * 1e3))
                )
            if not finished:
                raise InstrumentTimeoutError(
                    self.name,
                    "Countrate.waitUntilFinished",
                    f"a {window_s} s count-rate window did not end within a further "
                    f"{self.timeout_s} s",
                )
            with self._vendor("Countrate.getData"):
                rates = np.asarray(countrate.getData(), dtype=np.float64).ravel()
        channels = self.options.channels
        if len(rates) != len(channels):
            raise ProtocolError(
                self.name,
                "Countrate.getData",
                f"{len(rates)} rates for {len(channels)} channels {channels}",
            )
        return {c: float(r) for c, r in zip(channels, rates, strict=True)}
