"""Benchmarks of the procedures: how long each takes and how fast the sync core runs.

``run_benchmarks()`` returns rows ``{"name", "value", "unit", "target", "note"}``.
Procedure timings run on the simulated link stepped as fast as the physics allows
(:mod:`qkdnode.procedures.simharness`); they measure our code plus the simulation of the
light the procedure needs, not the wall-clock integration time a real instrument takes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from drivers.simlink.params import LinkParams
from qkdnode.procedures import track_kernel
from qkdnode.procedures.dark_counts import DarkCountConfig, measure_dark_counts_and_efficiency
from qkdnode.procedures.detector_timing import calibrate_detector_timing
from qkdnode.procedures.encoder_v_pi import (
    EncoderVPiConfig,
    StateErrors,
    calibrate_encoder_v_pi,
    count_state_errors,
)
from qkdnode.procedures.encoding_compensation import compensate_encoding, qber_from_detections
from qkdnode.procedures.mean_photon_number import MeanPhotonConfig, calibrate_mean_photon_number
from qkdnode.procedures.modulator import calibrate_modulator
from qkdnode.procedures.simharness import SimLink, drain
from qkdnode.procedures.sync import acquire_lock
from qkdnode.procedures.sync_model import SyncConfig, map_tags_to_slots
from qkdnode.procedures.sync_search import acquire
from qkdnode.procedures.sync_tracking import SlotTracker
from qkdnode.procedures.synthetic import synthetic_tags

__all__ = ["run_benchmarks"]

Row = dict[str, object]


def _row(name: str, value: float, unit: str, target: str, note: str = "") -> Row:
    return {"name": name, "value": round(value, 4), "unit": unit, "target": target, "note": note}


def _core_benchmarks(quick: bool) -> list[Row]:
    rows: list[Row] = []
    rate = 25e6
    acq = synthetic_tags(offset_s=3.3, ppm=-97.0, start_slot=50_000_000, seed=1, duration_s=0.05)
    cfg = SyncConfig()
    acquire(acq["time_ps"], 7, rate, cfg)  # warm-up (FFT plans, imports)
    t0 = time.perf_counter()
    res = acquire(acq["time_ps"], 7, rate, cfg)
    rows.append(
        _row(
            "sync.acquire_core",
            time.perf_counter() - t0,
            "s",
            "< 1 s",
            f"{acq.size} tags, +/-{cfg.max_offset_s} s offset search, locked={res.locked}",
        )
    )
    dur = 0.5 if quick else 2.0
    run = synthetic_tags(
        offset_s=3.3,
        ppm=-97.0,
        start_slot=50_000_000,
        seed=2,
        duration_s=dur,
        pattern_seed=None,
        click_probability=0.08,
        wander_ppm_per_sqrt_s=0.05,
    )
    tracker = SlotTracker(res.model, rate, res.window_ps, cfg)
    blocks = np.array_split(run, max(1, run.size // 200_000))
    track_kernel.warm_up()  # as the daemon does at start: no compile or cache load timed
    t0 = time.perf_counter()
    for b in blocks:
        tracker.update(b)
    el = time.perf_counter() - t0
    rows.append(
        _row(
            "sync.tracker_throughput",
            run.size / el / 1e6,
            "M tags/s",
            ">= 10",
            f"{run.size} tags, locked={tracker.locked}",
        )
    )
    t0 = time.perf_counter()
    map_tags_to_slots(run, tracker.model, rate, res.window_ps)
    el = time.perf_counter() - t0
    rows.append(_row("sync.map_tags_throughput", run.size / el / 1e6, "M tags/s", ">= 10"))
    return rows


async def _procedure_benchmarks(quick: bool) -> list[Row]:
    rows: list[Row] = []
    params = LinkParams(chunk_slots=1 << 18, start_calibrated=False)
    link = SimLink(params)
    src = params.source
    try:
        inst: dict[str, Any] = link.connect()
        inst["laser"].set_emission(True)
        while inst["laser"].status() != 2:
            await asyncio.sleep(0.05)

        async def timed(name: str, coro: Any, note: str = "") -> Any:
            t0 = time.perf_counter()
            out = await coro
            rows.append(_row(f"procedure.{name}", time.perf_counter() - t0, "s", "< 30 s", note))
            return out

        mod = await timed(
            "modulator",
            calibrate_modulator(inst["im"], inst["meter"], voa=inst["voa"]),
            "61+61 sweep points, 3 readings each",
        )
        mu = await timed(
            "mean_photon_number",
            calibrate_mean_photon_number(
                inst["laser"],
                inst["im"],
                inst["voa"],
                inst["meter"],
                mod,
                mu_signal=src.mu_signal,
                mu_decoy=src.mu_decoy,
                slot_rate_hz=src.slot_rate_hz,
                # the box's commissioning value: the simulated box's true tap-to-output loss
                cfg=MeanPhotonConfig(tap_to_output_db=link.params.transmitter.tap_to_output_db),
            ),
        )
        inst["encoder"].set_output(True)
        await timed(
            "detector_timing",
            calibrate_detector_timing(
                inst["detectors"], src.slot_rate_hz, wait_integration=lambda: link.step(1)
            ),
            "4 detectors in parallel, 10 ms of link per point (simulated)",
        )

        inst["source"].set_sync_pattern(5)
        link.step(1)
        inst["tagger"].start_stream()
        link.advance(0.08)
        t0 = time.perf_counter()
        sync, tracker = await acquire_lock(
            inst["tagger"], 5, src.slot_rate_hz, SyncConfig(confirm_blocks=0)
        )
        rows.append(
            _row(
                "sync.acquire_lock",
                time.perf_counter() - t0,
                "s",
                "< 2 s",
                f"{sync.n_tags} tags over {sync.span_s * 1e3:.0f} ms of link, locked={sync.locked}",
            )
        )
        inst["source"].set_sync_pattern(None)

        async def measure_qber() -> float:
            drain(inst["tagger"])
            link.advance(0.05)
            mapped, _ = tracker.update(drain(inst["tagger"]))
            prep = inst["source"].prepared(mapped.slot_index)
            return qber_from_detections(mapped.channel, prep.basis, prep.bit).qber

        enc = await timed(
            "encoding_compensation",
            compensate_encoding(inst["encoder"], measure_qber),
            "from power-on bias; each QBER = 50 ms of key exchange",
        )
        rows.append(
            _row(
                "encoding_compensation.measurements",
                len(enc.samples),
                "QBER blocks",
                "<= 6",
                f"QBER {enc.initial_qber:.3f} -> {enc.final_qber:.3f}",
            )
        )

        async def measure_state_errors() -> StateErrors:
            drain(inst["tagger"])
            link.advance(0.02)
            mapped, _ = tracker.update(drain(inst["tagger"]))
            prep = inst["source"].prepared(mapped.slot_index)
            return count_state_errors(mapped.channel, prep.basis, prep.bit)

        cfg = EncoderVPiConfig()
        v_pi = await timed(
            "encoder_v_pi",
            calibrate_encoder_v_pi(inst["encoder"], measure_state_errors, cfg),
            f"{cfg.sweep_points} bias points, each 20 ms of key exchange",
        )
        rows.append(
            _row(
                "encoder_v_pi.relative_uncertainty",
                v_pi.coverage_factor * v_pi.v_pi_sigma_v / v_pi.v_pi_v,
                "",
                f"<= {cfg.max_relative_uncertainty}",
                f"V_pi {v_pi.v_pi_v:.3f} V from a guess of {v_pi.v_pi_guess_v} V",
            )
        )
        qber = await measure_qber()  # with the drives and bias of the V_pi step

        async def set_light(on: bool) -> None:
            inst["voa"].set_shutter(on)

        await timed(
            "dark_counts",
            measure_dark_counts_and_efficiency(
                inst["detectors"],
                set_light,
                src.slot_rate_hz,
                [
                    (src.p_signal, mu.mu_signal),
                    (src.p_decoy, mu.mu_decoy),
                    (src.p_vacuum, mu.vacuum.mu_or_upper),
                ],
                # a simulated detector's reading counts over the last chunk of the link
                DarkCountConfig(reading_time_s=link.chunk_s, max_efficiency_uncertainty=0.2),
                mu_bounds=mu.bounds(),
                encoding_qber=qber,  # the encoding set by the V_pi step
                wait_integration=lambda: link.step(2),
            ),
        )
    finally:
        link.close()
    return rows


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    rows = _core_benchmarks(quick)
    rows += asyncio.run(_procedure_benchmarks(quick))
    return rows


if __name__ == "__main__":  # pragma: no cover
    for r in run_benchmarks():
        print(
            f"{r['name']:40s} {r['value']!s:>10} {r['unit']:12s} target {r['target']:8s} "
            f"{r['note']}"
        )
