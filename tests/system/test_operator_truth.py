"""Is the link producing key? Two real daemons with metrics enabled, asked the way an
operator asks: Prometheus scrapes, ``qkdnode health``, ``status``, alarms on telemetry and
in the logs. Faults an operator meets (peer stopped, a stuck pair, a full disk) must raise
the named alarm within its bound, make ``qkdnode health`` CRITICAL, and clear when the
cause goes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import free_port
from tests.system.conftest import START_TIMEOUT_S, Node, Pair, blocks_done, make_pair

pytestmark = pytest.mark.slow

#: short thresholds so that the tests see the alarms quickly
ALARMS = """
[alarms]
no_key_min_s = 20
not_exchanging_grace_s = 120
peer_down_s = 3
pair_mismatch_s = 8
"""


def metrics_toml(port: int) -> str:
    return f'\n[metrics]\nenabled = true\nlisten_host = "127.0.0.1"\nlisten_port = {port}\n'


def make_metrics_pair(tmp: Path, *, alarms_rx: str = "") -> tuple[Pair, dict[str, int]]:
    ports = {"transmitter": free_port(), "receiver": free_port()}
    p = make_pair(
        tmp,
        autostart=True,
        extra_tx=metrics_toml(ports["transmitter"]) + ALARMS,
        extra_rx=metrics_toml(ports["receiver"]) + ALARMS + alarms_rx,
    )
    return p, ports


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    for lab, v in m.get(name, []):
        if all(lab.get(k) == x for k, x in labels.items()):
            return v
    raise AssertionError(f"{name}{labels} not in the scrape")


def health(node: Node) -> tuple[int, str]:
    """``qkdnode health --endpoint ... --nagios``: (exit code, line)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkdnode",
            "health",
            "--endpoint",
            node.control_endpoint,
            "--nagios",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.returncode, r.stdout.strip()


def active_alarms(node: Node) -> set[str]:
    st = node.status()
    return {a["name"] for a in (st or {}).get("alarms", [])}


def wait_for(what: str, pred: Any, timeout_s: float, p: Pair) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(p.report(f"timed out after {timeout_s:g} s waiting for {what}"))


@pytest.fixture(scope="module")
def mpair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, dict[str, int]]]:
    p, ports = make_metrics_pair(tmp_path_factory.mktemp("metrics"))
    p.start()
    try:
        yield p, ports
    finally:
        p.kill_all()


def test_every_metric_has_a_value_from_start_and_blocks_are_counted(
    mpair: tuple[Pair, dict[str, int]],
) -> None:
    p, ports = mpair
    # from the first scrape: auth balance, alarms and instruments are there
    m = wait_for("a first scrape", lambda: _try_scrape(ports["transmitter"]), 60, p)
    assert value(m, "qkdnode_auth_key_balance_bits") > 0
    assert value(m, "qkdnode_alarm_active", alarm="no_key", severity="critical") == 0
    assert value(m, "qkdnode_session_key_rate_bits_per_second") >= 0
    p.wait_exchanging(START_TIMEOUT_S, min_blocks_after=2)
    for role, port in ports.items():
        node = p.tx if role == "transmitter" else p.rx
        st = node.status()
        assert st is not None
        m = scrape(port)
        ok_blocks = value(m, "qkdnode_blocks_total", outcome="ok")
        assert ok_blocks >= 1, role
        assert ok_blocks == st["stats"]["blocks_ok"], role
        assert value(m, "qkdnode_secret_bits_total") == st["stats"]["secret_bits"] > 0
        assert value(m, "qkdnode_secret_key_rate_bits_per_second") > 0
        assert value(m, "qkdnode_session_key_rate_bits_per_second") > 0
        assert st["stats"]["secret_key_rate_bps"] > 0 and st["seconds_since_last_block"] < 120
        assert value(m, "qkdnode_healthy") == 1
        for labels, v in m["qkdnode_instrument_up"]:
            assert v == 1, (role, labels)
        raised = [lab["alarm"] for lab, v in m["qkdnode_alarm_active"] if v]
        assert raised == [], (role, raised)
        code, line = health(node)
        assert code == 0, line
    assert blocks_done(p.tx.status() or {"stats": {"blocks_ok": 0, "blocks_aborted": 0}}) >= 2


def _try_scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    try:
        return scrape(port)
    except OSError:
        return None


