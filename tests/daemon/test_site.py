"""One daemon, several links: a link that cannot start spares the others, the operator is
told, and every link's instruments end safe."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qkdnode.client import Client
from qkdnode.demo.line import control_endpoints, rewrite_for_run
from tests.daemon.conftest import Daemon, start_daemon

ROOT = Path(__file__).resolve().parents[2]


def _site_config(tmp: Path, broken_link: int | None) -> tuple[Path, list[str]]:
    """configs/line/bravo.toml on free ports, its state under ``tmp``; link
    ``broken_link`` gets a detector on a serial port that does not exist."""
    text = (ROOT / "configs" / "line" / "bravo.toml").read_text()
    text = rewrite_for_run(text, {}, tmp / "bravo")
    if broken_link is not None:
        # the extra instrument goes right after the link's [links.bus] table
        parts = text.split("[links.bus]")
        assert len(parts) == 3
        missing = tmp / "no-such-tty"
        parts[broken_link + 1] = (
            parts[broken_link + 1].split("\n\n", 1)[0]
            + f'\n\n[links.instruments.monitor_spd]\ndriver = "ascii_spd"\nresource = "{missing}"'
            + "\n\n"
            + parts[broken_link + 1].split("\n\n", 1)[1]
        )
        text = "[links.bus]".join(parts)
    path = tmp / "bravo.toml"
    path.write_text(text)
    return path, control_endpoints(path)


@pytest.mark.system  # waits out a link that cannot start (~10 s): make test-system
def test_a_link_that_cannot_start_spares_the_other(tmp_path: Path) -> None:
    config, (ab_control, bc_control) = _site_config(tmp_path, broken_link=1)
    check = subprocess.run(
        [sys.executable, "-m", "qkdnode", "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr  # the config is fine; the hardware is not
    d = start_daemon(config, tmp_path / "bravo.log")
    try:
        d.wait_event("daemon_ready", 120)
        failed = [r for r in d.lines() if r.get("event") == "link_failed"]
        assert [r.get("link") for r in failed] == ["bravo-charlie"], failed
        assert "monitor_spd" in str(failed[0].get("error")), failed
        # the other link runs: it waits for its peer (alpha is not started here)
        with Client(ab_control, timeout_s=10.0) as c:
            st = c.call("status")
        assert st["state"] == "CONNECTING" and st["peer_id"] == "alpha"
        # the operator is told: the failed link does not answer, health says so
        health = subprocess.run(
            [sys.executable, "-m", "qkdnode", "health", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 1, health.stdout + health.stderr
        verdict = json.loads(health.stdout)
        assert verdict["status"] != "OK" and "link=bravo-charlie" in verdict["detail"], verdict
        assert bc_control  # (its endpoint was never bound: the link's services never started)
        code = d.stop(signal.SIGTERM, 60)
    finally:
        _kill(d)
    assert code == 0, d.log_path.read_text()[-3000:]
    lines = d.lines()
    safe = {
        (r.get("link"), r.get("instrument")) for r in lines if r.get("event") == "instrument_safe"
    }
    # every instrument that was opened, on both links, was made safe at the end
    for link, names in (
        ("alpha-bravo", ("spd_h", "spd_v", "spd_d", "spd_a", "tagger")),
        ("bravo-charlie", ("laser", "intensity_modulator", "encoder", "attenuator")),
    ):
        for name in names:
            assert (link, name) in safe, (link, name, sorted(safe, key=str))
    assert not [r for r in lines if r.get("event") == "unsafe_at_exit"]


def test_every_link_logs_under_its_name_and_stops_safely(tmp_path: Path) -> None:
    config, controls = _site_config(tmp_path, broken_link=None)
    d = start_daemon(config, tmp_path / "bravo.log")
    try:
        d.wait_event("daemon_ready", 120)
        for control, peer in zip(controls, ("alpha", "charlie"), strict=True):
            with Client(control, timeout_s=10.0) as c:
                st = c.call("status")
            assert st["node_id"] == "bravo" and st["peer_id"] == peer
        code = d.stop(signal.SIGTERM, 60)
    finally:
        _kill(d)
    assert code == 0
    lines = d.lines()
    links = {r.get("link") for r in lines if r.get("event") == "instruments_opening"}
    assert links == {"alpha-bravo", "bravo-charlie"}
    assert all(r.get("node_id") == "bravo" for r in lines if "node_id" in r)
    # state kept per link
    assert (tmp_path / "bravo" / "alpha-bravo" / "keys.sqlite").exists()
    assert (tmp_path / "bravo" / "bravo-charlie" / "keys.sqlite").exists()


def _kill(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(30)


def test_the_watchdog_is_fed_while_some_link_is_healthy() -> None:
    """A link whose peer is down must not get the node restarted (that would stop the
    other links' key); every link unhealthy: a restart may help, as for a one-link node."""
    from qkdnode.config import load_site
    from qkdnode.daemon import Daemon, DaemonBase, ProcessControl

    class Link(DaemonBase):
        ok = True

        def healthy(self) -> bool:
            return self.ok

    site = load_site(ROOT / "configs" / "line" / "bravo.toml")
    process = ProcessControl()
    ab, bc = (Link(link.cfg, "bravo.toml", process, link.id) for link in site.links)
    daemon = Daemon([ab, bc], site.id, process)
    daemon.running = [ab, bc]
    assert daemon.healthy()
    ab.ok = False
    assert daemon.healthy()  # bravo-charlie still produces key
    bc.ok = False
    assert not daemon.healthy()
    one = Daemon([Link(site.links[0].cfg, "x.toml", ProcessControl())], "bravo")
    one.running = list(one.links)
    assert one.healthy()
    one.links[0].ok = False  # type: ignore[attr-defined]
    assert not one.healthy()
