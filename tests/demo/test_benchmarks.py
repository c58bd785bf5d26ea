"""The bench aggregator: target judging, module discovery, table, JSON and docs page."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from qkdnode.benchmarks import (
    PRODUCTION_TAG,
    BenchReport,
    LinkRun,
    _keep_up_items,
    judge,
    markdown,
    run_all,
    text_table,
    unit_factor,
)
from qkdnode.cli import main


@pytest.mark.parametrize(
    ("value", "unit", "target", "expected"),
    [
        (70e6, "counts/s", ">= 60e6 counts/s", True),
        (50e6, "counts/s", ">= 60e6 counts/s", False),
        (12e6, "b/s", ">= 10 Mb/s", True),
        (9.9e6, "b/s", ">= 10 Mb/s", False),
        (40.0, "us", "<= 0.1 ms", True),
        (400.0, "us", "<= 0.1 ms", False),
        (0.5, "ms", "< 1000 us", True),
        (3.0, "", "> 2", True),
        (8392.0, "keys/s", ">= 100000 (256-bit keys; ~25 Mb/s of final key)", False),
        (70.0, "us", "< 5000 us (a 9600-baud module needs ~8 ms)", True),
        (3.0, "x", "about fast", None),
        (3.0, "b/s", ">= 1 furlong", None),
        (float("nan"), "b/s", ">= 1 b/s", None),
    ],
)
def test_judge(value: float, unit: str, target: str, expected: bool | None) -> None:
    assert judge(value, unit, target) is expected


def test_unit_factor() -> None:
    assert unit_factor("Mb/s", "b/s") == 1e6
    assert unit_factor("b/s", "kb/s") == pytest.approx(1e-3)
    assert unit_factor("", "s") == 1.0
    assert unit_factor("m", "s") is None


@pytest.fixture
def bench_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real package on sys.path with a good and a failing bench module."""
    pkg = tmp_path / "fakebenchpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good").mkdir()
    (pkg / "good" / "__init__.py").write_text("")
    (pkg / "good" / "bench.py").write_text(
        textwrap.dedent(
            """
            import statistics, time

            def run_benchmarks(quick=False):
                times = []
                for _ in range(3 if quick else 7):
                    t0 = time.perf_counter(); sum(range(10000)); times.append(time.perf_counter() - t0)
                return [
                    {"name": "sum", "value": 1e6 * statistics.median(times), "unit": "us",
                     "target": "<= 1 s", "note": "quick" if quick else "full"},
                    {"name": "impossible", "value": 1.0, "unit": "b/s",
                     "target": ">= 1 Gb/s", "note": ""},
                ]
            """
        )
    )
    (pkg / "bad").mkdir()
    (pkg / "bad" / "__init__.py").write_text("")
    (pkg / "bad" / "bench.py").write_text(
        "def run_benchmarks(quick=False):\n    raise RuntimeError('boom')\n"
    )
    (pkg / "kernels").mkdir()
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "bench.py").write_text(
        textwrap.dedent(
            """
            from qkdnode import jit

            def run_benchmarks(quick=False):
                # this fake stage's native kernels are 3/4 of numba's speed, its numpy
                # twins 1/4
                speed = {"numba": 4.0, "native": 3.0, "numpy": 1.0}[jit.BACKEND]
                return [{"name": "kernel", "value": speed, "unit": "Mbit/s",
                         "target": ">= 2", "note": jit.WHY_NOT or "jit"}]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fakebenchpkg"


def test_run_all_collects_skips_and_failures(bench_pkg: str, tmp_path: Path) -> None:
    modules = [f"{bench_pkg}.good.bench", f"{bench_pkg}.bad.bench", f"{bench_pkg}.absent.bench"]
    report = run_all(quick=True, out_dir=tmp_path, end_to_end=False, modules=modules)
    assert [r.name for r in report.rows] == ["sum", "impossible"]
    assert report.rows[0].passed is True and report.rows[0].note == "quick"
    assert report.rows[1].passed is False
    assert report.rows[0].stage == f"{bench_pkg}.good"
    assert report.skipped == [
        {"module": f"{bench_pkg}.absent.bench", "reason": "module not present"}
    ]
    assert report.failed[0]["module"] == f"{bench_pkg}.bad.bench"
    assert "boom" in report.failed[0]["error"]
    assert report.machine["cores"] >= 1 and report.machine["python"]
    table = text_table(report)
    assert "FAIL" in table and "pass" in table and "skipped" in table
    md = markdown(report)
    assert "| sum |" in md.replace(f"| {bench_pkg}.good ", "")
    assert report.machine["cpu"] in md


def test_production_rows_run_without_jit_beside_the_jit_rows(
    bench_pkg: str, tmp_path: Path
) -> None:
    """A production module runs twice: with numba (JIT_ENV), then with QKDNODE_NO_JIT=1 (what the
    hardened unit leaves: the native kernels where built, else the numpy twins), its rows
    tagged and set beside the same run's JIT value."""
    from qkdnode import jit

    native = bool(jit._load_native()[0])

    name = f"{bench_pkg}.kernels.bench"
    report = run_all(
        quick=True, out_dir=tmp_path, end_to_end=False, modules=[name], production=[name]
    )
    assert not report.failed
    first, prod = report.rows
    speed = {"numba": 4.0, "native": 3.0, "numpy": 1.0}
    assert first.stage == f"{bench_pkg}.kernels" and first.value == speed["numba"]  # JIT_ENV
    assert prod.stage == f"{bench_pkg}.kernels{PRODUCTION_TAG}"
    assert prod.value == (3.0 if native else 1.0) and prod.passed is native
    assert "QKDNODE_NO_JIT is set" in prod.note
    assert f"QKDNODE_NO_JIT=1 ({'native' if native else 'numpy'} kernels)" in prod.note
    assert f"production / JIT {prod.value / first.value:.2f}" in prod.note
    assert f"| {bench_pkg}.kernels{PRODUCTION_TAG} | kernel |" in markdown(report)


def test_bench_command_writes_json_and_docs(bench_pkg: str, tmp_path: Path) -> None:
    from qkdnode.benchmarks import KEPT_MARKER

    out_json = tmp_path / "b.json"
    docs = tmp_path / "perf.md"
    kept = f"{KEPT_MARKER}\n\n## Measured by hand\n\n| a | b |\n"
    docs.write_text("# stale table\n\n| old | row |\n\n" + kept)
    code = main(
        [
            "bench",
            "--quick",
            "--no-e2e",
            "--only",
            f"{bench_pkg}.good.bench",
            "--out",
            str(tmp_path),
            "--json-out",
            str(out_json),
            "--write-docs",
            str(docs),
        ]
    )
    assert code == 0
    data = json.loads(out_json.read_text())
    assert [r["name"] for r in data["results"]] == ["sum", "impossible"]
    assert data["quick"] is True
    assert "--quick" in data["command"] or data["command"].startswith("qkdnode")
    text = docs.read_text()
    assert "impossible" in text
    assert "stale table" not in text and text.endswith(kept)  # the hand-written part stays
    # a missed target fails only with --strict; a failing module always fails
    strict = [
        "bench",
        "--quick",
        "--no-e2e",
        "--only",
        f"{bench_pkg}.good.bench",
        "--out",
        str(tmp_path),
        "--strict",
    ]
    assert main(strict) == 1
    assert (
        main(["bench", "--no-e2e", "--only", f"{bench_pkg}.bad.bench", "--out", str(tmp_path)]) == 1
    )


def test_empty_report_renders() -> None:
    report = BenchReport()
    assert "stage" in text_table(report)
    assert "## Results" in markdown(report)


def _link_run(committed: float, withheld: float, tags_missed: int = 0) -> LinkRun:
    """A 0 km run whose link delivered 3.38 M/s per key slot; ``withheld`` of its slots in
    tracking windows."""
    return LinkRun(
        committed_hz=committed,
        modelled_hz=3.59e6,
        delivered_hz=3.38e6,
        withheld_share=withheld,
        tags_missed=tags_missed,
        busy_fractions=(0.7, 0.75),
        duration_s=65.0,
        blocks_ok=4,
        block_detections=48_000_000,
        keys_identical=True,
    )


def test_keep_up_rows_count_tracking_windows_as_loss_and_keep_the_model_figure() -> None:
    runs = [
        _link_run(3.30e6, 0.035),
        _link_run(3.36e6, 0.004),
        _link_run(2.50e6, 0.004, tags_missed=1_000_000),  # a loaded machine's run
    ]
    rows = {r["name"]: r for r in _keep_up_items(runs, 0.0, "")}
    kept = rows["kept up (0 km)"]
    # the median run: committed / delivered, nothing added back for its windows
    assert kept["value"] == pytest.approx(3.30e6 / 3.38e6)
    assert judge(kept["value"], kept["unit"], kept["target"]) is True
    assert "tagger dropped 1000000" in kept["note"]  # a run's lost tags are named
    # the model's offer stays reported: the same runs against it miss the target
    model = rows["committed / modelled offer (0 km)"]
    assert model["value"] == pytest.approx(3.30e6 / 3.59e6)
    assert judge(model["value"], "x", ">= 0.95") is False
    assert "3.38 M/s (0.942 of the model)" in model["note"]
    assert rows["tracking windows (0 km)"]["value"] == pytest.approx(0.004)
    busy = rows["pipeline busy (0 km)"]
    assert busy["value"] == pytest.approx(0.725)  # over every block of every run
    assert judge(busy["value"], busy["unit"], busy["target"]) is True
    # a run that committed nothing steady keeps up with nothing
    assert _link_run(0.0, 0.0).kept_up == 0.0
