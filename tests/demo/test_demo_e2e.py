"""The demo end to end: real daemons as subprocesses, driven over ZeroMQ on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkdnode.demo.config import DemoConfig, apply_overrides
from qkdnode.demo.runner import DemoRunner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(out: Path) -> list[int]:
    return [int((out / f"{n}.pid").read_text()) for n in ("alice", "bob")]


def _demo(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdnode", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _demo_toml(tmp_path: Path, block_detections: int) -> Path:
    """configs/demo.toml with another block size."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "configs" / "demo.toml").read_text()
    old = "block_detections = 48000000"
    assert old in text
    out = tmp_path / f"demo-{block_detections}.toml"
    out.write_text(text.replace(old, f"block_detections = {block_detections}"))
    return out


def _why(result: dict[str, object], out: Path) -> str:
    """The demo's failure and the end of both daemon logs, for an assertion message."""
    tails = []
    for name in ("alice", "bob"):
        log_file = out / f"{name}.log"
        if log_file.exists():
            tails.append(
                f"--- {name}.log ---\n" + "\n".join(log_file.read_text().splitlines()[-15:])
            )
    return f"failure={result.get('failure')!r}\n" + "\n".join(tails)


# ~50 s: `make test` keeps the demo's start, stop and failure paths; this full run with
# key is in make test-system (and `make demo` runs it).
@pytest.mark.system
def test_demo_json_keys_identical(tmp_path: Path) -> None:
    # Blocks of 3 M detections: several finish within the run on a loaded 2-core machine.
    proc = _demo(
        "--config",
        str(_demo_toml(tmp_path, 3_000_000)),
        "--duration",
        "25",
        "--json",
        "--out",
        str(tmp_path),
        timeout_s=300,
    )
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["keys_identical"] is True, _why(result, tmp_path)
    assert result["blocks_ok"] >= 1, _why(result, tmp_path)
    assert result["secret_bits"] > 0
    assert result["distance_km"] == 25.0
    assert result["below_plob"] is not False
    assert proc.returncode == 0, result.get("failure")
    assert result["daemon_exit_codes"] == {"alice": 0, "bob": 0}
    assert json.loads((tmp_path / "summary.json").read_text()) == result
    assert not any(_alive(p) for p in _pids(tmp_path))


@pytest.mark.system
def test_demo_with_full_intercept_resend_gives_no_key(tmp_path: Path) -> None:
    # Blocks that yield key without Eve (see above), several attempted within the run.
    proc = _demo(
        "--config",
        str(_demo_toml(tmp_path, 3_000_000)),
        "--duration",
        "15",
        "--eve",
        "intercept-resend:1.0",
        "--json",
        "--out",
        str(tmp_path),
        timeout_s=240,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eve"] == "intercept-resend:1"
    assert result["secret_bits"] == 0 and result["blocks_ok"] == 0, _why(result, tmp_path)
    assert result["blocks_aborted"] >= 1, _why(
        result, tmp_path
    )  # blocks ran, and every one was refused
    assert result["keys_identical"] is True
    assert proc.returncode == 0, result.get("failure")


def test_start_up_failure_stops_both_daemons(tmp_path: Path) -> None:
    """A step that fails (here: start-up not done in time) is reported, and no daemon
    outlives the run."""
    cfg = apply_overrides(DemoConfig(), duration_s=5, out_dir=tmp_path)
    cfg = cfg.model_copy(update={"demo": cfg.demo.model_copy(update={"startup_timeout_s": 0.05})})
    summary = DemoRunner(cfg).run()
    assert not summary.ok
    assert summary.failure is not None
    assert "start-up" in summary.failure or "exited" in summary.failure
    assert set(summary.daemon_exit_codes) == {"alice", "bob"}
    assert all(code is not None for code in summary.daemon_exit_codes.values())
    assert not any(_alive(p) for p in _pids(tmp_path))
    assert summary.key_count == {}
    assert not summary.keys_identical


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_ctrl_c_stops_both_daemons(tmp_path: Path) -> None:
    # Started with SIGINT ignored, as a CI runner or `nohup` may leave it: Ctrl-C must
    # still stop the demo (it installs its own handler).
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdnode", "demo", "--duration", "60", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,  # noqa: PLW1509
    )
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"{n}.pid").exists() for n in ("alice", "bob")):
            assert time.monotonic() < deadline, "daemons were never started"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        pids = _pids(tmp_path)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (1, 130)  # 1 if the daemons had already failed by themselves
    assert not any(_alive(p) for p in pids)


