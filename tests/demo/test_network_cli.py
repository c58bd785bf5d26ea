"""`qkdnode demo --network`: what it says before it starts anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _demo(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "qkdnode", "demo", *args]
    if prefix:  # capsh runs a shell command line
        cmd = [*prefix, "--", "-c", " ".join(f"'{c}'" for c in cmd)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("capsh") is None,
    reason="needs root and capsh to drop the namespace capability",
)
def test_netns_mode_without_the_privilege_says_why_and_offers_loopback(tmp_path: Path) -> None:
    proc = _demo(
        "--network",
        str(ROOT / "configs" / "network.toml"),
        "--network-mode",
        "netns",
        "--json",
        "--out",
        str(tmp_path),
        prefix=("capsh", "--drop=cap_sys_admin"),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not summary["ok"]
    assert "network namespaces are not available here" in summary["failure"]
    assert "CAP_SYS_ADMIN" in summary["failure"]
    assert "--network-mode loopback" in summary["failure"]
    assert summary["exit_codes"] == {}  # nothing was started


def test_bad_network_file_is_named_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "net.toml"
    bad.write_text(
        'sites = ["A", "B"]\nlinks = [{ id = "A-B", a = "A", b = "X" }]\n'
        '[run]\ncut = "A-C"\norigin_sae = "nobody"\n'
    )
    proc = _demo("--network", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert f"{bad}: links[0].b: 'X' is not a site" in lines
    assert f"{bad}: run.cut: 'A-C' is not a link" in lines
    assert f"{bad}: run.origin_sae: 'nobody' is not an SAE" in lines


def test_network_takes_no_pair_options(tmp_path: Path) -> None:
    proc = _demo("--network", str(ROOT / "configs" / "network.toml"), "--distance-km", "5")
    assert proc.returncode == 2
    assert "--network takes only" in proc.stderr and "--distance-km" in proc.stderr
