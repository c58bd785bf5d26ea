"""One typed interface per instrument class.

Every driver — real (VISA, serial, vendor API) or simulated — implements exactly one
of these abstract classes, and the node runtime calls only the members defined here.
Units are part of every name (``_dbm``, ``_nm``, ``_v``, ``_ps``, ``_ns``, ``_hz``).

Calls are blocking; the runtime runs them in worker threads. Every method may raise a
subclass of :class:`drivers.errors.InstrumentError` naming the instrument, the command
and the reason; nothing else escapes a driver.

Members without ``abc.abstractmethod`` are optional settings (an SNSPD's bias current, a
gated detector's gate width, a tagger's edge, a power meter's range): their default raises
:class:`drivers.errors.NotSupportedError` before anything is sent, and a driver whose
instrument has the setting overrides them.

Hardware safety: :meth:`Instrument.safe_state` must be callable at any time, from any
state, and must leave the instrument harmless (laser emission off, detector disarmed,
modulator outputs off). It is called on every exit path of the daemon.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.errors import NotSupportedError

__all__ = [
    "TAG_DTYPE",
    "BB84State",
    "DetectorMode",
    "DetectorStatus",
    "Edge",
    "Encoder",
    "FaultInjector",
    "GateGenerator",
    "HealthLevel",
    "Instrument",
    "InstrumentHealth",
    "IntensityClass",
    "IntensityModulator",
    "Laser",
    "LaserStatus",
    "OpticalPowerMeter",
    "PolarizationController",
    "PreparedStates",
    "ReferenceClock",
    "SinglePhotonDetector",
    "StateSource",
    "TagBlock",
    "TimeTagger",
    "VariableAttenuator",
    "SimulatedBackend",
    "not_supported",
]


class HealthLevel(IntEnum):
    OK = 0
    DEGRADED = 1
    FAULT = 2


@dataclass(frozen=True)
class InstrumentHealth:
    """Result of a health check: a level and a short human-readable reason.

    ``restored`` lists the settings the driver found lost since the previous check (a
    power-cycled instrument comes back at its defaults) and put back, one
    ``"name: found -> restored"`` line each; such a check reports at least DEGRADED.
    """

    level: HealthLevel
    message: str = ""
    restored: tuple[str, ...] = ()


def not_supported(instrument: Instrument, command: str, what: str) -> NotSupportedError:
    """The error an optional member raises on an instrument that lacks ``what``."""
    return NotSupportedError(instrument.name, command, f"{type(instrument).__name__} has no {what}")


class Instrument(abc.ABC):
    """Common life cycle of every instrument.

    ``name`` is the instrument's name in the node config (``laser``, ``spd0``...) and is
    carried by every exception the driver raises.
    """

    name: str

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the transport and verify the instrument answers. Idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the transport. Idempotent; never raises."""

    @abc.abstractmethod
    def identify(self) -> str:
        """Return the identity string (``*IDN?`` or the vendor equivalent)."""

    @abc.abstractmethod
    def safe_state(self) -> None:
        """Put the instrument in its harmless state. Must not raise if already safe."""

    @abc.abstractmethod
    def health(self) -> InstrumentHealth:
        """Check the instrument; never raises (a failure is reported as FAULT)."""


# --- Laser -----------------------------------------------------------------------


class LaserStatus(IntEnum):
    OFF = 0
    WARMING_UP = 1
    LOCKED = 2
    FAULT = 3


class Laser(Instrument):
    """A CW or pulsed laser source.

    Limits (``power_range_dbm``, ``wavelength_range_nm``) are checked before anything
    is sent; out-of-range settings raise :class:`drivers.errors.OutOfRangeError`.
    """

    power_range_dbm: tuple[float, float]
    wavelength_range_nm: tuple[float, float]

    @abc.abstractmethod
    def set_emission(self, on: bool) -> None: ...

    @abc.abstractmethod
    def emission_on(self) -> bool: ...

    @abc.abstractmethod
    def set_power_dbm(self, power_dbm: float) -> None: ...

    @abc.abstractmethod
    def power_dbm(self) -> float: ...

    @abc.abstractmethod
    def set_wavelength_nm(self, wavelength_nm: float) -> None: ...

    @abc.abstractmethod
    def wavelength_nm(self) -> float: ...

    @abc.abstractmethod
    def temperature_c(self) -> float:
        """Laser diode temperature in degrees Celsius."""

    @abc.abstractmethod
    def status(self) -> LaserStatus: ...


# --- Modulators ------------------------------------------------------------------


