"""Parser hardening: the JSON the protocol refuses (deep nesting, non-UTF-8, NaN and
Infinity, duplicate keys...) is ``bad_json``, and every message that reaches the parser
gets exactly one reply, whatever fails behind it. Refusals are logged once per client
per interval, with the number not logged."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import structlog
from pydantic import BaseModel, field_validator

from qkdnode.bus.commands import CallerInfo, CommandSpec, CommandTable
from qkdnode.bus.envelope import MAX_JSON_DEPTH, EnvelopeError, parse_request
from qkdnode.client import Client, RemoteError
from tests.bus.conftest import raw_dealer

GOOD = {"v": 1, "id": "t-1", "type": "request", "ts": 1.5, "command": "status", "content": {}}


def good_bytes(**over: Any) -> bytes:
    return json.dumps({**GOOD, **over}).encode()


def nested(depth: int) -> Any:
    """``depth`` levels of arrays (depth 1: ``[]``)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


MALFORMED: list[tuple[str, bytes]] = [
    ("open_brackets_10000", b"[" * 10000),
    ("balanced_brackets_10000", b"[" * 10000 + b"]" * 10000),
    ("open_braces_10000", b'{"a":' * 10000),
    ("deep_content", good_bytes(content={"x": nested(MAX_JSON_DEPTH)})),
    ("invalid_utf8", b'{"v": 1, "id": "\xff\xfe"}'),
    ("overlong_utf8", b'{"v": 1, "id": "\xc0\xaf"}'),
    ("encoded_surrogate", b'{"v": 1, "id": "\xed\xa0\x80"}'),
    ("utf16", json.dumps(GOOD).encode("utf-16")),
    ("utf32", json.dumps(GOOD).encode("utf-32")),
    ("utf8_bom", b"\xef\xbb\xbf" + json.dumps(GOOD).encode()),
    ("nan_ts", good_bytes().replace(b"1.5", b"NaN")),
    ("infinity_ts", good_bytes().replace(b"1.5", b"Infinity")),
    ("minus_infinity_content", good_bytes(content={"x": 0}).replace(b'"x": 0', b'"x": -Infinity')),
    ("overflow_float", good_bytes().replace(b"1.5", b"1e999")),
    ("huge_integer", good_bytes(content={"x": 0}).replace(b'"x": 0', b'"x": ' + b"9" * 5000)),
    ("duplicate_command", good_bytes()[:-1] + b', "command": "keys.get"}'),
    ("duplicate_in_content", good_bytes(content={"n": 1}).replace(b'"n": 1', b'"n": 1, "n": 2')),
    ("empty", b""),
    ("truncated", good_bytes()[:-1]),
    ("trailing_garbage", good_bytes() + b" x"),
    ("nul_bytes", b"\x00" * 64),
    ("single_quotes", b"{'v': 1}"),
]


