"""The compiled kernels per backend (:mod:`qkdnode.jit`): numba, native (ahead of time), numpy.

For each kernel family a child process per backend (``QKDNODE_KERNELS``) runs the same
work on the same inputs after a warm-up (numba's compile or cache load is not timed); the
children of one repeat run back to back, backends interleaved, and each row is the median
over repeats. Families:

- **Cascade**: :func:`qkdnode.postproc.cascade.reconcile_local` of a 1e6-bit frame at 3 %
  QBER, both sides in one process (Mbit/s of frame);
- **shuffle**: :meth:`qkdnode.postproc.shuffle.KeyedPermutation.gather` of 4e6 bits
  (M positions/s);
- **tracking**: :func:`qkdnode.procedures.track_kernel.track` over 1 s of tags at 2 M tags/s
  in 2 ms segments (M tags/s).

Rows ``kernels.<family>_<backend>``, and ``kernels.<family>_native_vs_numba``: the native
backend's speed over numba's in the same run (target: within machine noise, >= 0.9).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qkdnode.jit import BACKENDS

#: (family, unit) in row order
FAMILIES: tuple[tuple[str, str], ...] = (
    ("cascade_in_process", "Mbit/s"),
    ("shuffle_gather", "M positions/s"),
    ("tracking", "M tags/s"),
)
CHILD_TIMEOUT_S = 600.0


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(quick: bool) -> dict[str, Any]:
    """This process's backend and its speed per family (units of :data:`FAMILIES`)."""
    from qkdnode import jit
    from qkdnode.postproc import cascade, shuffle
    from qkdnode.postproc.params import CascadeParams
    from qkdnode.procedures import track_kernel

    reps = 1 if quick else 3
    rng = np.random.default_rng(7)
    n = 1_000_000
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = a ^ (rng.random(n) < 0.03).astype(np.uint8)
    cascade.warm_up()
    track_kernel.warm_up()

    def run_cascade() -> None:
        out, _ = cascade.reconcile_local(a, b, 0.03, CascadeParams(), 1)
        assert np.array_equal(out, a)

    m = 4_000_000
    bits = rng.integers(0, 2, m, dtype=np.uint8)
    perm = shuffle.KeyedPermutation(m, 5, 1)
    perm.gather(bits[:m])  # warm

    slots = np.flatnonzero(rng.random(25_000_000) < 0.08).astype(np.int64)
    times = slots * 40_000 + np.rint(rng.normal(0.0, 30.0, slots.size)).astype(np.int64)
    times.sort()

    def run_track() -> None:
        track_kernel.track(
            times,
            segment_ps=2_000_000_000,
            offset_ps=0.0,
            rate=1.0,
            period_ps=40_000.0,
            capture_ps=20_000.0,
            window_ps=2_000.0,
            min_fit_tags=16,
            phase_gain=0.5,
            rate_gain=0.1,
        )

    return {
        "backend": jit.BACKEND,
        "why_not": jit.WHY_NOT,
        "cascade_in_process": n / _best_of(run_cascade, reps) / 1e6,
        "shuffle_gather": m / _best_of(lambda: perm.gather(bits), reps) / 1e6,
        "tracking": times.size / _best_of(run_track, reps) / 1e6,
    }


def _child(backend: str, quick: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "QKDNODE_NO_JIT"}
    env["QKDNODE_KERNELS"] = backend
    argv = [sys.executable, "-m", "qkdnode.kernelbench", "--child"]
    out = subprocess.run(
        argv + (["--quick"] if quick else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    repeats = 1 if quick else 3
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in BACKENDS}
    for _ in range(repeats):
        for backend in BACKENDS:
            runs[backend].append(_child(backend, quick))
    rows: list[dict[str, object]] = []
    for family, unit in FAMILIES:
        med = {b: statistics.median(r[family] for r in runs[b]) for b in BACKENDS}
        for b in BACKENDS:
            ran = {r["backend"] for r in runs[b]}
            note = (
                f"QKDNODE_KERNELS={b}, ran {'/'.join(sorted(ran))}; "
                f"{med[b] / med['numba']:.2f}x numba in the same run; median of {repeats}"
            )
            rows.append(
                {
                    "name": f"kernels.{family}_{b}",
                    "value": round(med[b], 3),
                    "unit": unit,
                    "target": "",
                    "note": note,
                }
            )
        rows.append(
            {
                "name": f"kernels.{family}_native_vs_numba",
                "value": round(med["native"] / med["numba"], 3),
                "unit": "x",
                "target": ">= 0.9 (within machine noise of numba)",
                "note": f"native {med['native']:.3g} / numba {med['numba']:.3g} {unit}, "
                f"numpy twin {med['numpy'] / med['numba']:.2f}x; same run, median of {repeats}",
            }
        )
    return rows


if __name__ == "__main__":  # pragma: no cover
    if "--child" in sys.argv:
        print(json.dumps(measure(quick="--quick" in sys.argv)))
    else:
        print(json.dumps(run_benchmarks(quick="--quick" in sys.argv), indent=1))