class IntensityClass(IntEnum):
    """Decoy-state intensity classes."""

    SIGNAL = 0
    DECOY = 1
    VACUUM = 2


class IntensityModulator(Instrument):
    """Amplitude modulator (Mach-Zehnder) setting the signal, decoy and vacuum levels.

    Transmission follows ``T(V) = T_min + (1 - T_min) * cos^2(pi/2 * (V - V_bias_opt) / V_pi)``
    on real devices; drivers only set voltages, calibration finds the curve.
    """

    drive_range_v: tuple[float, float]
    bias_range_v: tuple[float, float]

    @abc.abstractmethod
    def set_level_v(self, intensity_class: IntensityClass, drive_v: float) -> None:
        """Drive amplitude in volts applied for slots of ``intensity_class``."""

    @abc.abstractmethod
    def level_v(self, intensity_class: IntensityClass) -> float: ...

    @abc.abstractmethod
    def set_bias_v(self, bias_v: float) -> None: ...

    @abc.abstractmethod
    def bias_v(self) -> float: ...

    @abc.abstractmethod
    def set_output(self, on: bool) -> None:
        """Enable or disable the drive outputs (disabled in the safe state)."""

    @abc.abstractmethod
    def output_on(self) -> bool: ...


class BB84State(IntEnum):
    """BB84 polarisation states. Basis = value // 2 (0 = Z, 1 = X); bit = value % 2."""

    H = 0
    V = 1
    D = 2
    A = 3


class Encoder(Instrument):
    """Polarisation (or phase) modulator preparing the four BB84 states.

    ``drive_v(state)`` is the voltage that prepares ``state`` when the bias is right;
    ``bias_v`` compensates the slow drift of the encoding reference.
    """

    drive_range_v: tuple[float, float]
    bias_range_v: tuple[float, float]

    @abc.abstractmethod
    def set_drive_v(self, state: BB84State, drive_v: float) -> None: ...

    @abc.abstractmethod
    def drive_v(self, state: BB84State) -> float: ...

    @abc.abstractmethod
    def set_bias_v(self, bias_v: float) -> None: ...

    @abc.abstractmethod
    def bias_v(self) -> float: ...

    @abc.abstractmethod
    def set_output(self, on: bool) -> None: ...

    @abc.abstractmethod
    def output_on(self) -> bool: ...


# --- Attenuator and power meter ---------------------------------------------------


class VariableAttenuator(Instrument):
    attenuation_range_db: tuple[float, float]

    @abc.abstractmethod
    def set_attenuation_db(self, attenuation_db: float) -> None: ...

    @abc.abstractmethod
    def attenuation_db(self) -> float: ...

    @abc.abstractmethod
    def set_shutter(self, open_: bool) -> None:
        """Open or close the output shutter (closed in the safe state)."""

    @abc.abstractmethod
    def shutter_open(self) -> bool: ...


class OpticalPowerMeter(Instrument):
    @abc.abstractmethod
    def set_wavelength_nm(self, wavelength_nm: float) -> None:
        """Wavelength used for the responsivity correction."""

    @abc.abstractmethod
    def power_w(self) -> float:
        """Measured optical power in watts (may be negative noise near zero)."""

    # Optional members: a meter without them raises NotSupportedError (nothing sent).

    def set_range_w(self, range_w: float | None) -> None:
        """Full-scale range in watts (the meter picks the range that holds it); None selects
        auto-ranging."""
        raise not_supported(self, "set_range_w", "range setting")

    def range_w(self) -> float | None:
        """Full-scale range in watts, or None when auto-ranging."""
        raise not_supported(self, "range_w", "range setting")

    def set_averaging(self, count: int) -> None:
        """Number of samples averaged into one reading (>= 1)."""
        raise not_supported(self, "set_averaging", "averaging setting")

    def averaging(self) -> int:
        raise not_supported(self, "averaging", "averaging setting")

    def zero(self) -> None:
        """Dark (zero) adjustment; the input must be dark. Blocks until it is done."""
        raise not_supported(self, "zero", "zero adjustment")


# --- Single-photon detector -------------------------------------------------------


class DetectorMode(IntEnum):
    """How an avalanche detector is biased: in gates on the slot clock, or continuously."""

    GATED = 0
    FREE_RUNNING = 1


class DetectorStatus(IntEnum):
    DISARMED = 0
    ARMED = 1
    LATCHED = 2  # latched off after bright light; needs reset_latch()
    FAULT = 3


