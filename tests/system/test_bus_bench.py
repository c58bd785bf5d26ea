"""The bus benchmark measures the real daemon: CURVE, ``status``, distinct client keys,
and an error answer is not counted as a served request."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdnode.bus import daemonbench
from qkdnode.bus.errors import BusTimeout, RemoteError
from qkdnode.client import Client


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[daemonbench.BenchDaemon]:
    d = daemonbench.start_daemon(tmp_path)
    yield d
    daemonbench.stop_daemon(d)


def _accepted_clients(daemon: daemonbench.BenchDaemon) -> set[str]:
    names = set()
    for line in daemon.log_path.read_text().splitlines():
        if '"bus.zap.accepted"' in line:
            rec = json.loads(line)
            if rec.get("domain") == "control":
                names.add(str(rec["client"]))
    return names


def test_the_bench_daemon_is_curve_only_and_its_load_clients_have_keys_of_their_own(
    daemon: daemonbench.BenchDaemon,
) -> None:
    # a key the daemon does not list gets no answer at all: CURVE is on
    with (
        Client(daemon.endpoint, daemon.server_public, None, 1.0) as stranger,
        pytest.raises(BusTimeout, match="no reply"),
    ):
        stranger.request("status")
    with (
        Client(daemon.monitor_endpoint, daemon.server_public, None, 1.0) as stranger,
        pytest.raises(BusTimeout, match="no reply"),
    ):
        stranger.request("status")
    for monitor in (False, True):
        rtts = daemonbench.status_rtts_s(daemon, 50, monitor=monitor)
        assert len(rtts) == 50 and all(0 < t < 1 for t in rtts)
        rate, errors = daemonbench.status_throughput(daemon, 0.5, monitor=monitor)
        assert rate > 100 and errors == 0
    assert _accepted_clients(daemon) == {f"bench{i}" for i in range(daemonbench.LOAD_CLIENTS + 1)}


def test_refused_requests_are_counted_as_errors_not_as_throughput(
    daemon: daemonbench.BenchDaemon,
) -> None:
    """One key shared by all load clients exceeds its rate limit: the refusals show."""
    shared = daemon.client_keys[1]
    flood = dataclasses.replace(
        daemon, client_keys=(daemon.client_keys[0],) + (shared,) * daemonbench.LOAD_CLIENTS
    )
    _, errors = daemonbench.status_throughput(flood, 2.0)
    assert errors > 0
    with Client(daemon.endpoint, daemon.server_public, daemon.client_keys[0]) as c:
        try:
            assert c.request("status")["node_id"] == "alice"
        except RemoteError as exc:  # pragma: no cover - shown if it happens
            pytest.fail(f"an innocent client was refused: {exc}")


def test_quick_bench_rows(tmp_path: Path) -> None:
    rows = {r["name"]: r for r in daemonbench.bench_daemon_control(quick=True)}
    for name in (
        "bus.daemon_status_rtt_p50",
        "bus.echo_rtt_p50_plaintext",
        "bus.echo_rtt_p50_curve",
        "bus.daemon_status_over_echo_curve",
        "bus.daemon_status_throughput",
        "bus.daemon_status_monitor_rtt_p50",
        "bus.daemon_status_monitor_over_echo_curve",
        "bus.daemon_status_monitor_throughput",
    ):
        assert rows[name]["value"] > 0, name
    ratio = rows["bus.daemon_status_over_echo_curve"]["value"]
    assert ratio == pytest.approx(
        rows["bus.daemon_status_rtt_p50"]["value"] / rows["bus.echo_rtt_p50_curve"]["value"],
        rel=0.05,
    )
    assert rows["bus.daemon_status_throughput"]["target"] == ">= 10000"
    assert rows["bus.daemon_status_monitor_throughput"]["target"] == ">= 10000"