@pytest.mark.parametrize(("name", "body"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_parser_refuses_with_bad_json(name: str, body: bytes) -> None:
    with pytest.raises(EnvelopeError) as info:
        parse_request(body)
    assert info.value.code == "bad_json", info.value.message
    assert info.value.message and "\xff" not in info.value.message


def test_nesting_limit_is_exact() -> None:
    # the envelope is level 1, content level 2: content may hold MAX_JSON_DEPTH - 2 more
    env = parse_request(good_bytes(content={"x": nested(MAX_JSON_DEPTH - 2)}))
    assert env.content["x"] == nested(MAX_JSON_DEPTH - 2)
    with pytest.raises(EnvelopeError) as info:
        parse_request(good_bytes(content={"x": nested(MAX_JSON_DEPTH - 1)}))
    assert info.value.code == "bad_json"
    assert info.value.details == {"max_depth": MAX_JSON_DEPTH}


def test_strict_json_still_accepts_ordinary_requests() -> None:
    env = parse_request(good_bytes(content={"a": [1, 2.5, -3e10, "é", None, True], "b": {}}))
    assert env.content == {"a": [1, 2.5, -3e10, "é", None, True], "b": {}}
    # the same key in two different objects is not a duplicate
    env = parse_request(good_bytes(content={"x": {"id": 1}, "y": {"id": 2}}))
    assert env.content["y"] == {"id": 2}


def test_each_malformed_frame_gets_exactly_one_error_reply(start_inproc: Any) -> None:
    srv = start_inproc()
    sock = raw_dealer(srv.endpoint)
    for _, body in MALFORMED:
        sock.send_multipart([b"", body])
    sock.send_multipart([b"", good_bytes(id="last")])  # a marker: the good one comes last
    replies = []
    while sock.poll(1000):
        replies.append(json.loads(sock.recv_multipart()[1]))
    sock.close()
    assert len(replies) == len(MALFORMED) + 1
    errors, last = replies[:-1], replies[-1]
    assert [r["type"] for r in errors] == ["error"] * len(MALFORMED)
    assert [r["error"]["code"] for r in errors] == ["bad_json"] * len(MALFORMED)
    assert all(r["parent_id"] is None for r in errors)
    assert last["type"] == "reply" and last["parent_id"] == "last"


def _failing_table() -> CommandTable:
    class Exploding(BaseModel):
        x: int = 0

        @field_validator("x")
        @classmethod
        def _boom(cls, v: int) -> int:
            raise RuntimeError("validator bug")  # not a ValueError: escapes pydantic

    async def ok(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {}

    async def too_deep(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {"x": nested(100_000)}  # json.dumps hits the recursion limit

    async def nan(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {"x": float("nan")}

    return CommandTable(
        [
            CommandSpec("exploding", ok, None, "monitor", Exploding),
            CommandSpec("too_deep", too_deep, None, "monitor"),
            CommandSpec("nan", nan, None, "monitor"),
        ]
    )


def test_failures_behind_the_parser_still_get_one_reply(start_inproc: Any) -> None:
    srv = start_inproc(table=_failing_table())
    sock = raw_dealer(srv.endpoint)
    cases = [("exploding", {"x": 1}), ("too_deep", {}), ("nan", {})]
    for name, content in cases:
        sock.send_multipart([b"", good_bytes(id=name, command=name, content=content)])
    replies = []
    while sock.poll(1000):
        replies.append(json.loads(sock.recv_multipart()[1]))
    sock.close()
    assert sorted(r["parent_id"] for r in replies) == sorted(n for n, _ in cases)
    assert {r["error"]["code"] for r in replies} == {"internal"}
    assert all("validator bug" not in r["error"]["message"] for r in replies)
    with Client(srv.endpoint, timeout_s=3) as c:  # and the server goes on
        assert c.call("ping")["pong"] is True


def test_refusals_logged_once_per_client_per_interval(start_inproc: Any) -> None:
    srv = start_inproc()
    srv.server._refusal_log.interval_s = 0.5
    a, b = raw_dealer(srv.endpoint), raw_dealer(srv.endpoint)
    with structlog.testing.capture_logs() as logs:
        for _ in range(30):
            a.send_multipart([b"", b"{bad"])
        b.send_multipart([b"", b"{bad"])
        got = 0
        while got < 31 and (a.poll(2000) or b.poll(2000)):
            for sock in (a, b):
                while sock.poll(0):
                    sock.recv_multipart()
                    got += 1
        assert got == 31
        time.sleep(0.6)
        a.send_multipart([b"", good_bytes(v=7)])
        assert a.poll(2000)
        a.recv_multipart()
    a.close()
    b.close()
    refused = [e for e in logs if e["event"] == "bus.control.refused"]
    by_client: dict[str, list[dict[str, Any]]] = {}
    for e in refused:
        by_client.setdefault(e["client"], []).append(e)
    assert len(by_client) == 2
    first_a, first_b = sorted(by_client.values(), key=len, reverse=True)
    assert [e["suppressed"] for e in first_b] == [0]
    assert [e["suppressed"] for e in first_a] == [0, 29]
    assert [e["code"] for e in first_a] == ["bad_json", "unsupported_version"]
    assert all(e["client"].startswith("plaintext:") for e in refused)
    assert srv.server.stats["refusals_not_logged"] == 29


def test_refusal_log_names_curve_clients(start_inproc: Any, keys: Any) -> None:
    srv = start_inproc(curve=True)
    with structlog.testing.capture_logs() as logs:
        with Client(srv.endpoint, keys.server[0], keys.monitor, timeout_s=3) as mon:
            for _ in range(5):
                with pytest.raises(RemoteError):
                    mon.call("start")
        with (
            Client(srv.endpoint, keys.server[0], keys.operator, timeout_s=3) as op,
            pytest.raises(RemoteError),
        ):
            op.call("nope")
    refused = [e for e in logs if e["event"] == "bus.control.refused"]
    assert [(e["client"], e["code"]) for e in refused] == [
        ("bob", "forbidden"),
        ("alice", "unknown_command"),
    ]
