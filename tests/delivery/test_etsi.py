"""ETSI GS QKD 014 delivery through two in-process KMEs (activation first).

KME A serves the transmitter's key service, KME B the receiver's; their key services are
joined by the in-memory peer channel of ``kme_pair`` (see conftest). The attacks on key IDs,
replays and revocation are in ``test_etsi_inprocess_attacks.py``; the same properties
against two real daemons are in ``test_two_kmes.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from qkdnode.delivery.openapi import build_openapi
from qkdnode.keystore import KeyState
from qkdnode.keystore.models import EraseReason

from .conftest import (
    KEY_SIZE_BITS,
    UNKNOWN,
    Kmes,
    Pki,
    call,
    get,
    ids_body,
    post,
    run,
    unknown_message,
    wait_until,
)

DOCS_OPENAPI = Path(__file__).parents[2] / "docs" / "openapi.json"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def live_ids(k: Kmes, node: str) -> set[uuid.UUID]:
    store = k.store_a if node == "a" else k.store_b
    return {kid for b in k.data for kid in store.key_ids_of_block(b)}


def digests_equal(k: Kmes) -> bool:
    return k.store_a.digest() == k.store_b.digest()


# ------------------------------------------------------------------------------ normal flow
def test_sae_pair_gets_matching_keys_across_the_two_kmes(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(2, keys_per_block=16)
        async with k.session("sae-m") as master, k.session("sae-s") as slave:
            st, body = await post(
                master, k.url("a", "sae-s", "enc_keys"), {"number": 3, "size": 128}
            )
            assert st == 200, body
            enc = body["keys"]
            assert len(enc) == 3
            # KME A issues the even-indexed keys of the oldest block, each cut to 128 bits
            assert [base64.b64decode(e["key"]) for e in enc] == [
                k.key(0, i)[:16] for i in (0, 2, 4)
            ]
            assert all(uuid.UUID(e["key_ID"]).version == 4 for e in enc)
            # POST dec_keys with several IDs
            st, body = await post(
                slave, k.url("b", "sae-m", "dec_keys"), ids_body([e["key_ID"] for e in enc[:2]])
            )
            assert st == 200, body
            assert body["keys"] == enc[:2]
            # GET dec_keys with one ID
            st, body = await get(
                slave, k.url("b", "sae-m", "dec_keys"), params={"key_ID": enc[2]["key_ID"]}
            )
            assert st == 200 and body["keys"] == enc[2:]
            # GET enc_keys, default size, on KME B (it issues the odd-indexed keys)
            st, body = await get(master, k.url("b", "sae-s", "enc_keys"), params={"number": "2"})
            assert st == 200, body
            assert [base64.b64decode(e["key"]) for e in body["keys"]] == [
                k.key(0, 1),
                k.key(0, 3),
            ]
            st, body2 = await post(
                slave,
                k.url("a", "sae-m", "dec_keys"),
                ids_body([e["key_ID"] for e in body["keys"]]),
            )
            assert st == 200 and body2["keys"] == body["keys"]
        # delivered at both ends: erased on both once the delivery notices arrived
        done = [uuid.UUID(e["key_ID"]) for e in [*enc, *body["keys"]]]

        def erased() -> bool:
            return all(s.key_info(kid) is None for s in (k.store_a, k.store_b) for kid in done)

        await wait_until(erased)
        for kid in done:
            assert k.store_a.erase_reason(kid) is EraseReason.DELIVERED
            assert k.store_b.erase_reason(kid) is EraseReason.DELIVERED
        assert digests_equal(k)

    run(pki, tmp_path, scenario)


def test_dec_keys_succeeds_immediately_after_enc_keys(pki: Pki, tmp_path: Path) -> None:
    """Activation first: the peer KME holds the reservation before enc_keys answers, so
    the slave's first dec_keys succeeds without waiting for anything."""

    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=16)
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            for issuer, peer in (("a", "b"), ("b", "a")):
                issuer_store = k.store_a if issuer == "a" else k.store_b
                peer_store = k.store_b if issuer == "a" else k.store_a
                for _ in range(5):
                    st, got = await post(m, k.url(issuer, "sae-s", "enc_keys"), {"number": 1})
                    assert st == 200, got
                    kid = uuid.UUID(got["keys"][0]["key_ID"])
                    # durable on both KMEs before the master saw the ID
                    reserved = peer_store.key_info(kid)
                    assert reserved is not None and reserved.state is KeyState.RESERVED
                    assert reserved.pair is not None
                    assert (reserved.pair.master, reserved.slaves) == ("sae-m", ("sae-s",))
                    issued = issuer_store.key_info(kid)
                    assert issued is not None and issued.state is KeyState.DELIVERED
                    st, back = await get(
                        s, k.url(peer, "sae-m", "dec_keys"), params={"key_ID": str(kid)}
                    )
                    assert st == 200, back
                    assert back == got

    run(pki, tmp_path, scenario)


