"""A gated detector whose gates come from an external generator, as one detector.

In a receiver box the gated InGaAs detector's gate often comes from outside: its clock
(gate) input is wired to a pulse generator, the Time Controller's generator output
(:mod:`drivers.idq_gate_generator`). The node knows one
:class:`~drivers.interfaces.SinglePhotonDetector` per channel; this driver is that
detector, built from two configured drivers:

* the gate's timing goes to the generator: :meth:`set_delay_ps` (the gate delay the
  detector-timing calibration scans), :meth:`set_gate_frequency_hz` (the period),
  :meth:`set_gate_width_ns` (the pulse width);
* everything else goes to the detector: efficiency, dead time, threshold, mode, arming,
  status, counts, temperature (the Aurea detector in gated mode, where its gates follow
  the clock input, ``getDetectionMode`` 1; any other detector driver).

Arming switches the generator's output on, then arms the detector; disarming and the
safe state do both, the detector first, and try the generator even when the detector
fails (the first error is raised after). A detector that reports ARMED while the gate
output is off counts nothing: :meth:`status` reports it DISARMED.

Options (``[instruments.<name>.options]``; ``resource`` of the composite is unused)::

    [instruments.spd0.options.generator]
    driver = "idq_gate_generator"
    resource = "tcp://192.168.10.42:5555"
    options = { output = 1, output_level = "TTL", trigger_link = "STAR" }

    [instruments.spd0.options.detector]
    driver = "aurea_spd"
    resource = ""

The parts are checked with the composite's options, before either is contacted: the
driver must exist and implement the right interface, and its options are validated by its
own model (a :class:`DriverConfigError` names ``options.generator`` and the part's key).

Whether the detector's gate is as wide as the generator's pulse depends on the detector:
one that makes its own gate on the clock edge ignores the width (docs/drivers.md).
"""

from __future__ import annotations

import math
import threading
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drivers.common import DriverOptions, check_range
from drivers.errors import DriverConfigError, InstrumentError, NotSupportedError
from drivers.interfaces import (
    DetectorMode,
    DetectorStatus,
    GateGenerator,
    HealthLevel,
    Instrument,
    InstrumentHealth,
    SinglePhotonDetector,
)
from drivers.restore import SettingsMemory, Value


class PartSpec(BaseModel):
    """One of the two instruments: a registered driver, its resource and options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    driver: str = Field(min_length=1, description="driver name, see `qkdnode drivers list`")
    resource: str = ""
    timeout_s: float | None = Field(None, gt=0, le=120, description="None: the composite's")
    options: dict[str, Any] = Field(default_factory=dict)


def _check_part(spec: PartSpec, interface: type) -> PartSpec:
    """``spec``, or ValueError when its driver is unknown, of the wrong interface, or its
    options do not validate (the message names the key: ``options.<key>``, ``driver``)."""
    from drivers import registry

    try:
        cls = registry.resolve(spec.driver)
        if not issubclass(cls, interface):
            raise ValueError(f"driver: {spec.driver!r} is not a {interface.__name__} driver")
        registry.validate_options(spec.driver, spec.driver, spec.options)
    except DriverConfigError as exc:
        where = "" if exc.command == "options" else f"{exc.command}: "
        raise ValueError(f"{where}{exc.reason}") from None
    return spec


class ExternallyGatedDetectorOptions(DriverOptions):
    generator: PartSpec = Field(description="the gate generator (a GateGenerator driver)")
    detector: PartSpec = Field(description="the detector (a SinglePhotonDetector driver)")
    gated_mode: bool = Field(
        True, description="set the detector to gated mode at connect, when it has the choice"
    )
    clock_tolerance: float | None = Field(
        0.01,
        gt=0,
        le=1,
        description="health: the detector's clock reading may differ from the gate "
        "frequency by this fraction while the gates are on (None: not compared)",
    )

    @field_validator("generator")
    @classmethod
    def _generator(cls, spec: PartSpec) -> PartSpec:
        return _check_part(spec, GateGenerator)

    @field_validator("detector")
    @classmethod
    def _detector(cls, spec: PartSpec) -> PartSpec:
        return _check_part(spec, SinglePhotonDetector)


def _nothing() -> None:
    """A view's setting is never applied."""


def _same(value: Value) -> Value:
    return value