class SinglePhotonDetector(Instrument):
    """Gated or free-running single-photon detector (InGaAs APD or SNSPD)."""

    dead_time_range_ns: tuple[float, float]
    delay_range_ps: tuple[float, float]

    @abc.abstractmethod
    def set_efficiency_pct(self, efficiency_pct: float) -> None:
        """Nominal detection efficiency setting in percent (APD excess bias presets)."""

    @abc.abstractmethod
    def efficiency_pct(self) -> float: ...

    @abc.abstractmethod
    def set_dead_time_ns(self, dead_time_ns: float) -> None: ...

    @abc.abstractmethod
    def dead_time_ns(self) -> float: ...

    @abc.abstractmethod
    def set_delay_ps(self, delay_ps: float) -> None:
        """Gate (or detection window) delay relative to the slot clock, in ps."""

    @abc.abstractmethod
    def delay_ps(self) -> float: ...

    @abc.abstractmethod
    def set_threshold_v(self, threshold_v: float) -> None:
        """Discriminator threshold (or bias) in volts."""

    @abc.abstractmethod
    def threshold_v(self) -> float: ...

    @abc.abstractmethod
    def arm(self) -> None: ...

    @abc.abstractmethod
    def disarm(self) -> None: ...

    @abc.abstractmethod
    def status(self) -> DetectorStatus: ...

    @abc.abstractmethod
    def reset_latch(self) -> None:
        """Clear a LATCHED condition; the detector returns DISARMED."""

    @abc.abstractmethod
    def count_rate_hz(self) -> float:
        """Click rate over the last integration period, in Hz."""

    # Optional members: a detector without the setting raises NotSupportedError (nothing is
    # sent). Gated InGaAs detectors have gate frequency, width and mode; SNSPDs have a bias
    # current; most report a temperature.

    def set_bias_current_ua(self, bias_current_ua: float) -> None:
        """Bias current of a superconducting nanowire, in microamperes."""
        raise not_supported(self, "set_bias_current_ua", "bias current setting")

    def bias_current_ua(self) -> float:
        raise not_supported(self, "bias_current_ua", "bias current setting")

    def set_gate_frequency_hz(self, gate_frequency_hz: float) -> None:
        """Gate repetition rate of a gated detector (internal gate generator), in Hz."""
        raise not_supported(self, "set_gate_frequency_hz", "gate frequency setting")

    def gate_frequency_hz(self) -> float:
        raise not_supported(self, "gate_frequency_hz", "gate frequency setting")

    def set_gate_width_ns(self, gate_width_ns: float) -> None:
        """Effective gate width of a gated detector, in ns."""
        raise not_supported(self, "set_gate_width_ns", "gate width setting")

    def gate_width_ns(self) -> float:
        raise not_supported(self, "gate_width_ns", "gate width setting")

    def set_mode(self, mode: DetectorMode) -> None:
        """Gated or free-running operation."""
        raise not_supported(self, "set_mode", "choice of gated/free-running mode")

    def mode(self) -> DetectorMode:
        raise not_supported(self, "mode", "choice of gated/free-running mode")

    def temperature_k(self) -> float:
        """Temperature of the sensing element (APD or nanowire stage), in kelvin."""
        raise not_supported(self, "temperature_k", "temperature reading")

    def count_integration_s(self) -> float:
        """Counting time behind one :meth:`count_rate_hz` reading, in seconds (the
        counter's integration period): a reading of ``r`` Hz stands for ``r`` times this
        many counts. Calibration needs it to state Poisson uncertainties; a detector that
        does not say it leaves the scatter of the readings to set them."""
        raise not_supported(self, "count_integration_s", "counter integration period")


# --- Gate generator -----------------------------------------------------------------


class GateGenerator(Instrument):
    """Pulse generator whose output gates an externally gated single-photon detector.

    A gate is a pulse of ``gate_width_ps`` every ``gate_period_ps``, starting
    ``gate_delay_ps`` after the generator's trigger (the slot clock when the generator is
    tied to it). Values are integers in picoseconds; each setter checks its value against
    the driver's ``*_range_ps`` limits (and the width against the period) and raises
    :class:`drivers.errors.OutOfRangeError` before anything is sent. The readbacks ask the
    instrument, never a cached value.

    :meth:`Instrument.safe_state` switches the output off: no gate reaches the detector,
    which then cannot click.
    """

    period_range_ps: tuple[int, int]
    width_range_ps: tuple[int, int]
    delay_range_ps: tuple[int, int]

    @abc.abstractmethod
    def set_gate_period_ps(self, period_ps: int) -> None:
        """Time between two gates, in ps (larger than the gate width)."""

    @abc.abstractmethod
    def gate_period_ps(self) -> int: ...

    def gate_frequency_hz(self) -> float:
        """Gate repetition rate, in Hz, from :meth:`gate_period_ps`."""
        return 1e12 / self.gate_period_ps()

    @abc.abstractmethod
    def set_gate_width_ps(self, width_ps: int) -> None:
        """Width of each gate pulse, in ps (smaller than the period)."""

    @abc.abstractmethod
    def gate_width_ps(self) -> int: ...

    @abc.abstractmethod
    def set_gate_delay_ps(self, delay_ps: int) -> None:
        """Delay of the gates after the generator's trigger, in ps."""

    @abc.abstractmethod
    def gate_delay_ps(self) -> int: ...

    @abc.abstractmethod
    def set_output_enabled(self, on: bool) -> None:
        """Send the gates to the output (True) or hold the output idle (False)."""

    @abc.abstractmethod
    def output_enabled(self) -> bool: ...