def test_status_reports_standard_fields(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=10)
        async with k.session("sae-m") as master:
            st, body = await get(master, k.url("a", "sae-s", "status"))
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
                "max_key_size": 4096,  # delivery.max_key_size_bits (< 256 stored keys)
                "min_key_size": 64,
                "max_SAE_ID_count": 8,  # delivery.max_sae_id_count
            }
            st, body = await get(master, k.url("b", "sae-s2", "status"))
            assert st == 200
            assert (body["source_KME_ID"], body["target_KME_ID"]) == ("KME-B", "KME-A")
            assert body["slave_SAE_ID"] == "sae-s2"
            assert body["stored_key_count"] == 5  # the odd-indexed half
            # keys in use no longer count
            assert (await post(master, k.url("a", "sae-s", "enc_keys"), {"number": 2}))[0] == 200
            assert (await get(master, k.url("a", "sae-s", "status")))[1]["stored_key_count"] == 3

    run(pki, tmp_path, scenario)


def test_status_limits_follow_the_configuration(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=4)
        async with k.session("sae-m") as master:
            for node in ("a", "b"):
                st, body = await get(master, k.url(node, "sae-s", "status"))
                assert st == 200
                # at most 256 stored keys make one delivered key
                assert body["max_key_size"] == 256 * KEY_SIZE_BITS
                assert body["min_key_size"] == 128
                assert body["max_SAE_ID_count"] == 3
                assert body["max_key_per_request"] == 7

    run(
        pki,
        tmp_path,
        scenario,
        max_key_size_bits=1_000_000,
        min_key_size_bits=128,
        max_sae_id_count=3,
        max_key_per_request=7,
    )


# ---------------------------------------------------------------------- who may do what
def test_client_without_certificate_or_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=4)
        for node in ("a", "b"):
            for cn, rogue in ((None, False), ("sae-m", True)):
                async with k.session(cn, rogue=rogue) as s:
                    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                        await get(s, k.url(node, "sae-s", "enc_keys"))
            # a valid certificate that names no registered SAE
            async with k.session("stranger") as s:
                st, body = await get(s, k.url(node, "sae-s", "enc_keys"))
                assert st == 401 and "SAE" in body["message"]
                st, _ = await get(s, f"{k.server(node).url}/api/v1/openapi.json")
                assert st == 401
                st, _ = await post(
                    s, k.url(node, "sae-m", "dec_keys"), ids_body([str(uuid.uuid4())])
                )
                assert st == 401
        for store in (k.store_a, k.store_b):
            counts = store.counts()
            assert counts[KeyState.DELIVERED] == counts[KeyState.RESERVED] == 0

    run(pki, tmp_path, scenario)


