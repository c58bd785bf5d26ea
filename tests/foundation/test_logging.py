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
