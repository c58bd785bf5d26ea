"""Relay across trusted nodes: key managers over real peer channels and key stores."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from qkdnode.keystore.errors import KeyRequestError, KeysUnavailableError, UnknownKeyError
from qkdnode.kms.hopauth import TAG_KEY_BITS
from tests.kms.harness import KEY_SIZE_BITS, Net, build

LINE5 = ["A", "B", "C", "D", "E"]
LINKS5 = [("A-B", "A", "B"), ("B-C", "B", "C"), ("C-D", "C", "D"), ("D-E", "D", "E")]
SAES = {"sae-a": "A", "sae-b": "B", "sae-e": "E", "sae-x": "E"}


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def consumed(net: Net, link_id: str, site: str) -> dict[str, int]:
    return net.store(link_id, site).consumed_counts()


@pytest.mark.parametrize(("dest_sae", "hops"), [("sae-b", 1), ("sae-e", 4)])
def test_relay_gives_both_ends_the_same_key_and_costs_exactly_its_length(
    tmp_path: Path, dest_sae: str, hops: int
) -> None:
    async def go() -> None:
        net = await build(tmp_path, LINE5, LINKS5, SAES)
        try:
            await net.wait_routes()
            keys = await net.kms["A"].issue("sae-a", [dest_sae], 3, 512)
            assert len(keys) == 3 and all(len(k.key) == 64 for k in keys)
            dest = "B" if hops == 1 else "E"
            got = await net.kms[dest].claim("sae-a", dest_sae, [k.key_id for k in keys])
            assert [g.key for g in got] == [k.key for k in keys]
            # accounting: every link of the path spent exactly 3 x 512 bits of relayed key
            # (both ends erased the same stored keys) plus two tags
            path = LINKS5[:hops]
            for link_id, a, b in LINKS5:
                ca, cb = consumed(net, link_id, a), consumed(net, link_id, b)
                on_path = (link_id, a, b) in path
                want_relay = 3 * 512 // KEY_SIZE_BITS if on_path else 0
                want_auth = 2 * TAG_KEY_BITS // KEY_SIZE_BITS if on_path else 0
                assert ca == cb == {"relayed": want_relay, "authentication": want_auth}, link_id
                acc_a = net.kms[a].hops[link_id].account
                acc_b = net.kms[b].hops[link_id].account
                assert acc_a.relay_out + acc_b.relay_out == (3 * 512 if on_path else 0)
                assert acc_a.relay_out + acc_b.relay_out == acc_a.relay_in + acc_b.relay_in
            # a second fetch, or another slave, gets nothing
            with pytest.raises(UnknownKeyError):
                await net.kms[dest].claim("sae-a", dest_sae, [keys[0].key_id])
        finally:
            await net.close()

    run(go())


def test_wrong_slave_or_master_at_the_far_end_gets_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        net = await build(tmp_path, LINE5, LINKS5, SAES)
        try:
            await net.wait_routes()
            keys = await net.kms["A"].issue("sae-a", ["sae-e"], 1, 256)
            ids = [keys[0].key_id]
            for master, slave in (("sae-a", "sae-x"), ("sae-b", "sae-e"), ("sae-x", "sae-e")):
                with pytest.raises(UnknownKeyError) as info:
                    await net.kms["E"].claim(master, slave, ids)
                assert "unknown, already delivered, or not issued" in str(info.value)
            # a key never issued gets the same answer
            with pytest.raises(UnknownKeyError):
                await net.kms["E"].claim("sae-a", "sae-e", [uuid.uuid4()])
            got = await net.kms["E"].claim("sae-a", "sae-e", ids)
            assert got[0].key == keys[0].key
        finally:
            await net.close()

    run(go())


def test_dry_link_on_the_only_path_refuses_cleanly(tmp_path: Path) -> None:
    async def go() -> None:
        net = await build(tmp_path, LINE5, LINKS5, SAES, keys_per_link=0)
        try:
            for link_id in ("A-B", "B-C", "D-E"):
                net.fill(link_id, 50)
            net.fill("C-D", 2)  # 2 stored keys per side-parity pair: too little
            await net.wait_routes()
            before = {lk: consumed(net, lk[0], lk[1]) for lk in LINKS5 for _ in [0]}
            with pytest.raises(KeysUnavailableError) as info:
                await net.kms["A"].issue("sae-a", ["sae-e"], 4, 512)
            assert "no path to site E" in str(info.value)
            # refused before anything was spent
            assert {lk: consumed(net, lk[0], lk[1]) for lk in LINKS5} == before
        finally:
            await net.close()

    run(go())


def test_request_errors(tmp_path: Path) -> None:
    async def go() -> None:
        net = await build(tmp_path, LINE5, LINKS5, SAES, keys_per_link=4)
        try:
            with pytest.raises(KeyRequestError, match="not in the network directory"):
                await net.kms["A"].issue("sae-a", ["nobody"], 1, 256)
            with pytest.raises(KeyRequestError, match="same site"):
                await net.kms["A"].issue("sae-a", ["sae-b", "sae-e"], 1, 256)
            with pytest.raises(KeyRequestError, match="at this site"):
                await net.kms["E"].issue("sae-x", ["sae-e"], 1, 256)
        finally:
            await net.close()

    run(go())


BYPASS = [*LINKS5, ("B-D", "B", "D")]


def test_cut_link_relays_move_to_the_bypass(tmp_path: Path) -> None:
    """C-D is cut: the next relays go A-B-D-E; nothing is half delivered."""

    async def go() -> None:
        net = await build(tmp_path, LINE5, BYPASS, SAES, costs={"B-D": 3.0}, avoid_failed_s=30.0)
        try:
            await net.wait_routes()
            route = net.kms["A"].route_to("E", 256)
            assert route is not None and route.links == ("A-B", "B-C", "C-D", "D-E")
            first = await net.kms["A"].issue("sae-a", ["sae-e"], 1, 256)
            await net.links["C-D"].cut()
            # the very next request already succeeds: over C-D it fails at C, and A
            # tries again on the path that avoids C-D
            second = await net.kms["A"].issue("sae-a", ["sae-e"], 1, 256)
            for keys in (first, second):
                got = await net.kms["E"].claim("sae-a", "sae-e", [keys[0].key_id])
                assert got[0].key == keys[0].key
            assert consumed(net, "B-D", "B")["relayed"] == 1
            assert consumed(net, "B-D", "D")["relayed"] == 1
            # once the adverts say C-D is down, routes avoid it from the start
            await asyncio.sleep(2.0)
            route = net.kms["A"].route_to("E", 256)
            assert route is not None and route.links == ("A-B", "B-D", "D-E")
        finally:
            await net.close()

    run(go())


def _relay_header(net: Net) -> tuple[dict, list[bytes]]:  # type: ignore[type-arg]
    """A relay request from A to B, as A would send it (keys drawn from A-B)."""
    from qkdnode.keystore.models import EraseReason
    from qkdnode.kms.wire import RelayedKey, RelayRequest

    store = net.store("A-B", "A")
    parts = store.consume_own(256, EraseReason.RELAYED)
    body = RelayRequest(
        relay_id=uuid.uuid4(),
        origin="A",
        destination="B",
        path=["A", "B"],
        hop=1,
        master="sae-a",
        slaves=["sae-b"],
        mode="key",
        keys=[RelayedKey(key_ID=uuid.uuid4(), size_bits=256)],
        parts=[kid for kid, _ in parts],
        budget_s=3.0,
    )
    return {"rid": 999, "body": body.model_dump(mode="json")}, []


async def _reply(net: Net, header: dict, buffers: list[bytes]) -> dict:  # type: ignore[type-arg]
    """Send ``header`` on A's end of A-B as a kms.req; B's reply header."""
    port = net.links["A-B"].port_a
    got: asyncio.Future[dict] = asyncio.get_running_loop().create_future()  # type: ignore[type-arg]
    hop = net.kms["A"].hops["A-B"]
    original = hop._on_message

    def spy(kind: str, head: dict, bufs: list[bytes]) -> None:  # type: ignore[type-arg]
        if kind == "kms.rep" and head.get("rid") == header["rid"] and not got.done():
            got.set_result(head)
        original(kind, head, bufs)

    port.attach(spy, hop._on_lost)
    await port.send("kms.req", header, buffers)
    async with asyncio.timeout(5):
        return await got


def test_relay_with_a_forged_or_missing_tag_is_refused_and_stores_nothing(
    tmp_path: Path,
) -> None:
    from qkdnode.keystore.models import EraseReason
    from qkdnode.kms import hopauth

    async def go() -> None:
        net = await build(tmp_path, LINE5, LINKS5, SAES)
        try:
            await net.wait_routes()
            # no tag at all
            header, bufs = _relay_header(net)
            rep = await _reply(net, header, bufs)
            assert "refused" in rep["error"] and "tag" in rep["error"]
            # a tag made with a key B does not hold (guessed IDs)
            header, bufs = _relay_header(net)
            header["rid"] = 1000
            header["auth"] = {"key_ids": [str(uuid.uuid4())], "tag": "00" * 16}
            rep = await _reply(net, header, bufs)
            assert "refused" in rep["error"]
            # a real tag key, but the message changed after tagging
            header, bufs = _relay_header(net)
            header["rid"] = 1001
            tag_key = net.store("A-B", "A").consume_own(256, EraseReason.AUTHENTICATION)
            msg = hopauth.canonical("A-B", "A", "kms.req", header, bufs)
            tag = hopauth.tag(tag_key[0][1], msg).hex()
            header["body"]["slaves"] = ["sae-x"]  # the attacker's edit
            header["auth"] = {"key_ids": [str(tag_key[0][0])], "tag": tag}
            rep = await _reply(net, header, bufs)
            assert "refused" in rep["error"] and "tag" in rep["error"]
            assert net.kms["B"].hops["A-B"].account.tags_refused >= 2
            assert net.kms["B"].store.counts()["held"] == 0
            # the same message replayed with its (now used) tag key: refused too
            header["body"]["slaves"] = ["sae-b"]
            header["rid"] = 1002
            rep = await _reply(net, header, bufs)
            assert "refused" in rep["error"]
            assert net.kms["B"].store.counts()["held"] == 0
        finally:
            await net.close()

    run(go())


def test_relay_whose_destination_never_answers_fails_at_both_ends(tmp_path: Path) -> None:
    async def go() -> None:
        net = await build(tmp_path, LINE5, LINKS5, SAES, relay_timeout_s=2.0)
        try:
            await net.wait_routes()
            # E's key manager stops: D's requests on D-E go unanswered
            for hop in net.kms["E"].hops.values():
                hop.port.attach(lambda *a: None, lambda r: None)
            with pytest.raises(KeysUnavailableError) as info:
                await net.kms["A"].issue("sae-a", ["sae-e"], 1, 256)
            assert "site E" in str(info.value)
            assert net.kms["E"].store.counts()["held"] == 0
            assert net.kms["A"].stats.cancels_sent >= 1
        finally:
            await net.close()

    run(go())


def test_no_key_byte_in_any_log_line_of_any_site(tmp_path: Path) -> None:
    """Every site's log events during relays, searched for every relayed key and every
    pad and tag key the links spent, in raw, hex and base64 form."""
    import base64

    import structlog

    async def go() -> list[dict[str, Any]]:
        net = await build(tmp_path, LINE5, LINKS5, SAES)
        try:
            await net.wait_routes()
            with structlog.testing.capture_logs() as events:
                keys = await net.kms["A"].issue("sae-a", ["sae-e"], 4, 256)
                got = await net.kms["E"].claim("sae-a", "sae-e", [k.key_id for k in keys])
                assert [g.key for g in got] == [k.key for k in keys]
            secrets = [k.key for k in keys]
            return [*events, {"secrets": secrets}]
        finally:
            await net.close()

    *events, holder = asyncio.run(go())
    secrets: list[bytes] = holder["secrets"]
    text = repr(events)
    assert any(e.get("event") == "kms.relayed" for e in events)
    for secret in secrets:
        for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]):
            for at in range(0, len(form) - 16, 8):
                assert form[at : at + 16] not in text
