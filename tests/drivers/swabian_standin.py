"""A stand-in for Swabian's ``TimeTagger`` Python module, shaped like the vendor's API.

Only the part of the API the driver uses, with the vendor's shapes (see the docstring of
``drivers/swabian.py`` for the sources):

- ``TimeTagStreamBuffer``: ``size``, ``hasOverflows``, ``tStart``, ``tGetData`` are *data
  members* (public fields of the C++ class, plain attributes in Python); ``getTimestamps``,
  ``getChannels``, ``getEventTypes``, ``getMissedEvents``, ``getOverflows`` are methods
  returning numpy arrays. Times are picoseconds.
- Event types: 0 time tag, 1 error, 2 overflow begin, 3 overflow end, 4 missed events.
- Measurements (``IteratorBase``) start when created; ``start``, ``startFor(capture_duration_ps,
  clear=True)``, ``stop``, ``clear``, ``isRunning``, ``waitUntilFinished(timeout_ms=-1)``,
  ``getCaptureDuration``.
- ``Countrate.getData`` is the *average* rate since the first tag after creation or the last
  ``clear()``; ``getCountsTotal`` the counts since then.
- ``TimeTagStream.getData`` hands over everything stored since the previous call and clears.
- Vendor calls fail with ``RuntimeError``/``ValueError``, as the SWIG wrapper raises them.

The hardware behind it is a :class:`SimDevice` with a clock the test advances: each channel
ticks at a set rate (evenly spaced tags, so counts are exact), and :meth:`SimDevice.overflow`
models the on-device buffer overflowing (overflow begin/end records, tags dropped, then
missed-events records). ``waitUntilFinished`` advances the clock, as time passes on the real
device while the caller blocks. Not modelled: a full ``TimeTagStream`` buffer (extra events
are dropped unflagged), virtual channels, falling edges.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

TIME_TAG, ERROR, OVERFLOW_BEGIN, OVERFLOW_END, MISSED_EVENTS = 0, 1, 2, 3, 4
PS_PER_S = 10**12


@dataclass
class _Events:
    """Events in time order, one entry per event (the vendor's 16-byte Tag, split)."""

    types: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros(0, np.uint8))
    missed: npt.NDArray[np.uint16] = field(default_factory=lambda: np.zeros(0, np.uint16))
    channels: npt.NDArray[np.int32] = field(default_factory=lambda: np.zeros(0, np.int32))
    times_ps: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    def select(self, index: npt.NDArray[np.bool_] | npt.NDArray[np.intp]) -> _Events:
        """The events picked by a boolean mask or an index array."""
        return _Events(
            self.types[index], self.missed[index], self.channels[index], self.times_ps[index]
        )

    @staticmethod
    def concat(parts: Iterable[_Events]) -> _Events:
        parts = list(parts)
        if not parts:
            return _Events()
        ev = _Events(
            np.concatenate([p.types for p in parts]),
            np.concatenate([p.missed for p in parts]),
            np.concatenate([p.channels for p in parts]),
            np.concatenate([p.times_ps for p in parts]),
        )
        return ev.select(np.argsort(ev.times_ps, kind="stable"))


