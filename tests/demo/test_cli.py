"""``qkdnode demo`` option handling and its JSON contract on a failed run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qkdnode.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--eve", "intercept-resend"],
        ["demo", "--eve", "bogus:0.1"],
        ["demo", "--sweep", "0,abc"],
        ["demo", "--duration", "0"],
        ["demo", "--distance-km", "-5"],
        ["demo", "--config", "/nonexistent/demo.toml"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip()  # the reason is printed


def test_bad_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "demo.toml"
    cfg.write_text("[link.receiver]\ndark_count_hz = 5\n")
    assert main(["demo", "--config", str(cfg)]) == 2
    assert "link.receiver.dark_count_hz" in capsys.readouterr().err


def test_failed_run_still_ends_with_a_json_line(tmp_path: Path) -> None:
    """Even when a step fails, --json prints the object last and exits 1."""
    cfg = tmp_path / "demo.toml"
    cfg.write_text('[demo]\nstartup_timeout_s = 0.05\nsecurity = "plaintext"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkdnode",
            "demo",
            "--config",
            str(cfg),
            "--json",
            "--out",
            str(tmp_path / "out"),
            "--distance-km",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is False and result["failure"]
    assert result["distance_km"] == 10.0
    assert result["security"] == "plaintext"
    assert result["keys_identical"] is False
    assert (tmp_path / "out" / "alice.toml").exists()
