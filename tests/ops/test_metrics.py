"""NodeMetrics: updates, and a real HTTP scrape parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from qkdnode.metrics import NodeMetrics, SelfProcessCollector


def samples(text: str) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(parsed: dict[str, list[Sample]], name: str, **labels: str) -> float:
    for s in parsed.get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{name}{labels} not in scrape")


async def scrape(url: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, resp.headers["Content-Type"], await resp.text()


def filled_metrics() -> NodeMetrics:
    m = NodeMetrics("alice", "transmitter")
    m.set_state("CALIBRATING")
    m.set_state("EXCHANGING")
    m.set_healthy(True)
    m.observe_block(
        {
            "outcome": "ok",
            "qber": {"Z": 0.012, "X": 0.021},
            "sifted_bits": 800_000,
            "secret_bits": 200_000,
            "disclosed_bits": 90_000,
            "duration_s": 2.0,
            "ec_efficiency": 1.12,
            "stage_durations_s": {"sifting": 0.004, "error_correction": 0.3},
            "key_id": "not-a-metric",  # other keys are ignored
        }
    )
    m.observe_block(
        {"outcome": "aborted", "qber": {"Z": 0.15}, "sifted_bits": 700_000, "duration_s": 2.0}
    )
    m.set_keystore({"available": 250, "reserved": 10, "delivered": 40}, capacity=1000)
    m.set_detector_rates({"D0": 120_000.0, "D1": 118_500.5})
    m.set_instrument_up("laser", True)
    m.set_instrument_up("spd", False)
    m.set_auth_balance_bits(65_536)
    m.observe_stage("privacy_amplification", 0.05)
    return m


def test_scrape_over_http_has_all_node_metrics() -> None:
    m = filled_metrics()

    async def run() -> tuple[int, str, str]:
        port = await m.start_http("127.0.0.1", 0)
        try:
            assert port > 0
            assert m.url == f"http://127.0.0.1:{port}/metrics"
            return await scrape(m.url)
        finally:
            await m.stop()

    status, ctype, body = asyncio.run(run())
    assert status == 200
    assert ctype.startswith("text/plain")
    p = samples(body)

    assert value(p, "qkdnode_info", node_id="alice", role="transmitter") == 1
    assert value(p, "qkdnode_state", state="EXCHANGING") == 1
    assert value(p, "qkdnode_state", state="CALIBRATING") == 0
    assert value(p, "qkdnode_state", state="FAULT") == 0  # pre-created series
    assert value(p, "qkdnode_state_changes_total") == 1
    assert value(p, "qkdnode_healthy") == 1
    assert value(p, "qkdnode_qber_ratio", basis="Z") == pytest.approx(0.15)  # last block
    assert value(p, "qkdnode_qber_ratio", basis="X") == pytest.approx(0.021)
    assert value(p, "qkdnode_sifted_key_rate_bits_per_second") == pytest.approx(350_000)
    assert value(p, "qkdnode_secret_key_rate_bits_per_second") == 0  # aborted block
    assert value(p, "qkdnode_blocks_total", outcome="ok") == 1
    assert value(p, "qkdnode_blocks_total", outcome="aborted") == 1
    assert value(p, "qkdnode_sifted_bits_total") == 1_500_000
    assert value(p, "qkdnode_secret_bits_total") == 200_000
    assert value(p, "qkdnode_disclosed_bits_total") == 90_000
    assert value(p, "qkdnode_ec_efficiency_ratio") == pytest.approx(1.12)
    assert value(p, "qkdnode_last_block_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    assert value(p, "qkdnode_keystore_keys", state="available") == 250
    assert value(p, "qkdnode_keystore_keys", state="expired") == 0
    assert value(p, "qkdnode_keystore_capacity_keys") == 1000
    assert value(p, "qkdnode_keystore_fill_ratio") == pytest.approx(0.25)
    assert value(p, "qkdnode_detector_count_rate_hertz", detector="D1") == pytest.approx(118_500.5)
    assert value(p, "qkdnode_instrument_up", instrument="laser") == 1
    assert value(p, "qkdnode_instrument_up", instrument="spd") == 0
    assert value(p, "qkdnode_auth_key_balance_bits") == 65_536
    assert value(p, "qkdnode_stage_duration_seconds_count", stage="sifting") == 1
    assert value(p, "qkdnode_stage_duration_seconds_bucket", stage="sifting", le="0.005") == 1
    assert value(p, "qkdnode_stage_duration_seconds_bucket", stage="sifting", le="0.0025") == 0
    assert value(p, "qkdnode_stage_duration_seconds_sum", stage="error_correction") == (
        pytest.approx(0.3)
    )
    assert value(p, "qkdnode_stage_duration_seconds_count", stage="privacy_amplification") == 1
    # Process metrics from /proc/self only.
    assert value(p, "process_resident_memory_bytes") > 1e6
    assert value(p, "process_open_fds") >= 3


def test_every_metric_name_follows_conventions() -> None:
    body = filled_metrics().render().decode()
    for family in text_string_to_metric_families(body):
        if family.name.startswith(("process_", "python_")) or family.name.endswith("_created"):
            continue  # standard collectors; _created: counter creation times
        assert family.name.startswith("qkdnode_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples), family.name
        unitless = (
            "qkdnode_info",
            "qkdnode_state",
            "qkdnode_healthy",
            "qkdnode_instrument_up",
            "qkdnode_alarm_active",
        )
        if family.type == "gauge" and family.name not in unitless:
            units = ("_ratio", "_bits", "_second", "_seconds", "_hertz", "_keys")
            assert family.name.endswith(units), family.name


def test_only_the_configured_address_is_bound() -> None:
    m = NodeMetrics(process_metrics=False)

    async def run() -> None:
        port = await m.start_http("127.0.0.2", 0)
        try:
            status, _, _ = await scrape(f"http://127.0.0.2:{port}/metrics")
            assert status == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                await scrape(f"http://127.0.0.1:{port}/metrics")
        finally:
            await m.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(f"http://127.0.0.2:{port}/metrics")

    asyncio.run(run())


def test_port_in_use_raises_and_leaves_nothing_running() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    m = NodeMetrics(process_metrics=False)
    try:
        with pytest.raises(OSError):
            asyncio.run(m.start_http("127.0.0.1", port))
        assert m.url is None
    finally:
        busy.close()


def test_two_nodes_in_one_process_do_not_collide() -> None:
    a, b = NodeMetrics("a", "transmitter"), NodeMetrics("b", "receiver")
    a.set_state("EXCHANGING")
    b.set_state("FAULT")
    pa, pb = samples(a.render().decode()), samples(b.render().decode())
    assert value(pa, "qkdnode_state", state="EXCHANGING") == 1
    assert value(pb, "qkdnode_state", state="FAULT") == 1
    assert value(pb, "qkdnode_state", state="EXCHANGING") == 0


def test_unknown_state_is_added_and_stays_one_hot() -> None:
    m = NodeMetrics(process_metrics=False, states=("idle",))
    m.set_state("idle")
    m.set_state("peak_search")
    p = samples(m.render().decode())
    assert value(p, "qkdnode_state", state="idle") == 0
    assert value(p, "qkdnode_state", state="peak_search") == 1
    assert sum(s.value for s in p["qkdnode_state"]) == 1


@pytest.mark.parametrize(
    "stats",
    [
        {"outcome": "maybe"},
        {"sifted_bits": -1},
        {"qber": float("nan")},
    ],
)
def test_bad_block_stats_are_rejected(stats: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NodeMetrics(process_metrics=False).observe_block(stats)


def test_bad_updates_are_rejected() -> None:
    m = NodeMetrics(process_metrics=False)
    with pytest.raises(ValueError):
        m.set_keystore({"available": 1}, capacity=0)
    with pytest.raises(ValueError):
        m.observe_stage("sifting", -1.0)
    with pytest.raises(ValueError):
        m.set_state("")


def test_fill_ratio_without_available_entry_counts_unexpired_keys() -> None:
    m = NodeMetrics(process_metrics=False)
    m.set_keystore({"reserved": 30, "delivered": 20, "expired": 500}, capacity=100)
    assert value(samples(m.render().decode()), "qkdnode_keystore_fill_ratio") == 0.5


def test_self_process_collector_matches_proc() -> None:
    parsed: dict[str, float] = {}
    for family in SelfProcessCollector().collect():
        for s in family.samples:
            parsed[s.name] = s.value
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    assert parsed["process_resident_memory_bytes"] == pytest.approx(
        rss_pages * os.sysconf("SC_PAGE_SIZE"), rel=0.2
    )
    # Start time computed from CLOCK_BOOTTIME agrees with /proc/stat's btime when readable.
    with open("/proc/stat") as f:
        btime = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    with open("/proc/self/stat") as f:
        start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
    expected = btime + start_ticks / os.sysconf("SC_CLK_TCK")
    assert parsed["process_start_time_seconds"] == pytest.approx(expected, abs=2)
    assert parsed["process_cpu_seconds_total"] > 0


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "*", ""])
def test_config_refuses_a_wildcard_metrics_address(host: str) -> None:
    from pydantic import ValidationError

    from qkdnode.config.sections import MetricsSection

    with pytest.raises(ValidationError, match="wildcard"):
        MetricsSection(listen_host=host)
    assert MetricsSection(listen_host="[::1]").listen_host == "::1"
