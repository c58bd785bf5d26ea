"""The trusted-node network of configs/network.toml with real daemons: five sites, one
daemon each, in their own network namespaces where this host allows it (else on
loopback); SAEs at three sites talk ETSI 014 to their own site's KME.

Scenarios (in this order, on one network): relay over 1, 2 and 4 hops; a wrong SAE at
the far end; a site killed (SIGKILL) while relays run, then restarted; no path left (the
only links to E taken out) -> a clean 503; and ``qkdnode demo --network`` end to end
(its own network), which cuts a link during relays.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdnode.delivery.sae_client import EtsiClientError, SaeKey
from qkdnode.demo.network_run import NetworkDemo, NetworkSummary
from qkdnode.demo.network_spec import NetworkDemoSae, load_network_spec
from qkdnode.demo.runner import Reporter

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900.0

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkDemo]:
    spec = load_network_spec(ROOT / "configs" / "network.toml")
    spec = spec.model_copy(
        update={
            "saes": [*spec.saes, NetworkDemoSae(sae_id="sae-b", site="B")],
            "pairs": [*spec.pairs, ("sae-a", "sae-b")],
        }
    )
    demo = NetworkDemo(spec, tmp_path_factory.mktemp("network"), Reporter())
    summary = NetworkSummary()
    try:
        demo._setup(summary)
        for site in demo.sites.values():
            site.start()
        demo._wait("every link up with key", TIMEOUT_S)
        yield demo
    finally:
        for client in demo.clients.values():
            client.close()
        for site in demo.sites.values():
            site.terminate()
        if demo.topology is not None:
            demo.topology.close()


def _relay(net: NetworkDemo, master: str, slave: str, number: int = 2) -> list[SaeKey]:
    keys = net._sae(master).enc_keys(slave, number, 256)
    got = net._sae(slave).dec_keys(master, [k.key_id for k in keys])
    assert [g.key for g in got] == [k.key for k in keys]
    assert len(keys) == number and all(len(k.key) == 32 for k in keys)
    return keys


def test_relay_over_one_two_and_four_hops(net: NetworkDemo) -> None:
    for slave, hops in (("sae-b", 1), ("sae-c", 2), ("sae-e", 4)):
        before = net._view("A")
        assert before is not None
        _relay(net, "sae-a", slave)
        after = net._view("A")
        assert after is not None
        assert after["relays"]["stored"] == before["relays"]["stored"] + 1, hops
        crossed = {
            link: bits - before["relays"]["bits_by_link"].get(link, 0)
            for link, bits in after["relays"]["bits_by_link"].items()
            if bits != before["relays"]["bits_by_link"].get(link, 0)
        }
        assert len(crossed) == hops and set(crossed.values()) == {512}, crossed


def test_wrong_sae_at_the_far_end_gets_nothing(net: NetworkDemo) -> None:
    keys = net._sae("sae-a").enc_keys("sae-e", 1, 256)
    ids = [keys[0].key_id]
    for intruder in ("sae-c", "sae-b"):  # registered at other sites; certificate shown at E
        client = net._sae(intruder)
        client.url = net.files.etsi_urls["E"] if net.files else ""
        with pytest.raises(EtsiClientError) as info:
            client.dec_keys("sae-a", ids)
        assert info.value.status == 401
    with pytest.raises(EtsiClientError) as info:
        net._sae("sae-e").dec_keys("sae-c", ids)  # the right slave, the wrong master
    assert info.value.status in (400, 401)
    got = net._sae("sae-e").dec_keys("sae-a", ids)
    assert got[0].key == keys[0].key


def test_site_killed_during_relays_then_restarted(net: NetworkDemo) -> None:
    """SIGKILL of C while A relays to E: relays in flight fail cleanly (503 or done),
    later ones go A-B-D-E; no key ever differs. C restarted rejoins."""
    results: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                _relay(net, "sae-a", "sae-e", 1)
                results.append("ok")
            except EtsiClientError as exc:
                results.append(f"refused {exc.status}")
            except AssertionError:
                results.append("MISMATCH")
            time.sleep(0.2)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        time.sleep(5)
        n_before = len(results)
        c = net.sites["C"]
        assert c.proc is not None
        c.proc.kill()
        c.proc.wait(30)
        killed_at = len(results)
        time.sleep(25)
    finally:
        stop.set()
        t.join(60)
    assert "MISMATCH" not in results
    assert all(r == "ok" or r.startswith("refused 503") for r in results), results
    assert "ok" in results[:n_before]
    assert results[killed_at:].count("ok") >= 3, results[killed_at:]
    view = net._view("A")
    assert view is not None
    route = next(r for r in view["routes"] if r["destination"] == "E")
    assert "C" not in route["path"]
    c.start()
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        view = net._view("A")
        links = {lk["link_id"]: lk["usable"] for lk in (view or {}).get("links", [])}
        if links.get("B-C") and links.get("C-D"):
            break
        time.sleep(2)
    else:
        pytest.fail("C did not rejoin the network")
    _relay(net, "sae-a", "sae-c")


def test_no_path_left_is_a_clean_503(net: NetworkDemo) -> None:
    """D-E is the only link to E: taken out at D, enc_keys for sae-e answers 503 before
    anything is spent, and works again once it is back."""
    try:
        assert net.call("D", "network.link", link_id="D-E", enabled=False) is not None
        time.sleep(3)
        before = net._view("A")
        with pytest.raises(EtsiClientError) as info:
            net._sae("sae-a").enc_keys("sae-e", 1, 256)
        assert info.value.status == 503
        assert "no path to site E" in info.value.message
        after = net._view("A")
        assert before is not None and after is not None
        a_b = next(lk for lk in after["local_links"] if lk["link_id"] == "A-B")
        a_b0 = next(lk for lk in before["local_links"] if lk["link_id"] == "A-B")
        assert a_b["relay_out_bits"] == a_b0["relay_out_bits"]  # nothing drawn
    finally:
        net.call("D", "network.link", link_id="D-E", enabled=True)
    time.sleep(3)
    _relay(net, "sae-a", "sae-e")


def test_dry_link_on_the_only_path_is_a_clean_503(net: NetworkDemo) -> None:
    """D-E stops producing key and is drained by relays: enc_keys for sae-e then answers
    503 before anything is spent; the keys delivered until then were all identical."""
    assert net.files is not None
    d_site, d_endpoint = net.files.links["D-E"].tx
    assert net._client(d_site, d_endpoint).call("stop")["state"] in ("IDLE", "PAUSED")
    origin, dest = net._sae("sae-a"), net._sae("sae-e")
    delivered = 0
    try:
        for _ in range(200):
            try:
                keys = origin.enc_keys("sae-e", 64, 256)
            except EtsiClientError as exc:
                assert exc.status == 503, exc
                assert "no path to site E" in exc.message
                break
            got = dest.dec_keys("sae-a", [k.key_id for k in keys])
            assert [g.key for g in got] == [k.key for k in keys]
            delivered += len(keys)
        else:
            pytest.fail("D-E never ran dry")
        view = net._view("D")
        assert view is not None
        d_e = next(lk for lk in view["local_links"] if lk["link_id"] == "D-E")
        # what relays may draw (the level: held less the 16384-bit tag reserve) is below
        # one request and its tags; relays left the reserve (tags may have used some)
        assert d_e["level_bits"] < 64 * 256 + 512
        assert d_e["level_bits"] == max(0, d_e["held_bits"] - 16384)
        assert d_e["held_bits"] > 16384 - 64 * 256
        # smaller requests still fit while D-E holds enough for them
    finally:
        net._client(d_site, d_endpoint).call("start")
    assert delivered > 0
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            _relay(net, "sae-a", "sae-e", 64)
            return
        except EtsiClientError:
            time.sleep(3)
    pytest.fail("D-E did not come back")


def test_demo_network_end_to_end(tmp_path: Path) -> None:
    """`qkdnode demo --network`: relays A -> E, C-D cut mid-run, relays move to B-D."""
    spec = (ROOT / "configs" / "network.toml").read_text()
    spec = spec.replace("relay_s = 40.0", "relay_s = 20.0").replace(
        "after_cut_s = 40.0", "after_cut_s = 25.0"
    )
    path = tmp_path / "network.toml"
    path.write_text(spec)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkdnode",
            "demo",
            "--network",
            str(path),
            "--json",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, (summary, proc.stderr[-2000:])
    assert summary["ok"] and summary["keys_identical"] and summary["mismatches"] == 0
    assert summary["requests_ok_after_cut"] > 0 and summary["reroute_s"] is not None
    assert summary["accounting"]["B-D"]["relayed_key_bits"] > 0
    for link, acc in summary["accounting"].items():
        # every relayed key bit crossed its links as key drawn and erased at both ends
        assert acc["relayed_key_bits"] <= acc["relay_erased_bits"] <= acc["relay_drawn_bits"]
        assert acc["auth_erased_bits"] <= acc["auth_drawn_bits"], link
