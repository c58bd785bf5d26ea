"""Calibration against the hidden truth: does every procedure claim no more than it measured?

For a seed ``s`` the simulated link draws both boxes' hardware truths
(:mod:`drivers.simlink.truths`, ``hardware_seed = s``), the calibration chain runs on it
(:class:`~qkdnode.procedures.simharness.SimLink`, both halves in one process) in the order
a link comes up:

1. intensity modulator (V_pi and bias of maximal transmission, from the bias sweep);
2. mean photon numbers (on the box's commissioning record, never on the simulator's truth);
3. detector gate delays (the scan's fit);
4. synchronization (the clock's frequency offset);
5. encoder V_pi and bias, then the encoding compensation;
6. dark counts and detector efficiencies, with the encoding compensated (the link budget
   is the simulated fiber's, stated to 0.05 dB);
7. on the same boxes behind a fiber turned by a rotation drawn from the seed, one step of
   the receiver's polarisation compensation (its estimate of the rotation).

The truths are what the link had while it was measured: the clock's frequency offset in
the last chunk the acquisition read (it wanders), the encoder's optimum less the fiber's
drifting reference averaged over the sweep, the gated dark-count rate.

Each estimate is compared with its truth and its *stated* uncertainty
(:class:`TruthRow`): ``z = (estimate - truth) / u`` with ``u`` the procedure's standard
uncertainty on the side of the truth. A procedure is honest when ``|z| <= k``
(``k`` = :data:`~qkdnode.procedures.common.COVERAGE_FACTOR`, the intervals the procedures
report) on every seed; a miss means the stated uncertainty is too small. Quantities given
as a bound only (dark counts below their minimum counts) have no ``z``: their check is
that the truth lies within ``[lower, upper]``.

:func:`check_seed` runs one seed, :func:`check_seeds` several, :func:`summarize` gives the
largest ``|z|`` per quantity (``qkdnode calibration truth`` prints it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from drivers.interfaces import IntensityClass, LaserStatus
from drivers.poincare import rotation_vector
from drivers.simlink.params import (
    FiberParams,
    LinkParams,
    PolarizationDriftParams,
    ReceiverParams,
    TransmitterHardwareParams,
)
from drivers.simlink.truths import commissioning_record
from qkdnode.polarization import CompensationSettings, WindowCounts, compensation_step
from qkdnode.procedures.common import COVERAGE_FACTOR
from qkdnode.procedures.dark_counts import DarkCountConfig, measure_dark_counts_and_efficiency
from qkdnode.procedures.detector_timing import DetectorTimingConfig, calibrate_detector_timing
from qkdnode.procedures.encoder_v_pi import (
    EncoderVPiConfig,
    StateErrors,
    calibrate_encoder_v_pi,
    count_state_errors,
)
from qkdnode.procedures.encoding_compensation import (
    EncodingCompensationConfig,
    compensate_encoding,
    qber_from_detections,
)
from qkdnode.procedures.mean_photon_number import MeanPhotonConfig, calibrate_mean_photon_number
from qkdnode.procedures.modulator import calibrate_modulator
from qkdnode.procedures.simharness import SimLink, drain
from qkdnode.procedures.sync import SlotTracker, SyncConfig, acquire_lock

__all__ = [
    "QuantitySummary",
    "TruthRow",
    "check_seed",
    "check_seeds",
    "summarize",
    "truth_link",
]

#: Slots per simulated fiber batch (10.5 ms at 25 MHz): one detector reading.
CHUNK_SLOTS = 1 << 18
_SYNC_SEED = 4242


class TruthRow(BaseModel):
    """One calibrated quantity of one seed against its truth.

    ``standard_uncertainty`` is the procedure's stated standard uncertainty on the side of
    the truth (``(upper - estimate) / k`` when the truth lies above, ``(estimate - lower)
    / k`` below, ``k`` = ``coverage_factor``); ``z`` the error in those units. Both are
    None for a bound-only result (no point estimate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    quantity: str
    unit: str
    estimate: float | None
    lower: float
    upper: float
    truth: float
    standard_uncertainty: float | None
    z: float | None = Field(description="(estimate - truth) / standard_uncertainty")
    coverage_factor: float

    @property
    def within(self) -> bool:
        """The truth inside the stated interval."""
        return self.lower <= self.truth <= self.upper


class QuantitySummary(BaseModel):
    """The worst of one quantity over the seeds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quantity: str
    unit: str
    rows: int
    max_abs_z: float | None = Field(description="largest |error| / u (None: bounds only)")
    max_abs_error: float | None
    median_standard_uncertainty: float | None
    misses: int = Field(description="rows whose truth lies outside the stated interval")


def _row(
    seed: int,
    quantity: str,
    unit: str,
    *,
    estimate: float | None,
    lower: float,
    upper: float,
    truth: float,
    k: float = COVERAGE_FACTOR,
) -> TruthRow:
    u: float | None = None
    z: float | None = None
    if estimate is not None:
        half = (upper - estimate) if truth >= estimate else (estimate - lower)
        u = half / k
        z = (estimate - truth) / u if u > 0 else math.copysign(math.inf, estimate - truth)
    return TruthRow(
        seed=seed,
        quantity=quantity,
        unit=unit,
        estimate=estimate,
        lower=lower,
        upper=upper,
        truth=truth,
        standard_uncertainty=u,
        z=z,
        coverage_factor=k,
    )


def _sym(
    seed: int, quantity: str, unit: str, *, estimate: float, sigma: float, truth: float
) -> TruthRow:
    k = COVERAGE_FACTOR
    return _row(
        seed,
        quantity,
        unit,
        estimate=estimate,
        lower=estimate - k * sigma,
        upper=estimate + k * sigma,
        truth=truth,
    )


def _nearest(value: float, truth: float, period: float) -> float:
    """``value`` moved by whole periods to the copy nearest ``truth``."""
    return value - period * round((value - truth) / period)


def truth_link(seed: int) -> LinkParams:
    """The link of seed ``seed``: both boxes' truths drawn from ``seed``, safe power-on."""
    return LinkParams(
        chunk_slots=CHUNK_SLOTS,
        start_calibrated=False,
        transmitter_seed=2 * seed + 1,
        receiver_seed=2 * seed + 2,
        transmitter=TransmitterHardwareParams(hardware_seed=seed, laser_warmup_s=0.0),
        receiver=ReceiverParams(hardware_seed=seed),
    )


async def _chain(link: SimLink, inst: dict[str, Any], seed: int) -> list[TruthRow]:
    params = link.params  # the truths (read for the comparison only)
    hw = params.transmitter
    rx = params.receiver
    src = params.source
    rows: list[TruthRow] = []

    inst["laser"].set_emission(True)
    if inst["laser"].status() != LaserStatus.LOCKED:
        raise RuntimeError("the simulated laser did not lock")
    mod = await calibrate_modulator(inst["im"], inst["meter"], voa=inst["voa"])
    fit = mod.bias_fit
    rows.append(
        _sym(seed, "im_v_pi", "V", estimate=fit.v_pi_v, sigma=fit.v_pi_err_v, truth=hw.im_v_pi_v)
    )
    rows.append(
        _sym(
            seed,
            "im_bias",
            "V",
            estimate=mod.bias_set_v,
            sigma=fit.v0_err_v,
            truth=_nearest(hw.im_bias_opt_v, mod.bias_set_v, 2 * fit.v_pi_v),
        )
    )

    drive = mod.drive_fit
    rows.append(
        _sym(
            seed,
            "im_drive_v_pi",
            "V",
            estimate=drive.v_pi_v,
            sigma=drive.v_pi_err_v,
            truth=hw.im_v_pi_v,
        )
    )

    record = commissioning_record(hw)  # what the box's configuration holds
    mu = await calibrate_mean_photon_number(
        inst["laser"],
        inst["im"],
        inst["voa"],
        inst["meter"],
        mod,
        mu_signal=src.mu_signal,
        mu_decoy=src.mu_decoy,
        slot_rate_hz=src.slot_rate_hz,
        cfg=MeanPhotonConfig(tap_to_output_db=record.tap_to_output_db),
    )
    true_mu = link.tx.mu_per_class()
    for name, interval, truth in (
        ("mu_signal", mu.signal, true_mu[0]),
        ("mu_decoy", mu.decoy, true_mu[1]),
    ):
        rows.append(
            _row(
                seed,
                name,
                "",
                estimate=interval.mu,
                lower=interval.lower,
                upper=interval.upper,
                truth=truth,
            )
        )

    inst["encoder"].set_output(True)
    timing = await calibrate_detector_timing(
        inst["detectors"],
        src.slot_rate_hz,
        DetectorTimingConfig(reading_time_s=link.chunk_s),
        wait_integration=lambda: link.step(1),
    )
    period_ps = timing.period_ps
    for scan in timing.scans:
        if scan.fit is None:
            raise RuntimeError(f"{scan.detector}: {timing.message}")
        est = scan.fit.pulse_delay_ps
        rows.append(
            _sym(
                seed,
                f"delay[{scan.detector}]",
                "ps",
                estimate=est,
                sigma=scan.fit.pulse_delay_err_ps,
                truth=_nearest(rx.true_delay_ps, est, period_ps),
            )
        )

    inst["source"].set_sync_pattern(_SYNC_SEED)
    link.step(1)
    inst["tagger"].start_stream()
    # The clock wanders (a step per chunk, taken at the chunk's end): its true frequency
    # offset during each chunk of the acquisition's light.
    true_ppm: list[float] = []
    for _ in range(round(0.1 / link.chunk_s)):
        true_ppm.append(link.rx.model.clock.frequency_offset * 1e6)
        link.step(1)
    sync, tracker = await acquire_lock(
        inst["tagger"], _SYNC_SEED, src.slot_rate_hz, SyncConfig(confirm_blocks=0)
    )
    if not sync.locked:
        raise RuntimeError(f"synchronization failed: {sync.message}")
    unread = 0  # blocks (one per chunk) the acquisition left in the queue
    while inst["tagger"].read_block(0.0) is not None:
        unread += 1
    last_read = len(true_ppm) - 1 - unread  # the chunk of the acquisition's last tags
    rows.append(
        _sym(
            seed,
            "clock_ppm",
            "ppm",
            estimate=sync.ppm,
            sigma=sync.ppm_sigma,
            truth=true_ppm[last_read],
        )
    )
    inst["source"].set_sync_pattern(None)

    reference_rad: list[float] = []  # the fiber's drifting reference during each probe
    v_pi = await calibrate_encoder_v_pi(
        inst["encoder"],
        _state_errors(link, inst, tracker, reference_rad),
        EncoderVPiConfig(v_pi_guess_v=3.0),  # the datasheet value
    )
    rows.append(
        _sym(
            seed,
            "encoder_v_pi",
            "V",
            estimate=v_pi.v_pi_v,
            sigma=v_pi.v_pi_sigma_v,
            truth=hw.encoder_v_pi_v,
        )
    )
    f = v_pi.fit
    rows.append(
        _sym(
            seed,
            "encoder_bias",
            "V",
            estimate=f.bias_opt_v,
            sigma=f.bias_opt_sigma_v,
            # where H arrives at 0 degrees: the encoder's optimum less the fiber's turn of
            # the reference (a random walk), averaged over the sweep
            truth=_nearest(
                hw.encoder_bias_opt_v
                - float(np.mean(reference_rad)) * 2 * hw.encoder_v_pi_v / math.pi,
                f.bias_opt_v,
                2 * f.bias_v_pi_v,
            ),
        )
    )
    measure_qber = _qber(link, inst, tracker)
    encoding = await compensate_encoding(
        inst["encoder"], measure_qber, None, EncodingCompensationConfig(v_pi_v=v_pi.bias_v_pi_v)
    )

    async def set_light(on: bool) -> None:
        inst["voa"].set_shutter(on)

    dark = await measure_dark_counts_and_efficiency(
        inst["detectors"],
        set_light,
        src.slot_rate_hz,
        [
            (src.p_signal, mu.mu_signal),
            (src.p_decoy, mu.mu_decoy),
            (src.p_vacuum, mu.vacuum.mu_or_upper),
        ],
        DarkCountConfig(
            reading_time_s=link.chunk_s,
            rx_p_basis_z=rx.p_basis_z,
            tx_p_basis_z=src.p_basis_z,
        ),
        mu_bounds=mu.bounds(),
        channel_transmittance=params.fiber.transmittance,  # the link budget
        channel_transmittance_uncertainty_db=0.05,
        encoding_qber=encoding.final_qber,
        wait_integration=lambda: link.step(4),
    )
    gate_s = rx.gate_width_ps * 1e-12
    for d, eff, dark_hz in zip(
        dark.detectors, rx.detector_efficiency, rx.dark_count_rates_hz, strict=True
    ):
        assert d.detector_efficiency_lower is not None and d.detector_efficiency_upper is not None
        rows.append(
            _row(
                seed,
                f"efficiency[{d.detector}]",
                "",
                estimate=d.detector_efficiency,
                lower=d.detector_efficiency_lower,
                upper=d.detector_efficiency_upper,
                truth=eff,
            )
        )
        rows.append(
            _row(
                seed,
                f"dark_rate[{d.detector}]",
                "Hz",
                estimate=d.dark_rate_hz,
                lower=d.dark_rate_lower_hz,
                upper=d.dark_rate_upper_hz,
                truth=dark_hz * gate_s * src.slot_rate_hz,  # counts in the gates
            )
        )
    return rows


def _state_errors(
    link: SimLink, inst: dict[str, Any], tracker: SlotTracker, reference_rad: list[float]
) -> Any:
    async def measure() -> StateErrors:
        drain(inst["tagger"])
        for _ in range(max(1, round(0.02 / link.chunk_s))):
            link.step(1)
            reference_rad.append(link.tx.reference_angle_rad)
        mapped, _ = tracker.update(drain(inst["tagger"]))
        prepared = inst["source"].prepared(mapped.slot_index)
        return count_state_errors(mapped.channel, prepared.basis, prepared.bit)

    return measure


def _qber(link: SimLink, inst: dict[str, Any], tracker: SlotTracker) -> Any:
    async def measure() -> float:
        drain(inst["tagger"])
        link.advance(0.05)
        mapped, _ = tracker.update(drain(inst["tagger"]))
        prepared = inst["source"].prepared(mapped.slot_index)
        return qber_from_detections(mapped.channel, prepared.basis, prepared.bit).qber

    return measure


#: Chunks of detections per disclosed polarisation window (about 40 000 detections).
_WINDOW_CHUNKS = 8
_DOMAIN_FIBER = 0x66696272  # "fibr"


def polarization_link(seed: int) -> LinkParams:
    """The link of ``seed`` at its optimum, its fiber turned by a rotation drawn from the
    seed (random axis, 0.2 to 1 rad on the sphere) and frozen there (no drift: the truth
    the estimate is compared with is then one rotation)."""
    rng = np.random.default_rng([seed, _DOMAIN_FIBER])
    axis = rng.normal(size=3)
    angle = float(rng.uniform(0.2, 1.0))
    rotation = axis / float(np.linalg.norm(axis)) * angle
    fiber = FiberParams(
        drift_rad_per_sqrt_s=0.0,
        polarization=PolarizationDriftParams(
            drift_rad_per_sqrt_s=0.0,
            initial_rotation_rad=(float(rotation[0]), float(rotation[1]), float(rotation[2])),
        ),
    )
    return truth_link(seed).model_copy(update={"start_calibrated": True, "fiber": fiber})


async def _polarization(link: SimLink, seed: int) -> list[TruthRow]:
    """One compensation step's estimate of the fiber's rotation against the fiber's."""
    controller = link.connect()["polarization"]

    async def window() -> WindowCounts:
        counts = np.zeros((4, 4), np.int64)
        for _ in range(_WINDOW_CHUNKS):
            link.tx.step()
            rec = link.rx.receive(5.0)
            if rec is None:
                raise RuntimeError("simulated fiber lost a chunk")
            prep = link.tx.prepared(rec.slot)  # the transmitter's disclosure
            counts += WindowCounts.from_detections(
                rec.channel, prep.basis, prep.bit, mask=prep.intensity != IntensityClass.VACUUM
            ).counts
        return WindowCounts(counts)

    step = await compensation_step(controller, window, CompensationSettings())
    est = step.estimate
    truth = np.asarray(link.rx.last_fiber_rotation, dtype=np.float64)
    # the truth as a rotation from the estimate: F_true = exp([phi]x) F_estimate
    phi = rotation_vector(truth @ est.fiber.T)
    return [
        _sym(
            seed,
            f"polarization[{axis}]",
            "rad",
            estimate=0.0,
            sigma=sigma,
            truth=float(phi[k]),
        )
        for k, (axis, sigma) in enumerate(
            zip(("S1", "S2", "S3"), est.rotation_sigma_rad, strict=True)
        )
    ]


def check_seed(seed: int) -> list[TruthRow]:
    """Run the calibration chain on the link of ``seed`` and compare it with the truth,
    then the polarisation estimate on the same boxes behind a turned fiber."""
    link = SimLink(truth_link(seed))
    try:
        inst = link.connect()
        rows = asyncio.run(_chain(link, inst, seed))
    finally:
        link.close()
    link = SimLink(polarization_link(seed))
    try:
        rows += asyncio.run(_polarization(link, seed))
    finally:
        link.close()
    return rows


def check_seeds(seeds: Sequence[int]) -> list[TruthRow]:
    out: list[TruthRow] = []
    for s in seeds:
        out += check_seed(s)
    return out


def _family(quantity: str) -> str:
    """``delay[spd0]`` and ``delay[spd1]`` are one quantity: ``delay``."""
    return quantity.split("[", 1)[0]


def summarize(rows: Sequence[TruthRow]) -> list[QuantitySummary]:
    """Per quantity (detectors together): the largest ``|z|`` and ``|error|``, the median
    stated uncertainty and the number of truths outside their intervals."""
    groups: dict[str, list[TruthRow]] = {}
    for r in rows:
        groups.setdefault(_family(r.quantity), []).append(r)
    out = []
    for name, group in groups.items():
        zs = [abs(r.z) for r in group if r.z is not None]
        errs = [abs(r.estimate - r.truth) for r in group if r.estimate is not None]
        us = [r.standard_uncertainty for r in group if r.standard_uncertainty is not None]
        out.append(
            QuantitySummary(
                quantity=name,
                unit=group[0].unit,
                rows=len(group),
                max_abs_z=max(zs) if zs else None,
                max_abs_error=max(errs) if errs else None,
                median_standard_uncertainty=float(np.median(us)) if us else None,
                misses=sum(not r.within for r in group),
            )
        )
    return out
