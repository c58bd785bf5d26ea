"""Parameters of the simulated QKD link: source, fiber, receiver, clocks and adversary.

Every field carries its unit in its name. Defaults describe a realistic 25 km metro link
with superconducting-nanowire detectors: 25 MHz slots, mu = 0.5 / 0.1 / 0, 0.2 dB/km,
efficiency 0.6, which gives about 1.8 M detections/s and an error rate near 1 %.

Who may read what (the two nodes are separate processes and the receiver must learn the
transmitted states only through simulated photons):

* transmitter world: ``source``, ``fiber`` (loss only), ``eve``, ``transmitter``
  (hidden hardware truths of the transmitter's instruments) and ``transmitter_seed``
  (secret: it drives the basis, bit and intensity choices).
* receiver world: ``fiber`` (length, misalignment, drift), ``receiver``, ``clock`` and
  ``receiver_seed``. It never reads ``source``, ``eve``, ``transmitter`` or
  ``transmitter_seed``; the slot rate reaches it with the photons.

Encoding: polarisation. The four BB84 states are linear polarisations at 0 (H), 90 (V),
45 (D) and 135 (A) degrees; a rotation of the reference by ``delta`` radians gives an
error probability ``sin(delta)**2`` in both bases.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class FiberParams(_Strict):
    length_km: float = Field(25.0, ge=0, le=500)
    loss_db_per_km: float = Field(0.2, ge=0, le=2)
    insertion_loss_db: float = Field(1.0, ge=0, le=40)
    group_index: float = Field(1.468, ge=1, le=2, description="sets the fiber delay")
    misalignment: float = Field(0.01, ge=0, le=0.5, description="optical error probability e_d")
    drift_rad_per_sqrt_s: float = Field(
        0.002, ge=0, le=10, description="random-walk drift of the polarisation reference"
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


class ReceiverParams(_Strict):
    basis_choice: Literal["passive", "active"] = "passive"
    p_basis_z: float = Field(0.8, gt=0, lt=1, description="receiver's Z-basis probability")
    detector_efficiency: tuple[float, float, float, float] = (0.6, 0.6, 0.6, 0.6)
    dark_count_rate_hz: float = Field(100.0, ge=0, le=1e7, description="free-running, per det.")
    afterpulse_probability: float = Field(0.0, ge=0, le=0.5)
    afterpulse_delay_ns: float = Field(
        100.0, gt=0, le=1e6, description="mean trap release time after the dead time"
    )
    dead_time_ns: float = Field(50.0, ge=0, le=1e5)
    jitter_ps: float = Field(30.0, ge=0, le=1e5, description="timing jitter, one sigma")
    gate_width_ps: float = Field(1000.0, gt=0, description="detection window per slot")
    true_delay_ps: float = Field(
        12345.0, ge=0, le=1e9, description="optical delay of the pulse after the slot edge (hidden)"
    )
    threshold_window_v: tuple[float, float] = Field(
        (0.05, 0.4),
        description="discriminator thresholds that work: below, noise clicks; above, none",
    )

    @model_validator(mode="after")
    def _check(self) -> ReceiverParams:
        if not all(0.0 <= e <= 1.0 for e in self.detector_efficiency):
            raise ValueError("detector_efficiency values must lie in [0, 1]")
        return self


class ClockParams(_Strict):
    offset_s: float = Field(0.3717, ge=-1e3, le=1e3, description="receiver clock offset")
    frequency_offset_ppm: float = Field(12.5, ge=-200, le=200)
    wander_ppm_per_sqrt_s: float = Field(0.01, ge=0, le=10)


class EveParams(_Strict):
    mode: Literal["none", "intercept-resend", "beam-splitting"] = "none"
    fraction: float = Field(0.0, ge=0, le=1, description="fraction of pulses attacked")


class TransmitterHardwareParams(_Strict):
    """Hidden truths of the transmitter's simulated instruments (calibration finds them)."""

    laser_power_dbm: float = Field(0.0, ge=-20, le=20, description="power at power-on")
    laser_warmup_s: float = Field(0.5, ge=0, le=600)
    fixed_attenuation_db: float = Field(
        50.0, ge=0, le=120, description="fixed attenuator after the VOA and power-meter tap"
    )
    im_v_pi_v: float = Field(3.7, gt=0, le=20, description="intensity modulator V_pi")
    im_bias_opt_v: float = Field(1.23, ge=-10, le=10, description="bias of maximal T")
    im_extinction_db: float = Field(40.0, ge=10, le=80)
    encoder_v_pi_v: float = Field(2.9, gt=0, le=20, description="drive for a 90 deg rotation")
    encoder_bias_opt_v: float = Field(0.61, ge=-10, le=10)
    power_meter_noise_w: float = Field(1e-12, ge=0, le=1e-6)


class LinkParams(_Strict):
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
