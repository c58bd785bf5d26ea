from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from qkdnode.delivery.openapi import build_openapi
from qkdnode.keystore import KeyState

from .conftest import KEY_SIZE_BITS, Kmes, Pki, running_kmes

DOCS_OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"


async def get(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with s.get(url, **kw) as r:
        return r.status, await r.json()


async def post(s: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


def keys_url(k: Kmes, node: str, sae: str, what: str) -> str:
    server = k.a if node == "a" else k.b
    return f"{server.url}/api/v1/keys/{sae}/{what}"


def run(pki: Pki, tmp: Path, scenario: Any, **kw: Any) -> None:
    async def main() -> None:
        async with running_kmes(pki, tmp, **kw) as k:
            await scenario(k)

    asyncio.run(main())


def test_sae_pair_gets_matching_keys_across_the_two_kmes(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 2, keys_per_block=16)
        async with k.session("sae-m") as master, k.session("sae-s") as slave:
            st, body = await post(
                master, keys_url(k, "a", "sae-s", "enc_keys"), {"number": 3, "size": 128}
            )
            assert st == 200, body
            enc = body["keys"]
            assert len(enc) == 3
            for e in enc:
                assert len(base64.b64decode(e["key"])) == 16
            # POST dec_keys with several IDs
            ids = [{"key_ID": e["key_ID"]} for e in enc[:2]]
            st, body = await post(slave, keys_url(k, "b", "sae-m", "dec_keys"), {"key_IDs": ids})
            assert st == 200, body
            assert body["keys"] == enc[:2]
            # GET dec_keys with one ID
            st, body = await get(
                slave, keys_url(k, "b", "sae-m", "dec_keys"), params={"key_ID": enc[2]["key_ID"]}
            )
            assert st == 200 and body["keys"] == enc[2:]
            # the bytes are the block's key bits
            data = b"".join(k.data[b] for b in sorted(k.data))
            assert base64.b64decode(enc[0]["key"]) == k.data[1][:16]
            assert base64.b64decode(enc[1]["key"]) in data
            # GET enc_keys, default size, on node B (master on B, slave on A)
            st, body = await get(
                master, keys_url(k, "b", "sae-s", "enc_keys"), params={"number": "2"}
            )
            assert st == 200 and all(len(base64.b64decode(e["key"])) == 32 for e in body["keys"])
            st, body2 = await post(
                slave,
                keys_url(k, "a", "sae-m", "dec_keys"),
                {"key_IDs": [{"key_ID": e["key_ID"]} for e in body["keys"]]},
            )
            assert st == 200 and body2["keys"] == body["keys"]
        # delivered on both, notices relayed: erased on both
        for e in enc:
            kid = uuid.UUID(e["key_ID"])
            assert k.store_a.key_info(kid) is None and k.store_b.key_info(kid) is None

    run(pki, tmp_path, scenario)


def test_status_reports_standard_fields(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 1, keys_per_block=10)
        async with k.session("sae-m") as master:
            st, body = await get(master, keys_url(k, "a", "sae-s", "status"))
        assert st == 200
        assert body == {
            "source_KME_ID": "KME-A",
            "target_KME_ID": "KME-B",
            "master_SAE_ID": "sae-m",
            "slave_SAE_ID": "sae-s",
            "key_size": KEY_SIZE_BITS,
            "stored_key_count": 5,  # the even-indexed half of the block
            "max_key_count": 100_000,
            "max_key_per_request": 128,
            "max_key_size": KEY_SIZE_BITS,
            "min_key_size": 64,
            "max_SAE_ID_count": 0,
        }

    run(pki, tmp_path, scenario)


def test_client_without_certificate_or_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 1, keys_per_block=4)
        for cn, rogue in ((None, False), ("sae-m", True)):
            async with k.session(cn, rogue=rogue) as s:
                with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                    await get(s, keys_url(k, "a", "sae-s", "enc_keys"))
        # a valid certificate that names no registered SAE
        async with k.session("stranger") as s:
            st, body = await get(s, keys_url(k, "a", "sae-s", "enc_keys"))
            assert st == 401 and "SAE" in body["message"]
            st, _ = await get(s, f"{k.a.url}/api/v1/openapi.json")
            assert st == 401
        assert k.store_a.counts()[KeyState.DELIVERED] == 0

    run(pki, tmp_path, scenario)


def test_sae_cannot_use_another_pairs_keys(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 1, keys_per_block=8)
        async with k.session("sae-m") as m, k.session("sae-y") as y, k.session("sae-x") as x:
            st, body = await get(m, keys_url(k, "a", "sae-s", "enc_keys"))
            assert st == 200
            kid = body["keys"][0]["key_ID"]
            # sae-y is the slave of another pair: it may not ask for sae-m's keys
            st, err = await get(y, keys_url(k, "b", "sae-m", "dec_keys"), params={"key_ID": kid})
            assert st == 401 and "not authorised" in err["message"]
            # nor ask its own master's route for a key issued to sae-m's pair
            st, err = await get(y, keys_url(k, "b", "sae-x", "dec_keys"), params={"key_ID": kid})
            assert st == 400 and "not issued" in err["message"]
            # sae-x may not fetch keys for sae-s
            st, err = await get(x, keys_url(k, "a", "sae-s", "enc_keys"))
            assert st == 401
            st, err = await get(x, keys_url(k, "a", "sae-s", "status"))
            assert st == 401
        info = k.store_b.key_info(uuid.UUID(kid))
        assert info is not None and info.state is KeyState.RESERVED

    run(pki, tmp_path, scenario)


def test_bad_requests_get_400_with_clear_messages(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 1, keys_per_block=8)
        url = keys_url(k, "a", "sae-s", "enc_keys")
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            cases: list[tuple[Any, str]] = [
                ({"size": 100}, "multiple of 8"),
                ({"size": 32}, "out of range"),
                ({"size": 512}, "out of range"),
                ({"number": 129}, "max_key_per_request"),
                ({"number": 0}, "invalid request body"),
                ({"number": "x"}, "invalid request body"),
                ({"additional_slave_SAE_IDs": ["nobody"]}, "unknown SAE ID 'nobody'"),
                ({"additional_slave_SAE_IDs": ["sae-y"]}, "not supported"),
                ({"extension_mandatory": [{"abc": 1}]}, "mandatory extension"),
            ]
            for body, text in cases:
                st, err = await post(m, url, body)
                assert st == 400 and text in err["message"], (body, err)
            st, err = await get(m, url, params={"size": "abc"})
            assert st == 400 and "integer" in err["message"]
            st, err = await get(m, keys_url(k, "a", "nobody", "enc_keys"))
            assert st == 400 and "unknown SAE ID" in err["message"]
            st, err = await get(m, keys_url(k, "a", "nobody", "status"))
            assert st == 400
            dec = keys_url(k, "b", "sae-m", "dec_keys")
            st, err = await get(s, dec)
            assert st == 400 and "key_ID" in err["message"]
            st, err = await get(s, dec, params={"key_ID": "not-a-uuid"})
            assert st == 400 and "not a UUID" in err["message"]
            st, err = await get(s, dec, params={"key_ID": str(uuid.uuid4())})
            assert st == 400 and "not a key ID" in err["message"]
            st, err = await post(s, dec, {"key_IDs": []})
            assert st == 400 and err["details"]
            async with s.post(dec, data=b"{not json") as r:
                assert r.status == 400
            # already delivered
            _, body = await get(m, url)
            kid = body["keys"][0]["key_ID"]
            assert (await get(s, dec, params={"key_ID": kid}))[0] == 200
            st, err = await get(s, dec, params={"key_ID": kid})
            assert st == 400 and "already delivered" in err["message"]
            # a key A hands out itself cannot be asked from A's dec_keys
            st, err = await get(s, keys_url(k, "a", "sae-m", "dec_keys"), params={"key_ID": kid})
            assert st == 400

    run(pki, tmp_path, scenario)


def test_no_keys_gives_503(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        async with k.session("sae-m") as m:
            st, err = await get(m, keys_url(k, "a", "sae-s", "enc_keys"))
            assert st == 503 and "available" in err["message"]
            k.add_blocks(1, 1, keys_per_block=4)
            st, _ = await post(m, keys_url(k, "a", "sae-s", "enc_keys"), {"number": 3})
            assert st == 503  # only 2 even-indexed keys
            st, _ = await post(m, keys_url(k, "a", "sae-s", "enc_keys"), {"number": 2})
            assert st == 200

    run(pki, tmp_path, scenario)


def test_dec_waits_for_the_peer_notice_or_refuses_without_it(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 1, keys_per_block=8)
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            _, body = await get(m, keys_url(k, "a", "sae-s", "enc_keys"), params={"number": 2})
            ids = [e["key_ID"] for e in body["keys"]]
            assert [n.entries[0].via for n in k.notices] == ["enc"]
            # notice not relayed: refused with 503 (require_peer_notice)
            st, err = await get(s, keys_url(k, "b", "sae-m", "dec_keys"), params={"key_ID": ids[0]})
            assert st == 503 and "not announced" in err["message"]
            # the notice arrives a little later while the request waits
            notice = k.notices[0]

            async def late() -> None:
                await asyncio.sleep(0.1)
                await asyncio.to_thread(k.store_b.apply_notice, notice)

            task = asyncio.create_task(late())
            st, body2 = await get(
                s, keys_url(k, "b", "sae-m", "dec_keys"), params={"key_ID": ids[1]}
            )
            await task
            assert st == 200 and body2["keys"] == body["keys"][1:]

    run(pki, tmp_path, scenario, relay=False, require_peer_notice=True, peer_notice_wait_s=0.5)


def test_200_concurrent_requests_no_key_duplicated_or_lost(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 4, keys_per_block=100)  # 200 keys each node can hand out
        async with k.session("sae-m") as m, k.session("sae-s") as s:

            async def one(i: int) -> list[dict[str, str]]:
                node = "a" if i % 2 else "b"
                st, body = await post(m, keys_url(k, node, "sae-s", "enc_keys"), {"number": 2})
                assert st == 200, body
                other = "b" if node == "a" else "a"
                st, dec = await post(
                    s,
                    keys_url(k, other, "sae-m", "dec_keys"),
                    {"key_IDs": [{"key_ID": e["key_ID"]} for e in body["keys"]]},
                )
                assert st == 200, dec
                assert dec["keys"] == body["keys"]
                return body["keys"]  # type: ignore[no-any-return]

            results = await asyncio.gather(*(one(i) for i in range(200)))
            for node in ("a", "b"):  # exactly all keys of both nodes went out
                st, err = await post(m, keys_url(k, node, "sae-s", "enc_keys"), {"number": 1})
                assert st == 503, err
        ids = [e["key_ID"] for r in results for e in r]
        keys = [e["key"] for r in results for e in r]
        assert len(ids) == len(set(ids)) == 400
        assert len(set(keys)) == 400
        all_bytes = {
            base64.b64encode(d[i : i + 32]).decode()
            for d in k.data.values()
            for i in range(0, len(d), 32)
        }
        assert set(keys) <= all_bytes
        assert set(keys) == all_bytes  # none lost
        # every key delivered on both nodes is erased on both
        for store in (k.store_a, k.store_b):
            assert sum(store.counts().values()) == 0

    run(pki, tmp_path, scenario)


def test_openapi_is_published_matches_docs_and_lists_every_route(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        async with k.session("sae-m") as m, m.get(f"{k.a.url}/api/v1/openapi.json") as r:
            assert r.status == 200
            served = await r.text()
        assert served == DOCS_OPENAPI.read_text()
        doc = json.loads(served)
        assert doc == build_openapi()
        routes = {
            (method.upper(), res.canonical)
            for res in k.a.runner.app.router.resources()
            for route in res
            for method in [route.method]
            if method != "HEAD"
        }
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == documented
        # every documented operation answers (not 404/405) for an authorised SAE
        async with k.session("sae-m") as m:
            for method, path in documented:
                url = k.a.url + path.replace("{slave_SAE_ID}", "sae-s").replace(
                    "{master_SAE_ID}", "sae-s"
                )
                async with m.request(method, url, json={} if method == "POST" else None) as r:
                    assert r.status not in (404, 405), (method, path)

    run(pki, tmp_path, scenario)


def test_key_bytes_do_not_reach_logs_or_errors(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, 1, keys_per_block=8)
        with capture_logs() as logs:
            async with k.session("sae-m") as m, k.session("sae-s") as s:
                _, body = await get(m, keys_url(k, "a", "sae-s", "enc_keys"), params={"number": 2})
                kid = body["keys"][0]["key_ID"]
                await get(s, keys_url(k, "b", "sae-m", "dec_keys"), params={"key_ID": kid})
                _, err = await get(s, keys_url(k, "b", "sae-m", "dec_keys"), params={"key_ID": kid})
        assert any(e["event"] == "etsi.enc_keys" for e in logs)
        text = repr(logs) + json.dumps(err) + repr(k.a) + repr(k.a.api.store)
        data = k.data[1]
        for i in range(0, len(data), 8):
            chunk = data[i : i + 8]
            assert chunk.hex() not in text
            assert base64.b64encode(chunk).decode()[:8] not in text
        for e in body["keys"]:
            assert e["key"] not in text

    run(pki, tmp_path, scenario)
