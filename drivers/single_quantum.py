"""Single Quantum SNSPD driver (Eos/Atlas controller) over its TCP JSON protocol.

Source: Single Quantum's Python control library for the SNSPD driver, ``WebSQControl.py``
(Single Quantum B.V., MIT licence; the library the vendor distributes for remote control of
the controller, whose docstring says it implements "many functions that can be found in the
SNSPD manual"). The manual itself was not read here. What the library specifies:

* Control on TCP port 12000. The client sends JSON objects back to back, no terminator;
  the controller sends JSON objects each followed by ``\\x17`` (ETB), several may arrive
  in one read.
* ``{"request": "labelProps", "value": "None"}`` makes the controller send every label as
  ``{"label": L, "value": {"value": V, ...}}``; afterwards each change of a label is
  broadcast as ``{"label": L, "value": V}``. A label containing ``Error`` carries an error
  text. This driver asks afresh before every read (and before every read-modify-write of
  a per-detector list) and waits for the broadcast that confirms each setting.
* Settings (one value per detector, lists indexed by detector)::

      {"command": "SetAllBiasCurrents", "label": "BiasCurrent", "value": [uA, ...]}
      {"command": "SetAllTriggerLevels", "label": "TriggerLevel", "value": [mV, ...]}
      {"command": "DetectorEnable", "label": "DetectorEnable", "value": true|false}
      {"command": "SetMeasurementPeriod", "label": "InptMeasurementPeriod", "value": ms}

  Bias currents lie within +-90.9 uA; the measurement period is at least 10 ms.
* ``{"request": "BiasVoltage"}`` refreshes label ``BiasVoltage`` (mV per detector);
  ``{"request": "TemperatureHistory"}`` sends ``temperature_long_memory``, a dict whose
  ``T`` list holds the cold-stage temperature in K (last entry newest).
* Counts on TCP port 12345: each measurement period one line ``time,c1,...,cN\\n``, the
  counts of each detector in that period.

One driver instance is one detector (``options.channel``) of the controller; settings
that are lists are read back, changed in that detector's place and written whole.
An SNSPD has no gate, efficiency preset, settable dead time or delay: those members raise
:class:`NotSupportedError`. A latched nanowire (switched to its resistive state, counting
nothing) shows as a bias voltage above ``options.latched_bias_voltage_mv`` while enabled.
Every public method raises only :class:`drivers.errors.InstrumentError` subclasses.
"""

from __future__ import annotations

import json
import math
import select
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field

from drivers.common import DriverOptions, check_range, health_check
from drivers.errors import (
    ConnectionLostError,
    DriverConfigError,
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    NotConnectedError,
    ProtocolError,
)
from drivers.interfaces import (
    DetectorStatus,
    HealthLevel,
    InstrumentHealth,
    SinglePhotonDetector,
    not_supported,
)
from drivers.restore import SettingsMemory
from drivers.transports.base import reopen_with_backoff

ETB = b"\x17"
MAX_BUFFER_BYTES = 1 << 20
BIAS_RANGE_UA = (-90.9, 90.9)


class SingleQuantumOptions(DriverOptions):
    channel: int = Field(1, ge=1, le=64, description="detector number on the controller (1-based)")
    counts_port: int = Field(12345, ge=1, le=65535)
    measurement_period_ms: int = Field(100, ge=10, le=60_000)
    trigger_level_range_mv: tuple[float, float] = (-1000.0, 1000.0)
    latched_bias_voltage_mv: float = Field(
        50.0, gt=0, description="an enabled detector above this bias voltage is latched"
    )


