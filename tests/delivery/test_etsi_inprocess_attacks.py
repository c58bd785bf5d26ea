"""Attacks on ETSI 014 delivery through two in-process KMEs: IDs an SAE has no right to,
concurrent and replayed fetches, replayed or forged activations on the peer channel, lost
peer messages, revoked certificates. The same against two real daemons is in
``test_two_kmes.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from qkdnode.delivery.pki import revoke_cert
from qkdnode.delivery.revocation import RevocationChecker
from qkdnode.keystore import KeyState
from qkdnode.keystore.models import EraseReason
from qkdnode.link import LinkError, LinkRequest

from .conftest import (
    Kmes,
    Pki,
    get,
    ids_body,
    make_pki,
    post,
    run,
    unknown_message,
    wait_until,
)


def test_every_id_a_slave_cannot_have_gets_the_same_400(pki: Pki, tmp_path: Path) -> None:
    """Never issued, guessed, of the KME's own parity, of another pair, for another slave,
    already fetched, at the wrong KME: one answer, the same text, nothing consumed."""

    async def scenario(k: Kmes) -> None:
        (block,) = k.add_blocks(1, keys_per_block=32)
        ids_a = k.store_a.key_ids_of_block(block)  # index i -> ID, same on both KMEs
        assert ids_a == k.store_b.key_ids_of_block(block)
        async with (
            k.session("sae-m") as m,
            k.session("sae-s") as s,
            k.session("sae-s2") as s2,
            k.session("sae-x") as x,
        ):
            st, mine = await post(m, k.url("a", "sae-s", "enc_keys"), {"number": 3})
            assert st == 200
            mine_ids = [e["key_ID"] for e in mine["keys"]]
            st, other_pair = await get(x, k.url("a", "sae-y", "enc_keys"))
            assert st == 200
            st, fetched = await get(m, k.url("a", "sae-s", "enc_keys"))
            assert st == 200
            fetched_id = fetched["keys"][0]["key_ID"]
            st, _ = await post(s, k.url("b", "sae-m", "dec_keys"), ids_body([fetched_id]))
            assert st == 200
            st, from_b = await get(m, k.url("b", "sae-s", "enc_keys"))
            assert st == 200
            assert [uuid.UUID(e["key_ID"]) for e in mine["keys"]] == [ids_a[i] for i in (0, 2, 4)]

            dec_b, dec_a = k.url("b", "sae-m", "dec_keys"), k.url("a", "sae-m", "dec_keys")
            attempts: list[tuple[Any, str, str]] = [
                (s, dec_b, str(uuid.uuid4())),  # guessed
                (s, dec_b, str(uuid.UUID(int=0))),  # not even a version-4 ID
                (s, dec_b, str(ids_a[20])),  # a real key of A's parity, never activated
                (s, dec_b, str(ids_a[21])),  # a real key of B's own parity
                (s, dec_b, other_pair["keys"][0]["key_ID"]),  # activated for sae-x/sae-y
                (s2, dec_b, mine_ids[0]),  # sae-m's key, for sae-s only
                (s, dec_b, fetched_id),  # already fetched
                (s, dec_a, mine_ids[1]),  # issued by A: not redeemable at A
                (s, dec_b, from_b["keys"][0]["key_ID"]),  # issued by B: not redeemable at B
            ]
            before = (k.store_a.digest(), k.store_b.digest())
            for client, url, kid in attempts:
                for req in (
                    get(client, url, params={"key_ID": kid}),
                    post(client, url, ids_body([kid])),
                ):
                    st, err = await req
                    assert st == 400, (kid, err)
                    assert err == {"message": unknown_message(kid)}, (kid, err)
                # all or nothing: a good ID next to a bad one is not consumed
                st, err = await post(client, url, ids_body([mine_ids[2], kid]))
                assert st == 400
            assert (k.store_a.digest(), k.store_b.digest()) == before
            # the rightful slave still gets every key it was given
            st, got = await post(s, dec_b, ids_body(mine_ids))
            assert st == 200 and got == mine
            st, got = await post(s, dec_a, ids_body([from_b["keys"][0]["key_ID"]]))
            assert st == 200 and got == from_b

    run(pki, tmp_path, scenario)


def test_expired_key_gets_the_same_400_and_is_erased_on_both(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            st, got = await get(m, k.url("a", "sae-s", "enc_keys"))
            assert st == 200
            kid = got["keys"][0]["key_ID"]
            await asyncio.sleep(1.2)
            st, err = await get(s, k.url("b", "sae-m", "dec_keys"), params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)
            for store in (k.store_a, k.store_b):
                store.erase_due()
                assert store.key_info(uuid.UUID(kid)) is None
                assert store.erase_reason(uuid.UUID(kid)) is EraseReason.EXPIRED
            assert (
                k.store_a.digest()
                == k.store_b.digest()
                == {
                    "count": 0,
                    "sha256": k.store_a.digest()["sha256"],
                }
            )

    run(pki, tmp_path, scenario, key_ttl_s=1.0)


def test_concurrent_fetches_of_one_id_deliver_it_once(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            for issuer, peer in (("a", "b"), ("b", "a")):
                st, got = await get(m, k.url(issuer, "sae-s", "enc_keys"))
                assert st == 200
                kid = got["keys"][0]["key_ID"]
                dec = k.url(peer, "sae-m", "dec_keys")
                results = await asyncio.gather(
                    *(
                        get(s, dec, params={"key_ID": kid})
                        if i % 2
                        else post(s, dec, ids_body([kid]))
                        for i in range(20)
                    )
                )
                ok = [body for st, body in results if st == 200]
                assert ok == [got]
                assert all(
                    body == {"message": unknown_message(kid)} for st, body in results if st != 200
                )

    run(pki, tmp_path, scenario)


def _record_activations(k: Kmes, kme: str) -> list[dict[str, Any]]:
    """The ``activate`` requests KME ``kme`` receives on the peer channel."""
    target = k.kme_b if kme == "b" else k.kme_a
    seen: list[dict[str, Any]] = []
    inner = target.link.handler
    assert inner is not None

    async def handler(req: LinkRequest) -> dict[str, Any]:
        if req.step == "activate":
            seen.append(req.args["activation"])
        return await inner(req)

    target.link.handler = handler
    return seen


def test_replayed_or_forged_activations_never_reopen_a_key(pki: Pki, tmp_path: Path) -> None:
    """An activation replayed or altered on the peer channel (a duplicated message, a
    faulty peer) cannot give a key to another pair, or a second time to one slave."""

    async def scenario(k: Kmes) -> None:
        (block,) = k.add_blocks(1, keys_per_block=16)
        seen = _record_activations(k, "b")

        async def activate(activation: dict[str, Any]) -> dict[str, Any]:
            return await k.kme_a.link.request("activate", 5.0, activation=activation)

        async with (
            k.session("sae-m") as m,
            k.session("sae-s") as s,
            k.session("sae-s2") as s2,
            k.session("sae-y") as y,
        ):
            dec = k.url("b", "sae-m", "dec_keys")
            st, got = await post(
                m, k.url("a", "sae-s", "enc_keys"), {"additional_slave_SAE_IDs": ["sae-s2"]}
            )
            assert st == 200
            kid = got["keys"][0]["key_ID"]
            (original,) = seen
            # an identical repeat before anyone fetched is accepted and changes nothing
            assert (await activate(original))["activated"] is True
            # the same key for another pair: refused
            forged = {**original, "master": "sae-x", "slaves": ["sae-y"]}
            reply = await activate(forged)
            assert reply["activated"] is False and reply["refusal"] == "not_available"
            st, err = await get(y, k.url("b", "sae-x", "dec_keys"), params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)
            # one more slave added to the same key: refused
            wider = {**original, "slaves": ["sae-s", "sae-s2", "sae-y"]}
            assert (await activate(wider))["activated"] is False
            # a key of B's own parity "issued" by A: refused
            own = str(k.store_b.key_ids_of_block(block)[1])
            bogus = {**original, "keys": [{"key_ID": own, "size_bits": 256, "parts": [own]}]}
            reply = await activate(bogus)
            assert reply["activated"] is False and reply["refusal"] == "bad_request"
            # sae-s fetches; a replay does not let it fetch again
            st, back = await get(s, dec, params={"key_ID": kid})
            assert st == 200 and back == got
            assert (await activate(original))["activated"] is True  # identical repeat
            st, err = await get(s, dec, params={"key_ID": kid})
            assert st == 400 and err["message"] == unknown_message(kid)
            info = k.store_b.key_info(uuid.UUID(kid))
            assert info is not None and info.fetched_by == ("sae-s",)
            # sae-s2 fetches: the key is gone; replays are refused from now on
            st, back = await get(s2, dec, params={"key_ID": kid})
            assert st == 200 and back == got
            reply = await activate(original)
            assert reply["activated"] is False and reply["refusal"] == "not_available"
            for client in (s, s2):
                st, err = await get(client, dec, params={"key_ID": kid})
                assert st == 400 and err["message"] == unknown_message(kid)
            await wait_until(lambda: k.store_a.key_info(uuid.UUID(kid)) is None)
            assert k.store_a.digest() == k.store_b.digest()

    run(pki, tmp_path, scenario)


def test_lost_release_is_repaired_by_the_key_id_sync(pki: Pki, tmp_path: Path) -> None:
    """The activation reply is lost, and so is the release: the peer still holds the
    reservation; the next key-ID sync erases it on both KMEs."""

    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=16)
        inner = k.kme_b.link.handler
        assert inner is not None

        async def handler(req: LinkRequest) -> dict[str, Any]:
            if req.step == "release":
                raise LinkError("test: release lost")
            return await inner(req)

        k.kme_b.link.handler = handler
        k.kme_b.drop_replies = {"activate"}
        live_before = set(k.store_a.key_ids_of_block(0))
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            st, err = await post(m, k.url("a", "sae-s", "enc_keys"), {"number": 2})
            assert st == 503 and "did not confirm" in err["message"]
            lost = live_before - set(k.store_a.key_ids_of_block(0))
            assert len(lost) == 2
            for kid in lost:
                assert k.store_a.erase_reason(kid) is EraseReason.UNCERTAIN
                info = k.store_b.key_info(kid)
                assert info is not None and info.state is KeyState.RESERVED
            # the channel goes down and comes back: the sync repairs it
            for kme in (k.kme_a, k.kme_b):
                kme.service.peer_lost("test: channel lost")
            k.reconnect()
            k.kme_b.link.handler = inner
            await k.sync()
            assert k.store_a.digest() == k.store_b.digest()
            for kid in lost:
                assert k.store_b.key_info(kid) is None
                assert k.store_b.erase_reason(kid) is EraseReason.UNCERTAIN
                st, err = await get(s, k.url("b", "sae-m", "dec_keys"), params={"key_ID": str(kid)})
                assert st == 400 and err["message"] == unknown_message(str(kid))

    run(pki, tmp_path, scenario, activation_timeout_s=0.5)


def test_lost_delivery_notice_is_repaired_by_the_key_id_sync(pki: Pki, tmp_path: Path) -> None:
    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=8)
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            st, got = await get(m, k.url("a", "sae-s", "enc_keys"))
            assert st == 200
            kid = uuid.UUID(got["keys"][0]["key_ID"])
            k.kme_b.connected = False  # the notice B sends after the delivery is lost
            st, back = await get(s, k.url("b", "sae-m", "dec_keys"), params={"key_ID": str(kid)})
            assert st == 200 and back == got
            await asyncio.sleep(0.1)
            info = k.store_a.key_info(kid)
            assert info is not None and info.state is KeyState.DELIVERED
            assert k.store_b.erase_reason(kid) is EraseReason.DELIVERED
            k.reconnect()
            await k.sync()
            assert k.store_a.key_info(kid) is None
            assert k.store_a.erase_reason(kid) is EraseReason.DELIVERED
            assert k.store_a.digest() == k.store_b.digest()

    run(pki, tmp_path, scenario)


def test_revoked_certificate_gets_401_and_reload_picks_up_new_revocations(
    tmp_path: Path,
) -> None:
    own = make_pki(tmp_path / "pki", tmp_path / "rogue")
    crl = revoke_cert(own.dir, "stranger")  # a CRL that does not list any SAE yet
    # KME A: a checker built here; KME B: from delivery.crl_file
    checker_a = RevocationChecker.from_file(crl, ca_file=own.ca)

    async def scenario(k: Kmes) -> None:
        k.add_blocks(1, keys_per_block=16)
        assert k.b.api.revocation.current is not None
        async with k.session("sae-m") as m, k.session("sae-s") as s:
            st, got = await get(m, k.url("a", "sae-s", "enc_keys"), params={"number": "2"})
            assert st == 200
            ids = [e["key_ID"] for e in got["keys"]]
            revoke_cert(own.dir, "sae-m")
            # the new list is in use once reloaded (SIGHUP in the daemon)
            assert k.a.api.revocation.reload() is not None
            stored = k.store_a.available_for_enc()
            for method, what, kw in (
                ("get", "enc_keys", {}),
                ("post", "enc_keys", {"json": {"number": 1}}),
                ("get", "status", {}),
            ):
                async with getattr(m, method)(k.url("a", "sae-s", what), **kw) as r:
                    assert r.status == 401
                    assert (await r.json()) == {"message": "client certificate is revoked"}
            async with m.get(f"{k.a.url}/api/v1/openapi.json") as r:
                assert r.status == 401
            assert k.store_a.available_for_enc() == stored
            # KME B still uses its old list until it reloads
            st, _ = await get(m, k.url("b", "sae-s", "status"))
            assert st == 200
            k.b.api.revocation.reload()
            st, err = await get(m, k.url("b", "sae-s", "status"))
            assert st == 401 and err["message"] == "client certificate is revoked"
            # the slave is not revoked: it still gets a key issued before
            st, back = await get(s, k.url("b", "sae-m", "dec_keys"), params={"key_ID": ids[0]})
            assert st == 200 and back["keys"] == got["keys"][:1]
            # once the slave is revoked too, it gets nothing, and the key is not used up
            revoke_cert(own.dir, "sae-s")
            for server in (k.a, k.b):
                server.api.revocation.reload()
            st, err = await get(s, k.url("b", "sae-m", "dec_keys"), params={"key_ID": ids[1]})
            assert st == 401 and err["message"] == "client certificate is revoked"
            info = k.store_b.key_info(uuid.UUID(ids[1]))
            assert info is not None and info.state is KeyState.RESERVED and info.fetched_by == ()

    (tmp_path / "kmes").mkdir()
    run(own, tmp_path / "kmes", scenario, revocation_a=checker_a, crl_file=crl)
