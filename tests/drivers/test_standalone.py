from __future__ import annotations

import subprocess
import sys

import pytest

from drivers.ascii_spd import AsciiSpd
from drivers.bench import run_benchmarks
from drivers.oif_itla import OifItlaLaser


@pytest.mark.parametrize(
    ("module", "cls"),
    [("drivers.serialsim.itla_sim", OifItlaLaser), ("drivers.serialsim.spd_sim", AsciiSpd)],
)
def test_simulator_runs_as_a_process(module: str, cls: type) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("socket://127.0.0.1:")
        inst = cls("dev", url, 2.0)
        inst.connect()
        assert inst.identify().startswith("QKDNODE-SIM")
        inst.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_quick_benchmarks_report_schema() -> None:
    rows = run_benchmarks(quick=True)
    assert {r["name"] for r in rows} == {
        "drivers.itla_register_read_pty",
        "drivers.spd_query_tcp",
        "drivers.scpi_query_pyvisa_sim",
    }
    for r in rows:
        assert isinstance(r["value"], float) and r["value"] > 0 and r["unit"] == "us"
