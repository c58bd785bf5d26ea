"""``qkdnode health`` against a real metrics endpoint and a real control socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdnode.cli import main
from qkdnode.metrics import NodeMetrics

VENV_QKDNODE = Path(sys.executable).with_name("qkdnode")


class MetricsServer:
    """NodeMetrics served from an event loop in a background thread."""

    def __init__(self) -> None:
        self.metrics = NodeMetrics("alice", "transmitter", process_metrics=False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(
            self.metrics.start_http("127.0.0.1", 0), self.loop
        ).result(5)
        self.port = port
        self.url = f"http://127.0.0.1:{port}/metrics"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.metrics.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    s = MetricsServer()
    try:
        yield s
    finally:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["health", *argv])
    return code, capsys.readouterr().out.strip()


def test_healthy_node_exits_0_with_nagios_line(
    server: MetricsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    m = server.metrics
    m.set_state("EXCHANGING")
    m.set_healthy(True)
    m.set_instrument_up("laser", True)
    m.observe_block({"qber": {"Z": 0.0125}, "secret_bits": 1000, "duration_s": 1.0})
    code, out = run(capsys, "--metrics-url", server.url)
    assert code == 0
    assert out.startswith("QKDNODE OK - state=EXCHANGING healthy=yes | ")
    assert "secret_key_rate_bps=1000" in out
    assert "qber_Z=0.0125" in out


def test_json_output(server: MetricsServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.metrics.set_state("IDLE")
    server.metrics.set_healthy(True)
    code, out = run(capsys, "--metrics-url", server.url, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["status"] == "OK"
    assert d["ok"] is True
    assert d["state"] == "IDLE"
    assert d["healthy"] is True
    assert d["source"] == "metrics"
    assert d["target"] == server.url


def test_unhealthy_node_is_critical(
    server: MetricsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.metrics.set_state("FAULT")
    server.metrics.set_healthy(False)
    code, out = run(capsys, "--metrics-url", server.url)
    assert code == 1
    assert out.startswith("QKDNODE CRITICAL - state=FAULT healthy=no")
    code, _ = run(capsys, "--metrics-url", server.url, "--nagios")
    assert code == 2


def test_healthy_is_no_until_the_node_says_so(
    server: MetricsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # No set_healthy(): qkdnode_healthy starts at 0 (fail closed) and decides.
    server.metrics.set_state("EXCHANGING")
    code, _ = run(capsys, "--metrics-url", server.url)
    assert code == 1


def test_paused_or_instrument_down_is_a_warning(
    server: MetricsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    m = server.metrics
    m.set_healthy(True)
    m.set_state("PAUSED")
    code, out = run(capsys, "--metrics-url", server.url, "--nagios")
    assert (code, out.split(" -")[0]) == (1, "QKDNODE WARNING")
    m.set_state("EXCHANGING")
    m.set_instrument_up("spd", False)
    code, out = run(capsys, "--metrics-url", server.url, "--nagios")
    assert code == 1
    assert "instruments down: spd" in out
    # Default exit codes: a warning is still "healthy".
    code, _ = run(capsys, "--metrics-url", server.url)
    assert code == 0


def test_nothing_listening_is_critical(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    code, out = run(capsys, "--metrics-url", url, "--timeout", "2")
    assert code == 1
    assert out.startswith("QKDNODE CRITICAL - no answer")
    code, _ = run(capsys, "--metrics-url", url, "--timeout", "2", "--nagios")
    assert code == 2


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys)
    assert code == 2
    assert "UNKNOWN" in out
    code, _ = run(capsys, "--nagios")
    assert code == 3
    code, _ = run(capsys, "--metrics-url", "http://127.0.0.1:1/metrics", "--timeout", "0")
    assert code == 2


def test_config_file_gives_the_metrics_url(
    server: MetricsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.metrics.set_state("IDLE")
    server.metrics.set_healthy(True)
    cfg = tmp_path / "transmitter.toml"
    cfg.write_text(
        '[node]\nid = "alice"\nrole = "transmitter"\npeer_id = "bob"\n\n'
        f'[metrics]\nenabled = true\nlisten_host = "127.0.0.1"\nlisten_port = {server.port}\n'
    )
    code, out = run(capsys, "--config", str(cfg))
    assert code == 0, out
    assert "state=IDLE" in out


def test_non_qkdnode_endpoint_is_unknown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A real HTTP server exposing metrics, but not a node's.
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    Gauge("something_else", "not a node", registry=registry).set(1)
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/metrics"
        code, out = run(capsys, "--metrics-url", url, "--nagios")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert code == 3
    assert "no active qkdnode_state" in out


@pytest.fixture
def devserver() -> Iterator[str]:
    """The bus's standalone development server (a real ControlServer), plaintext."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qkdnode.bus.devserver",
            "--plaintext",
            "--plaintext-role",
            "monitor",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "devserver exited before printing its endpoints"
        yield json.loads(line)["control"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_control_endpoint_via_the_real_cli(devserver: str) -> None:
    # End to end: the installed entry point, a real control socket; the dev server's
    # status has no "healthy" field, so its state ("idle") decides.
    env = dict(os.environ)
    result = subprocess.run(
        [str(VENV_QKDNODE), "health", "--endpoint", devserver, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    d = json.loads(result.stdout)
    assert d["source"] == "control"
    assert d["state"] == "idle"
    assert d["status"] == "OK"
    assert "uptime_s" in d["perfdata"]


def test_control_endpoint_not_answering_falls_back_to_metrics(
    server: MetricsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.metrics.set_state("IDLE")
    server.metrics.set_healthy(True)
    dead = f"tcp://127.0.0.1:{free_port()}"
    code, out = run(capsys, "--endpoint", dead, "--timeout", "0.5", "--json")
    assert code == 1
    assert json.loads(out)["status"] == "CRITICAL"
    code, out = run(
        capsys, "--endpoint", dead, "--metrics-url", server.url, "--timeout", "0.5", "--json"
    )
    assert code == 0
    assert json.loads(out)["source"] == "metrics"