def test_peer_stopped_raises_peer_down_and_health_critical_then_clears(
    mpair: tuple[Pair, dict[str, int]],
) -> None:
    p, ports = mpair
    p.wait_exchanging(START_TIMEOUT_S)
    assert p.rx.daemon is not None
    p.rx.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        # heartbeat liveness (10 x 1 s) + peer_down_s (3 s) + a monitor tick
        wait_for("peer_down on the transmitter", lambda: "peer_down" in active_alarms(p.tx), 45, p)
        code, line = health(p.tx)
        assert code == 2 and "CRITICAL" in line and "peer_down" in line, line
        m = scrape(ports["transmitter"])
        assert value(m, "qkdnode_alarm_active", alarm="peer_down", severity="critical") == 1
        assert value(m, "qkdnode_healthy") == 0
    finally:
        p.rx.daemon.proc.send_signal(signal.SIGCONT)
    wait_for("peer_down cleared", lambda: "peer_down" not in active_alarms(p.tx), 60, p)
    p.wait_exchanging(START_TIMEOUT_S)
    wait_for("no alarm left", lambda: not active_alarms(p.tx) and not active_alarms(p.rx), 120, p)
    assert health(p.tx)[0] == 0


def test_a_stuck_pair_is_seen_and_restarted_by_the_transmitter(
    mpair: tuple[Pair, dict[str, int]],
) -> None:
    p, _ = mpair
    p.wait_exchanging(START_TIMEOUT_S)
    mark = len(p.tx.lines())
    # an operator stops the receiver directly: the transmitter is left exchanging alone
    assert p.rx.call("stop")["state"] == "IDLE"

    def raised() -> bool:
        return any(
            r.get("event") == "alarm" and r.get("alarm") == "pair_inconsistent"
            for r in p.tx.lines()[mark:]
        )

    # probe every 5 s + pair_mismatch_s (8 s) + margin
    wait_for("pair_inconsistent raised on the transmitter", raised, 40, p)
    p.wait_exchanging(START_TIMEOUT_S)
    wait_for(
        "pair_inconsistent cleared",
        lambda: any(
            r.get("event") == "alarm_cleared" and r.get("alarm") == "pair_inconsistent"
            for r in p.tx.lines()[mark:]
        ),
        60,
        p,
    )
    assert "pair_inconsistent" not in active_alarms(p.tx)


@pytest.fixture
def tmpfs_pair(tmp_path: Path) -> Iterator[tuple[Pair, Path]]:
    """A pair whose receiver keeps its state on a 64 MB tmpfs (root only)."""
    state = tmp_path / "pair" / "bob"
    state.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(state)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    # the tmpfs is small: "nearly full" means under 4 MB here
    p, _ = make_metrics_pair(tmp_path / "pair", alarms_rx="disk_free_min_bytes = 4000000\n")
    try:
        yield p, state
    finally:
        p.kill_all()
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_disk_full_raises_keystore_write_error_and_clears(tmpfs_pair: tuple[Pair, Path]) -> None:
    p, state = tmpfs_pair
    p.start()
    p.wait_exchanging(START_TIMEOUT_S, min_blocks_after=1)
    filler = state / "filler"
    st = os.statvfs(state)
    free = st.f_bavail * st.f_frsize
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        f.write(b"\0" * max(0, free - 16 * 1024))
        while True:  # whatever is left, until ENOSPC
            f.write(b"\0" * 4096)
    wait_for(
        "keystore_write_error or disk_nearly_full on the receiver",
        lambda: {"keystore_write_error", "disk_nearly_full"} & active_alarms(p.rx),
        180,
        p,
    )
    code, line = health(p.rx)
    assert code in (1, 2) and "QKDNODE" in line, line
    filler.unlink()
    p.wait_exchanging(START_TIMEOUT_S)
    ok0 = int((p.rx.status() or {"stats": {"blocks_ok": 0}})["stats"]["blocks_ok"])
    wait_for(
        "a new block stored after the disk has room again",
        lambda: int((p.rx.status() or {"stats": {"blocks_ok": 0}})["stats"]["blocks_ok"]) > ok0,
        START_TIMEOUT_S,
        p,
    )
    wait_for(
        "keystore_write_error and disk_nearly_full cleared",
        lambda: not ({"keystore_write_error", "disk_nearly_full"} & active_alarms(p.rx)),
        60,
        p,
    )
    # both stores agree once the pair is stopped
    assert p.tx.call("stop")["state"] == "IDLE"
    deadline = time.monotonic() + 60
    while True:
        a, b = p.tx.call("keys.digest"), p.rx.call("keys.digest")
        if a == b or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert a == b, (a, b)
    print(json.dumps({"digest": a}))
