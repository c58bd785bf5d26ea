"""End-to-end keys over ETSI GS QKD 014 at both ends of a relay, each site's KME a real
HTTPS server with mutual TLS; and the site's status in the shape of ETSI GS QKD 015."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from qkdnode.config.network import NetworkDeliverySection
from qkdnode.delivery.pki import init_ca, issue_cert
from qkdnode.delivery.sae_client import EtsiClient, EtsiClientError
from qkdnode.kms.service import STATUS_PATH, VIEW_PATH
from tests.kms.harness import Net, build, free_port

SITES = ["A", "B", "C"]
LINKS = [("A-B", "A", "B"), ("B-C", "B", "C")]
DIRECTORY = {"sae-a": "A", "sae-c": "C", "sae-c2": "C", "sae-b": "B"}
PAIRS = [("sae-a", "sae-c"), ("sae-c", "sae-a"), ("sae-a", "sae-c2")]


def _pki(tmp: Path) -> Path:
    pki = tmp / "pki"
    init_ca(pki)
    for site in SITES:
        issue_cert(pki, f"kme-{site}", server=True, sans=["127.0.0.1", "localhost"])
    for sae in [*DIRECTORY, "stranger"]:
        issue_cert(pki, sae)
    return pki


def _delivery(pki: Path) -> Callable[[str], NetworkDeliverySection]:
    def make(site: str) -> NetworkDeliverySection:
        return NetworkDeliverySection(
            enabled=True,
            listen_host="127.0.0.1",
            listen_port=free_port(),
            kme_id=site,
            tls_cert_file=pki / f"kme-{site}.crt",
            tls_key_file=pki / f"kme-{site}.key",
            client_ca_file=pki / "ca.crt",
            saes=[
                {"sae_id": s, "certificate_cn": s}
                for s, where in DIRECTORY.items()
                if where == site
            ],
            pairs=PAIRS,
        )

    return make


def _client(net: Net, pki: Path, site: str, sae: str) -> EtsiClient:
    server = net.services[site].etsi
    assert server is not None
    return EtsiClient(
        f"https://127.0.0.1:{server.port}", pki / "ca.crt", pki / f"{sae}.crt", pki / f"{sae}.key"
    )


def _run(
    tmp: Path, body: Callable[[Net, Path], Coroutine[Any, Any, None]], **overrides: Any
) -> None:
    async def go() -> None:
        pki = _pki(tmp)
        net = await build(tmp, SITES, LINKS, DIRECTORY, services=_delivery(pki), **overrides)
        try:
            await net.wait_routes()
            await body(net, pki)
        finally:
            await net.close()

    asyncio.run(go())


def test_enc_keys_at_one_site_dec_keys_at_the_far_site(tmp_path: Path) -> None:
    async def body(net: Net, pki: Path) -> None:
        a = _client(net, pki, "A", "sae-a")
        c = _client(net, pki, "C", "sae-c")
        status = await asyncio.to_thread(a.status, "sae-c")
        assert status["source_KME_ID"] == "A" and status["target_KME_ID"] == "C"
        assert status["stored_key_count"] > 0
        keys = await asyncio.to_thread(a.enc_keys, "sae-c", 3, 512)
        got = await asyncio.to_thread(c.dec_keys, "sae-a", [k.key_id for k in keys])
        assert [g.key for g in got] == [k.key for k in keys]
        assert all(len(k.key) == 64 for k in keys)
        # never twice
        with pytest.raises(EtsiClientError) as info:
            await asyncio.to_thread(c.dec_keys, "sae-a", [keys[0].key_id])
        assert info.value.status == 400
        # the other direction: sae-c is master at C
        back = await asyncio.to_thread(c.enc_keys, "sae-a", 1, 256)
        got = await asyncio.to_thread(a.dec_keys, "sae-c", [back[0].key_id])
        assert got[0].key == back[0].key

    _run(tmp_path, body)


def test_wrong_sae_at_the_far_end_gets_nothing(tmp_path: Path) -> None:
    async def body(net: Net, pki: Path) -> None:
        a = _client(net, pki, "A", "sae-a")
        keys = await asyncio.to_thread(a.enc_keys, "sae-c", 1, 256)
        ids = [keys[0].key_id]
        # another SAE at the same far site, named in a pair with sae-a: its own pair,
        # not this key's
        c2 = _client(net, pki, "C", "sae-c2")
        with pytest.raises(EtsiClientError) as info:
            await asyncio.to_thread(c2.dec_keys, "sae-a", ids)
        assert info.value.status == 400
        # an SAE registered at another site presenting its certificate here
        b_at_c = _client(net, pki, "C", "sae-b")
        with pytest.raises(EtsiClientError) as info:
            await asyncio.to_thread(b_at_c.dec_keys, "sae-a", ids)
        assert info.value.status == 401
        # a certificate of the CA that names no SAE
        stranger = _client(net, pki, "C", "stranger")
        with pytest.raises(EtsiClientError) as info:
            await asyncio.to_thread(stranger.dec_keys, "sae-a", ids)
        assert info.value.status == 401
        # the right slave still gets it, once
        c = _client(net, pki, "C", "sae-c")
        got = await asyncio.to_thread(c.dec_keys, "sae-a", ids)
        assert got[0].key == keys[0].key
        # a guessed ID: the same answer as every other refusal
        with pytest.raises(EtsiClientError) as info:
            await asyncio.to_thread(c.dec_keys, "sae-a", [uuid.uuid4()])
        assert info.value.status == 400

    _run(tmp_path, body)


def test_dry_only_path_is_a_clean_503(tmp_path: Path) -> None:
    async def body(net: Net, pki: Path) -> None:
        a = _client(net, pki, "A", "sae-a")
        # drain B-C at B (the side that draws to send towards C)
        store = net.store("B-C", "B")
        from qkdnode.keystore.errors import KeysUnavailableError
        from qkdnode.keystore.models import EraseReason

        with pytest.raises(KeysUnavailableError):
            while True:
                store.consume_own(256, EraseReason.RELAYED)
        await asyncio.sleep(1.0)  # B's next advert says B-C is dry
        with pytest.raises(EtsiClientError) as info:
            await asyncio.to_thread(a.enc_keys, "sae-c", 1, 256)
        assert info.value.status == 503
        assert "no path to site C" in info.value.message
        status = await asyncio.to_thread(a.status, "sae-c")
        assert status["stored_key_count"] == 0

    _run(tmp_path, body)


def test_status_in_the_shape_of_etsi_015(tmp_path: Path) -> None:
    async def body(net: Net, pki: Path) -> None:
        a = _client(net, pki, "A", "sae-a")
        keys = await asyncio.to_thread(a.enc_keys, "sae-c", 2, 256)
        assert keys
        b = _client(net, pki, "B", "sae-a")  # any certificate of the CA may read status
        node = (await asyncio.to_thread(b.get, STATUS_PATH))["etsi-qkd-sdn-node:qkd_node"]
        assert node["qkdn_location_id"] == "B"
        assert node["qkdn_status"] == "etsi-qkd-node-types:OPERATING"
        uuid.UUID(node["qkdn_id"])
        links = node["qkd_links"]["qkd_link"]
        phys = [lk for lk in links if lk["qkdl_type"] == "etsi-qkd-node-types:PHYS"]
        virt = [lk for lk in links if lk["qkdl_type"] == "etsi-qkd-node-types:VIRT"]
        assert len(phys) == 2 and {lk["qkdl_status"] for lk in phys} <= {
            "etsi-qkd-node-types:ACTIVE",
            "etsi-qkd-node-types:PASSIVE",
            "etsi-qkd-node-types:PENDING",
            "etsi-qkd-node-types:OFF",
        }
        for lk in phys:
            perf = lk["qkdl_performance"]
            assert {"skr", "eskr", "expected_consumption"} <= set(perf)
            assert all(isinstance(v, int) and 0 <= v < 2**32 for v in perf.values())
            assert isinstance(lk["qkdl_local"]["qkdi_id"], int)
        # B reaches A and C, each by a virtual link whose next hop is that neighbour
        assert {v["virt_next_hop"][0] for v in virt} == {
            lk["qkdl_remote"]["qkdn_id"] for lk in phys
        }
        # the same link has the same ID seen from both of its ends
        a_node = (await asyncio.to_thread(a.get, STATUS_PATH))["etsi-qkd-sdn-node:qkd_node"]
        a_phys = a_node["qkd_links"]["qkd_link"][0]
        twin = next(lk for lk in phys if lk["qkdl_id"] == a_phys["qkdl_id"])
        assert twin["qkdl_remote"] == a_phys["qkdl_local"]
        # consumed bits of the application at A
        apps = a_node["qkd_applications"]["qkd_app"]
        (app,) = [x for x in apps]
        assert app["app_statistics"]["statistics"][0]["consumed_bits"] == 512
        view = await asyncio.to_thread(a.get, VIEW_PATH)
        assert view["site"] == "A" and view["relays"]["stored"] == 1

    _run(tmp_path, body)


def test_network_command_and_link_toggle_on_the_control_socket(tmp_path: Path) -> None:
    from qkdnode.bus.commands import CallerInfo

    async def body(net: Net, pki: Path) -> None:
        port = net.ports_of("B")[0]
        op = CallerInfo("op", "operator")
        view = await port.commands["network"].handler({}, op)
        assert view["site"] == "B" and len(view["links"]) == 2
        toggle = port.commands["network.link"]
        assert toggle.role == "operator"
        await toggle.handler({"link_id": "B-C", "enabled": False}, op)
        await asyncio.sleep(0.5)
        assert net.kms["A"].route_to("C", 256) is None
        a = _client(net, pki, "A", "sae-a")
        with pytest.raises(EtsiClientError) as info:
            await asyncio.to_thread(a.enc_keys, "sae-c", 1, 256)
        assert info.value.status == 503
        await toggle.handler({"link_id": "B-C", "enabled": True}, op)
        await asyncio.sleep(0.5)
        assert net.kms["A"].route_to("C", 256) is not None
        from qkdnode.bus.errors import CommandError

        with pytest.raises(CommandError, match="no link 'X-Y'"):
            await toggle.handler({"link_id": "X-Y", "enabled": False}, op)

    _run(tmp_path, body)


@pytest.mark.system  # waits out the 30 s route alarm, shortened (~7 s): make test-system
def test_a_site_without_a_route_raises_network_unreachable(tmp_path: Path) -> None:
    async def body(net: Net, pki: Path) -> None:
        a_ports = net.ports_of("A")
        await asyncio.sleep(1.5)
        assert all("network_unreachable" not in p.alarms for p in a_ports)
        await net.kms["B"].set_enabled("B-C", False)
        await asyncio.sleep(2.5)
        causes = [p.alarms.get("network_unreachable") for p in a_ports]
        assert causes == ["no route to site(s) C"], causes
        assert "network_unreachable" in net.ports_of("C")[0].alarms  # C lost A and B
        await net.kms["B"].set_enabled("B-C", True)
        await asyncio.sleep(1.5)
        assert all("network_unreachable" not in p.alarms for p in a_ports)

    _run(tmp_path, body, unreachable_alarm_s=1.0)
