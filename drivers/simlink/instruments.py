"""Simulated instruments: views of this process's link world.

Each class implements one interface of :mod:`drivers.interfaces`; setters change the
world's state (so setting the attenuator changes the mean photon number, a detector delay
away from the pulse loses counts), getters read it. The hidden truths (V_pi, bias optima,
the true detector delay) are never exposed. ``connect`` fails with ConnectionLostError
when no world of the right role runs in the process (:func:`drivers.simlink.world.start_world`).

Constructor: ``Cls(name, resource="", timeout_s=2.0, options=None)``; ``options`` is an
instance of the class's ``options_model`` (validated by the driver registry). ``resource``
names the simulated link the instrument is on when the process takes part in several
(a node hosting several links: the link's ``id``); "" is the process's only one.
"""

from __future__ import annotations

import functools
import math
import time
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from drivers.errors import (
    ConnectionLostError,
    NotConnectedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.interfaces import (
    BB84State,
    DetectorStatus,
    Encoder,
    HealthLevel,
    InstrumentHealth,
    IntensityClass,
    IntensityModulator,
    Laser,
    LaserStatus,
    OpticalPowerMeter,
    PolarizationController,
    PreparedStates,
    SinglePhotonDetector,
    StateSource,
    TagBlock,
    TimeTagger,
    VariableAttenuator,
)
from drivers.restore import SettingsMemory
from drivers.simlink.optics import VOA_RANGE_DB
from drivers.simlink.world import ReceiverWorld, TransmitterWorld, get_world

__all__ = [
    "SimAttenuator",
    "SimDetector",
    "SimDetectorOptions",
    "SimEncoder",
    "SimIntensityModulator",
    "SimLaser",
    "SimOptions",
    "SimPolarizationController",
    "SimPowerMeter",
    "SimStateSource",
    "SimTimeTagger",
]


class SimOptions(BaseModel):
    """Options of simulated instruments that take none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SimDetectorOptions(SimOptions):
    channel: int = Field(0, ge=0, le=3, description="detector: 0 H, 1 V, 2 D, 3 A")


def _check_range(name: str, command: str, value: float, limits: tuple[float, float]) -> float:
    value = float(value)
    if not limits[0] <= value <= limits[1]:  # also refuses NaN
        raise OutOfRangeError(name, command, f"{value} outside [{limits[0]}, {limits[1]}]")
    return value


class _SimBase:
    """Life cycle shared by all simulated instruments."""

    options_model: ClassVar[type[SimOptions]] = SimOptions
    world_role: ClassVar[str] = "transmitter"

    def __init__(
        self,
        name: str,
        resource: str = "",
        timeout_s: float = 2.0,
        options: SimOptions | None = None,
    ) -> None:
        self.name = name
        self.resource = resource
        self.timeout_s = timeout_s
        self.options = options if options is not None else self.options_model()
        self._world: TransmitterWorld | ReceiverWorld | None = None
        #: every setting made through this driver, as a real driver remembers them (the
        #: settings snapshot of a calibration result reads it)
        self.memory = SettingsMemory(name)

    def connect(self) -> None:
        if self._world is not None:
            return
        try:
            world = get_world(self.resource)
        except RuntimeError as exc:
            raise ConnectionLostError(self.name, "connect", str(exc)) from None
        if world.role != self.world_role:
            raise ConnectionLostError(
                self.name,
                "connect",
                f"this process simulates the {world.role}, not the {self.world_role}",
            )
        self._world = world

    def close(self) -> None:
        self._world = None

    def identify(self) -> str:
        return f"qkdnode-sim,{type(self).__name__},{self.name},0.1"

    def health(self) -> InstrumentHealth:
        if self._world is None:
            return InstrumentHealth(HealthLevel.FAULT, "not connected")
        return InstrumentHealth(HealthLevel.OK)

    def _tx(self, command: str) -> TransmitterWorld:
        world = self._world
        if not isinstance(world, TransmitterWorld):
            raise NotConnectedError(self.name, command, "not connected")
        return world

    def _rx(self, command: str) -> ReceiverWorld:
        world = self._world
        if not isinstance(world, ReceiverWorld):
            raise NotConnectedError(self.name, command, "not connected")
        return world


# --- transmitter ------------------------------------------------------------------------


class SimLaser(_SimBase, Laser):
    """Pulsed laser: emission, power and wavelength of the source (warms up when turned on)."""

    power_range_dbm = (-10.0, 13.0)
    wavelength_range_nm = (1527.0, 1567.0)

    def set_emission(self, on: bool) -> None:
        w = self._tx("set_emission")
        with w.lock:
            if on and not w.optics.emission_on:
                w.optics.emission_since_s = time.monotonic()
            w.optics.emission_on = bool(on)
        if on:
            self.memory.remember(
                "emission_on", True, lambda: self.set_emission(True), self.emission_on, enables=True
            )
        else:
            self.memory.switching_off("emission_on")

    def emission_on(self) -> bool:
        return self._tx("emission_on").optics.emission_on

    def set_power_dbm(self, power_dbm: float) -> None:
        w = self._tx("set_power_dbm")
        value = _check_range(self.name, "set_power_dbm", power_dbm, self.power_range_dbm)
        with w.lock:
            w.optics.laser_power_dbm = value
        self.memory.remember(
            "power_dbm", value, lambda: self.set_power_dbm(value), self.power_dbm, tolerance=0.01
        )

    def power_dbm(self) -> float:
        return self._tx("power_dbm").optics.laser_power_dbm

    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        w = self._tx("set_wavelength_nm")
        value = _check_range(
            self.name, "set_wavelength_nm", wavelength_nm, self.wavelength_range_nm
        )
        with w.lock:
            w.optics.wavelength_nm = value
        self.memory.remember(
            "wavelength_nm", value, lambda: self.set_wavelength_nm(value), self.wavelength_nm
        )

    def wavelength_nm(self) -> float:
        return self._tx("wavelength_nm").optics.wavelength_nm

    def temperature_c(self) -> float:
        w = self._tx("temperature_c")
        return 25.0 + (0.8 if w.optics.emission_on else 0.0)

    def status(self) -> LaserStatus:
        w = self._tx("status")
        if not w.optics.emission_on:
            return LaserStatus.OFF
        return LaserStatus.LOCKED if w.optics.laser_warm(w.hardware) else LaserStatus.WARMING_UP

    def safe_state(self) -> None:
        self.memory.made_safe()
        if isinstance(self._world, TransmitterWorld):
            with self._world.lock:
                self._world.optics.emission_on = False


class _SimModulator(_SimBase):
    """Drive, bias and output plumbing shared by the simulated modulators.

    Subclasses name the fields of the world's optics they drive: ``_drive_field`` (a list
    of drive amplitudes in V indexed by ``_drive_key``, the intensity class or BB84
    state), ``_bias_field`` (bias in V) and ``_output_field`` (output on/off).
    """

    drive_range_v = (-10.0, 10.0)
    bias_range_v = (-10.0, 10.0)
    _drive_key: ClassVar[type[IntEnum]]
    _drive_field: ClassVar[str]
    _bias_field: ClassVar[str]
    _output_field: ClassVar[str]

    def _set_drive(self, command: str, key: int, drive_v: float) -> None:
        w = self._tx(command)
        value = _check_range(self.name, command, drive_v, self.drive_range_v)
        with w.lock:
            drives: list[float] = getattr(w.optics, self._drive_field)
            drives[int(self._drive_key(key))] = value
        k = self._drive_key(key)
        self.memory.remember(
            f"{self._drive_field}[{k.name}]",
            value,
            lambda: self._set_drive(command, key, value),
            lambda: self._drive(command, key),
        )

    def _drive(self, command: str, key: int) -> float:
        drives: list[float] = getattr(self._tx(command).optics, self._drive_field)
        return drives[int(self._drive_key(key))]

    def set_bias_v(self, bias_v: float) -> None:
        w = self._tx("set_bias_v")
        value = _check_range(self.name, "set_bias_v", bias_v, self.bias_range_v)
        with w.lock:
            setattr(w.optics, self._bias_field, value)
        self.memory.remember("bias_v", value, lambda: self.set_bias_v(value), self.bias_v)

    def bias_v(self) -> float:
        bias: float = getattr(self._tx("bias_v").optics, self._bias_field)
        return bias

    def set_output(self, on: bool) -> None:
        w = self._tx("set_output")
        with w.lock:
            setattr(w.optics, self._output_field, bool(on))
        if on:
            self.memory.remember(
                "output_on", True, lambda: self.set_output(True), self.output_on, enables=True
            )
        else:
            self.memory.switching_off("output_on")

    def output_on(self) -> bool:
        on: bool = getattr(self._tx("output_on").optics, self._output_field)
        return on

    def safe_state(self) -> None:
        self.memory.made_safe()
        if isinstance(self._world, TransmitterWorld):
            with self._world.lock:
                setattr(self._world.optics, self._output_field, False)


class SimIntensityModulator(_SimModulator, IntensityModulator):
    """Mach-Zehnder intensity modulator with hidden V_pi and bias optimum."""

    _drive_key = IntensityClass
    _drive_field = "im_levels_v"
    _bias_field = "im_bias_v"
    _output_field = "im_output_on"

    def set_level_v(self, intensity_class: IntensityClass, drive_v: float) -> None:
        self._set_drive("set_level_v", intensity_class, drive_v)

    def level_v(self, intensity_class: IntensityClass) -> float:
        return self._drive("level_v", intensity_class)


class SimEncoder(_SimModulator, Encoder):
    """Polarisation modulator with a hidden V_pi and bias optimum; the bias compensates
    the drift of the polarisation reference."""

    _drive_key = BB84State
    _drive_field = "encoder_drive_v"
    _bias_field = "encoder_bias_v"
    _output_field = "encoder_output_on"

    def set_drive_v(self, state: BB84State, drive_v: float) -> None:
        self._set_drive("set_drive_v", state, drive_v)

    def drive_v(self, state: BB84State) -> float:
        return self._drive("drive_v", state)


class SimAttenuator(_SimBase, VariableAttenuator):
    """Variable optical attenuator with shutter, before the fixed output attenuator."""

    attenuation_range_db = VOA_RANGE_DB

    def set_attenuation_db(self, attenuation_db: float) -> None:
        w = self._tx("set_attenuation_db")
        value = _check_range(
            self.name, "set_attenuation_db", attenuation_db, self.attenuation_range_db
        )
        with w.lock:
            w.optics.voa_db = value
        self.memory.remember(
            "attenuation_db", value, lambda: self.set_attenuation_db(value), self.attenuation_db
        )

    def attenuation_db(self) -> float:
        return self._tx("attenuation_db").optics.voa_db

    def set_shutter(self, open_: bool) -> None:
        w = self._tx("set_shutter")
        with w.lock:
            w.optics.shutter_open = bool(open_)
        if open_:
            self.memory.remember(
                "shutter_open",
                True,
                lambda: self.set_shutter(True),
                self.shutter_open,
                enables=True,
            )
        else:
            self.memory.switching_off("shutter_open")

    def shutter_open(self) -> bool:
        return self._tx("shutter_open").optics.shutter_open

    def safe_state(self) -> None:
        self.memory.made_safe()
        if isinstance(self._world, TransmitterWorld):
            with self._world.lock:
                self._world.optics.shutter_open = False


class SimPowerMeter(_SimBase, OpticalPowerMeter):
    """Power meter on a monitor tap after the VOA (before the fixed attenuator), with
    noise and a hidden gain error.

    The reading is corrected for the responsivity at the set wavelength: a setting away
    from the laser's wavelength reads 0.1 % per nm off. The noise is a function of the
    box's ``hardware_seed`` (not of any secret), so a simulated run repeats exactly.
    """

    wavelength_range_nm = (800.0, 1700.0)

    def __init__(
        self,
        name: str,
        resource: str = "",
        timeout_s: float = 2.0,
        options: SimOptions | None = None,
    ) -> None:
        super().__init__(name, resource, timeout_s, options)
        self._rng = np.random.default_rng()

    def connect(self) -> None:
        fresh = self._world is None
        super().connect()
        if fresh and isinstance(self._world, TransmitterWorld):
            self._rng = np.random.default_rng([self._world.hardware.hardware_seed, 0x706D])

    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        w = self._tx("set_wavelength_nm")
        value = _check_range(
            self.name, "set_wavelength_nm", wavelength_nm, self.wavelength_range_nm
        )
        with w.lock:
            w.optics.power_meter_wavelength_nm = value
        self.memory.remember(
            "wavelength_nm",
            value,
            lambda: self.set_wavelength_nm(value),
            lambda: self._tx("wavelength_nm").optics.power_meter_wavelength_nm,
        )

    def power_w(self) -> float:
        w = self._tx("power_w")
        with w.lock:
            mismatch_nm = w.optics.power_meter_wavelength_nm - w.optics.wavelength_nm
        return w.power_meter_w(self._rng) * (1.0 + 1e-3 * mismatch_nm)

    def safe_state(self) -> None:
        return None


class SimStateSource(_SimBase, StateSource):
    """The transmitter's pattern memory: what was prepared in any slot (secret)."""

    def prepared(self, slot_index: npt.NDArray[np.int64]) -> PreparedStates:
        slots = np.asarray(slot_index)
        if slots.dtype.kind not in "iu":
            raise OutOfRangeError(
                self.name, "prepared", f"slot indices must be integers, got {slots.dtype}"
            )
        if slots.size and int(slots.min()) < 0:
            raise OutOfRangeError(self.name, "prepared", "negative slot index")
        return self._tx("prepared").prepared(slots.astype(np.int64))

    def slot_rate_hz(self) -> float:
        return self._tx("slot_rate_hz").slot_rate_hz()

    def set_sync_pattern(self, public_seed: int | None) -> int:
        return self._tx("set_sync_pattern").set_sync_pattern(public_seed)

    def class_probabilities(self) -> tuple[float, float, float]:
        return self._tx("class_probabilities").class_probabilities()

    def set_class_probabilities(self, p_signal: float, p_decoy: float, p_basis_z: float) -> int:
        values = (float(p_signal), float(p_decoy), float(p_basis_z))
        if not (
            all(math.isfinite(v) for v in values)
            and values[0] > 0
            and values[1] >= 0
            and values[0] + values[1] <= 1
            and 0 < values[2] < 1
        ):
            raise OutOfRangeError(
                self.name,
                "set_class_probabilities",
                f"need 0 < p_signal, 0 <= p_decoy, p_signal + p_decoy <= 1, 0 < p_basis_z < 1;"
                f" got {values}",
            )
        first = self._tx("set_class_probabilities").set_class_probabilities(*values)

        def again() -> None:
            self.set_class_probabilities(*values)

        for label, i in (("p_signal", 0), ("p_decoy", 1), ("p_basis_z", 2)):
            self.memory.remember(label, values[i], again, functools.partial(self._probability, i))
        return first

    def _probability(self, i: int) -> float:
        return float(self.class_probabilities()[i])

    def next_slot(self) -> int:
        return self._tx("next_slot").next_slot

    def safe_state(self) -> None:
        return None


