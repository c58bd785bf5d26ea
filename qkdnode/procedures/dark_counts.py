"""Dark counts and detection efficiency, with the transmitter's light off then on.

Receiver side; the transmitter switches its light (``set_light`` is supplied by the
orchestration, which asks the peer). With the light off each detector's count rate is its
dark-count rate (per gate: divided by the slot rate). With the light on, the count rate
corrected for dead time and dark counts gives the click probability per slot, and

    p_click = sum_k p_k * E_states[ 1 - exp(-mu_k * x * a_c * f_state) ]

is solved for ``x`` = channel transmittance * detector efficiency, where ``a_c`` is the
share of the receiver's light sent to detector ``c``'s basis arm, and ``f_state`` the
share of that arm's light that leaves by ``c``'s port for each prepared state (1 or
``e_d`` in the detector's basis, 1/2 in the other). Given the channel transmittance (link
budget), the detector efficiency follows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import brentq

from drivers.interfaces import DetectorStatus, SinglePhotonDetector
from qkdnode.procedures.common import (
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    finish,
    maybe_await,
)

__all__ = [
    "DarkCountConfig",
    "DarkCountResult",
    "DetectorCounts",
    "click_probability",
    "dead_time_corrected",
    "measure_dark_counts_and_efficiency",
    "plot_dark_counts",
    "solve_system_efficiency",
]


def dead_time_corrected(rate_hz: float, dead_time_ns: float) -> float:
    """True event rate from an observed one (non-paralysable dead time)."""
    tau = dead_time_ns * 1e-9
    frac = rate_hz * tau
    if frac >= 1:
        raise CalibrationError(f"count rate {rate_hz:.3g} Hz saturates dead time {dead_time_ns} ns")
    return rate_hz / (1.0 - frac)


def click_probability(
    x: float,
    class_mix: Sequence[tuple[float, float]],
    arm_fraction: float,
    tx_same_basis_probability: float,
    misalignment: float = 0.0,
) -> float:
    """Expected click probability per slot of one detector for system efficiency ``x``."""
    p = 0.0
    ps = tx_same_basis_probability
    for p_k, mu in class_mix:
        lam = mu * x * arm_fraction
        same = 0.5 * (-math.expm1(-lam * (1 - misalignment))) + 0.5 * (
            -math.expm1(-lam * misalignment)
        )
        other = -math.expm1(-lam * 0.5)
        p += p_k * (ps * same + (1 - ps) * other)
    return p


def solve_system_efficiency(
    p_click: float,
    class_mix: Sequence[tuple[float, float]],
    arm_fraction: float,
    tx_same_basis_probability: float,
    misalignment: float = 0.0,
) -> float:
    """Invert :func:`click_probability` for ``x`` in (0, 1]."""
    if p_click <= 0:
        return 0.0
    top = click_probability(1.0, class_mix, arm_fraction, tx_same_basis_probability, misalignment)
    if p_click >= top:
        raise CalibrationError("click probability above what an ideal detector would give")
    return float(
        brentq(
            lambda x: (
                click_probability(
                    x, class_mix, arm_fraction, tx_same_basis_probability, misalignment
                )
                - p_click
            ),
            0.0,
            1.0,
            xtol=1e-12,
        )
    )


class DarkCountConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    readings: int = Field(5, ge=1, description="count-rate readings averaged per condition")
    rx_p_basis_z: float = Field(0.9, gt=0, lt=1, description="receiver's passive Z share")
    tx_p_basis_z: float = Field(0.9, gt=0, lt=1)
    misalignment: float = Field(0.0, ge=0, lt=0.5)
    basis_of_detector: list[int] = Field(
        default_factory=lambda: [0, 0, 1, 1], description="0 = Z arm, 1 = X arm"
    )


class DetectorCounts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: str
    dark_rate_hz: float
    dark_probability_per_slot: float
    light_rate_hz: float
    click_probability_per_slot: float
    system_efficiency: float
    detector_efficiency: float | None


class DarkCountResult(CalibrationResult):
    procedure: str = "dark_counts"
    slot_rate_hz: float
    channel_transmittance: float | None
    class_mix: list[tuple[float, float]]
    detectors: list[DetectorCounts]


async def _mean_rates(
    dets: Sequence[SinglePhotonDetector], readings: int, wait: Callable[[], object]
) -> list[float]:
    acc = np.zeros(len(dets))
    for _ in range(readings):
        await maybe_await(wait())
        acc += [float(await call(d.count_rate_hz)) for d in dets]
    return [float(x) for x in acc / readings]


async def measure_dark_counts_and_efficiency(
    detectors: Sequence[SinglePhotonDetector],
    set_light: Callable[[bool], Awaitable[None]],
    slot_rate_hz: float,
    class_mix: Sequence[tuple[float, float]],
    cfg: DarkCountConfig | None = None,
    *,
    channel_transmittance: float | None = None,
    wait_integration: Callable[[], object] | None = None,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> DarkCountResult:
    """Dark rates (light off), then efficiencies (light on).

    ``set_light(on)`` asks the transmitter to switch its light; ``class_mix`` lists
    ``(probability, mu)`` of what it sends while on (e.g. the key mix, or
    ``[(0.5, mu_signal), (0.5, 0)]`` during the sync pattern). The light is left on.
    """
    cfg = cfg or DarkCountConfig()
    started = time.monotonic()
    wait = wait_integration or (lambda: None)
    for d in detectors:
        if await call(d.status) != DetectorStatus.ARMED:
            await call(d.arm)
    await set_light(False)
    await maybe_await(wait())  # flush an integration period that saw the light
    dark = await _mean_rates(detectors, cfg.readings, wait)
    await set_light(True)
    await maybe_await(wait())
    light = await _mean_rates(detectors, cfg.readings, wait)
    out = []
    for i, det in enumerate(detectors):
        tau = float(await call(det.dead_time_ns))
        true_light = dead_time_corrected(light[i], tau)
        true_dark = dead_time_corrected(dark[i], tau)
        p_click = max(true_light - true_dark, 0.0) / slot_rate_hz
        basis = cfg.basis_of_detector[i] if i < len(cfg.basis_of_detector) else 0
        arm = cfg.rx_p_basis_z if basis == 0 else 1 - cfg.rx_p_basis_z
        same = cfg.tx_p_basis_z if basis == 0 else 1 - cfg.tx_p_basis_z
        x = solve_system_efficiency(p_click, class_mix, arm, same, cfg.misalignment)
        out.append(
            DetectorCounts(
                detector=det.name,
                dark_rate_hz=dark[i],
                dark_probability_per_slot=true_dark / slot_rate_hz,
                light_rate_hz=light[i],
                click_probability_per_slot=p_click,
                system_efficiency=x,
                detector_efficiency=(x / channel_transmittance if channel_transmittance else None),
            )
        )
    result = DarkCountResult(
        slot_rate_hz=slot_rate_hz,
        channel_transmittance=channel_transmittance,
        class_mix=[(float(p), float(m)) for p, m in class_mix],
        detectors=out,
    )
    return finish(result, started, state_dir, plot_dark_counts, publish)


def plot_dark_counts(result: DarkCountResult, fig: Figure) -> None:
    names = [d.detector for d in result.detectors]
    x = np.arange(len(names))
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.bar(x, [d.dark_rate_hz for d in result.detectors])
    ax1.set_xticks(x, names)
    ax1.set_ylabel("dark count rate (Hz)")
    ax2 = fig.add_subplot(1, 2, 2)
    eff = [
        d.detector_efficiency if d.detector_efficiency is not None else d.system_efficiency
        for d in result.detectors
    ]
    ax2.bar(x, eff, color="tab:orange")
    ax2.set_xticks(x, names)
    ax2.set_ylabel("detector efficiency" if result.channel_transmittance else "system efficiency")