def test_killed_demo_leaves_no_daemon_behind(tmp_path: Path) -> None:
    """SIGKILL of the demo client (no cleanup runs in it): the daemons get SIGTERM from
    the kernel (parent-death signal) and stop safely by themselves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdnode", "demo", "--duration", "60", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"{n}.pid").exists() for n in ("alice", "bob")):
            assert time.monotonic() < deadline, "daemons were never started"
            assert proc.poll() is None
            time.sleep(0.05)
        pids = _pids(tmp_path)
        logs = [tmp_path / f"{n}.log" for n in ("alice", "bob")]
        while not all("daemon_ready" in f.read_text() for f in logs):
            assert time.monotonic() < deadline + 120, "daemons never became ready"
            assert proc.poll() is None
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 90
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if _alive(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "daemons outlived the demo"
    for name in ("alice", "bob"):
        assert '"daemon_stopped"' in (tmp_path / f"{name}.log").read_text(), name


@pytest.mark.system
def test_full_key_store_drops_blocks_and_the_exchange_goes_on(tmp_path: Path) -> None:
    """Consumers not taking keys: a store that cannot take a block's keys drops the block
    on both nodes (identical stores), raises one alarm, and key exchange continues."""
    cfg = _demo_toml(tmp_path, 3_000_000)
    text = cfg.read_text()
    assert "\nmax_key_count = " in text
    cfg.write_text(re.sub(r"\nmax_key_count = \d+", "\nmax_key_count = 1", text))
    proc = _demo(
        "--config", str(cfg), "--duration", "20", "--json", "--out", str(tmp_path), timeout_s=240
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failure"] is None, _why(result, tmp_path)
    assert result["blocks_ok"] >= 1, _why(result, tmp_path)
    assert result["key_count"] == {"alice": 0, "bob": 0}
    assert result["keys_identical"] is True
    for name in ("alice", "bob"):
        events = [
            json.loads(x).get("event")
            for x in (tmp_path / f"{name}.log").read_text().splitlines()
            if x.startswith("{")
        ]
        assert "block_dropped_keystore_full" in events, name
        assert events.count("alarm") >= 1
        assert "exchange_failed" not in events, name


def test_line_demo_refuses_pair_options_and_a_missing_config_dir(tmp_path: Path) -> None:
    bad = _demo("--topology", "line", "--eve", "intercept-resend:1", timeout_s=60)
    assert bad.returncode == 2 and "--topology line takes no --eve" in bad.stderr
    missing = tmp_path / "nowhere"
    res = _demo(
        "--topology", "line", "--config-dir", str(missing), "--out", str(tmp_path), timeout_s=60
    )
    assert res.returncode == 2 and f"cannot read {missing / 'alpha.toml'}" in res.stderr
    pair = _demo("--no-fault", "--duration", "1", timeout_s=60)
    assert pair.returncode == 2 and "go with --topology line" in pair.stderr


@pytest.mark.system
def test_line_demo_shows_a_fault_on_one_link_sparing_the_other(tmp_path: Path) -> None:
    proc = _demo(
        "--topology", "line", "--duration", "5", "--json", "--out", str(tmp_path), timeout_s=1500
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True, (result, proc.stderr[-3000:])
    assert proc.returncode == 0
    assert result["keys_committed_while_alpha_down"] > 0
    assert result["seconds_to_recover"] is not None
    for link in ("alpha-bravo", "bravo-charlie"):
        assert result["links"][link]["identical"] is True
        assert result["links"][link]["states"] == ["EXCHANGING", "EXCHANGING"]
    assert result["exit_codes"] == {"alpha": 0, "bravo": 0, "charlie": 0}
