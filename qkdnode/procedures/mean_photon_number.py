"""Mean photon number: set the signal and decoy intensities, measure all three classes.

Transmitter side. The power-meter tap sits after the variable attenuator (VOA) and
before the box's fixed output attenuation, so

    mu = P_tap * 10^(-tap_to_output_db / 10) / (h c / lambda) / slot_rate

``tap_to_output_db`` cannot be measured in the field: it is a commissioning input (measured
at the factory with calibrated meters at the tap and the output port) with its stated
uncertainty. Without it the procedure refuses to run: any default would be a guess that
looks like a measurement.

While measuring one class the three class drives are set to that class's level, so the
meter (which averages over slots) reads that class alone. The meter's zero is read with
the VOA shutter closed. The VOA is set from a reading and corrected until the signal is
on target; then the decoy drive is moved along the calibrated modulator curve until the
decoy is on target. Finally each class (signal, decoy, vacuum) is read
``final_readings`` times and reported as an :class:`IntensityInterval`:

* statistical: mean of the readings minus the zero, +/- ``coverage_factor`` standard
  errors (readings and zero);
* systematic, as bounds added in the worst direction (they are common to all classes):
  the meter's calibration (relative), the tap-to-output uncertainty (dB) and the drift
  allowed until the next calibration (relative: laser power, VOA).

A drift of the modulator's bias is not common: it moves the decoy (on the slope of the
transfer curve) without the signal (at its top), and the vacuum (near its minimum) by
large fractions. Each class therefore has its own relative allowance on top of its
statistical interval (``signal_drift_allowance``, ``decoy_drift_allowance``,
``vacuum_drift_allowance``): :meth:`MeanPhotonResult.class_bounds` is each
class's statistical interval widened by it, independently of the other classes (a box:
each class may move alone), and the true intensities are these times one factor in
:meth:`MeanPhotonResult.common_scale`. The decoy-state bound needs
``mu1.lower > mu2.upper + mu3.upper`` and ``mu2.lower > mu3.upper`` of the class bounds;
a calibration whose allowances break that is refused
(:meth:`MeanPhotonResult.bound_conditions_error`).

A class whose net power is within ``coverage_factor`` standard errors of zero (the
vacuum class of a modulator with a high extinction) is below the meter's resolution:
only its upper bound is reported (``mu`` None, ``lower`` 0).
The class levels are restored at the end.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.interfaces import (
    IntensityClass,
    IntensityModulator,
    Laser,
    LaserStatus,
    OpticalPowerMeter,
    VariableAttenuator,
)
from qkdnode.procedures.common import (
    COVERAGE_FACTOR,
    HC_J_M,
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    finish,
    settle,
)
from qkdnode.procedures.modulator import (
    ModulatorResult,
    decoy_drive_v,
    read_power,
    set_all_levels,
)

__all__ = [
    "IntensityInterval",
    "IntensityUncertainty",
    "MeanPhotonConfig",
    "MeanPhotonResult",
    "calibrate_mean_photon_number",
    "intensity_interval",
    "mu_from_power",
    "plot_mean_photon_number",
]

#: Relative calibration uncertainty of the power meter: benchtop InGaAs photodiode sensors
#: specify 2-3.5 % at 1550 nm and reference conditions (traceable calibration to IEC
#: 61315), plus their linearity across the decades between the classes' powers.
METER_UNCERTAINTY = 0.03
#: Relative drift of the output intensities allowed until the next calibration: a DFB
#: laser under automatic power control holds about +/-0.05 dB a day, a VOA moves about
#: 0.1 dB over its temperature range, the modulator bias is tracked; 5 % (0.2 dB) covers
#: both. Supervise it: :meth:`MeanPhotonResult.mix_power_w` is what the tap should read.
DRIFT_ALLOWANCE = 0.05
#: Uncertainty of a factory tap-to-output measurement with two calibrated meters.
TAP_TO_OUTPUT_UNCERTAINTY_DB = 0.2
#: Relative change of the decoy alone (the modulator's bias: the decoy sits on the slope
#: of the transfer curve) that the bound allows for and the per-class checks keep it
#: within (docs/architecture.md, "Intensity classes under bias drift": the key it costs
#: and the drift it lets through).
DECOY_DRIFT_ALLOWANCE = 0.05
#: The same for the signal, at the top of the curve: a bias offset moves it to second
#: order (by 1.6e-4 where the decoy has moved 5 %), so a small allowance is enough, and
#: each per cent of it costs about 3 % of the key.
SIGNAL_DRIFT_ALLOWANCE = 0.005
#: Relative rise of the vacuum class alone that the bound allows for: the vacuum sits near
#: the curve's minimum, where a few mV of bias move it by tens of per cent, and its upper
#: bound costs almost no key (mu_vacuum ~ 1e-4 of mu_signal): doubling it is cheap.
VACUUM_DRIFT_ALLOWANCE = 1.0


def mu_from_power(
    power_w: float, wavelength_nm: float, slot_rate_hz: float, tap_to_output_db: float
) -> float:
    """Mean photons per pulse at the output from the tap power."""
    photon_j = HC_J_M / (wavelength_nm * 1e-9)
    return float(power_w * 10.0 ** (-tap_to_output_db / 10.0) / photon_j / slot_rate_hz)


class IntensityInterval(BaseModel):
    """Mean photon number of one intensity class at the box output, with its interval:
    the statistical part times the systematic factors common to the classes (meter,
    tap-to-output, laser and VOA drift). The class's own drift allowance (the modulator's
    bias) comes on top: :meth:`MeanPhotonResult.class_bounds` and
    :meth:`MeanPhotonResult.bounds` give what holds until the next calibration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mu: float | None = Field(
        description="best estimate; None when below the meter's resolution (only upper known)"
    )
    lower: float = Field(ge=0)
    upper: float = Field(ge=0)
    tap_power_w: float = Field(description="net power at the tap (zero subtracted)")
    tap_power_sigma_w: float = Field(ge=0, description="its statistical standard uncertainty")

    @model_validator(mode="after")
    def _ordered(self) -> IntensityInterval:
        if not self.lower <= self.upper:
            raise ValueError(f"lower {self.lower} above upper {self.upper}")
        if self.mu is not None and not self.lower <= self.mu <= self.upper:
            raise ValueError(f"mu {self.mu} outside [{self.lower}, {self.upper}]")
        return self

    @property
    def resolved(self) -> bool:
        return self.mu is not None

    @property
    def mu_or_upper(self) -> float:
        """The estimate, or the upper bound of a class below the meter's resolution (for
        expected rates; bounds that matter use ``lower`` and ``upper``)."""
        return self.upper if self.mu is None else self.mu


