"""How long a daemon takes from its process start to ``daemon_ready``, as installed.

Three configurations of the same simulated transmitter (CURVE bus, see
:func:`qkdnode.bus.daemonbench.start_daemon`), each started afresh:

- **first start, JIT**: numba's kernels (``QKDNODE_KERNELS=numba``) with numba's cache
  empty (``NUMBA_CACHE_DIR`` a new directory), as on the first start after an install:
  the kernels compile before the daemon is ready;
- **JIT, cache warm**: the same after a first start filled the cache;
- **production**: ``QKDNODE_NO_JIT=1``, as under the hardened systemd unit
  (``MemoryDenyWriteExecute=yes``), where numba cannot load: the kernels are those
  compiled at install (:mod:`qkdnode.native`; the numpy twins where not built) and
  nothing of the node compiles, first start or not. The node picks the same kernels
  without the variable wherever they are built. The simulated link (``drivers.simlink``,
  absent on real hardware) still starts in the process and needs numba: its kernels come
  from the warm cache, as they would not exist on hardware.

The first JIT start includes the simulated link's compilation too (several seconds);
the node's own share is the kernel time the daemon logs.

The kernel compile time the daemon logs (``kernels_ready``) is reported beside the first
start. Values are medians over repeated starts.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from qkdnode.bus.daemonbench import start_daemon, stop_daemon

#: Target for a first start after an install (seconds to ``daemon_ready``).
FIRST_START_TARGET_S = 5.0


def _kernels_s(log_path: Path) -> float:
    """The ``seconds`` of the daemon's ``kernels_ready`` record (NaN if absent)."""
    for line in log_path.read_text("utf-8", "replace").splitlines():
        if '"kernels_ready"' in line:
            try:
                return float(json.loads(line)["seconds"])
            except (ValueError, KeyError, TypeError):
                break
    return float("nan")


def time_start(env: dict[str, str], cache_dir: Path) -> tuple[float, float]:
    """(seconds to ``daemon_ready``, kernel seconds logged) of one daemon start with
    ``env`` and numba's cache in ``cache_dir``."""
    with tempfile.TemporaryDirectory(prefix="qkdnode-startbench-") as tmp:
        full = {**env, "NUMBA_CACHE_DIR": str(cache_dir)}
        daemon = start_daemon(Path(tmp), clients=1, env=full)
        try:
            return daemon.ready_s, _kernels_s(daemon.log_path)
        finally:
            stop_daemon(daemon)


def run_benchmarks(quick: bool = False) -> list[dict[str, Any]]:
    reps = 1 if quick else 3
    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="qkdnode-numba-") as tmp:
        caches = [Path(tmp) / f"cache{i}" for i in range(reps)]
        numba = {"QKDNODE_KERNELS": "numba"}
        first = [time_start(numba, caches[i]) for i in range(reps)]
        # the last first start filled its cache: later starts load from it
        warm = [time_start(numba, caches[reps - 1]) for _ in range(reps)]
        # nothing of the node compiles without JIT; the cache only spares the simulated
        # link's kernels, which a node on hardware does not have
        no_jit = {"QKDNODE_NO_JIT": "1"}
        prod = [time_start(no_jit, caches[reps - 1]) for _ in range(reps)]
    first_s = med(t for t, _ in first)
    prod_s = med(t for t, _ in prod)
    from qkdnode.benchmarks import production_kernels

    kernels = production_kernels()
    return [
        {
            "name": "daemon.ready_first_start_production",
            "value": round(prod_s, 2),
            "unit": "s",
            "target": f"<= {FIRST_START_TARGET_S:g}",
            "note": "QKDNODE_NO_JIT=1 (as under MemoryDenyWriteExecute=yes), "
            f"{kernels} kernels loaded in {med(k for _, k in prod):.2f} s: nothing of the "
            "node compiles; process start to daemon_ready, simulated transmitter (its "
            f"simulated link's kernels from the cache); median of {reps}",
        },
        {
            "name": "daemon.ready_first_start_jit",
            "value": round(first_s, 2),
            "unit": "s",
            "target": f"<= {FIRST_START_TARGET_S:g}",
            "note": f"numba JIT, empty numba cache (first start after an install); the node's "
            f"kernels compiled in {med(k for _, k in first):.1f} s of it, the simulated "
            f"link's in most of the rest; production start in the "
            f"same run {prod_s:.2f} s; median of {reps}",
        },
        {
            "name": "daemon.ready_jit_cache_warm",
            "value": round(med(t for t, _ in warm), 2),
            "unit": "s",
            "target": "-",
            "note": f"numba JIT, kernels loaded from the cache in "
            f"{med(k for _, k in warm):.2f} s; median of {reps}",
        },
    ]


if __name__ == "__main__":  # pragma: no cover
    from qkdnode.log import configure_logging

    configure_logging("warning")
    print(json.dumps(run_benchmarks(quick="--quick" in __import__("sys").argv), indent=1))
