"""Mean photon number: set the signal and decoy intensities to their targets.

Transmitter side. The power-meter tap sits after the variable attenuator (VOA) and
before the box's fixed output attenuation (a factory constant, ``tap_to_output_db``), so

    mu = P_tap * 10^(-tap_to_output_db / 10) / (h c / lambda) / slot_rate

While measuring one class the three class drives are set to that class's level, so the
meter (which averages over slots) reads that class alone. The VOA is set from a reading
and corrected until the signal is on target; then the decoy drive is moved along the
calibrated modulator curve until the decoy is on target; the vacuum level is measured.
The class levels are restored at the end.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field

from drivers.interfaces import (
    IntensityClass,
    IntensityModulator,
    Laser,
    LaserStatus,
    OpticalPowerMeter,
    VariableAttenuator,
)
from qkdnode.procedures.common import (
    HC_J_M,
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    finish,
)
from qkdnode.procedures.modulator import (
    ModulatorResult,
    decoy_drive_v,
    read_power,
    set_all_levels,
)

__all__ = [
    "MeanPhotonConfig",
    "MeanPhotonResult",
    "calibrate_mean_photon_number",
    "mu_from_power",
    "plot_mean_photon_number",
]


def mu_from_power(
    power_w: float, wavelength_nm: float, slot_rate_hz: float, tap_to_output_db: float
) -> float:
    """Mean photons per pulse at the output from the tap power."""
    photon_j = HC_J_M / (wavelength_nm * 1e-9)
    return float(power_w * 10.0 ** (-tap_to_output_db / 10.0) / photon_j / slot_rate_hz)


class MeanPhotonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tap_to_output_db: float = Field(
        description="attenuation from the power-meter tap to the box output (factory value)"
    )
    tolerance: float = Field(0.01, gt=0, lt=0.5, description="relative, per class")
    max_iterations: int = Field(6, ge=1)
    averages: int = Field(5, ge=1)
    settle_s: float = Field(0.0, ge=0)
    warmup_timeout_s: float = Field(60.0, gt=0)


class MeanPhotonResult(CalibrationResult):
    procedure: str = "mean_photon_number"
    wavelength_nm: float
    slot_rate_hz: float
    mu_signal_target: float
    mu_decoy_target: float
    mu_signal: float
    mu_decoy: float
    mu_vacuum: float
    attenuation_db: float
    decoy_v: float
    history: list[tuple[str, float, float]] = Field(
        default_factory=list, description="(what, setting, measured mu) per step"
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
    """Set VOA and decoy drive so that mu_signal and mu_decoy meet their targets.

    Needs the modulator calibration (levels and drive curve). Transmitter only.
    """
    started = time.monotonic()
    await _wait_warm(laser, cfg.warmup_timeout_s)
    wavelength = float(await call(laser.wavelength_nm))
    await call(meter.set_wavelength_nm, wavelength)
    await call(voa.set_shutter, True)
    await call(im.set_output, True)
    lo, hi = voa.attenuation_range_db
    history: list[tuple[str, float, float]] = []

    async def measure(level_v: float) -> float:
        await set_all_levels(im, level_v)
        p = await read_power(meter, cfg.averages, cfg.settle_s)
        return mu_from_power(p, wavelength, slot_rate_hz, cfg.tap_to_output_db)

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
    mu_d = math.nan
    for _ in range(cfg.max_iterations):
        dec_v = decoy_drive_v(fit, ratio_model * sig_rel, modulator.signal_v, modulator.vacuum_v)
        mu_d = await measure(dec_v)
        history.append(("decoy", dec_v, mu_d))
        ratio_meas = mu_d / mu_s
        if abs(mu_d / mu_decoy - 1) <= cfg.tolerance:
            break
        ratio_model = float(np.clip(ratio_model * ratio_target / ratio_meas, 1e-4, 0.999))
    mu_v = await measure(modulator.vacuum_v)
    history.append(("vacuum", modulator.vacuum_v, mu_v))
    await call(im.set_level_v, IntensityClass.SIGNAL, modulator.signal_v)
    await call(im.set_level_v, IntensityClass.DECOY, dec_v)
    await call(im.set_level_v, IntensityClass.VACUUM, modulator.vacuum_v)
    ok = abs(mu_s / mu_signal - 1) <= 2 * cfg.tolerance and abs(mu_d / mu_decoy - 1) <= (
        2 * cfg.tolerance
    )
    result = MeanPhotonResult(
        wavelength_nm=wavelength,
        slot_rate_hz=slot_rate_hz,
        mu_signal_target=mu_signal,
        mu_decoy_target=mu_decoy,
        mu_signal=mu_s,
        mu_decoy=mu_d,
        mu_vacuum=mu_v,
        attenuation_db=att,
        decoy_v=dec_v,
        history=history,
        ok=ok,
        message="" if ok else "targets not reached within tolerance",
    )
    return finish(result, started, state_dir, plot_mean_photon_number, publish)


def plot_mean_photon_number(result: MeanPhotonResult, fig: Figure) -> None:
    ax = fig.add_subplot(1, 1, 1)
    for name, target in (("signal", result.mu_signal_target), ("decoy", result.mu_decoy_target)):
        ys = [m for w, _, m in result.history if w == name]
        (line,) = ax.plot(range(len(ys)), ys, "o-", label=name)
        ax.axhline(target, color=line.get_color(), ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean photon number")
    ax.set_title(
        f"mu_s {result.mu_signal:.4f}, mu_d {result.mu_decoy:.4f}, mu_v {result.mu_vacuum:.2e},"
        f" VOA {result.attenuation_db:.2f} dB",
        fontsize=8,
    )
    ax.legend(fontsize=8)