def test_sae_cannot_use_another_pairs_keys(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with (
            k.session("sae-m") as m,
            k.session("sae-s") as s,
            k.session("sae-s2") as s2,
            k.session("sae-y") as y,
            k.session("sae-x") as x,
        ):
            st, body = await get(m, k.url("a", "sae-s", "enc_keys"))
            assert st == 200
            kid = body["keys"][0]["key_ID"]
            dec_m = k.url("b", "sae-m", "dec_keys")
            # sae-y is the slave of another pair: it may not use sae-m's route
            st, err = await get(y, dec_m, params={"key_ID": kid})
            assert st == 401 and "not authorised" in err["message"]
            # nor ask its own master's route for a key issued to sae-m's pair
            st, err = await get(y, k.url("b", "sae-x", "dec_keys"), params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)
            # sae-s2 is a slave of sae-m, but the key was activated for sae-s only
            st, err = await get(s2, dec_m, params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)
            # the master itself is not a slave of its own pair
            st, err = await get(m, dec_m, params={"key_ID": kid})
            assert st == 401
            # sae-x may not fetch keys or status for sae-s
            st, err = await get(x, k.url("a", "sae-s", "enc_keys"))
            assert st == 401
            st, err = await get(x, k.url("a", "sae-s", "status"))
            assert st == 401
            info = k.store_b.key_info(uuid.UUID(kid))
            assert info is not None and info.state is KeyState.RESERVED and info.fetched_by == ()
            # none of that used the key up: its slave still gets it
            st, got = await get(s, dec_m, params={"key_ID": kid})
            assert st == 200 and got == body

    run(pki, tmp_path, scenario)


# ------------------------------------------------------------------------------ bad input
def test_bad_requests_get_400_with_clear_messages(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        url = k.url("a", "sae-s", "enc_keys")
        before = (k.store_a.digest(), k.store_b.digest())
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            cases: list[tuple[Any, str]] = [
                ({"size": 100}, "multiple of 8"),
                ({"size": 32}, "out of range"),
                ({"size": 8192}, "out of range"),
                ({"number": 129}, "max_key_per_request"),
                ({"number": 0}, "invalid request body"),
                ({"number": "x"}, "invalid request body"),
                ({"number": "2"}, "invalid request body"),
                ({"number": True}, "invalid request body"),
                ({"size": 256.0}, "invalid request body"),
                ({"additional_slave_SAE_IDs": ["nobody"]}, "unknown SAE ID 'nobody'"),
                ({"additional_slave_SAE_IDs": ["sae-s"]}, "named twice"),
                ({"additional_slave_SAE_IDs": ["sae-s2", "sae-s2"]}, "named twice"),
                ({"additional_slave_SAE_IDs": "sae-s2"}, "invalid request body"),
                ({"extension_mandatory": [{"abc": 1}]}, "mandatory extension"),
            ]
            for body, text in cases:
                st, err = await post(m, url, body)
                assert st == 400 and text in err["message"], (body, err)
            st, err = await post(m, url, {"extension_mandatory": [{"abc": 1}]})
            assert err["details"] == [{"extension_mandatory_unsupported": ["abc"]}]
            st, err = await post(m, url, {"number": "x"})
            assert err["details"][0]["field"] == "number"
            for params, text in (
                ({"size": "abc"}, "integer"),
                ({"number": "0"}, ">= 1"),
                ({"number": "1e3"}, "integer"),
                ([("number", "1"), ("number", "2")], "2 times"),
            ):
                st, err = await get(m, url, params=params)
                assert st == 400 and text in err["message"], (params, err)
            st, err = await get(m, k.url("a", "nobody", "enc_keys"))
            assert st == 400 and "unknown SAE ID" in err["message"]
            st, err = await get(m, k.url("a", "nobody", "status"))
            assert st == 400
            async with m.post(url, data=b"{not json") as r:
                assert r.status == 400
                assert (await r.json())["message"] == "invalid request body"
            dec = k.url("b", "sae-m", "dec_keys")
            st, err = await get(s, dec)
            assert st == 400 and "key_ID" in err["message"]
            st, err = await get(s, dec, params=[("key_ID", str(uuid.uuid4()))] * 2)
            assert st == 400 and "exactly one" in err["message"]
            st, err = await get(s, dec, params={"key_ID": "not-a-uuid"})
            assert st == 400 and "not a UUID" in err["message"]
            kid = str(uuid.uuid4())
            st, err = await get(s, dec, params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)
            st, err = await post(s, dec, {"key_IDs": []})
            assert st == 400 and err["details"]
            st, err = await post(s, dec, {"key_IDs": [{"key_ID": "nope"}]})
            assert st == 400 and err["details"][0]["field"].startswith("key_IDs.0")
            st, err = await post(s, dec, ids_body([kid, kid]))
            assert st == 400 and "twice" in err["message"]
            st, err = await post(s, dec, ids_body([str(uuid.uuid4()) for _ in range(129)]))
            assert st == 400 and "max_key_per_request" in err["message"]
            async with s.post(dec, data=b"{not json") as r:
                assert r.status == 400
            # bad input changed nothing in either store
            assert (k.store_a.digest(), k.store_b.digest()) == before
            assert k.store_a.counts()[KeyState.DELIVERED] == 0
            assert k.store_b.counts()[KeyState.RESERVED] == 0
            # already delivered: the uniform answer
            _, body = await get(m, url)
            kid = body["keys"][0]["key_ID"]
            assert (await get(s, dec, params={"key_ID": kid}))[0] == 200
            st, err = await get(s, dec, params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)
            # a key A hands out itself cannot be asked from A's dec_keys
            _, body = await get(m, url)
            kid = body["keys"][0]["key_ID"]
            st, err = await get(s, k.url("a", "sae-m", "dec_keys"), params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)

    run(pki, tmp_path, scenario)


def test_no_keys_gives_503_with_retry_after(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        async with k.session("sae-m") as m:
            for node in ("a", "b"):
                st, err, headers = await call(m, "GET", k.url(node, "sae-s", "enc_keys"))
                assert st == 503 and "available" in err["message"]
                assert headers["Retry-After"] == "2"
            k.add_blocks(1, keys_per_block=4)
            before = (k.store_a.digest(), k.store_b.digest())
            st, _ = await post(m, k.url("a", "sae-s", "enc_keys"), {"number": 3})
            assert st == 503  # only 2 even-indexed keys
            # all or nothing: the refused request took no key
            assert (k.store_a.digest(), k.store_b.digest()) == before
            assert k.store_a.inflight_count() == 0
            st, _ = await post(m, k.url("a", "sae-s", "enc_keys"), {"number": 2})
            assert st == 200
            st, _ = await post(m, k.url("a", "sae-s", "enc_keys"), {"number": 1})
            assert st == 503
            st, _ = await post(m, k.url("b", "sae-s", "enc_keys"), {"number": 2})
            assert st == 200

    run(pki, tmp_path, scenario)


# --------------------------------------------------------------------- activation first
def test_enc_keys_before_the_key_id_sync_gets_503_on_both_kmes(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=16)
        assert not k.kme_a.service.in_step and not k.kme_b.service.in_step
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            for node in ("a", "b"):
                for method, what, kw in (
                    ("GET", "enc_keys", {}),
                    ("POST", "enc_keys", {"json": {"number": 1}}),
                    ("GET", "status", {}),
                ):
                    st, err, headers = await call(m, method, k.url(node, "sae-s", what), **kw)
                    assert st == 503 and "synchronising" in err["message"], (node, what, err)
                    assert headers["Retry-After"] == "2"
                st, err, headers = await call(
                    s, "GET", k.url(node, "sae-m", "dec_keys"), params={"key_ID": str(uuid.uuid4())}
                )
                assert st == 503 and headers["Retry-After"] == "2"
            assert k.store_a.counts()[KeyState.DELIVERED] == 0
            assert k.store_b.counts()[KeyState.RESERVED] == 0

            await k.sync()
            for issuer, peer in (("a", "b"), ("b", "a")):
                st, got = await get(m, k.url(issuer, "sae-s", "enc_keys"))
                assert st == 200, got
                st, back = await post(
                    s, k.url(peer, "sae-m", "dec_keys"), ids_body([got["keys"][0]["key_ID"]])
                )
                assert st == 200 and back == got

            # the peer is lost (it restarts): it refuses, and the issuer's activation is
            # refused by the peer, so the keys go back
            k.kme_b.service.peer_lost("test: restart")
            stored = (await get(m, k.url("a", "sae-s", "status")))[1]["stored_key_count"]
            before = (k.store_a.digest(), k.store_b.digest())
            st, err, headers = await call(m, "GET", k.url("a", "sae-s", "enc_keys"))
            assert st == 503 and "synchronising" in err["message"]
            assert headers["Retry-After"] == "2"
            st, err = await get(m, k.url("b", "sae-s", "enc_keys"))
            assert st == 503
            assert (k.store_a.digest(), k.store_b.digest()) == before
            assert k.store_a.inflight_count() == 0
            assert (await get(m, k.url("a", "sae-s", "status")))[1]["stored_key_count"] == stored
            await k.sync()
            st, got = await get(m, k.url("a", "sae-s", "enc_keys"))
            assert st == 200

    run(pki, tmp_path, scenario, sync=False)


def test_peer_restart_between_enc_and_dec_keeps_the_key_for_its_slave(
    pki: Pki, tmp_path: Path
) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m, k.session("sae-s") as s, k.session("sae-y") as y:
            st, got = await get(m, k.url("a", "sae-s", "enc_keys"), params={"number": "2"})
            assert st == 200
            ids = [e["key_ID"] for e in got["keys"]]
            for kme in (k.kme_a, k.kme_b):
                kme.service.peer_lost("test: peer restarted")
            st, _ = await post(s, k.url("b", "sae-m", "dec_keys"), ids_body(ids))
            assert st == 503
            await k.sync()
            assert digests_equal(k)
            st, err = await get(y, k.url("b", "sae-x", "dec_keys"), params={"key_ID": ids[0]})
            assert st == 400 and err["message"] == unknown_message(ids[0])
            st, back = await post(s, k.url("b", "sae-m", "dec_keys"), ids_body(ids))
            assert st == 200 and back == got

    run(pki, tmp_path, scenario)


@pytest.mark.parametrize("issuer", ["a", "b"])
def test_peer_unreachable_gives_503_quickly_and_keeps_the_stores_consistent(
    pki: Pki, tmp_path: Path, issuer: str
) -> None:
    timeout_s = 0.5
    peer = "b" if issuer == "a" else "a"

    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=32)
        kme_issuer = k.kme_a if issuer == "a" else k.kme_b
        kme_peer = k.kme_b if issuer == "a" else k.kme_a
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            enc = k.url(issuer, "sae-s", "enc_keys")
            # 1. the channel is down: refused at once, nothing picked or changed
            assert (await get(m, k.url(issuer, "sae-s", "status")))[0] == 200  # TLS set up
            before = (k.store_a.digest(), k.store_b.digest())
            k.kme_a.connected = k.kme_b.connected = False
            t0 = time.monotonic()
            st, err, headers = await call(m, "POST", enc, json={"number": 2})
            assert time.monotonic() - t0 < timeout_s
            assert st == 503 and "not reachable" in err["message"]
            assert headers["Retry-After"] == "2"
            assert (k.store_a.digest(), k.store_b.digest()) == before
            k.reconnect()

            # 2. the activation reaches the peer, its acknowledgement never comes back:
            # 503 after the activation timeout, the keys are erased on both
            live_before = live_ids(k, issuer)
            kme_peer.connected = False
            t0 = time.monotonic()
            st, err, headers = await call(m, "POST", enc, json={"number": 2})
            elapsed = time.monotonic() - t0
            assert st == 503 and "did not confirm" in err["message"]
            assert headers["Retry-After"] == "2"
            assert elapsed < timeout_s + 1.0
            lost = live_before - live_ids(k, issuer)
            assert len(lost) == 2
            assert kme_issuer.store.inflight_count() == 0
            k.reconnect()
            await k.sync()
            assert digests_equal(k)
            for kid in lost:
                for store in (k.store_a, k.store_b):
                    assert store.key_info(kid) is None
                    assert store.erase_reason(kid) is EraseReason.UNCERTAIN
                st, err = await get(
                    s, k.url(peer, "sae-m", "dec_keys"), params={"key_ID": str(kid)}
                )
                assert st == 400 and err["message"] == unknown_message(str(kid))
            # and the link serves again
            st, got = await post(m, enc, {"number": 2})
            assert st == 200, got
            st, back = await post(
                s, k.url(peer, "sae-m", "dec_keys"), ids_body([e["key_ID"] for e in got["keys"]])
            )
            assert st == 200 and back == got

    run(pki, tmp_path, scenario, activation_timeout_s=timeout_s)


@pytest.mark.parametrize("issuer", ["a", "b"])
def test_dropped_activation_reply_gives_503_and_no_half_issued_key(
    pki: Pki, tmp_path: Path, issuer: str
) -> None:
    timeout_s = 0.5
    peer = "b" if issuer == "a" else "a"

    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=32)
        kme_issuer = k.kme_a if issuer == "a" else k.kme_b
        kme_peer = k.kme_b if issuer == "a" else k.kme_a
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            live_before = live_ids(k, issuer)
            kme_peer.drop_replies = {"activate"}
            st, err = await post(m, k.url(issuer, "sae-s", "enc_keys"), {"number": 3})
            assert st == 503 and "did not confirm" in err["message"]
            lost = live_before - live_ids(k, issuer)
            assert len(lost) == 3
            assert kme_issuer.store.inflight_count() == 0
            # the release reaches the peer: it erases its reservation too
            await wait_until(lambda: all(kme_peer.store.key_info(kid) is None for kid in lost))
            k.reconnect()
            await k.sync()
            assert digests_equal(k)
            for kid in lost:
                for store in (k.store_a, k.store_b):
                    assert store.key_info(kid) is None
                    assert store.erase_reason(kid) is EraseReason.UNCERTAIN
            st, err = await post(
                s, k.url(peer, "sae-m", "dec_keys"), ids_body([str(x) for x in lost])
            )
            assert st == 400 and UNKNOWN in err["message"]
            for kid in lost:
                st, err = await get(
                    s, k.url(peer, "sae-m", "dec_keys"), params={"key_ID": str(kid)}
                )
                assert st == 400 and err["message"] == unknown_message(str(kid))
            # nothing else was touched: every other key is still there, on both KMEs
            assert live_ids(k, issuer) == live_before - lost
            st, got = await post(m, k.url(issuer, "sae-s", "enc_keys"), {"number": 1})
            assert st == 200
            st, back = await post(
                s, k.url(peer, "sae-m", "dec_keys"), ids_body([got["keys"][0]["key_ID"]])
            )
            assert st == 200 and back == got

    run(pki, tmp_path, scenario, activation_timeout_s=timeout_s)


# ------------------------------------------------------------------------------ multicast
def test_additional_slaves_each_get_identical_bytes_once(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=16)
        async with (
            k.session("sae-m") as m,
            k.session("sae-s") as s,
            k.session("sae-s2") as s2,
            k.session("sae-s3") as s3,
        ):
            st, got = await post(
                m,
                k.url("a", "sae-s", "enc_keys"),
                {"number": 2, "additional_slave_SAE_IDs": ["sae-s2"]},
            )
            assert st == 200, got
            ids = [e["key_ID"] for e in got["keys"]]
            dec = k.url("b", "sae-m", "dec_keys")
            info = k.store_b.key_info(uuid.UUID(ids[0]))
            assert info is not None and info.slaves == ("sae-s", "sae-s2")
            # a slave of sae-m that was not named gets the uniform refusal
            st, err = await post(s3, dec, ids_body(ids[:1]))
            assert st == 400 and err["message"] == unknown_message(ids[0])
            st, back = await post(s, dec, ids_body(ids))
            assert st == 200 and back == got
            # once per slave
            st, err = await post(s, dec, ids_body(ids[:1]))
            assert st == 400 and err["message"] == unknown_message(ids[0])
            # the other slave has not fetched yet: both KMEs still hold the key
            info = k.store_b.key_info(uuid.UUID(ids[0]))
            assert info is not None and info.fetched_by == ("sae-s",)
            assert k.store_a.key_info(uuid.UUID(ids[0])) is not None
            st, back2 = await post(s2, dec, ids_body(ids))
            assert st == 200 and back2 == got
            st, err = await post(s2, dec, ids_body(ids[1:]))
            assert st == 400 and err["message"] == unknown_message(ids[1])
            # every slave has it: erased on both KMEs
            await wait_until(
                lambda: all(
                    st.key_info(uuid.UUID(i)) is None for st in (k.store_a, k.store_b) for i in ids
                )
            )
            # a slave that is not paired with the master: 401, nothing taken
            before = (k.store_a.digest(), k.store_b.digest())
            st, err = await post(
                m, k.url("a", "sae-s", "enc_keys"), {"additional_slave_SAE_IDs": ["sae-y"]}
            )
            assert st == 401 and "sae-y" in err["message"]
            assert (k.store_a.digest(), k.store_b.digest()) == before
            # the same from KME B, three slaves
            st, got = await post(
                m,
                k.url("b", "sae-s", "enc_keys"),
                {"number": 1, "size": 512, "additional_slave_SAE_IDs": ["sae-s3", "sae-s2"]},
            )
            assert st == 200, got
            assert base64.b64decode(got["keys"][0]["key"]) == k.key(0, 1) + k.key(0, 3)
            dec_a = k.url("a", "sae-m", "dec_keys")
            results = await asyncio.gather(
                *(post(c, dec_a, ids_body([got["keys"][0]["key_ID"]])) for c in (s, s2, s3))
            )
            assert results == [(200, got)] * 3

    run(pki, tmp_path, scenario)


def test_more_additional_slaves_than_max_sae_id_count_is_400(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m:
            before = (k.store_a.digest(), k.store_b.digest())
            st, err = await post(
                m,
                k.url("a", "sae-s", "enc_keys"),
                {"additional_slave_SAE_IDs": ["sae-s2", "sae-s3"]},
            )
            assert st == 400 and "max_SAE_ID_count 1" in err["message"]
            assert (k.store_a.digest(), k.store_b.digest()) == before
            st, got = await post(
                m, k.url("a", "sae-s", "enc_keys"), {"additional_slave_SAE_IDs": ["sae-s3"]}
            )
            assert st == 200, got

    run(pki, tmp_path, scenario, max_sae_id_count=1)


def test_multicast_off_refuses_additional_slaves(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m:
            st, body = await get(m, k.url("a", "sae-s", "status"))
            assert body["max_SAE_ID_count"] == 0
            st, err = await post(
                m, k.url("a", "sae-s", "enc_keys"), {"additional_slave_SAE_IDs": ["sae-s2"]}
            )
            assert st == 400 and "max_SAE_ID_count 0" in err["message"]

    run(pki, tmp_path, scenario, max_sae_id_count=0)


# ------------------------------------------------------------------------------ key sizes
def test_keys_longer_and_shorter_than_the_stored_size(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=64)  # 32 keys for each KME to issue
        even = [k.key(0, i) for i in range(0, 64, 2)]
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            enc, dec = k.url("a", "sae-s", "enc_keys"), k.url("b", "sae-m", "dec_keys")
            expected: list[tuple[int, bytes]] = [
                (512, even[0] + even[1]),  # two stored keys concatenated
                (384, even[2] + even[3][:16]),  # one and a half
                (64, even[4][:8]),  # the first bits of one
                (4096, b"".join(even[5:21])),  # max_key_size: 16 stored keys
            ]
            for size, want in expected:
                st, got = await post(m, enc, {"number": 1, "size": size})
                assert st == 200, (size, got)
                data = base64.b64decode(got["keys"][0]["key"])
                assert len(data) * 8 == size and data == want
                st, back = await post(s, dec, ids_body([got["keys"][0]["key_ID"]]))
                assert st == 200 and back == got
            # two keys of 1.5 stored keys: four parts, none shared
            st, got = await post(m, enc, {"number": 2, "size": 384})
            assert st == 200
            assert [base64.b64decode(e["key"]) for e in got["keys"]] == [
                even[21] + even[22][:16],
                even[23] + even[24][:16],
            ]
            assert (await post(s, dec, ids_body([e["key_ID"] for e in got["keys"]])))[1] == got
            # every part of a delivered key is erased on both KMEs: 25 parts of A's parity
            await wait_until(lambda: sum(k.store_b.counts().values()) == 64 - 25)
            await wait_until(lambda: sum(k.store_a.counts().values()) == 64 - 25)
            assert digests_equal(k)
            # 7 stored keys left: a 4096-bit key needs 16
            assert k.store_a.available_for_enc() == 7
            st, err = await post(m, enc, {"number": 1, "size": 4096})
            assert st == 503 and "available" in err["message"]
            assert digests_equal(k) and k.store_a.available_for_enc() == 7
            # from KME B: a key longer than stored, fetched at A
            st, got = await post(m, k.url("b", "sae-s", "enc_keys"), {"size": 768})
            assert st == 200
            assert base64.b64decode(got["keys"][0]["key"]) == b"".join(
                k.key(0, i) for i in (1, 3, 5)
            )
            st, back = await post(
                s, k.url("a", "sae-m", "dec_keys"), ids_body([got["keys"][0]["key_ID"]])
            )
            assert st == 200 and back == got

    run(pki, tmp_path, scenario)


# ---------------------------------------------------------------------------- concurrency
def test_200_concurrent_requests_no_key_duplicated_or_lost(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(4, keys_per_block=100)  # 200 keys each KME can hand out
        async with k.session("sae-m") as m, k.session("sae-s") as s:

            async def one(i: int) -> list[dict[str, str]]:
                node = "a" if i % 2 else "b"
                st, body = await post(m, k.url(node, "sae-s", "enc_keys"), {"number": 2})
                assert st == 200, body
                other = "b" if node == "a" else "a"
                st, dec = await post(
                    s,
                    k.url(other, "sae-m", "dec_keys"),
                    ids_body([e["key_ID"] for e in body["keys"]]),
                )
                assert st == 200, dec
                assert dec["keys"] == body["keys"]
                return body["keys"]  # type: ignore[no-any-return]

            results = await asyncio.gather(*(one(i) for i in range(200)))
            for node in ("a", "b"):  # exactly all keys of both KMEs went out
                st, err = await post(m, k.url(node, "sae-s", "enc_keys"), {"number": 1})
                assert st == 503, err
        ids = [e["key_ID"] for r in results for e in r]
        keys = [e["key"] for r in results for e in r]
        assert len(ids) == len(set(ids)) == 400
        assert len(set(keys)) == 400
        assert set(keys) == {b64(key) for key in k.all_keys()}  # none lost, none invented
        # every key delivered at both ends is erased on both KMEs
        await wait_until(
            lambda: sum(k.store_a.counts().values()) + sum(k.store_b.counts().values()) == 0,
            timeout_s=20.0,
        )
        assert digests_equal(k)

    run(pki, tmp_path, scenario)


# -------------------------------------------------------------------------- the interface
def test_openapi_is_published_matches_docs_and_lists_every_route(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m:
            for server in (k.a, k.b):
                async with m.get(f"{server.url}/api/v1/openapi.json") as r:
                    assert r.status == 200
                    assert r.headers["Content-Type"].startswith("application/json")
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


def test_every_error_is_the_etsi_error_json(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m:
            for node in ("a", "b"):
                base = k.server(node).url
                st, err, _ = await call(m, "GET", f"{base}/api/v1/nothing")
                assert st == 404 and err == {"message": "no such resource"}
                st, err, _ = await call(m, "GET", f"{base}/api/v1/keys/sae-s/foo")
                assert st == 404
                st, err, headers = await call(m, "PUT", k.url(node, "sae-s", "enc_keys"))
                assert st == 405 and err == {"message": "method not allowed"}
                assert "POST" in headers["Allow"] and "GET" in headers["Allow"]
                st, err, headers = await call(m, "DELETE", k.url(node, "sae-s", "status"))
                assert st == 405 and "GET" in headers["Allow"]
                big = {"number": 1, "extension_optional": [{"pad": "x" * 300_000}]}
                st, err, _ = await call(m, "POST", k.url(node, "sae-s", "enc_keys"), json=big)
                assert st == 413 and "larger than" in err["message"]
                st, err, _ = await call(
                    m, "POST", k.url(node, "sae-s", "enc_keys"), data=b"x" * 300_000
                )
                assert st == 413
                # 503 with Retry-After (checked by ``call``)
                st, err, headers = await call(
                    m, "POST", k.url(node, "sae-s", "enc_keys"), json={"number": 100}
                )
                assert st == 503 and headers["Retry-After"] == "2"
            assert k.store_a.counts()[KeyState.DELIVERED] == 0

    run(pki, tmp_path, scenario)


def test_key_bytes_do_not_reach_logs_or_errors(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=16)
        errors: list[Any] = []
        with capture_logs() as logs:
            async with k.session("sae-m") as m, k.session("sae-s") as s:
                _, body = await get(m, k.url("a", "sae-s", "enc_keys"), params={"number": "2"})
                kid = body["keys"][0]["key_ID"]
                await get(s, k.url("b", "sae-m", "dec_keys"), params={"key_ID": kid})
                errors.append(await get(s, k.url("b", "sae-m", "dec_keys"), params={"key_ID": kid}))
                errors.append(await post(m, k.url("a", "sae-s", "enc_keys"), {"size": 100}))
                errors.append(await post(m, k.url("a", "sae-s", "enc_keys"), {"number": 50}))
                # activations that fail: refused, unconfirmed
                k.kme_b.service.peer_lost("test")
                errors.append(await post(m, k.url("a", "sae-s", "enc_keys"), {"number": 1}))
                await k.sync()
                k.kme_b.drop_replies = {"activate"}
                errors.append(await post(m, k.url("a", "sae-s", "enc_keys"), {"size": 512}))
                k.reconnect()
                await k.sync()
        assert any(e["event"] == "etsi.enc_keys" for e in logs)
        assert any(e["event"] == "keyservice.activation_unconfirmed" for e in logs)
        assert [st for st, _ in errors] == [400, 400, 503, 503, 503]
        text = repr(logs) + json.dumps(errors) + repr(k.a) + repr(k.a.api.service) + repr(k.pair.tx)
        data = k.data[0]
        for i in range(0, len(data), 8):
            chunk = data[i : i + 8]
            assert chunk.hex() not in text
            assert b64(chunk)[:8] not in text
        for e in body["keys"]:
            assert e["key"] not in text

    run(pki, tmp_path, scenario, activation_timeout_s=0.5)
