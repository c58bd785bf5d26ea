"""The unit, sysusers, tmpfiles and udev files, checked with systemd's own tools.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` (systemd >= 252)
run on the unmodified template instantiated as ``qkdnode@test.service``. The unit's
ExecStart names /opt/qkdnode/venv/bin/qkdnode, which does not exist on a development
machine; the verify test points ExecStart at this venv's real ``qkdnode`` through a
drop-in, the way an operator would override it, and a second test shows that the missing
/opt path is then the only complaint about the bare unit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = ROOT / "systemd"
UNIT = SYSTEMD_DIR / "qkdnode@.service"
SYSUSERS = SYSTEMD_DIR / "qkdnode.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "qkdnode.tmpfiles.conf"
UDEV_RULES = SYSTEMD_DIR / "99-qkdnode-instruments.rules"
DELIVERY_DROPIN = SYSTEMD_DIR / "delivery-tls.conf"
VENV_QKDNODE = Path(sys.executable).with_name("qkdnode")
INSTALLED_EXEC = "/opt/qkdnode/venv/bin/qkdnode"

ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if os.path.exists("/usr/bin/systemd-analyze") else None
)
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def systemd_version() -> int:
    assert ANALYZE is not None
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True).stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, out
    return int(m.group(1))


def instance_dir(tmp_path: Path, exec_path: Path | None, *dropins: Path) -> Path:
    """A unit directory with the template, optionally an ExecStart drop-in, and drop-ins."""
    d = tmp_path / "units"
    d.mkdir()
    shutil.copy(UNIT, d / UNIT.name)
    dropin_dir = d / "qkdnode@.service.d"
    dropin_dir.mkdir()
    if exec_path is not None:
        (dropin_dir / "exec.conf").write_text(
            f"[Service]\nExecStart=\nExecStart={exec_path} run --config %i\n"
        )
    for extra in dropins:
        shutil.copy(extra, dropin_dir / extra.name)
    return d


def analyze(units: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:", SYSTEMD_LOG_COLOR="0")
    return subprocess.run(
        [ANALYZE, *args, f"{units / UNIT.name}:qkdnode@test.service"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=units,
    )


@needs_analyze
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    assert VENV_QKDNODE.exists(), f"{VENV_QKDNODE} missing: install the package editable"
    units = instance_dir(tmp_path, VENV_QKDNODE)
    r = analyze(units, "verify", "--man=no")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == "", r.stderr


@needs_analyze
@pytest.mark.skipif(
    os.path.exists(INSTALLED_EXEC), reason=f"{INSTALLED_EXEC} exists on this machine"
)
def test_bare_unit_only_lacks_the_installed_executable(tmp_path: Path) -> None:
    units = instance_dir(tmp_path, None)
    r = analyze(units, "verify", "--man=no")
    complaints = [line for line in r.stderr.splitlines() if line.strip()]
    assert complaints, "verify should complain about the missing /opt executable"
    for line in complaints:
        assert f"Command {INSTALLED_EXEC} is not executable" in line, line


@needs_analyze
def test_security_exposure_is_ok(tmp_path: Path) -> None:
    if systemd_version() < 252:
        pytest.skip("systemd-analyze security --offline needs systemd >= 252")
    units = instance_dir(tmp_path, VENV_QKDNODE)
    r = analyze(units, "security", "--offline=true", "--no-pager", "--threshold=20")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure, verdict = float(m.group(1)), m.group(2)
    assert exposure <= 2.0, r.stdout
    assert verdict == "OK"
    assert r.returncode == 0, r.stderr  # --threshold=20 means exposure <= 2.0


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def test_unit_essentials() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == [f"{INSTALLED_EXEC} run --config %i"]
    assert s["ConfigurationDirectory"] == ["qkdnode"]
    assert s["StateDirectory"] == ["qkdnode/%i"]
    assert s["DevicePolicy"] == ["closed"]
    assert s["CapabilityBoundingSet"] == [""]
    assert "PrivateDevices" not in s  # it would hide the instruments
    stop_s = int(s["TimeoutStopSec"][0].removesuffix("s"))
    assert stop_s >= 60  # room for a safe hardware shutdown
    watchdog_s = int(s["WatchdogSec"][0].removesuffix("s"))
    assert 10 <= watchdog_s < stop_s
    creds = {v.split(":", 1)[0] for v in s["LoadCredential"]}
    assert creds == {"curve.key", "auth.psk"}
    assert "LoadCredential=tls.key:/etc/credstore/qkdnode/%i/tls.key" in (
        DELIVERY_DROPIN.read_text()
    )
    for group in ("dialout", "plugdev"):
        assert group in s["SupplementaryGroups"][0].split()


def test_udev_rules_are_well_formed_and_allowed_by_the_unit() -> None:
    """Every rule matches, assigns group and mode 0660, and its symlink is in DeviceAllow."""
    token = re.compile(r'^\s*([A-Z_]+)(\{[^}]+\})?\s*(==|!=|\+=|:=|=)\s*"([^"]*)"\s*$')
    allowed = set(unit_settings()["DeviceAllow"])
    rules = [
        line
        for line in UDEV_RULES.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(rules) >= 3
    for rule in rules:
        parts = [token.match(p) for p in rule.split(", ")]
        assert all(parts), rule
        ops = {(m.group(1), m.group(3)): m.group(4) for m in parts if m}
        assert ("SUBSYSTEM", "==") in ops, rule
        assert ops[("MODE", "=")] == "0660", rule
        assert ops[("GROUP", "=")] in ("dialout", "plugdev"), rule
        link = ops[("SYMLINK", "+=")]
        assert link.startswith("qkd-"), rule
        assert f"/dev/{link} rw" in allowed, f"/dev/{link} not in the unit's DeviceAllow"


def test_sysusers_creates_the_user_in_its_groups(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed")
    if os.geteuid() != 0:
        pytest.skip("systemd-sysusers --root needs root to write an alternate /etc")
    (tmp_path / "etc").mkdir()
    r = subprocess.run(
        [tool, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    group = (tmp_path / "etc/group").read_text()
    assert re.search(r"^qkdnode:x:\d+:\d+:.*:/var/lib/qkdnode:", passwd, re.M), passwd
    for g in ("dialout", "plugdev"):
        assert re.search(rf"^{g}:x:\d+:.*\bqkdnode\b", group, re.M), group


def test_tmpfiles_creates_a_root_only_credential_store(tmp_path: Path) -> None:
    tool = shutil.which("systemd-tmpfiles")
    if tool is None:
        pytest.skip("systemd-tmpfiles is not installed")
    r = subprocess.run(
        [tool, f"--root={tmp_path}", "--create", str(TMPFILES)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    for sub in ("", "/qkdnode", "/qkdnode/transmitter", "/qkdnode/receiver"):
        st = (tmp_path / f"etc/credstore{sub}").stat()
        assert st.st_mode & 0o777 == 0o700, sub
    # Every LoadCredential= source lives under the store tmpfiles creates.
    for v in unit_settings()["LoadCredential"]:
        assert v.split(":", 1)[1].startswith("/etc/credstore/qkdnode/%i/"), v