# --- receiver ----------------------------------------------------------------------------


class SimDetector(_SimBase, SinglePhotonDetector):
    """One gated single-photon detector (``options.channel``: 0 H, 1 V, 2 D, 3 A).

    The gate is locked to the pulse train; a delay away from the (hidden) optical delay
    loses the counts. Bright light latches an armed detector off.
    """

    options_model: ClassVar[type[SimOptions]] = SimDetectorOptions
    world_role: ClassVar[str] = "receiver"
    dead_time_range_ns = (0.0, 1e5)
    delay_range_ps = (0.0, 1e6)
    efficiency_range_pct = (1.0, 100.0)
    threshold_range_v = (0.0, 2.0)

    @property
    def channel(self) -> int:
        opts = self.options
        return opts.channel if isinstance(opts, SimDetectorOptions) else 0

    def _det(self, command: str) -> ReceiverWorld:
        w = self._rx(command)
        if "detector_disconnect" in w.faults:
            raise ConnectionLostError(self.name, command, "no reply from the detector (link down)")
        return w

    def _set(self, command: str, field: str, value: Any) -> None:
        w = self._det(command)
        with w.lock:
            getattr(w.detectors, field)[self.channel] = value
        if field != "armed":
            self.memory.remember(
                field,
                float(value),
                lambda: self._set(command, field, value),
                lambda: float(self._get(command, field)),
            )

    def _get(self, command: str, field: str) -> Any:
        w = self._det(command)
        with w.lock:
            return getattr(w.detectors, field)[self.channel].item()

    def set_efficiency_pct(self, efficiency_pct: float) -> None:
        value = _check_range(
            self.name, "set_efficiency_pct", efficiency_pct, self.efficiency_range_pct
        )
        self._set("set_efficiency_pct", "efficiency_pct", value)

    def efficiency_pct(self) -> float:
        return float(self._get("efficiency_pct", "efficiency_pct"))

    def set_dead_time_ns(self, dead_time_ns: float) -> None:
        value = _check_range(self.name, "set_dead_time_ns", dead_time_ns, self.dead_time_range_ns)
        self._set("set_dead_time_ns", "dead_time_ns", value)

    def dead_time_ns(self) -> float:
        return float(self._get("dead_time_ns", "dead_time_ns"))

    def set_delay_ps(self, delay_ps: float) -> None:
        value = _check_range(self.name, "set_delay_ps", delay_ps, self.delay_range_ps)
        self._set("set_delay_ps", "delay_ps", value)

    def delay_ps(self) -> float:
        return float(self._get("delay_ps", "delay_ps"))

    def set_threshold_v(self, threshold_v: float) -> None:
        value = _check_range(self.name, "set_threshold_v", threshold_v, self.threshold_range_v)
        self._set("set_threshold_v", "threshold_v", value)

    def threshold_v(self) -> float:
        return float(self._get("threshold_v", "threshold_v"))

    def arm(self) -> None:
        w = self._det("arm")
        with w.lock:
            if w.detectors.latched[self.channel]:
                return
            w.detectors.armed[self.channel] = True
            self.memory.remember("armed", True, self.arm, self._armed, enables=True)
            if "bright_light" in w.faults:
                w.detectors.latched[self.channel] = True

    def disarm(self) -> None:
        self.memory.switching_off("armed")
        self._set("disarm", "armed", False)

    def _armed(self) -> bool:
        return bool(self._get("armed", "armed"))

    def status(self) -> DetectorStatus:
        w = self._det("status")
        with w.lock:
            if w.detectors.latched[self.channel]:
                return DetectorStatus.LATCHED
            return (
                DetectorStatus.ARMED if w.detectors.armed[self.channel] else DetectorStatus.DISARMED
            )

    def reset_latch(self) -> None:
        w = self._det("reset_latch")
        with w.lock:
            w.detectors.latched[self.channel] = False
            w.detectors.armed[self.channel] = False

    def gate_width_ns(self) -> float:
        """The gate the detector opens in every slot (fixed in this model), ns."""
        return float(self._det("gate_width_ns").rx.gate_width_ps) * 1e-3

    def count_rate_hz(self) -> float:
        """Over the last integration period; after a setting change, one that began with
        it (waiting up to ``timeout_s`` for it, see ``ReceiverWorld.count_rates_hz``)."""
        w = self._det("count_rate_hz")
        return float(w.count_rates_hz(fresh_within_s=self.timeout_s)[self.channel])

    def count_integration_s(self) -> float:
        """The simulated counters' integration period (``ReceiverWorld``), in s."""
        seconds = self._det("count_integration_s").counter_integration_s()
        if seconds <= 0:
            raise ProtocolError(self.name, "count_integration_s", "no batch counted yet")
        return seconds

    def health(self) -> InstrumentHealth:
        w = self._world
        if not isinstance(w, ReceiverWorld):
            return InstrumentHealth(HealthLevel.FAULT, "not connected")
        if "detector_disconnect" in w.faults:
            return InstrumentHealth(HealthLevel.FAULT, "detector does not answer")
        if w.detectors.latched[self.channel]:
            return InstrumentHealth(HealthLevel.DEGRADED, "latched after bright light")
        return InstrumentHealth(HealthLevel.OK)

    def safe_state(self) -> None:
        self.memory.made_safe()
        if isinstance(self._world, ReceiverWorld):
            with self._world.lock:
                self._world.detectors.armed[self.channel] = False


