"""Parameters of the simulated QKD link: source, fiber, receiver, clocks and adversary.

Every field carries its unit in its name. Defaults describe a realistic 25 km metro link
with superconducting-nanowire detectors: 25 MHz slots, mu = 0.5 / 0.1 / 0, 0.2 dB/km,
efficiency 0.6, which gives about 1.2 M detections/s and an error rate near 1 %.

Hardware values are *nominal* (datasheet) values: each simulated box draws its actual
values, the hidden truths calibration must find, from a documented spread around them
with its own ``hardware_seed`` (:mod:`drivers.simlink.truths`).

The two nodes are separate processes, and each holds only its side of the link:

* :class:`TransmitterSimParams` (the transmitter's process): ``transmitter_seed``
  (secret: it drives the basis, bit and intensity choices), the ``source``, the
  transmitter's ``hardware``, and the ``fiber`` with whatever sits on it (``eve``). The
  simulated fiber runs in the transmitter's process, because only the pulses that survive
  it are generated: its loss, propagation delay, polarisation misalignment and drift are
  applied before a batch leaves, and the batch arrives as the light at the fiber's far
  end, which is the receiver box's input.
* :class:`ReceiverSimParams` (the receiver's process): ``receiver_seed``, the receiver's
  ``hardware`` (optics and detectors) and its time tagger's ``clock``. It holds nothing of
  the transmitter: the slot rate and the arrival times reach it with the photons.

:class:`LinkParams` is the whole link in one model (the demo's ``[link]`` table and
in-process tests); :meth:`LinkParams.transmitter_side` and
:meth:`LinkParams.receiver_side` cut it into the two sides.

Encoding: polarisation. The four BB84 states are linear polarisations at 0 (H), 90 (V),
45 (D) and 135 (A) degrees; a rotation of the reference by ``delta`` radians gives an
error probability ``sin(delta)**2`` in both bases.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.simlink.satellite_channel import SatelliteChannelParams

__all__ = [
    "ClockParams",
    "DriftParams",
    "ReceiverDriftParams",
    "EveParams",
    "FiberParams",
    "LinkParams",
    "PolarizationDriftParams",
    "ReceiverParams",
    "ReceiverSimParams",
    "SourceParams",
    "TransmitterHardwareParams",
    "TransmitterSimParams",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_HARDWARE_SEED_DOC = "draws this box's hardware truths around the nominal values (not secret)"
_SPREAD_DOC = (
    "scale of the documented unit-to-unit spreads (drivers.simlink.truths): 1 as "
    "documented; 0: the values given here are the truths (tests that pin the physics)"
)


class SourceParams(_Strict):
    slot_rate_hz: float = Field(25e6, gt=0, le=10e9, description="pulse (slot) rate")
    mu_signal: float = Field(0.5, gt=0, le=10, description="true mean photon number, signal")
    mu_decoy: float = Field(0.1, ge=0, le=10, description="true mean photon number, decoy")
    mu_vacuum: float = Field(0.0, ge=0, le=1, description="residual mean photon number, vacuum")
    p_signal: float = Field(0.6, gt=0, lt=1)
    p_decoy: float = Field(0.2, ge=0, lt=1)
    p_basis_z: float = Field(0.8, gt=0, lt=1, description="probability of preparing Z")
    wavelength_nm: float = Field(1550.12, ge=400, le=2000)

    @model_validator(mode="after")
    def _check(self) -> SourceParams:
        if self.p_signal + self.p_decoy > 1:
            raise ValueError("p_signal + p_decoy must be <= 1 (the rest is vacuum)")
        return self

    @property
    def p_vacuum(self) -> float:
        return max(0.0, 1.0 - self.p_signal - self.p_decoy)


class PolarizationDriftParams(_Strict):
    """The fiber's full SU(2) polarisation drift (:mod:`drivers.simlink.polarization`).

    Rotations are on the Poincaré sphere (a rotation by ``phi`` there turns a linear
    polarisation by up to ``phi / 2`` in real space). The default, 0.01 rad/sqrt(s) per
    axis, is a buried metro fiber: the state wanders about a radian in three hours, and
    without compensation the error rate of each basis rises by ``0.01**2 * t / 2``, 0.3 %
    after one minute and 3 % after ten (on average; the walk is random).
    """

    drift_rad_per_sqrt_s: float = Field(
        0.01, ge=0, le=10, description="random walk on SO(3): standard deviation per axis"
    )
    jump_times_s: tuple[float, ...] = Field(
        (), description="link times (s since the world started) of jumps (fiber touched)"
    )
    jump_rate_per_hour: float = Field(0.0, ge=0, le=3600, description="Poisson rate of jumps")
    jump_angle_rad: float = Field(
        1.0, ge=0, le=math.pi, description="rotation of one jump, about a random axis"
    )
    initial_rotation_rad: tuple[float, float, float] | None = Field(
        None, description="rotation vector of the fiber at start (None: identity)"
    )

    @field_validator("jump_times_s")
    @classmethod
    def _times(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (math.isfinite(t) and t >= 0) for t in v):
            raise ValueError(f"jump_times_s must be finite and >= 0, got {v}")
        return tuple(sorted(v))


class FiberParams(_Strict):
    """The channel between the boxes (simulated in the transmitter's process).

    ``drift_rad_per_sqrt_s`` turns every state about ``S3`` only (the reference angle: one
    degree of freedom, what the encoder bias undoes); ``polarization`` adds the fiber's
    full SU(2) rotation, which needs the receiver's polarisation controller.
    """

    length_km: float = Field(25.0, ge=0, le=500)
    loss_db_per_km: float = Field(0.2, ge=0, le=2)
    insertion_loss_db: float = Field(1.0, ge=0, le=40)
    group_index: float = Field(1.468, ge=1, le=2, description="sets the fiber delay")
    misalignment: float = Field(0.01, ge=0, le=0.5, description="optical error probability e_d")
    drift_rad_per_sqrt_s: float = Field(
        0.002, ge=0, le=10, description="random-walk drift of the polarisation reference"
    )
    polarization: PolarizationDriftParams | None = Field(
        None, description="full SU(2) drift and jumps of the fiber; None: none"
    )

    @property
    def transmittance(self) -> float:
        """Channel transmittance (fiber and insertion loss), dimensionless."""
        loss_db = self.length_km * self.loss_db_per_km + self.insertion_loss_db
        return float(10.0 ** (-loss_db / 10.0))

    @property
    def delay_s(self) -> float:
        """Propagation delay of the fiber in seconds."""
        return self.length_km * 1e3 * self.group_index / 299_792_458.0


class ReceiverDriftParams(_Strict):
    """Slow drifts of the receiver box while it runs (simulation truths, off by default).

    * dark counts: a detector warming up (a cooler losing its grip, a warm room) raises
      its dark count rate roughly exponentially with the temperature (InGaAs SPADs: about
      a factor 2 per 5 to 10 K), and the temperature follows a step with a first-order
      lag. The dark rates are multiplied by ``dark_rate_factor ** (1 - exp(-t / tau))``
      from ``dark_rate_rise_start_s`` of simulated time on (``t`` counted from there,
      ``tau`` = ``dark_rate_time_constant_s``): 1 before, ``dark_rate_factor`` long after.
      Simulated time runs from the receiver's first fiber batch.
    """

    dark_rate_factor: float = Field(
        1.0, ge=1.0, le=1e5, description="final factor on every detector's dark count rate"
    )
    dark_rate_time_constant_s: float = Field(
        60.0, gt=0, le=1e6, description="thermal time constant of the rise, s"
    )
    dark_rate_rise_start_s: float = Field(
        0.0, ge=0, le=1e7, description="simulated seconds after the first batch the rise starts"
    )

    def dark_factor(self, t_s: float) -> float:
        """The factor on the dark count rates at simulated time ``t_s`` (seconds)."""
        if self.dark_rate_factor == 1.0 or t_s <= self.dark_rate_rise_start_s:
            return 1.0
        x = (t_s - self.dark_rate_rise_start_s) / self.dark_rate_time_constant_s
        return float(self.dark_rate_factor ** (-math.expm1(-x)))


class ReceiverParams(_Strict):
    """The receiver box: analysers, detectors (nominal values) and the seed of its truths.

    ``hardware_seed`` also draws the truths of the tagger's :class:`ClockParams`.
    """

    hardware_seed: int = Field(12, ge=0, description=_HARDWARE_SEED_DOC)
    spread_scale: float = Field(1.0, ge=0, le=3, description=_SPREAD_DOC)
    basis_choice: Literal["passive", "active"] = "passive"
    p_basis_z: float = Field(0.8, gt=0, lt=1, description="receiver's Z-basis probability")
    detector_efficiency: tuple[float, float, float, float] = (0.6, 0.6, 0.6, 0.6)
    dark_count_rates_hz: tuple[float, float, float, float] = Field(
        (100.0, 100.0, 100.0, 100.0),
        description="free-running dark count rate per detector (H, V, D, A); a single "
        "number sets all four",
    )
    afterpulse_probability: float = Field(0.0, ge=0, le=0.5)
    afterpulse_delay_ns: float = Field(
        100.0, gt=0, le=1e6, description="mean trap release time after the dead time"
    )
    dead_time_ns: float = Field(50.0, ge=0, le=1e5)
    counter_integration_s: float = Field(
        0.0,
        ge=0,
        le=10,
        description="the detectors' count-rate integration period (0: one simulated batch)",
    )
    jitter_ps: float = Field(30.0, ge=0, le=1e5, description="timing jitter, one sigma")
    gate_width_ps: float = Field(1000.0, gt=0, description="detection window per slot")
    true_delay_ps: float = Field(
        12345.0, ge=0, le=1e9, description="optical delay of the pulse after the slot edge (hidden)"
    )
    threshold_window_v: tuple[float, float] = Field(
        (0.05, 0.4),
        description="discriminator thresholds that work: below, noise clicks; above, none",
    )
    drift: ReceiverDriftParams = Field(
        ReceiverDriftParams(), description="slow drifts while the box runs (off by default)"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_dark_rate(cls, data: Any) -> Any:
        """``dark_count_rate_hz = X`` (one rate for all four detectors) is still read."""
        if isinstance(data, dict) and "dark_count_rate_hz" in data:
            data = dict(data)
            rate = data.pop("dark_count_rate_hz")
            if "dark_count_rates_hz" in data:
                raise ValueError("give dark_count_rates_hz or dark_count_rate_hz, not both")
            data["dark_count_rates_hz"] = rate
        return data

    @field_validator("dark_count_rates_hz", mode="before")
    @classmethod
    def _broadcast(cls, v: Any) -> Any:
        return (v, v, v, v) if isinstance(v, int | float) else v

    @model_validator(mode="after")
    def _check(self) -> ReceiverParams:
        if not all(0.0 <= e <= 1.0 for e in self.detector_efficiency):
            raise ValueError("detector_efficiency values must lie in [0, 1]")
        if not all(0.0 <= r <= 1e7 for r in self.dark_count_rates_hz):
            raise ValueError("dark_count_rates_hz values must lie in [0, 1e7]")
        return self

    @property
    def dark_count_rate_hz(self) -> float:
        """Mean dark count rate of the four detectors (the background yield depends only on
        their sum)."""
        return sum(self.dark_count_rates_hz) / len(self.dark_count_rates_hz)


class ClockParams(_Strict):
    """The receiver's time tagger clock against the transmitter's slot clock (nominal)."""

    offset_s: float = Field(0.0, ge=-1e3, le=1e3, description="receiver clock offset")
    frequency_offset_ppm: float = Field(0.0, ge=-200, le=200)
    wander_ppm_per_sqrt_s: float = Field(0.01, ge=0, le=10)


class EveParams(_Strict):
    mode: Literal["none", "intercept-resend", "beam-splitting"] = "none"
    fraction: float = Field(0.0, ge=0, le=1, description="fraction of pulses attacked")


class DriftParams(_Strict):
    """Slow drifts of the transmitter box while it runs (simulation truths, all off by
    default: a link without a ``drift`` table is unchanged).

    Each is a deterministic rate plus, for the bias, a random walk (stepped per fiber
    batch from the world's own counter-based stream, so a run repeats exactly). They
    start at power-on and act on the hidden truths, never on a setting: the instruments
    read back what they were told while the physics moves under them.

    Orders of magnitude (``configs/drift.toml`` turns them on at these rates):

    * intensity-modulator bias: the DC drift of LiNbO3 Mach-Zehnder modulators moves the
      operating point by volts over hours to days, faster when the temperature changes
      (Salvestrini et al., "Analysis and control of the DC drift in LiNbO3-based
      Mach-Zehnder modulators", J. Lightwave Technol. 29, 1522 (2011));
    * laser power: a temperature-stabilised DFB laser wanders by hundredths to tenths
      of a dB per hour (ageing and temperature of its driver);
    * power-meter gain: InGaAs photodiode responsivity changes by about 0.1 % per kelvin
      at 1550 nm (less below, more towards the band edge), so a 1 K/h room swing moves
      the reading by about 1e-3 per hour.
    """

    im_bias_v_per_s: float = Field(
        0.0, ge=-1.0, le=1.0, description="linear drift of the IM's bias optimum, V/s"
    )
    im_bias_walk_v_per_sqrt_s: float = Field(
        0.0, ge=0.0, le=1.0, description="random walk of the IM's bias optimum, V/sqrt(s)"
    )
    laser_power_db_per_s: float = Field(
        0.0, ge=-0.1, le=0.1, description="linear drift of the laser's true output, dB/s"
    )
    power_meter_gain_per_s: float = Field(
        0.0,
        ge=-0.01,
        le=0.01,
        description="linear drift of the power meter's gain (relative, 1/s): the reading "
        "over the true power moves by this fraction per second",
    )

    @property
    def any(self) -> bool:
        """Whether any drift is on."""
        return any(
            v != 0.0
            for v in (
                self.im_bias_v_per_s,
                self.im_bias_walk_v_per_sqrt_s,
                self.laser_power_db_per_s,
                self.power_meter_gain_per_s,
            )
        )


class TransmitterHardwareParams(_Strict):
    """The transmitter box's instruments (nominal values; calibration finds the truths).

    Optical path: laser, intensity modulator, encoder, variable attenuator (VOA) and
    shutter, then a monitor tap feeding the power meter (``tap_ratio_db`` below the through
    path), then the fixed output attenuation: the box output is ``tap_to_output_db`` below
    the power at the meter's port.
    """

    hardware_seed: int = Field(11, ge=0, description=_HARDWARE_SEED_DOC)
    spread_scale: float = Field(1.0, ge=0, le=3, description=_SPREAD_DOC)
    laser_power_dbm: float = Field(0.0, ge=-20, le=20, description="set point at power-on")
    laser_power_error_db: float = Field(
        0.0, ge=-3, le=3, description="true output power minus the set point (hidden)"
    )
    laser_warmup_s: float = Field(0.5, ge=0, le=600)
    tap_ratio_db: float = Field(
        10.0, ge=0, le=40, description="monitor tap: power-meter port below the through path"
    )
    tap_to_output_db: float = Field(
        50.0,
        ge=0,
        le=120,
        description="box output below the power-meter port (what commissioning measures)",
    )
    power_meter_gain: float = Field(
        1.0, gt=0.5, lt=1.5, description="power-meter reading over the true power (hidden)"
    )
    im_v_pi_v: float = Field(3.7, gt=0, le=20, description="intensity modulator V_pi")
    im_bias_opt_v: float = Field(1.23, ge=-10, le=10, description="bias of maximal T")
    im_extinction_db: float = Field(40.0, ge=10, le=80)
    encoder_v_pi_v: float = Field(3.0, gt=0, le=20, description="drive for a 90 deg rotation")
    encoder_bias_opt_v: float = Field(0.8, ge=-10, le=10)
    power_meter_noise_w: float = Field(1e-12, ge=0, le=1e-6)
    drift: DriftParams = Field(
        DriftParams(), description="slow drifts while the box runs (off by default)"
    )

    @model_validator(mode="before")
    @classmethod
    def _old_name(cls, data: Any) -> Any:
        """``fixed_attenuation_db`` (the attenuation after the meter's tap) is read as
        ``tap_to_output_db``."""
        if isinstance(data, dict) and "fixed_attenuation_db" in data:
            data = dict(data)
            value = data.pop("fixed_attenuation_db")
            if "tap_to_output_db" in data:
                raise ValueError("give tap_to_output_db or fixed_attenuation_db, not both")
            data["tap_to_output_db"] = value
        return data

    @property
    def output_attenuation_db(self) -> float:
        """Attenuation from the VOA's output to the box output (tap and fixed attenuator)."""
        return self.tap_ratio_db + self.tap_to_output_db


#: Keys of one side that never belong in the other side's parameters.
_TRANSMITTER_ONLY = ("transmitter_seed", "source", "fiber", "eve", "transmitter", "satellite")
_RECEIVER_ONLY = ("receiver_seed", "clock", "receiver")
_WHAT = {
    "transmitter": "its secret seed, source, fiber, eavesdropper and hardware truths",
    "receiver": "its seed, hardware truths and clock",
}
_SHARED_HARDWARE = {"hardware_seed", "spread_scale", "drift"}  # each side its own drift


def _refuse(data: Any, keys: tuple[str, ...], other: type[BaseModel], side: str) -> None:
    """Refuse the other side's keys (its secrets and truths) with a message naming them."""
    if not isinstance(data, dict):
        return
    owner = "transmitter" if side == "receiver" else "receiver"
    found = [k for k in keys if k in data]
    hardware = data.get("hardware")
    if isinstance(hardware, dict):
        foreign = set(other.model_fields) - _SHARED_HARDWARE
        found += [f"hardware.{k}" for k in hardware if k in foreign]
    if found:
        raise ValueError(
            f"{', '.join(found)}: the {owner}'s side of the simulated link ({_WHAT[owner]}) "
            f"never belongs in the {side}'s"
        )


class TransmitterSimParams(_Strict):
    """What the transmitter's process simulates: its box, the fiber and the adversary."""

    transmitter_seed: int = Field(1, ge=0, description="secret: the transmitter's choices")
    chunk_slots: int = Field(
        1 << 20, ge=1 << 10, le=1 << 26, description="slots simulated per fiber batch"
    )
    start_calibrated: bool = Field(
        False,
        description="power on with every instrument at its optimum (laser on, levels set); "
        "False: safe state, calibration must do it",
    )
    source: SourceParams = SourceParams()
    fiber: FiberParams = FiberParams()
    eve: EveParams = EveParams()
    hardware: TransmitterHardwareParams = TransmitterHardwareParams()
    satellite: SatelliteChannelParams | None = Field(
        None, description="satellite passes in place of the fiber's loss and delay"
    )

    @model_validator(mode="before")
    @classmethod
    def _own_side_only(cls, data: Any) -> Any:
        _refuse(data, _RECEIVER_ONLY, ReceiverParams, "transmitter")
        return data


class ReceiverSimParams(_Strict):
    """What the receiver's process simulates: its box (analysers, detectors, tagger clock).

    Nothing of the transmitter: no seed, no source, no fiber, no transmitter hardware."""

    receiver_seed: int = Field(2, ge=0, description="the receiver's randomness")
    start_calibrated: bool = Field(
        False,
        description="power on with the detectors armed at the true delay; False: disarmed "
        "at 0 ps, calibration must find the delay",
    )
    hardware: ReceiverParams = ReceiverParams()
    clock: ClockParams = ClockParams()

    @model_validator(mode="before")
    @classmethod
    def _own_side_only(cls, data: Any) -> Any:
        _refuse(data, _TRANSMITTER_ONLY, TransmitterHardwareParams, "receiver")
        return data


class LinkParams(_Strict):
    """The whole simulated link (both sides): the demo's ``[link]`` and in-process tests."""

    transmitter_seed: int = Field(1, ge=0, description="secret: the transmitter's choices")
    receiver_seed: int = Field(2, ge=0, description="the receiver's randomness")
    chunk_slots: int = Field(
        1 << 20, ge=1 << 10, le=1 << 26, description="slots simulated per fiber batch"
    )
    start_calibrated: bool = Field(
        False,
        description="power on with every instrument at its optimum (laser on, levels set, "
        "detectors armed at the true delay); False: safe state, calibration must do it",
    )
    source: SourceParams = SourceParams()
    fiber: FiberParams = FiberParams()
    receiver: ReceiverParams = ReceiverParams()
    clock: ClockParams = ClockParams()
    eve: EveParams = EveParams()
    transmitter: TransmitterHardwareParams = TransmitterHardwareParams()
    satellite: SatelliteChannelParams | None = None

    def transmitter_side(self) -> TransmitterSimParams:
        """The transmitter's process's part: seed, source, fiber, eve, its hardware."""
        return TransmitterSimParams(
            transmitter_seed=self.transmitter_seed,
            chunk_slots=self.chunk_slots,
            start_calibrated=self.start_calibrated,
            source=self.source,
            fiber=self.fiber,
            eve=self.eve,
            hardware=self.transmitter,
            satellite=self.satellite,
        )

    def receiver_side(self) -> ReceiverSimParams:
        """The receiver's process's part: seed, its hardware and clock."""
        return ReceiverSimParams(
            receiver_seed=self.receiver_seed,
            start_calibrated=self.start_calibrated,
            hardware=self.receiver,
            clock=self.clock,
        )