class IntensityUncertainty(BaseModel):
    """What the intervals of :class:`IntensityInterval` combine (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    coverage_factor: float = Field(COVERAGE_FACTOR, gt=0, description="standard errors")
    meter_uncertainty: float = Field(
        METER_UNCERTAINTY, ge=0, lt=0.5, description="power meter calibration, relative bound"
    )
    tap_to_output_uncertainty_db: float = Field(
        TAP_TO_OUTPUT_UNCERTAINTY_DB, ge=0, le=3, description="commissioning value, bound"
    )
    drift_allowance: float = Field(
        DRIFT_ALLOWANCE,
        ge=0,
        lt=0.5,
        description="relative, common to the classes (laser power, VOA), until the next "
        "calibration",
    )
    signal_drift_allowance: float = Field(
        SIGNAL_DRIFT_ALLOWANCE,
        ge=0,
        lt=0.5,
        description="relative change of the signal alone (the modulator's bias)",
    )
    decoy_drift_allowance: float = Field(
        DECOY_DRIFT_ALLOWANCE,
        ge=0,
        lt=0.5,
        description="relative change of the decoy alone (the modulator's bias)",
    )
    vacuum_drift_allowance: float = Field(
        VACUUM_DRIFT_ALLOWANCE,
        ge=0,
        le=100,
        description="relative rise of the vacuum class alone (the modulator's bias); at 1 "
        "or more its lower bound is 0",
    )
    meter_floor_w: float = Field(
        0.0,
        ge=0,
        description="floor of a class's standard error (the meter's datasheet noise at the "
        "readings' averaging time), for a meter whose readings repeat to the last digit",
    )

    @property
    def upper_factor(self) -> float:
        return (
            (1 + self.meter_uncertainty)
            * 10 ** (self.tap_to_output_uncertainty_db / 10)
            * (1 + self.drift_allowance)
        )

    @property
    def lower_factor(self) -> float:
        return (
            (1 - self.meter_uncertainty)
            * 10 ** (-self.tap_to_output_uncertainty_db / 10)
            * (1 - self.drift_allowance)
        )

    def class_factors(
        self,
    ) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """``(lower, upper)`` factor of each class's own allowance (signal, decoy, vacuum):
        what :meth:`MeanPhotonResult.class_bounds` widens the statistical intervals by."""
        s, d, v = (
            self.signal_drift_allowance,
            self.decoy_drift_allowance,
            self.vacuum_drift_allowance,
        )
        return (1 - s, 1 + s), (1 - d, 1 + d), (max(0.0, 1 - v), 1 + v)

    def class_allowances(self) -> tuple[float, float, float]:
        """Signal, decoy, vacuum drift allowances (relative)."""
        return self.signal_drift_allowance, self.decoy_drift_allowance, self.vacuum_drift_allowance


def intensity_interval(
    net_power_w: float,
    sigma_w: float,
    *,
    wavelength_nm: float,
    slot_rate_hz: float,
    tap_to_output_db: float,
    budget: IntensityUncertainty,
) -> IntensityInterval:
    """The interval of one class from its net tap power and the power's standard error."""
    sigma = max(float(sigma_w), budget.meter_floor_w)
    k = budget.coverage_factor

    def to_mu(p: float) -> float:
        return mu_from_power(p, wavelength_nm, slot_rate_hz, tap_to_output_db)

    if net_power_w > k * sigma:
        return IntensityInterval(
            mu=to_mu(net_power_w),
            lower=to_mu(net_power_w - k * sigma) * budget.lower_factor,
            upper=to_mu(net_power_w + k * sigma) * budget.upper_factor,
            tap_power_w=net_power_w,
            tap_power_sigma_w=sigma,
        )
    if sigma <= 0:
        raise CalibrationError(
            "a class reads no power and the meter shows no noise: its resolution is unknown"
            " (set the meter's noise floor)"
        )
    return IntensityInterval(
        mu=None,
        lower=0.0,
        upper=to_mu(max(net_power_w, 0.0) + k * sigma) * budget.upper_factor,
        tap_power_w=net_power_w,
        tap_power_sigma_w=sigma,
    )


class MeanPhotonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tap_to_output_db: float | None = Field(
        description="attenuation from the power-meter tap to the box output (commissioning "
        "value of the box); None: not commissioned, the procedure refuses to run"
    )
    uncertainty: IntensityUncertainty = IntensityUncertainty()
    tolerance: float = Field(0.01, gt=0, lt=0.5, description="relative, per class")
    max_iterations: int = Field(6, ge=1)
    averages: int = Field(5, ge=1, description="readings per step while setting levels")
    final_readings: int = Field(
        20, ge=3, description="readings per class (and of the zero) for the reported values"
    )
    settle_s: float = Field(0.0, ge=0)
    warmup_timeout_s: float = Field(60.0, gt=0)


class MeanPhotonResult(CalibrationResult):
    procedure: str = "mean_photon_number"
    wavelength_nm: float
    slot_rate_hz: float
    mu_signal_target: float
    mu_decoy_target: float
    signal: IntensityInterval
    decoy: IntensityInterval
    vacuum: IntensityInterval
    tap_to_output_db: float = Field(description="commissioning value the result rests on")
    uncertainty: IntensityUncertainty
    zero_w: float = Field(description="meter reading with the shutter closed (mean)")
    zero_noise_w: float = Field(description="standard deviation of one zero reading")
    attenuation_db: float
    decoy_v: float
    history: list[tuple[str, float, float]] = Field(
        default_factory=list, description="(what, setting, measured mu) per step"
    )
    class_readings_w: list[list[float]] = Field(
        default_factory=list,
        description="the raw meter readings behind the reported values (W): the zero "
        "(shutter closed), then signal, decoy, vacuum",
    )

    @property
    def mu_signal(self) -> float:
        assert self.signal.mu is not None  # a resolved class (checked by the procedure)
        return self.signal.mu

    @property
    def mu_decoy(self) -> float:
        assert self.decoy.mu is not None
        return self.decoy.mu

    def bounds(self) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """``(lower, upper)`` of signal, decoy and vacuum taken independently: each class's
        :meth:`class_bounds` times the extremes of :meth:`common_scale` (a box that holds
        every true intensity the bound allows for, and more)."""
        c_lo, c_hi = self.common_scale()
        (sl, su), (dl, du), (vl, vu) = self.class_bounds()
        return (sl * c_lo, su * c_hi), (dl * c_lo, du * c_hi), (vl * c_lo, vu * c_hi)

    def statistical_bounds(
        self,
    ) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """``(lower, upper)`` of each class with the statistical part only (meter noise):
        the reported interval without the common factors."""
        lo, hi = self.uncertainty.lower_factor, self.uncertainty.upper_factor
        return (
            (self.signal.lower / lo, self.signal.upper / hi),
            (self.decoy.lower / lo, self.decoy.upper / hi),
            (self.vacuum.lower / lo, self.vacuum.upper / hi),
        )

    def class_bounds(
        self,
    ) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """``(lower, upper)`` of each class: its statistical interval
        (:meth:`statistical_bounds`) widened by its own drift allowance
        (``uncertainty.signal_drift_allowance``, ``decoy_drift_allowance``,
        ``vacuum_drift_allowance``), each class independently
        of the others (a box: the modulator's bias moves one class without the others).
        The true intensities are these times one factor in :meth:`common_scale`, shared
        by the classes (meter calibration, tap-to-output attenuation, laser and VOA drift
        act on the classes alike). What the finite-key bound takes: a common factor cannot
        raise one class while it lowers another, which the independent intervals of
        :meth:`bounds` would have to allow."""
        stat = self.statistical_bounds()
        facs = self.uncertainty.class_factors()
        s, d, v = (
            (lo * f_lo, hi * f_hi) for (lo, hi), (f_lo, f_hi) in zip(stat, facs, strict=True)
        )
        return s, d, v

    def common_scale(self) -> tuple[float, float]:
        """The range of the factor common to the three classes (see :meth:`class_bounds`)."""
        return self.uncertainty.lower_factor, self.uncertainty.upper_factor

    def bound_conditions_error(self) -> str | None:
        """Why the class bounds break what the decoy-state bound needs
        (``mu1.lower > mu2.upper + mu3.upper``, ``mu2.lower > mu3.upper``; the common
        factor scales both sides alike), naming the configuration keys; None if they
        hold."""
        (sl, _), (dl, du), (_, vu) = self.class_bounds()
        u = self.uncertainty
        keys = (
            f"calibration.signal_drift_allowance ({u.signal_drift_allowance:g}), "
            f"calibration.decoy_drift_allowance ({u.decoy_drift_allowance:g}) or "
            f"calibration.vacuum_drift_allowance ({u.vacuum_drift_allowance:g})"
        )
        if not sl > du + vu:
            return (
                f"the intensity classes overlap with their drift allowances: the signal's "
                f"lower bound {sl:.4g} is not above the decoy's upper bound {du:.4g} plus the "
                f"vacuum's {vu:.4g}, as the decoy-state bound needs; lower {keys}, or "
                "set the decoy further below the signal"
            )
        if not dl > vu:
            return (
                f"the intensity classes overlap with their drift allowances: the decoy's "
                f"lower bound {dl:.4g} is not above the vacuum's upper bound {vu:.4g}, as the "
                f"decoy-state bound needs; lower {keys}, or raise the decoy"
            )
        return None

    def admits(self, true_mu: tuple[float, float, float]) -> bool:
        """Whether the bound's set of intensities holds ``true_mu`` (signal, decoy,
        vacuum): one factor ``c`` in :meth:`common_scale` with every ``true_mu[k] / c``
        inside the class's :meth:`class_bounds`."""
        c_lo, c_hi = self.common_scale()
        for (lo, hi), mu in zip(self.class_bounds(), true_mu, strict=True):
            if mu < 0 or (mu == 0 and lo > 0) or (mu > 0 and hi <= 0):
                return False
            if mu > 0:
                # lo <= mu / c <= hi  <=>  mu / hi <= c <= mu / lo
                c_lo = max(c_lo, mu / hi)
                if lo > 0:
                    c_hi = min(c_hi, mu / lo)
        return c_lo <= c_hi

    def bound_fields(self) -> dict[str, float]:
        """The intensity fields of :class:`qkdnode.postproc.params.PostprocParams` (values,
        per-class intervals, common scale): how the finite-key bound takes this
        calibration. Raises ``ValueError`` if the signal or decoy was not measured or the
        class bounds break the decoy bound's conditions (:meth:`bound_conditions_error`)."""
        if self.signal.mu is None or self.decoy.mu is None:
            raise ValueError("the signal and decoy intensities are not measured")
        why = self.bound_conditions_error()
        if why is not None:
            raise ValueError(why)
        (sl, su), (dl, du), (vl, vu) = self.class_bounds()
        c_lo, c_hi = self.common_scale()
        vacuum = self.vacuum.mu if self.vacuum.mu is not None else vu
        return {
            "mu_signal": self.signal.mu,
            "mu_decoy": self.decoy.mu,
            "mu_vacuum": min(max(vacuum, vl), vu),
            "mu_signal_lower": sl,
            "mu_signal_upper": su,
            "mu_decoy_lower": dl,
            "mu_decoy_upper": du,
            "mu_vacuum_lower": vl,
            "mu_vacuum_upper": vu,
            "mu_scale_lower": c_lo,
            "mu_scale_upper": c_hi,
        }

    def mix_power_w(self, p_signal: float, p_decoy: float, p_vacuum: float) -> float:
        """Tap power (zero subtracted) expected while the key mix is sent: a reading off by
        more than ``uncertainty.drift_allowance`` means the intensities left their common
        factor (a bias drift that moves one class is the per-class checks' matter)."""
        return (
            p_signal * self.signal.tap_power_w
            + p_decoy * self.decoy.tap_power_w
            + p_vacuum * max(self.vacuum.tap_power_w, 0.0)
        )