# --- Time tagger ------------------------------------------------------------------

#: One time tag: input channel and arrival time in picoseconds on the tagger's clock.
TAG_DTYPE = np.dtype([("channel", np.int16), ("time_ps", np.int64)])


@dataclass
class TagBlock:
    """A block of time tags in arrival order.

    ``tags`` has dtype :data:`TAG_DTYPE`. ``overflow`` is True when the tagger dropped
    data before this block (buffer overflow); ``missed_events`` counts tags lost.
    """

    tags: npt.NDArray[np.void]
    overflow: bool = False
    missed_events: int = 0
    start_ps: int = 0
    stop_ps: int = 0

    def __len__(self) -> int:
        return int(self.tags.shape[0])


class Edge(IntEnum):
    """Which edge of an input pulse is time-tagged."""

    RISING = 0
    FALLING = 1


class ReferenceClock(IntEnum):
    """The tagger's time base: its own oscillator or an external reference (10 MHz)."""

    INTERNAL = 0
    EXTERNAL = 1


class TimeTagger(Instrument):
    """Multi-channel time-to-digital converter streaming (channel, time_ps) records.

    Input settings beyond delay and level (edge, dead time), the time base and the
    resolution are optional members: a tagger without them raises NotSupportedError.
    """

    @abc.abstractmethod
    def channels(self) -> list[int]: ...

    @abc.abstractmethod
    def set_input_delay_ps(self, channel: int, delay_ps: int) -> None: ...

    @abc.abstractmethod
    def input_delay_ps(self, channel: int) -> int: ...

    @abc.abstractmethod
    def set_trigger_level_v(self, channel: int, level_v: float) -> None: ...

    @abc.abstractmethod
    def trigger_level_v(self, channel: int) -> float: ...

    @abc.abstractmethod
    def start_stream(self) -> None: ...

    @abc.abstractmethod
    def read_block(self, timeout_s: float) -> TagBlock | None:
        """Next block of tags, or None when nothing arrived within ``timeout_s``."""

    @abc.abstractmethod
    def stop_stream(self) -> None: ...

    @abc.abstractmethod
    def count_rates_hz(self) -> dict[int, float]: ...

    def set_edge(self, channel: int, edge: Edge) -> None:
        """Tag the rising or the falling edge on ``channel``."""
        raise not_supported(self, "set_edge", "edge selection")

    def edge(self, channel: int) -> Edge:
        raise not_supported(self, "edge", "edge selection")

    def set_dead_time_ps(self, channel: int, dead_time_ps: int) -> None:
        """Minimum time between two tags on ``channel`` (later pulses are ignored), in ps."""
        raise not_supported(self, "set_dead_time_ps", "dead-time setting")

    def dead_time_ps(self, channel: int) -> int:
        raise not_supported(self, "dead_time_ps", "dead-time setting")

    def set_reference_clock(self, source: ReferenceClock) -> None:
        """Run the time base from the internal oscillator or an external reference."""
        raise not_supported(self, "set_reference_clock", "reference-clock choice")

    def reference_clock(self) -> ReferenceClock:
        raise not_supported(self, "reference_clock", "reference-clock choice")

    def resolution_ps(self) -> float:
        """Time bin (least significant bit) of the tags, in ps."""
        raise not_supported(self, "resolution_ps", "resolution reading")


# --- Transmitter state record -----------------------------------------------------


@dataclass(frozen=True)
class PreparedStates:
    """What the transmitter prepared in a set of slots (secret: never logged)."""

    basis: npt.NDArray[np.uint8]  # 0 = Z, 1 = X
    bit: npt.NDArray[np.uint8]
    intensity: npt.NDArray[np.uint8]  # IntensityClass values
    extra: dict[str, object] = field(default_factory=dict)