def parse_objects(text: str) -> list[Any]:
    """All JSON values in ``text`` written back to back (ValueError on anything else)."""
    decoder = json.JSONDecoder()
    out = []
    i = 0
    text = text.strip()
    while i < len(text):
        value, end = decoder.raw_decode(text, i)
        out.append(value)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def _number(instrument: str, label: str, value: Any) -> float:
    """A label's value as a number (ProtocolError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(instrument, label, f"expected a number, got {value!r:.60}")
    return float(value)


class SingleQuantumSnspd(SinglePhotonDetector):
    """``resource`` is ``tcp://HOST:12000`` (or ``HOST``, ``HOST:PORT``)."""

    Options = SingleQuantumOptions

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: SingleQuantumOptions | None = None,
    ) -> None:
        self.name = name
        self.options = options or SingleQuantumOptions()
        split = urlsplit(resource if "://" in resource else f"tcp://{resource}")
        if not split.hostname:
            raise DriverConfigError(name, "resource", f"no host in {resource!r}")
        self.host = split.hostname
        try:
            self.port = split.port or 12000
        except ValueError:
            raise DriverConfigError(name, "resource", f"bad port in {resource!r}") from None
        self.timeout_s = timeout_s
        self.dead_time_range_ns = (0.0, 0.0)
        self.delay_range_ps = (0.0, 0.0)
        self._lock = threading.RLock()
        self._control: socket.socket | None = None
        self._counts: socket.socket | None = None
        self._rx = b""
        self._counts_rx = b""
        self._labels: dict[str, Any] = {}
        self._detectors = 0
        self._wanted = False  # connect() was called and close() was not
        #: settings made through this driver, put back after a power cycle
        self.memory = SettingsMemory(name)

    # --- wire ---------------------------------------------------------------------------

    def _sock(self, command: str) -> socket.socket:
        """The control connection; after it was lost, reopened with backoff for at most
        ``options.reconnect_timeout_s`` (then ConnectionLostError)."""
        if self._control is None:
            if not self._wanted:
                raise NotConnectedError(self.name, command, "not connected")
            reopen_with_backoff(
                self.name,
                command,
                lambda: self._open_control(command),
                self.options.reconnect_timeout_s,
            )
            self.check_settings()  # a controller that was switched off is back at defaults
            if self._control is None:
                raise ConnectionLostError(self.name, command, "connection lost again")
        return self._control

    def check_settings(self) -> None:
        """Read back the settings made through this driver; put them back if the
        controller lost them (a power cycle). Raises SettingsLostError (or the error of
        the setting it refused) if that fails, and drops the connection so that the next
        call checks again."""
        with self._lock:
            self.memory.restore(lambda: None, self._drop)

    def _open_control(self, command: str) -> None:
        try:
            self._control = socket.create_connection((self.host, self.port), self.timeout_s)
        except OSError as exc:
            raise ConnectionLostError(
                self.name, command, f"cannot reach {self.host}:{self.port}: {exc}"
            ) from None

    def _send(self, message: dict[str, Any]) -> None:
        command = str(message.get("command") or message.get("request"))
        try:
            self._sock(command).sendall(json.dumps(message).encode())
        except OSError as exc:
            self._drop()
            raise ConnectionLostError(self.name, command, f"send failed: {exc}") from None

    def _pump(self, command: str, wait_s: float) -> bool:
        """Read what arrives within ``wait_s`` into the label cache; True if anything did."""
        sock = self._sock(command)
        try:
            ready, _, _ = select.select([sock], [], [], max(0.0, wait_s))
            if not ready:
                return False
            data = sock.recv(65536)
        except OSError as exc:
            self._drop()
            raise ConnectionLostError(self.name, command, f"receive failed: {exc}") from None
        if not data:
            self._drop()
            raise ConnectionLostError(self.name, command, "controller closed the connection")
        self._rx += data
        if len(self._rx) > MAX_BUFFER_BYTES:
            self._rx = b""
            raise ProtocolError(self.name, command, "no message terminator in 1 MiB of data")
        *frames, self._rx = self._rx.split(ETB)
        for frame in frames:
            self._absorb(command, frame)
        return True

    def _absorb(self, command: str, frame: bytes) -> None:
        try:
            objects = parse_objects(frame.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # nesting too deep to parse
            raise ProtocolError(self.name, command, f"not JSON: {frame[:60]!r}") from None
        for obj in objects:
            if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
                raise ProtocolError(self.name, command, f"not a label message: {obj!r:.60}")
            label, value = obj["label"], obj.get("value")
            if "Error" in label:
                raise InstrumentReportedError(self.name, command, f"controller: {value}")
            if isinstance(value, dict) and "value" in value:
                value = value["value"]
            self._labels[label] = value

    def _await_label(self, command: str, label: str, accept: Any = None) -> Any:
        """Read until ``label`` arrives (and satisfies ``accept``) or the timeout ends."""
        self._labels.pop(label, None)
        deadline = time.monotonic() + self.timeout_s
        while True:
            if label in self._labels and (accept is None or accept(self._labels[label])):
                return self._labels[label]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InstrumentTimeoutError(
                    self.name, command, f"no {label!r} within {self.timeout_s:g} s"
                )
            self._pump(command, remaining)

    def _label(self, label: str) -> Any:
        """Current value of ``label``, asked for afresh (``labelProps``): a value cached from
        broadcasts may be stale when another client or the front panel changed it and the
        broadcast was missed, and settings written as whole lists must not undo that."""
        with self._lock:
            self._send({"request": "labelProps", "value": "None"})
            return self._await_label(label, label)

    def _list(self, label: str, unit: str) -> list[float]:
        value = self._label(label)
        if (
            not isinstance(value, list)
            or len(value) < self._detectors
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in value
            )
        ):
            raise ProtocolError(self.name, label, f"expected {self._detectors} numbers in {unit}")
        return [float(v) for v in value]

    def _set_list(self, command: str, label: str, unit: str, value: float) -> None:
        """Write the whole list with this detector's entry changed; the broadcast that
        confirms it must carry the new value (InstrumentReportedError otherwise)."""
        with self._lock:
            values = self._list(label, unit)
            k = self.options.channel - 1
            values[k] = value
            self._send({"command": command, "label": label, "value": values})
            echoed = self._await_label(command, label)
            try:
                got = float(echoed[k])
            except (TypeError, ValueError, IndexError, KeyError):
                raise ProtocolError(self.name, command, f"{label} echoed {echoed!r:.60}") from None
            if not abs(got - value) <= 1e-6 * max(1.0, abs(value)):
                raise InstrumentReportedError(
                    self.name, command, f"controller set {label} to {got:g} {unit}, not {value:g}"
                )

    def _drop(self) -> None:
        for sock in (self._control, self._counts):
            if sock is not None:
                sock.close()
        self._control = self._counts = None
        self._rx = self._counts_rx = b""
        self._labels.clear()

    # --- Instrument ---------------------------------------------------------------------

    def connect(self) -> None:
        with self._lock:
            if self._control is not None:
                return
            self._open_control("connect")
            try:
                self._send({"request": "labelProps", "value": "None"})
                n = self._await_label("labelProps", "NumberOfDetectors")
                if not isinstance(n, int) or n < 1:
                    raise ProtocolError(self.name, "NumberOfDetectors", f"got {n!r}")
                if self.options.channel > n:
                    raise DriverConfigError(
                        self.name, "options.channel", f"controller has {n} detectors"
                    )
                self._detectors = n
                self._set_measurement_period()
            except InstrumentError:
                self._drop()
                raise
            self._wanted = True
            self.check_settings()  # after a close: the controller may have restarted

    def _set_measurement_period(self) -> None:
        """``options.measurement_period_ms``: count_rate_hz divides the counts by it."""
        period = self.options.measurement_period_ms
        with self._lock:
            self._send(
                {
                    "command": "SetMeasurementPeriod",
                    "label": "InptMeasurementPeriod",
                    "value": period,
                }
            )
            self._await_label("SetMeasurementPeriod", "InptMeasurementPeriod")
        self.memory.remember(
            "measurement_period_ms",
            float(period),
            self._set_measurement_period,
            lambda: _number(
                self.name, "InptMeasurementPeriod", self._label("InptMeasurementPeriod")
            ),
        )

    def close(self) -> None:
        with self._lock:
            self._wanted = False
            self._drop()

    def identify(self) -> str:
        n = self._label("NumberOfDetectors")
        return f"Single Quantum,SNSPD controller,{self.host}:{self.port},{n} detectors"

    def safe_state(self) -> None:
        """Bias off (DetectorEnable false): nothing counts, nothing latches. Never connected
        (or closed) means nothing to do; a lost connection is reopened for it, and raises
        when the controller cannot be reached (the bias may still be on)."""
        if self._wanted:
            self.disarm()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.check_settings()
            status = self.status()
            if status is DetectorStatus.LATCHED:
                return InstrumentHealth(HealthLevel.DEGRADED, "nanowire latched")
            return InstrumentHealth(HealthLevel.OK, status.name)

        return self.memory.report(health_check(self.name, probe))

    # --- SNSPD settings -----------------------------------------------------------------

    def set_bias_current_ua(self, bias_current_ua: float) -> None:
        v = check_range(
            self.name, "SetAllBiasCurrents", "bias current", bias_current_ua, BIAS_RANGE_UA, "uA"
        )
        self._set_list("SetAllBiasCurrents", "BiasCurrent", "uA", v)
        self.memory.remember(
            "bias_current_ua",
            v,
            lambda: self.set_bias_current_ua(v),
            self.bias_current_ua,
            tolerance=1e-3,
        )

    def bias_current_ua(self) -> float:
        return self._list("BiasCurrent", "uA")[self.options.channel - 1]

    def set_threshold_v(self, threshold_v: float) -> None:
        lo, hi = self.options.trigger_level_range_mv
        v = check_range(
            self.name,
            "SetAllTriggerLevels",
            "trigger level",
            threshold_v,
            (lo / 1e3, hi / 1e3),
            "V",
        )
        self._set_list("SetAllTriggerLevels", "TriggerLevel", "mV", v * 1e3)
        self.memory.remember(
            "threshold_v", v, lambda: self.set_threshold_v(v), self.threshold_v, tolerance=1e-6
        )

    def threshold_v(self) -> float:
        return self._list("TriggerLevel", "mV")[self.options.channel - 1] / 1e3

    def _enable(self, on: bool) -> None:
        if not on:
            self.memory.switching_off("armed")
        with self._lock:
            self._send({"command": "DetectorEnable", "label": "DetectorEnable", "value": on})
            self._await_label("DetectorEnable", "DetectorEnable", lambda v: v is on)
        self.memory.remember(
            "armed",
            on,
            lambda: self._enable(on),
            lambda: self._label("DetectorEnable") is True,
            enables=True,
        )

    def arm(self) -> None:
        """Enable the bias of all detectors of the controller (the protocol has one switch)."""
        self._enable(True)

    def disarm(self) -> None:
        self._enable(False)

    def reset_latch(self) -> None:
        """Bias off: the nanowire cools back to superconducting; DISARMED afterwards."""
        self._enable(False)

    def status(self) -> DetectorStatus:
        with self._lock:
            enabled = self._label("DetectorEnable")
            if not isinstance(enabled, bool):
                raise ProtocolError(self.name, "DetectorEnable", f"expected a boolean: {enabled!r}")
            if not enabled:
                return DetectorStatus.DISARMED
            self._send({"request": "BiasVoltage"})
            volts = self._await_label("BiasVoltage", "BiasVoltage")
            try:
                v_mv = float(volts[self.options.channel - 1])
            except (TypeError, ValueError, IndexError):
                raise ProtocolError(self.name, "BiasVoltage", f"got {volts!r:.60}") from None
            if abs(v_mv) > self.options.latched_bias_voltage_mv:
                return DetectorStatus.LATCHED
            return DetectorStatus.ARMED

    def temperature_k(self) -> float:
        with self._lock:
            self._send({"request": "TemperatureHistory"})
            memory = self._await_label("TemperatureHistory", "temperature_long_memory")
            try:
                value = float(memory["T"][-1])
            except (TypeError, KeyError, IndexError, ValueError):
                raise ProtocolError(
                    self.name, "TemperatureHistory", f"no cold-stage temperature in {memory!r:.60}"
                ) from None
            if not 0 < value < 400:
                raise ProtocolError(self.name, "TemperatureHistory", f"temperature {value} K")
            return value

    def count_rate_hz(self) -> float:
        """Counts of this detector in the newest complete measurement period, per second
        (waits for the next period when none arrived since the last call)."""
        with self._lock:
            line = self._next_counts_line()
        try:
            fields = [float(x) for x in line.split(",")]
        except ValueError:
            raise ProtocolError(self.name, "counts", f"not numbers: {line[:60]!r}") from None
        if len(fields) < self._detectors + 1:
            raise ProtocolError(self.name, "counts", f"{len(fields) - 1} counts in {line!r:.60}")
        counts = fields[self.options.channel]
        if not (math.isfinite(counts) and counts >= 0):
            raise ProtocolError(self.name, "counts", f"count {counts}")
        return counts / (self.options.measurement_period_ms / 1e3)

    def count_integration_s(self) -> float:
        """The counts' measurement period (``options.measurement_period_ms``), in s."""
        return self.options.measurement_period_ms / 1e3

    def _next_counts_line(self) -> str:
        self._sock("counts")
        if self._counts is None:
            try:
                self._counts = socket.create_connection(
                    (self.host, self.options.counts_port), self.timeout_s
                )
            except OSError as exc:
                raise ConnectionLostError(self.name, "counts", f"counts port: {exc}") from None
        deadline = time.monotonic() + self.timeout_s + self.options.measurement_period_ms / 1e3
        lines: list[bytes] = []
        while True:
            wait = 0.0 if lines else deadline - time.monotonic()
            if wait < 0:
                raise InstrumentTimeoutError(self.name, "counts", "no counts line in time")
            try:
                ready, _, _ = select.select([self._counts], [], [], wait)
                if not ready:
                    if lines:
                        return lines[-1].decode("ascii", "replace").strip()
                    continue
                data = self._counts.recv(65536)
            except OSError as exc:
                self._counts.close()
                self._counts = None
                raise ConnectionLostError(self.name, "counts", str(exc)) from None
            if not data:
                self._counts.close()
                self._counts = None
                raise ConnectionLostError(self.name, "counts", "counts port closed")
            self._counts_rx += data
            if len(self._counts_rx) > MAX_BUFFER_BYTES:
                self._counts_rx = b""
                raise ProtocolError(self.name, "counts", "no line end in 1 MiB")
            *complete, self._counts_rx = self._counts_rx.split(b"\n")
            lines += [c for c in complete if c.strip()]

    # --- what an SNSPD does not have ----------------------------------------------------

    def set_efficiency_pct(self, efficiency_pct: float) -> None:
        raise not_supported(self, "set_efficiency_pct", "efficiency preset (set the bias)")

    def efficiency_pct(self) -> float:
        raise not_supported(self, "efficiency_pct", "efficiency preset (set the bias)")

    def set_dead_time_ns(self, dead_time_ns: float) -> None:
        raise not_supported(self, "set_dead_time_ns", "settable dead time")

    def dead_time_ns(self) -> float:
        raise not_supported(self, "dead_time_ns", "settable dead time")

    def set_delay_ps(self, delay_ps: float) -> None:
        raise not_supported(self, "set_delay_ps", "detection delay")

    def delay_ps(self) -> float:
        raise not_supported(self, "delay_ps", "detection delay")