def _build(spec: PartSpec, name: str, timeout_s: float) -> Instrument:
    from drivers import registry

    cls = registry.resolve(spec.driver)
    validated = registry.validate_options(spec.driver, name, spec.options)
    kwargs: dict[str, Any] = {"timeout_s": spec.timeout_s or timeout_s}
    if validated is not None:
        kwargs["options"] = validated
    return cls(name, spec.resource, **kwargs)  # type: ignore[call-arg]


class ExternallyGatedDetector(SinglePhotonDetector):
    """``resource`` is unused: the parts name their own (see the module)."""

    Options = ExternallyGatedDetectorOptions

    def __init__(
        self,
        name: str,
        resource: str = "",
        timeout_s: float = 2.0,
        options: ExternallyGatedDetectorOptions | None = None,
        *,
        generator: GateGenerator | None = None,
        detector: SinglePhotonDetector | None = None,
    ) -> None:
        """The parts are built from ``options``, or passed in (``generator`` and
        ``detector``, for a lab script or a test)."""
        self.name = name
        self.resource = resource
        self.options = options
        gen: Instrument | None = generator
        det: Instrument | None = detector
        if gen is None or det is None:
            if options is None:
                raise DriverConfigError(name, "options", "generator and detector are required")
            gen = gen or _build(options.generator, f"{name}.gate", timeout_s)
            det = det or _build(options.detector, f"{name}.detector", timeout_s)
        if not isinstance(gen, GateGenerator):
            raise DriverConfigError(name, "options.generator", "not a GateGenerator")
        if not isinstance(det, SinglePhotonDetector):
            raise DriverConfigError(name, "options.detector", "not a SinglePhotonDetector")
        self.generator = gen
        self.detector = det
        self.gated_mode = options.gated_mode if options is not None else True
        self.clock_tolerance = options.clock_tolerance if options is not None else 0.01
        self._lock = threading.RLock()

    # --- limits the node reads --------------------------------------------------

    @property
    def delay_range_ps(self) -> tuple[float, float]:  # type: ignore[override]
        lo, hi = self.generator.delay_range_ps
        return float(lo), float(hi)

    @property
    def dead_time_range_ns(self) -> tuple[float, float]:  # type: ignore[override]
        return self.detector.dead_time_range_ns

    @property
    def memory(self) -> SettingsMemory:
        """What both parts were told, as one read-only view (``gate.<setting>``,
        ``detector.<setting>``, in the order each part made them): a calibration result
        records its snapshot. The parts keep and restore their own settings; nothing done
        to this view reaches them."""
        view = SettingsMemory(self.name)
        for prefix, part in (("gate", self.generator), ("detector", self.detector)):
            memory = getattr(part, "memory", None)
            if isinstance(memory, SettingsMemory):
                for setting, value in memory.snapshot():
                    view.remember(f"{prefix}.{setting}", value, _nothing, partial(_same, value))
        return view

    # --- Instrument --------------------------------------------------------------

    def connect(self) -> None:
        """Generator first (its output is left OFF by its connect), then the detector;
        on a failure both are closed and the error raised."""
        with self._lock:
            try:
                self.generator.connect()
                self.detector.connect()
                if self.gated_mode:
                    try:
                        self.detector.set_mode(DetectorMode.GATED)
                    except NotSupportedError:
                        pass  # a detector that is always gated
            except InstrumentError:
                self.close()
                raise

    def close(self) -> None:
        with self._lock:
            for part in (self.detector, self.generator):
                try:
                    part.close()
                except Exception:  # close never raises; the other part is closed anyway
                    pass

    def identify(self) -> str:
        return f"gate: {self.generator.identify()}; detector: {self.detector.identify()}"

    def _both(self, first: Any, second: Any) -> None:
        """Run ``first`` then ``second`` even when ``first`` fails; the first error."""
        error: InstrumentError | None = None
        for step in (first, second):
            try:
                step()
            except InstrumentError as exc:
                error = error or exc
        if error is not None:
            raise error

    def safe_state(self) -> None:
        """Detector safe (disarmed), then the gate output off; both tried."""
        with self._lock:
            self._both(self.detector.safe_state, self.generator.safe_state)

    def health(self) -> InstrumentHealth:
        """The worse of the two parts' health; DEGRADED when the detector's clock reading
        disagrees with the gate frequency while the gates are on (a loose cable)."""
        gen = self.generator.health()
        det = self.detector.health()
        level = max(gen.level, det.level)
        notes = [f"gate: {gen.message}", f"detector: {det.message}"]
        if level is HealthLevel.OK and self.clock_tolerance is not None:
            mismatch = self._clock_mismatch()
            if mismatch:
                level = HealthLevel.DEGRADED
                notes.append(mismatch)
        return InstrumentHealth(
            HealthLevel(level), "; ".join(notes), tuple(gen.restored) + tuple(det.restored)
        )

    def _clock_mismatch(self) -> str:
        assert self.clock_tolerance is not None
        try:
            if not self.generator.output_enabled():
                return ""
            wanted = self.generator.gate_frequency_hz()
            seen = self.detector.gate_frequency_hz()
        except NotSupportedError:
            return ""
        except InstrumentError as exc:
            return f"clock check: {exc}"
        if abs(seen - wanted) > self.clock_tolerance * wanted:
            return (
                f"the detector sees a {seen:.6g} Hz clock, the gates run at {wanted:.6g} Hz "
                "(gate cable?)"
            )
        return ""

    # --- the gate: to the generator -----------------------------------------------

    def set_delay_ps(self, delay_ps: float) -> None:
        """Gate delay after the slot clock in ps (rounded to whole ps), on the generator."""
        v = check_range(self.name, "set_delay_ps", "delay", delay_ps, self.delay_range_ps, "ps")
        self.generator.set_gate_delay_ps(round(v))

    def delay_ps(self) -> float:
        return float(self.generator.gate_delay_ps())

    def set_gate_frequency_hz(self, gate_frequency_hz: float) -> None:
        """Gate rate in Hz: the generator's period, ``1e12 / f`` ps rounded."""
        f = float(gate_frequency_hz)
        lo, hi = self.generator.period_range_ps
        limits = (1e12 / hi, 1e12 / lo) if lo > 0 else (1e12 / hi, math.inf)
        f = check_range(self.name, "set_gate_frequency_hz", "gate frequency", f, limits, "Hz")
        self.generator.set_gate_period_ps(round(1e12 / f))

    def gate_frequency_hz(self) -> float:
        return self.generator.gate_frequency_hz()

    def set_gate_width_ns(self, gate_width_ns: float) -> None:
        """Gate pulse width in ns (sent in whole ps) on the generator."""
        lo, hi = self.generator.width_range_ps
        w = check_range(
            self.name, "set_gate_width_ns", "gate width", gate_width_ns, (lo / 1e3, hi / 1e3), "ns"
        )
        self.generator.set_gate_width_ps(round(w * 1e3))

    def gate_width_ns(self) -> float:
        return self.generator.gate_width_ps() / 1e3

    # --- arming: both ---------------------------------------------------------------

    def arm(self) -> None:
        """Gates on, then the detector armed."""
        with self._lock:
            self.generator.set_output_enabled(True)
            self.detector.arm()

    def disarm(self) -> None:
        """Detector disarmed, then the gates off; both tried."""
        with self._lock:
            self._both(self.detector.disarm, lambda: self.generator.set_output_enabled(False))

    def reset_latch(self) -> None:
        self.detector.reset_latch()

    def status(self) -> DetectorStatus:
        status = self.detector.status()
        if status is DetectorStatus.ARMED and not self.generator.output_enabled():
            return DetectorStatus.DISARMED  # no gates: nothing is counted
        return status

    # --- everything else: to the detector ----------------------------------------------

    def set_efficiency_pct(self, efficiency_pct: float) -> None:
        self.detector.set_efficiency_pct(efficiency_pct)

    def efficiency_pct(self) -> float:
        return self.detector.efficiency_pct()

    def set_dead_time_ns(self, dead_time_ns: float) -> None:
        self.detector.set_dead_time_ns(dead_time_ns)

    def dead_time_ns(self) -> float:
        return self.detector.dead_time_ns()

    def set_threshold_v(self, threshold_v: float) -> None:
        self.detector.set_threshold_v(threshold_v)

    def threshold_v(self) -> float:
        return self.detector.threshold_v()

    def count_rate_hz(self) -> float:
        return self.detector.count_rate_hz()

    def count_integration_s(self) -> float:
        return self.detector.count_integration_s()

    def set_bias_current_ua(self, bias_current_ua: float) -> None:
        self.detector.set_bias_current_ua(bias_current_ua)

    def bias_current_ua(self) -> float:
        return self.detector.bias_current_ua()

    def set_mode(self, mode: DetectorMode) -> None:
        self.detector.set_mode(mode)

    def mode(self) -> DetectorMode:
        return self.detector.mode()

    def temperature_k(self) -> float:
        return self.detector.temperature_k()
