"""Parameters of the simulated QKD link: source, fiber, receiver, clocks and adversary.

Every field carries its unit in its name. Defaults describe a realistic 25 km metro link
with superconducting-nanowire detectors (see ``docs/simulation.md``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceParams(_Strict):
    slot_rate_hz: float = Field(25e6, gt=0, le=10e9, description="pulse (slot) rate")
    mu_signal: float = Field(0.5, gt=0, le=10, description="true mean photon number, signal")
    mu_decoy: float = Field(0.1, ge=0, le=10, description="true mean photon number, decoy")
    mu_vacuum: float = Field(0.0, ge=0, le=1, description="residual mean photon number, vacuum")
    p_signal: float = Field(0.7, gt=0, lt=1)
    p_decoy: float = Field(0.2, ge=0, lt=1)
    p_basis_z: float = Field(0.9, gt=0, lt=1, description="probability of preparing Z")


class FiberParams(_Strict):
    length_km: float = Field(25.0, ge=0, le=500)
    loss_db_per_km: float = Field(0.2, ge=0, le=2)
    insertion_loss_db: float = Field(1.0, ge=0, le=40)
    misalignment: float = Field(0.01, ge=0, le=0.5, description="optical error probability e_d")
    drift_rad_per_sqrt_s: float = Field(
        0.0, ge=0, le=10, description="random-walk drift of the polarisation reference"
    )


class ReceiverParams(_Strict):
    basis_choice: Literal["passive", "active"] = "passive"
    p_basis_z: float = Field(0.9, gt=0, lt=1, description="receiver's Z-basis probability")
    detector_efficiency: tuple[float, float, float, float] = (0.6, 0.6, 0.6, 0.6)
    dark_count_rate_hz: float = Field(100.0, ge=0, le=1e7)
    afterpulse_probability: float = Field(0.0, ge=0, le=0.5)
    dead_time_ns: float = Field(50.0, ge=0, le=1e5)
    jitter_ps: float = Field(30.0, ge=0, le=1e5, description="timing jitter, one sigma")
    gate_width_ps: float = Field(1000.0, gt=0, description="detection window per slot")
    true_delay_ps: float = Field(
        12345.0, description="optical delay of the pulse after the slot edge (hidden)"
    )


class ClockParams(_Strict):
    offset_s: float = Field(0.3717, ge=-1e3, le=1e3, description="receiver clock offset")
    frequency_offset_ppm: float = Field(12.5, ge=-200, le=200)
    wander_ppm_per_sqrt_s: float = Field(0.01, ge=0, le=10)


class EveParams(_Strict):
    mode: Literal["none", "intercept-resend", "beam-splitting"] = "none"
    fraction: float = Field(0.0, ge=0, le=1, description="fraction of pulses attacked")


class LinkParams(_Strict):
    seed: int = Field(1, ge=0)
    source: SourceParams = SourceParams()
    fiber: FiberParams = FiberParams()
    receiver: ReceiverParams = ReceiverParams()
    clock: ClockParams = ClockParams()
    eve: EveParams = EveParams()