class SimTimeTagger(_SimBase, TimeTagger):
    """Four-channel time tagger streaming the receiver world's detections (free-running
    clock: offset, frequency offset and wander relative to the transmitter)."""

    world_role: ClassVar[str] = "receiver"
    input_delay_range_ps = (-1_000_000, 1_000_000)
    trigger_range_v = (-2.5, 2.5)

    def __init__(
        self,
        name: str,
        resource: str = "",
        timeout_s: float = 2.0,
        options: SimOptions | None = None,
    ) -> None:
        super().__init__(name, resource, timeout_s, options)
        self._trigger_v = [0.1, 0.1, 0.1, 0.1]

    def _check_channel(self, command: str, channel: int) -> int:
        if channel not in range(4):
            raise OutOfRangeError(self.name, command, f"channel {channel} not in 0..3")
        return int(channel)

    def channels(self) -> list[int]:
        return [0, 1, 2, 3]

    def set_input_delay_ps(self, channel: int, delay_ps: int) -> None:
        w = self._rx("set_input_delay_ps")
        ch = self._check_channel("set_input_delay_ps", channel)
        value = _check_range(self.name, "set_input_delay_ps", delay_ps, self.input_delay_range_ps)
        with w.lock:
            w.tagger_delay_ps[ch] = round(value)
        self.memory.remember(
            f"input_delay_ps[{ch}]",
            float(round(value)),
            lambda: self.set_input_delay_ps(ch, round(value)),
            lambda: float(self.input_delay_ps(ch)),
        )

    def input_delay_ps(self, channel: int) -> int:
        w = self._rx("input_delay_ps")
        return int(w.tagger_delay_ps[self._check_channel("input_delay_ps", channel)])

    def set_trigger_level_v(self, channel: int, level_v: float) -> None:
        self._rx("set_trigger_level_v")
        ch = self._check_channel("set_trigger_level_v", channel)
        value = _check_range(self.name, "set_trigger_level_v", level_v, self.trigger_range_v)
        self._trigger_v[ch] = value
        self.memory.remember(
            f"trigger_level_v[{ch}]",
            value,
            lambda: self.set_trigger_level_v(ch, value),
            lambda: self.trigger_level_v(ch),
        )

    def trigger_level_v(self, channel: int) -> float:
        self._rx("trigger_level_v")
        return self._trigger_v[self._check_channel("trigger_level_v", channel)]

    def start_stream(self) -> None:
        self._rx("start_stream").start_stream()

    def read_block(self, timeout_s: float) -> TagBlock | None:
        return self._rx("read_block").read_block(timeout_s)

    def stop_stream(self) -> None:
        self._rx("stop_stream").stop_stream()

    def count_rates_hz(self) -> dict[int, float]:
        rates = self._rx("count_rates_hz").count_rates_hz(fresh_within_s=self.timeout_s)
        return {ch: float(rates[ch]) for ch in range(4)}

    def safe_state(self) -> None:
        if isinstance(self._world, ReceiverWorld):
            self._world.stop_stream()