class SimDevice:
    """The simulated hardware: a clock in ps, per-channel rates, settings, injected faults."""

    def __init__(
        self,
        serial: str = "2138000ABC",
        model: str = "Time Tagger Ultra",
        channels: Iterable[int] = (1, 2, 3, 4),
    ) -> None:
        self.serial = serial
        self.model = model
        self.channels = list(channels)
        self.now_ps = 0
        self.rates_hz: dict[int, float] = {}
        self.input_delay_ps: dict[int, int] = {c: 0 for c in self.channels}
        self.trigger_level_v: dict[int, float] = {c: 0.5 for c in self.channels}
        self.faults: dict[str, Exception] = {}
        #: A stalled pipeline: the clock runs but measurements see no data (USB or CPU stall).
        self.stalled = False
        #: Called at the start of every ``TimeTagStream.getData``: what happens between polls.
        self.poll_hook: Callable[[], None] | None = None
        self.in_use = False
        self._phase: dict[int, float] = {}
        self._measurements: list[IteratorBase] = []

    # --- test controls ---------------------------------------------------------------

    def set_rate(self, channel: int, rate_hz: float) -> None:
        self.rates_hz[channel] = rate_hz

    def power_cycle(self) -> None:
        """Off and on: input delays and trigger levels back at their defaults."""
        self.input_delay_ps = {c: 0 for c in self.channels}
        self.trigger_level_v = {c: 0.5 for c in self.channels}

    def fail(self, call: str, exc: Exception) -> None:
        """Make the vendor call ``call`` (e.g. ``"Countrate.getData"``) raise ``exc``."""
        self.faults[call] = exc

    def heal(self) -> None:
        self.faults.clear()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: channels tick at their rates, measurements see the tags."""
        self.advance_to(self.now_ps + round(seconds * PS_PER_S))

    def advance_to(self, t_ps: int) -> None:
        t0 = self.now_ps
        if t_ps <= t0:
            return
        self._deliver(self._tags(t0, t_ps), t0, t_ps)

    def overflow(self, seconds: float) -> dict[int, int]:
        """The on-device buffer overflows for ``seconds``: the tags of that interval are lost,
        framed by overflow begin/end records and followed by one missed-events record per
        channel (its count capped at 65535, the field being 16 bits). Returns the lost counts."""
        t0 = self.now_ps
        t1 = t0 + round(seconds * PS_PER_S)
        lost = self._tags(t0, t1)
        counts = {c: int((lost.channels == c).sum()) for c in self.channels}
        rec_ch = [c for c in self.channels if counts[c]]
        ev = _Events(
            np.array([OVERFLOW_BEGIN, OVERFLOW_END] + [MISSED_EVENTS] * len(rec_ch), np.uint8),
            np.array([0, 0] + [min(counts[c], 65535) for c in rec_ch], np.uint16),
            np.array([0, 0, *rec_ch], np.int32),
            np.array([t0, t1] + [t1] * len(rec_ch), np.int64),
        )
        self._deliver(ev, t0, t1)
        return counts

    # --- internals -------------------------------------------------------------------

    def check(self, call: str) -> None:
        exc = self.faults.get(call)
        if exc is not None:
            raise exc

    def _tags(self, t0: int, t1: int) -> _Events:
        parts = []
        dt_s = (t1 - t0) / PS_PER_S
        for ch in self.channels:
            rate = self.rates_hz.get(ch, 0.0)
            phase = self._phase.get(ch, 0.0)
            if rate <= 0:
                continue
            total = phase + rate * dt_s
            n = math.floor(total)
            self._phase[ch] = total - n
            # the cumulative count crosses k at t0 + (k - phase) / rate, k = 1..n
            k = np.arange(1, n + 1, dtype=np.float64)
            times = t0 + np.round((k - phase) / rate * PS_PER_S).astype(np.int64)
            times += self.input_delay_ps.get(ch, 0)
            parts.append(
                _Events(
                    np.zeros(n, np.uint8),
                    np.zeros(n, np.uint16),
                    np.full(n, ch, np.int32),
                    times,
                )
            )
        return _Events.concat(parts)

    def _deliver(self, ev: _Events, t0: int, t1: int) -> None:
        self.now_ps = t1
        if self.stalled:
            return
        for m in list(self._measurements):
            m._feed(ev, t0, t1)


# --- the vendor's classes ----------------------------------------------------------------


class TimeTagger:
    """A connected Time Tagger (what ``createTimeTagger`` returns)."""

    def __init__(self, device: SimDevice) -> None:
        self._device = device

    def _known(self, call: str, channel: int) -> None:
        self._device.check(call)
        if channel not in self._device.channels:
            raise ValueError(f"{call}: channel {channel} does not exist")

    def getSerial(self) -> str:
        self._device.check("TimeTagger.getSerial")
        return self._device.serial

    def getModel(self) -> str:
        self._device.check("TimeTagger.getModel")
        return self._device.model

    def getChannelList(self, type: int = 0) -> list[int]:
        self._device.check("TimeTagger.getChannelList")
        return list(self._device.channels)

    def setInputDelay(self, channel: int, delay: int) -> None:
        self._known("TimeTagger.setInputDelay", channel)
        self._device.input_delay_ps[channel] = int(delay)

    def getInputDelay(self, channel: int) -> int:
        self._known("TimeTagger.getInputDelay", channel)
        return self._device.input_delay_ps[channel]

    def setTriggerLevel(self, channel: int, voltage: float) -> None:
        self._known("TimeTagger.setTriggerLevel", channel)
        self._device.trigger_level_v[channel] = float(voltage)

    def getTriggerLevel(self, channel: int) -> float:
        self._known("TimeTagger.getTriggerLevel", channel)
        return self._device.trigger_level_v[channel]


class IteratorBase:
    """Common methods of every measurement; a measurement runs from its creation."""

    def __init__(self, tagger: TimeTagger, name: str) -> None:
        self._name = name
        self._device = tagger._device
        self._device.check(f"{name}.__init__")
        self._running = True
        self._stop_at_ps: int | None = None
        self._capture_ps = 0
        self._clear_impl()
        self._device._measurements.append(self)

    def start(self) -> None:
        self._device.check(f"{self._name}.start")
        self._running, self._stop_at_ps = True, None

    def startFor(self, capture_duration: int, clear: bool = True) -> None:
        self._device.check(f"{self._name}.startFor")
        if capture_duration <= 0:
            raise ValueError("capture_duration must be positive")
        if clear:
            self.clear()
        self._running = True
        self._stop_at_ps = self._device.now_ps + int(capture_duration)

    def stop(self) -> None:
        self._device.check(f"{self._name}.stop")
        self._running = False

    def clear(self) -> None:
        self._device.check(f"{self._name}.clear")
        self._capture_ps = 0
        self._clear_impl()

    def isRunning(self) -> bool:
        return self._running

    def getCaptureDuration(self) -> int:
        return self._capture_ps

    def waitUntilFinished(self, timeout: int = -1) -> bool:
        """Block until a ``startFor`` run ends (the clock advances); ``timeout`` in ms."""
        self._device.check(f"{self._name}.waitUntilFinished")
        if not self._running:
            return True
        if self._stop_at_ps is None or self._device.stalled:
            if timeout < 0:
                raise AssertionError("stand-in: waitUntilFinished() would block forever")
            self._device.advance(timeout / 1e3)
            return False
        remaining_ps = self._stop_at_ps - self._device.now_ps
        if timeout >= 0 and timeout * 10**9 < remaining_ps:
            self._device.advance(timeout / 1e3)
            return False
        self._device.advance_to(self._stop_at_ps)
        return True

    def _feed(self, ev: _Events, t0: int, t1: int) -> None:
        if not self._running:
            return
        if self._stop_at_ps is not None and t1 >= self._stop_at_ps:
            t1 = self._stop_at_ps
            ev = ev.select(ev.times_ps < t1)
            self._running = False
        self._capture_ps += max(0, t1 - t0)
        self._next(ev, t0, t1)

    def _clear_impl(self) -> None:
        raise NotImplementedError

    def _next(self, ev: _Events, t0: int, t1: int) -> None:
        raise NotImplementedError


class Countrate(IteratorBase):
    """Average rate on each channel since the first tag after creation or ``clear()``."""

    def __init__(self, tagger: TimeTagger, channels: Iterable[int]) -> None:
        self._channels = [int(c) for c in channels]
        super().__init__(tagger, "Countrate")

    def _clear_impl(self) -> None:
        self._counts = np.zeros(len(self._channels), np.int64)
        self._first_ps: int | None = None
        self._last_ps: int | None = None

    def _next(self, ev: _Events, t0: int, t1: int) -> None:
        tags = ev.select((ev.types == TIME_TAG) & np.isin(ev.channels, self._channels))
        for i, c in enumerate(self._channels):
            self._counts[i] += int((tags.channels == c).sum())
        if self._first_ps is None and len(tags.times_ps):
            self._first_ps = int(tags.times_ps[0])
        self._last_ps = t1

    def getData(self) -> npt.NDArray[np.float64]:
        self._device.check("Countrate.getData")
        if self._first_ps is None or self._last_ps is None or self._last_ps <= self._first_ps:
            return np.zeros(len(self._channels), np.float64)
        return self._counts / ((self._last_ps - self._first_ps) / PS_PER_S)

    def getCountsTotal(self) -> npt.NDArray[np.int64]:
        self._device.check("Countrate.getCountsTotal")
        return self._counts.copy()


class TimeTagStreamBuffer:
    """What ``TimeTagStream.getData`` returns; the four fields are data members."""

    def __init__(self, ev: _Events, has_overflows: bool, t_start: int, t_get_data: int) -> None:
        self._ev = ev
        self.size = len(ev.types)
        self.hasOverflows = has_overflows
        self.tStart = t_start
        self.tGetData = t_get_data

    def getTimestamps(self) -> npt.NDArray[np.int64]:
        return self._ev.times_ps.copy()

    def getChannels(self) -> npt.NDArray[np.int32]:
        return self._ev.channels.copy()

    def getEventTypes(self) -> npt.NDArray[np.uint8]:
        return self._ev.types.copy()

    def getMissedEvents(self) -> npt.NDArray[np.uint16]:
        return self._ev.missed.copy()

    def getOverflows(self) -> npt.NDArray[np.uint8]:  # deprecated by the vendor
        flags: npt.NDArray[np.uint8] = (self._ev.types != TIME_TAG).astype(np.uint8)
        return flags


class TimeTagStream(IteratorBase):
    """Stores the events of ``channels`` (and the overflow records) until ``getData``."""

    def __init__(self, tagger: TimeTagger, n_max_events: int, channels: Iterable[int]) -> None:
        if n_max_events <= 0:
            raise ValueError("n_max_events must be positive")
        self._n_max = int(n_max_events)
        self._channels = [int(c) for c in channels]
        super().__init__(tagger, "TimeTagStream")

    def _clear_impl(self) -> None:
        self._parts: list[_Events] = []
        self._stored = 0
        self._overflow = False
        self._t_start_ps = self._device.now_ps

    def _next(self, ev: _Events, t0: int, t1: int) -> None:
        keep = np.isin(ev.channels, self._channels) | np.isin(
            ev.types, [ERROR, OVERFLOW_BEGIN, OVERFLOW_END]
        )
        ev = ev.select(keep)
        if (ev.types != TIME_TAG).any():
            self._overflow = True
        room = self._n_max - self._stored
        if len(ev.types) > room:
            ev = ev.select(np.arange(len(ev.types)) < room)
        self._parts.append(ev)
        self._stored += len(ev.types)

    def getCounts(self) -> int:
        return self._stored

    def getData(self) -> TimeTagStreamBuffer:
        if self._device.poll_hook is not None:
            self._device.poll_hook()
        self._device.check("TimeTagStream.getData")
        now = self._device.now_ps
        buf = TimeTagStreamBuffer(
            _Events.concat(self._parts), self._overflow, self._t_start_ps, now
        )
        self._parts, self._stored, self._overflow = [], 0, False
        self._t_start_ps = now
        return buf


def make_module(*devices: SimDevice) -> types.ModuleType:
    """A module object named ``TimeTagger`` serving ``devices`` (one default device if none)."""
    pool = list(devices) or [SimDevice()]
    mod = types.ModuleType("TimeTagger", "stand-in for Swabian's TimeTagger package")

    def createTimeTagger(serial: str = "", resolution: int = 0) -> TimeTagger:
        for dev in pool:
            if serial in ("", dev.serial) and not dev.in_use:
                dev.check("createTimeTagger")
                dev.in_use = True
                return TimeTagger(dev)
        raise RuntimeError(f"No Time Tagger with serial '{serial}' available")

    def freeTimeTagger(tagger: TimeTagger) -> bool:
        tagger._device.in_use = False
        tagger._device._measurements.clear()
        return True

    def scanTimeTagger() -> list[str]:
        return [d.serial for d in pool if not d.in_use]

    mod.__dict__.update(
        createTimeTagger=createTimeTagger,
        freeTimeTagger=freeTimeTagger,
        scanTimeTagger=scanTimeTagger,
        TimeTagger=TimeTagger,
        IteratorBase=IteratorBase,
        Countrate=Countrate,
        TimeTagStream=TimeTagStream,
        TimeTagStreamBuffer=TimeTagStreamBuffer,
    )
    return mod
