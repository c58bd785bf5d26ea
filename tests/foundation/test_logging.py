"""Logging pipeline: JSON lines, context binding, stdlib routing, and redaction."""

from __future__ import annotations

import base64
import io
import json
import logging
import os

import numpy as np
import structlog

from qkdnode.log import Secret, bind_context, bound_context, configure_logging


def _capture() -> io.StringIO:
    buf = io.StringIO()
    configure_logging("debug", stream=buf, json=True)
    structlog.contextvars.clear_contextvars()
    return buf


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_with_bound_context() -> None:
    buf = _capture()
    bind_context(node_id="alice", role="transmitter")
    with bound_context(block_id=7):
        structlog.get_logger("t").info("block_done", detections=10)
    structlog.get_logger("t").info("after")
    logging.getLogger("pyvisa").warning("from stdlib %s", "pyvisa")
    a, b, c = _lines(buf)
    assert a["event"] == "block_done" and a["block_id"] == 7 and a["node_id"] == "alice"
    assert "block_id" not in b and b["role"] == "transmitter"
    assert (
        c["event"] == "from stdlib pyvisa" and c["logger"] == "pyvisa" and c["level"] == "warning"
    )


def test_key_material_never_reaches_a_log_line() -> None:
    buf = _capture()
    key = os.urandom(32)
    renderings = [key.hex(), base64.b64encode(key).decode(), repr(key), key.hex().upper()]
    bits = np.unpackbits(np.frombuffer(key, dtype=np.uint8))
    log = structlog.get_logger("t")
    log.info("oops_bytes", value=key)
    log.info("oops_secret", value=Secret(key))
    log.info("oops_array", value=bits)
    log.info("oops_named", key=key.hex(), psk=base64.b64encode(key).decode())
    log.info("oops_nested", stats={"final": {"bits": key.hex()}, "list": [key]})
    log.info(f"oops in message {key.hex()}")
    log.info("oops_b64_text", note=f"key is {base64.b64encode(key).decode()} ok")
    logging.getLogger("somelib").info("stdlib leak %s", key.hex())
    try:
        raise ValueError(f"bad key {key.hex()}")
    except ValueError:
        log.exception("oops_exception")

    class KeyHolder:
        def __repr__(self) -> str:
            return f"KeyHolder({key.hex()})"

    log.info("oops_object", holder=KeyHolder())
    out = buf.getvalue()
    assert len(out.splitlines()) == 10
    for r in renderings:
        assert r not in out, f"leaked {r[:8]}..."
    # Harmless fields survive redaction.
    log.info("stats", key_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427", final_key_bits=1234)
    last = _lines(buf)[-1]
    assert last["key_id"] == "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    assert last["final_key_bits"] == 1234


def test_secret_repr_and_equality() -> None:
    s = Secret(b"\x01" * 16)
    assert repr(s) == str(s) == "<secret 16 bytes>"
    assert s == Secret(b"\x01" * 16) and s != Secret(b"\x02" * 16)
    assert s.reveal() == b"\x01" * 16


# ---------------------------------------------------------------- redaction: secrets only
def test_counts_ids_and_public_keys_stay_readable() -> None:
    """Only key material is redacted: counts, key IDs, config keys and CURVE public keys
    under key-like names reach the log as they are."""
    buf = _capture()
    import zmq

    public, _secret = zmq.curve_keypair()
    key_id = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    log = structlog.get_logger("t")
    log.info(
        "keys_erased",
        keys=5,
        keys_lost=0,
        secret_count=3,
        seed=12345,
        psk_bytes=32,
        key_ratio=0.25,
        stored=np.int64(7),
        key_ID=key_id,
        key_IDs=[key_id],
        keys_requested=[key_id],
        config_key="delivery.crl_file",
        client_key=public.decode(),
        peer_public_key=public.decode(),
        keys_digest="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    )
    rec = _lines(buf)[-1]
    assert rec["keys"] == 5 and rec["keys_lost"] == 0 and rec["secret_count"] == 3
    assert rec["seed"] == 12345 and rec["psk_bytes"] == 32 and rec["key_ratio"] == 0.25
    assert rec["stored"] == 7
    assert rec["key_ID"] == key_id and rec["key_IDs"] == rec["keys_requested"] == [key_id]
    assert rec["config_key"] == "delivery.crl_file"
    assert rec["client_key"] == public.decode() and rec["peer_public_key"] == public.decode()
    assert rec["keys_digest"].startswith("9f86d081")


def test_key_material_under_key_and_secret_names_is_redacted() -> None:
    buf = _capture()
    import zmq

    _public, secret_z85 = zmq.curve_keypair()
    key = os.urandom(32)
    small = os.urandom(8)
    b64, b64url = base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()
    key_id = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    log = structlog.get_logger("t")
    log.info(
        "delivered",
        key=b64,
        auth_key=key.hex(),
        next_key=b64url,
        small_key=base64.b64encode(small).decode(),
        keys=[{"key_ID": key_id, "key": b64}],
        psk=key.hex(),
        secret_key=secret_z85.decode(),
        password="hunter2",
        private_key="any text at all",
        token={"value": "abc", "length": 3},
    )
    out = buf.getvalue()
    for leaked in (b64, b64url, key.hex(), secret_z85.decode(), "hunter2", "any text at all"):
        assert leaked not in out
    assert base64.b64encode(small).decode() not in out
    rec = _lines(buf)[-1]
    assert rec["keys"] == [{"key_ID": key_id, "key": "<redacted>"}]
    assert rec["psk"] == rec["key"] == rec["auth_key"] == "<redacted>"
    assert rec["token"] == {"value": "<redacted>", "length": 3}


# ---------------------------------------------------------------- tracebacks
def test_traceback_is_one_json_string_escaped_once() -> None:
    buf = _capture()
    log = structlog.get_logger("t")
    try:
        raise ValueError("first line" + chr(10) + "second line")  # no backslash in the source
    except ValueError as exc:
        caught = exc
        log.exception("structlog_exception")
        logging.getLogger("somelib").exception("stdlib exception")
    import traceback

    log.error("field_exception", error=caught)
    log.error("field_traceback", tb=caught.__traceback__)
    log.error("field_lines", tb=traceback.format_exception(caught))
    raw = buf.getvalue().splitlines()
    assert len(raw) == 5
    for line in raw:
        assert "\\\\n" not in line  # no newline escaped twice
    a, b, c, d, e = (json.loads(line) for line in raw)
    for rec in (a, b):
        text = rec["exception"]
        assert isinstance(text, str) and text.startswith("Traceback (most recent call last):")
        assert text.endswith("ValueError: first line\nsecond line")
        assert "\\n" not in text  # real newlines, not a repr
    assert c["error"] == "ValueError: first line\nsecond line"
    assert isinstance(d["tb"], str) and 'File "' in d["tb"] and "\n" in d["tb"]
    assert isinstance(e["tb"], str) and e["tb"].startswith("Traceback (most recent call last):")
    assert e["tb"].endswith("second line")
