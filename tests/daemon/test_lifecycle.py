"""The daemon as a real subprocess: readiness, systemd notifications, safe shutdown."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, node_config, start_daemon


def _recv_all(sock: socket.socket, until: str, timeout_s: float) -> list[str]:
    msgs: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            msgs.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(until in m for m in msgs):
            break
    return msgs


@pytest.mark.parametrize("role", ["transmitter", "receiver"])
def test_sigterm_leaves_every_instrument_safe_and_notifies_systemd(
    tmp_path: Path, ports: dict[str, int], daemons: list[Daemon], role: str
) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    try:
        cfg = node_config(tmp_path, role, ports)
        d = start_daemon(
            cfg,
            tmp_path / "node.log",
            env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"},
        )
        daemons.append(d)
        ready = _recv_all(sock, "READY=1", 60)
        assert any("READY=1" in m for m in ready), ready
        # The watchdog is pinged from the event loop (every WATCHDOG_USEC / 2).
        later = _recv_all(sock, "WATCHDOG=1", 5)
        assert any("WATCHDOG=1" in m for m in later), later
        d.wait_event("daemon_ready")
        code = d.stop(signal.SIGTERM)
        tail = _recv_all(sock, "STOPPING=1", 5)
        assert any("STOPPING=1" in m for m in later + tail)
    finally:
        sock.close()
    assert code == 0, d.log_path.read_text()[-3000:]
    safe = {str(r["instrument"]): r for r in d.lines() if r.get("event") == "instrument_safe"}
    expected = (
        {"laser", "intensity_modulator", "encoder", "attenuator", "power_meter", "state_source"}
        if role == "transmitter"
        else {"spd_h", "spd_v", "spd_d", "spd_a", "tagger"}
    )
    assert set(safe) == expected
    assert all(r["safe"] is True for r in safe.values())
    if role == "transmitter":
        assert safe["laser"]["emission_on"] is False
        assert safe["attenuator"]["shutter_open"] is False
    else:
        assert all(safe[n]["armed"] is False for n in ("spd_h", "spd_v", "spd_d", "spd_a"))


def test_invalid_config_exits_2_before_touching_hardware(
    tmp_path: Path, ports: dict[str, int], daemons: list[Daemon]
) -> None:
    cfg = node_config(tmp_path, "transmitter", ports, extra="")
    text = cfg.read_text().replace("mu_signal = 0.5", "mu_signal = -0.5")
    cfg.write_text(text)
    d = start_daemon(cfg, tmp_path / "bad.log")
    daemons.append(d)
    assert d.proc.wait(60) == 2
    assert "source.mu_signal: must be > 0, got -0.5" in d.log_path.read_text()


def test_daemon_serves_prometheus_metrics(
    tmp_path: Path, ports: dict[str, int], daemons: list[Daemon]
) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.daemon.conftest import free_port

    port = free_port()
    cfg = node_config(tmp_path, "transmitter", ports)
    cfg.write_text(
        cfg.read_text() + f'\n[metrics]\nenabled = true\nlisten_host = "127.0.0.1"\n'
        f"listen_port = {port}\n"
    )
    d = start_daemon(cfg, tmp_path / "node.log")
    daemons.append(d)
    d.wait_event("daemon_ready", 60)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    states = {s.labels["state"]: s.value for s in families["qkdnode_state"].samples}
    # Without a peer the transmitter waits in CONNECTING; exactly one state is set.
    assert states["CONNECTING"] == 1.0
    assert sum(states.values()) == 1.0
    assert d.stop() == 0


def test_sigterm_during_the_first_link_model_compile_is_honoured(
    tmp_path: Path, ports: dict[str, int], daemons: list[Daemon]
) -> None:
    """A cold numba cache makes start-up compile for many seconds; a stop request then
    ends the daemon without waiting for the compile (no instrument is open yet)."""
    cfg = node_config(tmp_path, "receiver", ports)
    d = start_daemon(
        cfg, tmp_path / "node.log", env={"NUMBA_CACHE_DIR": str(tmp_path / "numba-cold")}
    )
    daemons.append(d)
    d.wait_event("daemon_starting")
    code = d.stop(signal.SIGTERM, timeout_s=60)
    assert code == 0, d.log_path.read_text()[-3000:]
    events = [r.get("event") for r in d.lines()]
    assert "startup_abandoned" in events, events
    assert "daemon_ready" not in events and "instrument_connected" not in events
    assert events[-1] == "daemon_stopped", events
