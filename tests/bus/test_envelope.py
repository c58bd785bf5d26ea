"""Envelope parsing: arbitrary bytes never escape as anything but EnvelopeError."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.bus.envelope import EnvelopeError, parse_request, request_bytes
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
