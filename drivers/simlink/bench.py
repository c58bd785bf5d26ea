"""Benchmarks of the link model: detection records per second and simulation speed.

``python -m drivers.simlink.bench`` prints them; the lead's ``qkdnode bench`` collects
:func:`run_benchmarks`. Medians of repeated runs; times are CPU time of the calling
thread (one core). No fiber socket. A warm-up chunk runs first, so the figures exclude
the one-off compilation of :mod:`drivers.simlink.kernels` (cached on disk after the
first run on a machine).

Rows: the one-core figure runs both sides in one thread (the issue's target); the
per-side figures count the same detections against each side's own CPU time (in the
daemons each side is a process of its own, so the link runs at the slower side's rate).
"""

from __future__ import annotations

import statistics
import time

from drivers.simlink.params import LinkParams
from drivers.simlink.world import ReceiverWorld, TransmitterWorld


def _one_run(params: LinkParams, n_chunks: int) -> tuple[float, float, float, int]:
    """(tx seconds, rx seconds, simulated seconds, detections) of ``n_chunks`` chunks."""
    tx = TransmitterWorld(params.transmitter_side())
    rx = ReceiverWorld(params.receiver_side())
    tx_s = rx_s = 0.0
    detections = 0
    for _ in range(n_chunks):
        index = tx.chunk_index
        t0 = time.thread_time()
        chunk = tx.step()
        t1 = time.thread_time()
        detections += len(rx.process(tx.fiber_header(index, chunk), chunk.photons))
        t2 = time.thread_time()
        tx_s += t1 - t0
        rx_s += t2 - t1
    tx.close()
    rx.close()
    return tx_s, rx_s, n_chunks * params.chunk_slots / params.source.slot_rate_hz, detections


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    params = LinkParams(start_calibrated=True)
    n_chunks, repeats = (3, 3) if quick else (24, 5)
    _one_run(params, 1)  # warm-up (imports, allocator)
    runs = [_one_run(params, n_chunks) for _ in range(repeats)]
    end_to_end = [d / (tx + rx) for tx, rx, _, d in runs]
    rx_only = [d / rx for _, rx, _, d in runs]
    tx_only = [d / tx for tx, _, _, d in runs]
    speedup = [sim / (tx + rx) for tx, rx, sim, _ in runs]
    note = (
        f"default 25 km link, {n_chunks} chunks of {params.chunk_slots} slots, median of {repeats}"
    )
    return [
        {
            "name": "simlink.detections_per_s_one_core",
            "value": statistics.median(end_to_end),
            "unit": "records/s",
            "target": ">= 20e6",
            "note": "transmitter + receiver model on one core; " + note,
        },
        {
            "name": "simlink.rx_detections_per_s",
            "value": statistics.median(rx_only),
            "unit": "records/s",
            "target": "(info)",
            "note": "receiver process alone (runs on its own core in the daemons); " + note,
        },
        {
            "name": "simlink.tx_detections_per_s",
            "value": statistics.median(tx_only),
            "unit": "records/s",
            "target": "(info)",
            "note": "transmitter process alone, per detection it causes at the receiver; " + note,
        },
        {
            "name": "simlink.sim_time_over_cpu_time",
            "value": statistics.median(speedup),
            "unit": "x",
            "target": "> 1 (much faster than real time)",
            "note": "simulated link seconds per CPU second, both sides on one core; " + note,
        },
    ]


if __name__ == "__main__":  # pragma: no cover
    import sys

    for row in run_benchmarks(quick="--quick" in sys.argv):
        print(f"{row['name']:40s} {row['value']:>14.4g} {row['unit']:10s} target {row['target']}")
