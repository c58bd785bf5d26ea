"""Swabian Instruments Time Tagger (20 / Ultra / X) through the vendor's Python package.

The ``TimeTagger`` module ships with Swabian's installer (it is not on PyPI); when it is
missing, :meth:`SwabianTimeTagger.connect` raises :class:`DriverUnavailableError`. Vendor
calls used: ``createTimeTagger(serial)``, ``freeTimeTagger``, ``getSerial``, ``getModel``,
``getChannelList``, ``setInputDelay``/``getInputDelay``, ``setTriggerLevel``/
``getTriggerLevel``, ``TimeTagStream(tagger, n_max_events, channels)`` with ``getData()``
(``getTimestamps``, ``getChannels``, ``getEventTypes``, ``getMissedEvents``,
``getTStart``, ``getTGet``...), and ``Countrate(tagger, channels).getData()``.
Tag times are already in picoseconds.
"""

from __future__ import annotations

import importlib
import threading
import time
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import Field

from drivers.common import DriverOptions, health_check
from drivers.errors import DriverUnavailableError, InstrumentError, NotConnectedError, ProtocolError
from drivers.interfaces import TAG_DTYPE, HealthLevel, InstrumentHealth, TagBlock, TimeTagger

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
    countrate_window_s: float = Field(0.1, gt=0, le=10)


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

    def _vendor_call(self, command: str, fn: Any, *args: Any) -> Any:
        if self._tagger is None:
            raise NotConnectedError(self.name, command, "not connected")
        try:
            return fn(*args)
        except InstrumentError:
            raise
        except Exception as exc:  # vendor raises RuntimeError/ValueError for device faults
            raise ProtocolError(self.name, command, f"vendor API: {exc}") from exc

    def connect(self) -> None:
        with self._lock:
            if self._tagger is not None:
                return
            tt = load_vendor_module()
            try:
                self._tagger = tt.createTimeTagger(self.serial)
            except Exception as exc:
                raise DriverUnavailableError(self.name, "createTimeTagger", str(exc)) from exc
            self._tt = tt
            self._countrate = tt.Countrate(self._tagger, self.options.channels)

    def close(self) -> None:
        with self._lock:
            tagger, self._tagger = self._tagger, None
            self._stream = self._countrate = None
            if tagger is not None and self._tt is not None:
                try:
                    self._tt.freeTimeTagger(tagger)
                except Exception:
                    pass

    def identify(self) -> str:
        t = self._tagger
        return str(self._vendor_call("identify", lambda: f"Swabian,{t.getModel()},{t.getSerial()}"))

    def safe_state(self) -> None:
        with self._lock:
            if self._stream is not None:
                self.stop_stream()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.identify()
            return InstrumentHealth(HealthLevel.OK, "vendor API answers")

        return health_check(self.name, probe)

    def channels(self) -> list[int]:
        return list(self.options.channels)

    def set_input_delay_ps(self, channel: int, delay_ps: int) -> None:
        self._vendor_call(
            "setInputDelay",
            self._tagger.setInputDelay if self._tagger else None,
            channel,
            int(delay_ps),
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
        stream = self._stream
        if stream is None:
            raise NotConnectedError(self.name, "read_block", "stream not started")
        deadline = time.monotonic() + timeout_s
        while True:
            buf = self._vendor_call("TimeTagStream.getData", stream.getData)
            ts = np.asarray(buf.getTimestamps(), dtype=np.int64)
            if len(ts) or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if not len(ts):
            return None
        types = np.asarray(buf.getEventTypes())
        keep = types == _EVENT_TIMETAG
        tags = np.empty(int(keep.sum()), dtype=TAG_DTYPE)
        tags["channel"] = np.asarray(buf.getChannels())[keep]
        tags["time_ps"] = ts[keep]
        missed = int(np.asarray(buf.getMissedEvents()).sum())
        return TagBlock(
            tags,
            overflow=bool(buf.hasOverflows()) or bool((~keep).any()),
            missed_events=missed,
            start_ps=int(buf.getTStart()),
            stop_ps=int(buf.getTGetData()),
        )

    def stop_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
            if stream is not None:
                self._vendor_call("TimeTagStream.stop", stream.stop)

    def count_rates_hz(self) -> dict[int, float]:
        rates = self._vendor_call(
            "Countrate.getData", self._countrate.getData if self._countrate else None
        )
        return {c: float(r) for c, r in zip(self.options.channels, rates, strict=False)}