async def _wait_warm(laser: Laser, timeout_s: float) -> None:
    if not await call(laser.emission_on):
        await call(laser.set_emission, True)
    t0 = time.monotonic()
    while True:
        status = await call(laser.status)
        if status == LaserStatus.LOCKED:
            return
        if status == LaserStatus.FAULT:
            raise CalibrationError("laser in FAULT")
        if time.monotonic() - t0 > timeout_s:
            raise CalibrationError(f"laser not locked after {timeout_s} s")
        await asyncio.sleep(0.05)


async def calibrate_mean_photon_number(
    laser: Laser,
    im: IntensityModulator,
    voa: VariableAttenuator,
    meter: OpticalPowerMeter,
    modulator: ModulatorResult,
    *,
    mu_signal: float,
    mu_decoy: float,
    slot_rate_hz: float,
    cfg: MeanPhotonConfig,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> MeanPhotonResult:
    """Set VOA and decoy drive so that mu_signal and mu_decoy meet their targets, then
    measure the three classes with their intervals (see the module docstring).

    Needs the modulator calibration (levels and drive curve). Transmitter only. Raises
    CalibrationError when the tap-to-output attenuation is not commissioned, and (after
    saving the result) when the classes' drift allowances make their bounds overlap
    (:meth:`MeanPhotonResult.bound_conditions_error`, naming the keys).
    """
    tap_db = cfg.tap_to_output_db
    if tap_db is None:
        raise CalibrationError(
            "the tap-to-output attenuation of this box is not commissioned: set "
            "calibration.tap_to_output_db (and calibration.tap_to_output_uncertainty_db) "
            "to the value measured at the factory; it cannot be measured in the field"
        )
    started = time.monotonic()
    await _wait_warm(laser, cfg.warmup_timeout_s)
    wavelength = float(await call(laser.wavelength_nm))
    await call(meter.set_wavelength_nm, wavelength)
    await call(im.set_output, True)
    # the meter's zero and noise, with no light at the tap
    await call(voa.set_shutter, False)
    zero = await _readings(meter, cfg.final_readings, cfg.settle_s)
    await call(voa.set_shutter, True)
    zero_w = float(zero.mean())
    lo, hi = voa.attenuation_range_db
    history: list[tuple[str, float, float]] = []

    async def measure(level_v: float) -> float:
        await set_all_levels(im, level_v)
        p = await read_power(meter, cfg.averages, cfg.settle_s)
        return mu_from_power(p - zero_w, wavelength, slot_rate_hz, tap_db)

    # signal: VOA from a low-attenuation reading, then corrected at the setting itself
    att = float(lo)
    await call(voa.set_attenuation_db, att)
    mu_s = await measure(modulator.signal_v)
    history.append(("signal", att, mu_s))
    if mu_s <= 0:
        raise CalibrationError("no power at the tap (laser, shutter, modulator?)")
    for _ in range(cfg.max_iterations):
        att = float(np.clip(att + 10 * math.log10(mu_s / mu_signal), lo, hi))
        await call(voa.set_attenuation_db, att)
        att = float(await call(voa.attenuation_db))
        mu_s = await measure(modulator.signal_v)
        history.append(("signal", att, mu_s))
        if abs(mu_s / mu_signal - 1) <= cfg.tolerance:
            break
    # decoy: move along the drive curve, correcting the model's ratio by the measured one
    ratio_target = mu_decoy / mu_signal
    fit = modulator.drive_fit
    sig_rel = float(fit.relative(modulator.signal_v))
    ratio_model = ratio_target
    dec_v = modulator.decoy_v
    for _ in range(cfg.max_iterations):
        dec_v = decoy_drive_v(fit, ratio_model * sig_rel, modulator.signal_v, modulator.vacuum_v)
        mu_d = await measure(dec_v)
        history.append(("decoy", dec_v, mu_d))
        ratio_meas = mu_d / mu_s
        if abs(mu_d / mu_decoy - 1) <= cfg.tolerance:
            break
        ratio_model = float(np.clip(ratio_model * ratio_target / ratio_meas, 1e-4, 0.999))
    # the reported values: every class read afresh at its final setting
    classes: dict[str, IntensityInterval] = {}
    raw: list[list[float]] = [[float(x) for x in zero]]
    for name, level in (
        ("signal", modulator.signal_v),
        ("decoy", dec_v),
        ("vacuum", modulator.vacuum_v),
    ):
        await set_all_levels(im, level)
        r = await _readings(meter, cfg.final_readings, cfg.settle_s)
        raw.append([float(x) for x in r])
        sigma = math.sqrt(float(r.var(ddof=1)) / r.size + float(zero.var(ddof=1)) / zero.size)
        classes[name] = intensity_interval(
            float(r.mean()) - zero_w,
            sigma,
            wavelength_nm=wavelength,
            slot_rate_hz=slot_rate_hz,
            tap_to_output_db=tap_db,
            budget=cfg.uncertainty,
        )
    await call(im.set_level_v, IntensityClass.SIGNAL, modulator.signal_v)
    await call(im.set_level_v, IntensityClass.DECOY, dec_v)
    await call(im.set_level_v, IntensityClass.VACUUM, modulator.vacuum_v)
    for name in ("signal", "decoy"):
        if not classes[name].resolved:
            raise CalibrationError(f"the {name} class is below the power meter's resolution")
    sig, dec = classes["signal"].mu, classes["decoy"].mu
    assert sig is not None and dec is not None
    ok = abs(sig / mu_signal - 1) <= 2 * cfg.tolerance and abs(dec / mu_decoy - 1) <= (
        2 * cfg.tolerance
    )
    result = MeanPhotonResult(
        wavelength_nm=wavelength,
        slot_rate_hz=slot_rate_hz,
        mu_signal_target=mu_signal,
        mu_decoy_target=mu_decoy,
        signal=classes["signal"],
        decoy=classes["decoy"],
        vacuum=classes["vacuum"],
        tap_to_output_db=tap_db,
        uncertainty=cfg.uncertainty,
        zero_w=zero_w,
        zero_noise_w=float(zero.std(ddof=1)),
        attenuation_db=att,
        decoy_v=dec_v,
        history=history,
        class_readings_w=raw,
        ok=ok,
        message="" if ok else "targets not reached within tolerance",
    )
    why = result.bound_conditions_error()
    if why is not None:
        result = result.model_copy(update={"ok": False, "message": why})
    result = finish(
        result,
        started,
        state_dir,
        plot_mean_photon_number,
        publish,
        instruments=[laser, im, voa, meter],
    )
    if why is not None:
        raise CalibrationError(why)
    return result


async def _readings(meter: OpticalPowerMeter, n: int, settle_s: float) -> npt.NDArray[np.float64]:
    await settle(settle_s)
    return np.array([float(await call(meter.power_w)) for _ in range(n)])


def plot_mean_photon_number(result: MeanPhotonResult, fig: Figure) -> None:
    """Left: the meter's readings of each class (zero subtracted, nW at the tap) with
    their mean and the statistical interval (coverage factor times the standard error),
    the zero below. Right: each class's mean photon number at the output with the
    interval the finite-key bound takes (statistics, meter, tap-to-output, drift) and
    its statistical part, beside the target."""
    outer = fig.add_gridspec(1, 2, width_ratios=(1.2, 1), wspace=0.3)
    names = ("signal", "decoy", "vacuum")
    ivs = (result.signal, result.decoy, result.vacuum)
    k = result.uncertainty.coverage_factor
    raw = result.class_readings_w
    left = outer[0].subgridspec(4, 1, hspace=0.15)
    zero = np.asarray(raw[0]) if raw else np.zeros(0)
    first = None
    for row, (name, iv) in enumerate(zip(names, ivs, strict=True)):
        ax = (
            fig.add_subplot(left[row], sharex=first)
            if first is not None
            else fig.add_subplot(left[row])
        )
        first = first or ax
        if len(raw) > row + 1:
            r = (np.asarray(raw[row + 1]) - result.zero_w) * 1e9
            ax.plot(np.arange(r.size), r, "o", ms=3, color=f"C{row}")
        ax.axhline(iv.tap_power_w * 1e9, color=f"C{row}", lw=1.0)
        ax.axhspan(
            (iv.tap_power_w - k * iv.tap_power_sigma_w) * 1e9,
            (iv.tap_power_w + k * iv.tap_power_sigma_w) * 1e9,
            color=f"C{row}",
            alpha=0.15,
        )
        ax.set_ylabel(f"{name}\n(nW)", fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.tick_params(labelbottom=False, labelsize=7)
        ax.grid(True, alpha=0.3, lw=0.5)
    axz = fig.add_subplot(left[3], sharex=first)
    if zero.size:
        axz.plot(np.arange(zero.size), (zero - result.zero_w) * 1e12, "o", ms=3, color="0.3")
    axz.axhline(0.0, color="0.3", lw=1.0)
    axz.set_ylabel("zero\n(pW)", fontsize=8)
    axz.set_xlabel("reading")
    axz.tick_params(labelsize=7)
    axz.grid(True, alpha=0.3, lw=0.5)
    if first is not None:
        first.set_title(
            f"tap readings, zero subtracted; band: +/-{k:g} standard errors", fontsize=8
        )
    ax2 = fig.add_subplot(outer[1])
    stat = result.statistical_bounds()
    full = result.bounds()
    targets = (result.mu_signal_target, result.mu_decoy_target, None)
    for i, iv in enumerate(ivs):
        color = f"C{i}"
        lo_s, hi_s = stat[i]
        lo_f, hi_f = full[i]
        if iv.mu is not None:
            ax2.errorbar(
                [i],
                [iv.mu],
                yerr=[[max(iv.mu - lo_f, 0.0)], [max(hi_f - iv.mu, 0.0)]],
                fmt="o",
                capsize=6,
                color=color,
                label="bound's interval" if i == 0 else None,
            )
            ax2.errorbar(
                [i + 0.12],
                [iv.mu],
                yerr=[[max(iv.mu - lo_s, 0.0)], [max(hi_s - iv.mu, 0.0)]],
                fmt="none",
                capsize=3,
                color="k",
                lw=1.5,
                label="statistical part" if i == 0 else None,
            )
            label = f"{iv.mu:.4g}\n[{lo_f:.3g}, {hi_f:.3g}]"
        else:
            ax2.plot([i], [hi_f], "v", color=color, ms=8)
            label = f"< {hi_f:.3g}\n(below resolution)"
        ax2.annotate(
            label, (i, hi_f), xytext=(0, 6), textcoords="offset points", fontsize=7, ha="center"
        )
        t = targets[i]
        if t is not None:
            ax2.plot([i - 0.3, i + 0.3], [t, t], color=color, ls=":", lw=1.5)
    ax2.set_yscale("log")
    ax2.set_ylim(top=4 * max(hi for _, hi in full))
    ax2.set_xticks(range(3), list(names))
    ax2.set_xlim(-0.5, 2.6)
    ax2.set_ylabel("mean photon number at the output")
    ax2.legend(fontsize=7, loc="lower left")
    ax2.grid(True, alpha=0.3, lw=0.5, which="both")
    ax2.set_title(
        f"VOA {result.attenuation_db:.2f} dB, tap-to-output {result.tap_to_output_db:.3f} dB;"
        f" dotted: targets\nintervals: meter {result.uncertainty.meter_uncertainty:.0%}, "
        f"tap {result.uncertainty.tap_to_output_uncertainty_db:g} dB, drift "
        f"{result.uncertainty.drift_allowance:.0%}; per class: signal "
        f"{result.uncertainty.signal_drift_allowance:.1%}, decoy "
        f"{result.uncertainty.decoy_drift_allowance:.0%}, vacuum "
        f"+{result.uncertainty.vacuum_drift_allowance:.0%}",
        fontsize=7,
    )
