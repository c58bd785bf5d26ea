"""Transmitter optics: how instrument settings become photon numbers and states.

The hidden truths (V_pi, bias optima, attenuations, laser power and meter gain errors)
live in :class:`drivers.simlink.params.TransmitterHardwareParams` (as drawn by
:mod:`drivers.simlink.truths`); the simulated instruments only change the settings held in
:class:`TxOptics`.

* laser output: the set point plus the hidden ``laser_power_error_db`` (plus its drift);
* drifts (:class:`~drivers.simlink.params.DriftParams`, off by default) move the IM's
  bias optimum, the laser's true output and the meter's gain while the world runs;
* mean photon number of class ``c`` at the transmitter output:
  ``mu_c = P_laser / (h c / lambda) / slot_rate * T_IM(V_c) * 10^(-(VOA + tap + tap_to_output)/10)``
  (zero with emission off or the shutter closed);
* intensity modulator: ``T(V) = T_min + (1 - T_min) cos^2(pi/2 (V + bias - bias_opt) / V_pi)``
  with ``V`` the class's drive level (0 V with the outputs off);
* encoder: polarisation angle ``pi/2 (V + bias - bias_opt) / V_pi_enc`` (radians, linear
  polarisation); the ideal drives are 0, V_pi_enc, V_pi_enc/2, 3 V_pi_enc/2 for H, V, D, A;
* power meter: on a monitor tap after the VOA and shutter, ``tap_ratio_db`` below the
  through path, before the fixed output attenuation (the output is ``tap_to_output_db``
  below the meter's port); it reads ``gain`` times the average over the class mix
  ``P_laser * <T_IM> * 10^(-(VOA + tap)/10)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from drivers.simlink.params import SourceParams, TransmitterHardwareParams

PLANCK_J_S = 6.626_070_15e-34
LIGHT_SPEED_M_S = 299_792_458.0
VOA_RANGE_DB = (0.0, 60.0)
#: the encoder's datasheet V_pi: what an uncalibrated node starts from
ENCODER_NOMINAL_V_PI_V = 3.0


@dataclass
class TxOptics:
    """Settings of the transmitter's optical instruments (the instruments' shared state)."""

    emission_on: bool = False
    emission_since_s: float = 0.0
    laser_power_dbm: float = 0.0
    wavelength_nm: float = 1550.12
    im_levels_v: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    im_bias_v: float = 0.0
    im_output_on: bool = False
    encoder_drive_v: list[float] = field(
        default_factory=lambda: [
            0.0,
            ENCODER_NOMINAL_V_PI_V,
            ENCODER_NOMINAL_V_PI_V / 2,
            1.5 * ENCODER_NOMINAL_V_PI_V,
        ]
    )
    encoder_bias_v: float = 0.0
    encoder_output_on: bool = False
    voa_db: float = VOA_RANGE_DB[1]
    shutter_open: bool = False
    power_meter_wavelength_nm: float = 1550.0
    #: hidden drifts since power-on (:class:`~drivers.simlink.params.DriftParams`): the
    #: IM's bias optimum moved by this many volts, the laser's true output by this many
    #: dB, the meter's gain by this fraction
    im_bias_drift_v: float = 0.0
    laser_drift_db: float = 0.0
    meter_gain_drift: float = 0.0

    @classmethod
    def power_on(
        cls, hw: TransmitterHardwareParams, source: SourceParams, calibrated: bool
    ) -> TxOptics:
        """Settings at power-on: safe (all off) or at the optimum for ``source``'s targets."""
        optics = cls(laser_power_dbm=hw.laser_power_dbm, wavelength_nm=source.wavelength_nm)
        if not calibrated:
            return optics
        optics.emission_on = True
        optics.emission_since_s = -1e9
        optics.im_bias_v = hw.im_bias_opt_v
        t_min = 10.0 ** (-hw.im_extinction_db / 10.0)
        ratio = min(1.0, source.mu_decoy / source.mu_signal)
        cos2 = max(0.0, (ratio - t_min) / (1.0 - t_min))
        decoy_v = 2.0 / math.pi * hw.im_v_pi_v * math.acos(math.sqrt(cos2))
        optics.im_levels_v = [0.0, decoy_v, hw.im_v_pi_v]
        optics.im_output_on = True
        v = hw.encoder_v_pi_v
        optics.encoder_drive_v = [0.0, v, v / 2, 1.5 * v]
        optics.encoder_bias_v = hw.encoder_bias_opt_v
        optics.encoder_output_on = True
        photons = photons_per_pulse(
            optics.true_laser_dbm(hw), source.wavelength_nm, source.slot_rate_hz
        )
        voa = -10.0 * math.log10(source.mu_signal / photons) - hw.output_attenuation_db
        optics.voa_db = min(max(voa, VOA_RANGE_DB[0]), VOA_RANGE_DB[1])
        optics.shutter_open = True
        return optics

    def light_on(self) -> bool:
        return self.emission_on and self.shutter_open

    def true_laser_dbm(self, hw: TransmitterHardwareParams) -> float:
        """What the laser really emits: its set point plus the hidden error."""
        return self.laser_power_dbm + hw.laser_power_error_db + self.laser_drift_db

    def im_bias_opt_v(self, hw: TransmitterHardwareParams) -> float:
        """Where the IM's bias of maximal transmission is now (its truth plus the drift)."""
        return hw.im_bias_opt_v + self.im_bias_drift_v

    def im_transmission(self, hw: TransmitterHardwareParams) -> tuple[float, float, float]:
        """Intensity-modulator transmission for SIGNAL, DECOY, VACUUM (dimensionless)."""
        t_min = 10.0 ** (-hw.im_extinction_db / 10.0)
        levels = self.im_levels_v if self.im_output_on else [0.0, 0.0, 0.0]
        out = [
            t_min
            + (1.0 - t_min)
            * math.cos(math.pi / 2 * (v + self.im_bias_v - self.im_bias_opt_v(hw)) / hw.im_v_pi_v)
            ** 2
            for v in levels
        ]
        return out[0], out[1], out[2]

    def mu_per_class(
        self, hw: TransmitterHardwareParams, slot_rate_hz: float
    ) -> tuple[float, float, float]:
        """Mean photon numbers per pulse at the transmitter output (after the fixed att.)."""
        if not self.light_on():
            return 0.0, 0.0, 0.0
        photons = photons_per_pulse(self.true_laser_dbm(hw), self.wavelength_nm, slot_rate_hz)
        att = 10.0 ** (-(self.voa_db + hw.output_attenuation_db) / 10.0)
        t = self.im_transmission(hw)
        scale = float(photons * att)
        return scale * t[0], scale * t[1], scale * t[2]

    def state_angles_rad(self, hw: TransmitterHardwareParams) -> tuple[float, float, float, float]:
        """Prepared polarisation angle of H, V, D, A in radians."""
        drives = self.encoder_drive_v if self.encoder_output_on else [0.0] * 4
        bias = self.encoder_bias_v - hw.encoder_bias_opt_v
        a = [math.pi / 2 * (v + bias) / hw.encoder_v_pi_v for v in drives]
        return a[0], a[1], a[2], a[3]

    def meter_power_w(self, hw: TransmitterHardwareParams, p_class: tuple[float, ...]) -> float:
        """Noise-free reading of the power meter in watts (class-averaged, with its gain)."""
        if not self.light_on():
            return 0.0
        t = self.im_transmission(hw)
        mean_t = sum(p * x for p, x in zip(p_class, t, strict=True))
        tap = 10.0 ** (-(self.voa_db + hw.tap_ratio_db) / 10.0)
        gain = hw.power_meter_gain * (1.0 + self.meter_gain_drift)
        return float(gain * dbm_to_w(self.true_laser_dbm(hw)) * mean_t * tap)

    def laser_warm(self, hw: TransmitterHardwareParams) -> bool:
        return self.emission_on and time.monotonic() - self.emission_since_s >= hw.laser_warmup_s


def dbm_to_w(power_dbm: float) -> float:
    return float(1e-3 * 10.0 ** (power_dbm / 10.0))


def photons_per_pulse(power_dbm: float, wavelength_nm: float, slot_rate_hz: float) -> float:
    """Mean photons per pulse of a laser of ``power_dbm`` pulsed at ``slot_rate_hz``."""
    photon_j = PLANCK_J_S * LIGHT_SPEED_M_S / (wavelength_nm * 1e-9)
    return dbm_to_w(power_dbm) / photon_j / slot_rate_hz