class StateSource(Instrument):
    """The transmitter's record of the states its QRNG-driven modulators prepared.

    On hardware this is the pattern memory of the FPGA that drives the modulators; in
    simulation it is a seeded counter-based generator. Slot indices count slots of the
    transmitter's clock since the start of the stream.
    """

    @abc.abstractmethod
    def prepared(self, slot_index: npt.NDArray[np.int64]) -> PreparedStates:
        """States prepared in ``slot_index`` (any order; repeats allowed)."""

    @abc.abstractmethod
    def slot_rate_hz(self) -> float: ...

    @abc.abstractmethod
    def next_slot(self) -> int:
        """The first slot not yet prepared: a setting changed now applies from here on."""

    @abc.abstractmethod
    def class_probabilities(self) -> tuple[float, float, float]:
        """``(p_signal, p_decoy, p_basis_z)`` of the key states prepared from now on (the
        vacuum class has ``1 - p_signal - p_decoy``)."""

    @abc.abstractmethod
    def set_class_probabilities(self, p_signal: float, p_decoy: float, p_basis_z: float) -> int:
        """Draw intensity classes and bases with these probabilities from the returned
        slot on (earlier slots keep theirs: :meth:`prepared` answers for every slot with
        the probabilities in force there). Raises :class:`drivers.errors.OutOfRangeError` unless
        ``0 < p_signal``, ``0 <= p_decoy``, ``p_signal + p_decoy <= 1`` and
        ``0 < p_basis_z < 1``."""

    @abc.abstractmethod
    def set_sync_pattern(self, public_seed: int | None) -> int:
        """Emit the public synchronization pattern (``public_seed``) or, with None, random
        key states again. Returns the first slot index the change applies to.

        The pattern is defined by :mod:`drivers.syncpattern` so that both nodes can
        compute it; slots emitted while it runs carry no key."""


# --- Simulated backends ----------------------------------------------------------


class FaultInjector(abc.ABC):
    """Starts and ends faults of a simulated backend (tests, commissioning drills).

    Fault names and their parameters are the backend's (the simulated link lists them in
    :mod:`drivers.simlink.world`)."""

    @abc.abstractmethod
    def inject(self, fault: str, **params: Any) -> None:
        """Start ``fault``. ValueError when this side of the backend does not model it,
        TypeError on parameters it does not take."""

    @abc.abstractmethod
    def clear(self, fault: str) -> None:
        """End ``fault`` (a fault that is not active, or a one-shot one: nothing)."""


class SimulatedBackend(abc.ABC):
    """The simulated physics that a process's simulated instruments are views of (one per
    process). The node runtime drives its life cycle: warm up (compile, before the node
    reports ready), start, stop; and injects faults through :attr:`faults`."""

    @abc.abstractmethod
    def warm_up(self) -> None:
        """Compile or load whatever the first start would otherwise compile (may take
        tens of seconds on a fresh install; touches no shared state)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Create and start the simulation. RuntimeError if one already runs here."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop it. Idempotent."""

    @property
    @abc.abstractmethod
    def faults(self) -> FaultInjector:
        """The running simulation's fault injector (RuntimeError when not started)."""


# --- Polarisation controller ---------------------------------------------------------


class PolarizationController(Instrument):
    """Electronic polarisation controller: a row of variable retarders (piezo fiber
    squeezers or liquid-crystal/lithium-niobate waveplates) in front of the receiver's
    analysers.

    Retarder ``i`` has its fast axis at ``axes_deg[i]`` degrees (real space; 0 and 45 are
    rotations of the Poincaré sphere about ``S1`` and ``S2``), light crosses retarder 0
    first, and its retardance is set in radians within ``retardance_range_rad``. A driver
    whose instrument takes voltages maps them with its configured half-wave voltages (the
    drive that gives a retardance of pi); the retardance a driver reports is the one it
    set, not a measurement.

    Safe state: nothing to make safe (no light, no high voltage reachable from the
    fiber); :meth:`safe_state` leaves the retardances where they are, so the link keeps
    its compensation across a restart of the node.
    """

    axes_deg: tuple[float, ...]
    retardance_range_rad: tuple[float, float]

    @abc.abstractmethod
    def set_retardances_rad(self, retardances_rad: tuple[float, ...]) -> None:
        """Set every retarder at once (one value per retarder, in order).

        ValueError (before anything is sent) for a wrong count, a value that is not
        finite or one outside ``retardance_range_rad``."""

    @abc.abstractmethod
    def retardances_rad(self) -> tuple[float, ...]:
        """The retardances in force, as read back from the instrument."""
