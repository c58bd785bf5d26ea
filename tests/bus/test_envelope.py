"""Envelope parsing: arbitrary bytes never escape as anything but EnvelopeError."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.bus.envelope import (
    EnvelopeError,
    dumps,
    parse_canonical,
    parse_request,
    request_bytes,
)
from qkdnode.bus.ratelimit import TokenBuckets

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    try:
        parse_request(data)
    except EnvelopeError as exc:
        assert exc.code in {"bad_json", "bad_envelope", "unsupported_version", "unknown_type"}


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "id", "type", "ts", "command", "content", "x"]),
        json_values,
        max_size=7,
    )
)
def test_random_envelopes(fields: dict[str, object]) -> None:
    try:
        env = parse_request(json.dumps(fields).encode())
    except EnvelopeError as exc:
        assert exc.message and isinstance(exc.details, dict)
    else:
        assert env.v == 1 and env.type in ("request", "heartbeat")


def test_roundtrip() -> None:
    env = parse_request(request_bytes("c-1", "keys.get", {"number": 2}))
    assert (env.id, env.command, env.content, env.type) == (
        "c-1",
        "keys.get",
        {"number": 2},
        "request",
    )
    assert parse_request(request_bytes("c-2", None, {}, "heartbeat")).type == "heartbeat"


def test_token_buckets() -> None:
    tb = TokenBuckets(10, burst=5)
    verdicts = [tb.take(b"a", now=0.0) for _ in range(8)]
    assert verdicts[:5] == [1] * 5 and verdicts[5] == 0
    assert tb.take(b"b", now=0.0) == 1  # other clients unaffected
    assert [tb.take(b"a", now=0.0) for _ in range(20)][-1] == -1  # persistent flood: dropped
    assert tb.take(b"a", now=10.0) == 1  # refilled after a pause


def _agrees_with_the_general_parser(body: bytes) -> bool:
    """parse_canonical(body) is None, or parse_request accepts body with the same id,
    type, command and empty content. Returns whether the canonical parse matched."""
    canonical = parse_canonical(body)
    if canonical is None:
        return False
    env = parse_request(body)
    assert (env.id, env.type, env.command, env.content) == (*canonical, {}), body
    return True


@pytest.mark.parametrize(
    ("msg_id", "command", "mtype"),
    [
        ("c1a2b3c4-1", "status", "request"),
        ("x", "alarms", "request"),
        ("A" * 64, "keys.digest", "request"),
        ("id_with.colon:and-dash", "sim.inject", "request"),
        ("c9-77", None, "heartbeat"),
    ],
)
def test_canonical_requests_take_the_fast_parse_with_the_same_result(
    msg_id: str, command: str | None, mtype: str
) -> None:
    assert _agrees_with_the_general_parser(request_bytes(msg_id, command, {}, mtype))


@pytest.mark.parametrize(
    "body",
    [
        b'{"v":1,"id":"a","type":"request","ts":1.5,"command":"status","content":{"x":1}}',
        b'{"v":1, "id":"a","type":"request","ts":1.5,"command":"status","content":{}}',
        b'{"id":"a","v":1,"type":"request","ts":1.5,"command":"status","content":{}}',
        b'{"v":1,"id":"a\\"b","type":"request","ts":1.5,"command":"status","content":{}}',
        b'{"v":1,"id":"a","type":"request","ts":1e999,"command":"status","content":{}}',
        b'{"v":1,"id":"a","type":"request","ts":NaN,"command":"status","content":{}}',
        b'{"v":1,"id":"a","type":"request","ts":01,"command":"status","content":{}}',
        b'{"v":1,"id":"a","type":"request","ts":1.5}',
        b'{"v":2,"id":"a","type":"request","ts":1.5,"command":"status","content":{}}',
        b'{"v":1,"id":"' + b"a" * 65 + b'","type":"request","ts":1.5,"command":"status",'
        b'"content":{}}',
        b'{"v":1,"id":"a","type":"request","ts":1.5,"command":"Status","content":{}}',
        b'{"v":1,"id":"a","type":"request","ts":1.5,"command":"status","content":{}}\n',
        b'{"v":1,"id":"a","type":"reply","ts":1.5,"command":"status","content":{}}',
    ],
)
def test_anything_else_is_left_to_the_general_parser(body: bytes) -> None:
    assert parse_canonical(body) is None


def test_mutated_canonical_requests_never_disagree_with_the_general_parser() -> None:
    """An attacker's byte edits of a canonical request: whenever the fast parse still
    matches, the general parser accepts the same request."""
    rng = random.Random(7)
    base = request_bytes("c0123abcd-42", "status", {})
    alphabet = b'{}[]",:.-+eE0123456789 \\azZ_'
    matched = 0
    for _ in range(20_000):
        body = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(body))
            op = rng.random()
            if op < 0.4:
                body[i] = rng.choice(alphabet)
            elif op < 0.7:
                del body[i]
            else:
                body.insert(i, rng.choice(alphabet))
        try:
            matched += _agrees_with_the_general_parser(bytes(body))
        except EnvelopeError as exc:  # pragma: no cover - the failure shown
            pytest.fail(f"fast parse accepted what the protocol refuses: {bytes(body)!r}: {exc}")
    assert matched > 100  # the edits that keep the form (digits of ts or id) were tried


@pytest.mark.parametrize(
    ("msg_id", "command", "content", "mtype"),
    [
        ("c1a2b3c4-1", "status", {}, "request"),
        ("c1a2b3c4-2", None, {}, "heartbeat"),
        ('quote"d', "status", {}, "request"),
        ("c1-3", "status\n", {}, "request"),
        ("c1-4", "Status", {}, "request"),
        ("c1-5", "keys.get", {"number": 1}, "request"),
        ("é", "status", {}, "request"),
    ],
)
def test_request_bytes_are_what_the_general_encoder_writes(
    msg_id: str, command: str | None, content: dict[str, object], mtype: str
) -> None:
    body = request_bytes(msg_id, command, content, mtype)
    data = json.loads(body)
    expected: dict[str, object] = {"v": 1, "id": msg_id, "type": mtype, "ts": data["ts"]}
    if command is not None:
        expected |= {"command": command, "content": content}
    assert body == dumps(expected)
