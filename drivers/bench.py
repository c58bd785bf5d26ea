"""Benchmarks of the driver round trips (medians of repeated runs).

* ITLA register read over a pty pair (framing + checksum + simulator thread),
* SPD-ASCII query over TCP loopback,
* SCPI query through pyvisa + pyvisa-sim (the real pyvisa path, no I/O).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from drivers.ascii_spd import AsciiSpd
from drivers.keysight_816x import Keysight816xLaser
from drivers.oif_itla import OifItlaLaser, Reg
from drivers.serialsim.itla_sim import ItlaSimulator
from drivers.serialsim.server import SimServer
from drivers.serialsim.spd_sim import SpdSimulator


def _median_us(fn: Callable[[], object], n: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    n = 50 if quick else 500
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with SimServer(ItlaSimulator(), mode="pty", link_path=str(Path(tmp) / "itla")) as srv:
            laser = OifItlaLaser("bench_itla", srv.url, 1.0)
            laser.connect()
            results.append(
                {
                    "name": "drivers.itla_register_read_pty",
                    "value": _median_us(lambda: laser.read_register(Reg.PWR), n),
                    "unit": "us",
                    "target": "< 5000 us (a 9600-baud module needs ~8 ms on the wire)",
                    "note": f"median of {n}; 4-byte frame + BIP-4 both ways, simulator thread",
                }
            )
            laser.close()
        with SimServer(SpdSimulator()) as srv:
            spd = AsciiSpd("bench_spd", srv.url, 1.0)
            spd.connect()
            results.append(
                {
                    "name": "drivers.spd_query_tcp",
                    "value": _median_us(spd.dead_time_ns, n),
                    "unit": "us",
                    "target": "< 5000 us",
                    "note": f"median of {n}; one checksummed line each way over 127.0.0.1",
                }
            )
            spd.close()
    visa = Keysight816xLaser("bench_visa", "GPIB0::20::INSTR@sim", 1.0)
    visa.connect()
    results.append(
        {
            "name": "drivers.scpi_query_pyvisa_sim",
            "value": _median_us(visa.power_dbm, n),
            "unit": "us",
            "target": "< 5000 us",
            "note": f"median of {n}; :SOUR1:POW? through pyvisa and pyvisa-sim",
        }
    )
    visa.close()
    return results


if __name__ == "__main__":
    for row in run_benchmarks(quick=False):
        print(f"{row['name']:<36} {row['value']:10.1f} {row['unit']}  ({row['target']})")