class SimPolarizationController(_SimBase, PolarizationController):
    """The receiver's polarisation controller: four fiber squeezers at 0, 45, 0 and 45
    degrees in front of the analysers (:class:`drivers.simlink.polarization.
    ControllerModel`). A retardance set here is the one the light sees (a real controller's
    voltage-to-retardance calibration is its driver's)."""

    world_role = "receiver"
    axes_deg = (0.0, 45.0, 0.0, 45.0)
    retardance_range_rad = (-4.0 * math.pi, 4.0 * math.pi)

    def set_retardances_rad(self, retardances_rad: tuple[float, ...]) -> None:
        command = "set_retardances_rad"
        values = [float(v) for v in retardances_rad]
        if len(values) != len(self.axes_deg):
            raise OutOfRangeError(
                self.name, command, f"{len(self.axes_deg)} retardances needed, got {len(values)}"
            )
        checked = [_check_range(self.name, command, v, self.retardance_range_rad) for v in values]
        w = self._rx(command)
        with w.lock:
            w.polarization_controller.retardances_rad = checked

        def again() -> None:
            self.set_retardances_rad(tuple(checked))

        for i, v in enumerate(checked):
            self.memory.remember(
                f"retardance_rad[{i}]", v, again, functools.partial(self._retardance, i)
            )

    def _retardance(self, i: int) -> float:
        return float(self.retardances_rad()[i])

    def retardances_rad(self) -> tuple[float, ...]:
        w = self._rx("retardances_rad")
        with w.lock:
            return tuple(w.polarization_controller.retardances_rad)

    def safe_state(self) -> None:
        """Nothing to make safe: the retardances stay (see the interface)."""
