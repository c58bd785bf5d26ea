"""The control envelope: versioned request and reply messages (see docs/protocol.md).

A control message is one JSON frame (UTF-8) after an empty delimiter frame::

    request: {"v": 1, "id": "c1-7", "type": "request", "ts": 1712000000.123,
              "command": "status", "content": {}}
    reply:   {"v": 1, "id": "s9-3", "type": "reply", "ts": ..., "parent_id": "c1-7",
              "command": "status", "content": {...}}
    error:   {"v": 1, "id": ..., "type": "error", "ts": ..., "parent_id": "c1-7",
              "command": "status", "error": {"code": "...", "message": "...", "details": {}}}

Parsing is defensive and ordered so that each problem gets its own code: JSON syntax,
envelope shape, version, message type, then the remaining fields. The JSON accepted is
strict RFC 8259 text in UTF-8: no ``NaN``/``Infinity`` (nor numbers that overflow to
them), no duplicate object keys, at most :data:`MAX_JSON_DEPTH` nested arrays/objects.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qkdnode.bus.errors import ErrorCode

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset({PROTOCOL_VERSION})
REQUEST_TYPES: tuple[str, ...] = ("request", "heartbeat")
REPLY_TYPES: tuple[str, ...] = ("reply", "error", "heartbeat")
COMMAND_PATTERN = r"^[a-z][a-z0-9_.]{0,63}$"
MAX_ID_LENGTH = 64
#: Deepest nesting of arrays and objects in a message (the envelope object is level 1).
MAX_JSON_DEPTH = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RequestEnvelope(_Strict):
    """A request (or heartbeat) sent by a client on the control socket."""

    v: int
    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    type: Literal["request", "heartbeat"]
    ts: float
    command: str | None = Field(None, pattern=COMMAND_PATTERN)
    content: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(_Strict):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ReplyEnvelope(_Strict):
    """A reply, error or heartbeat answer sent by the server."""

    v: int
    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    type: Literal["reply", "error", "heartbeat"]
    ts: float
    parent_id: str | None = None
    command: str | None = None
    content: dict[str, Any] = Field(default_factory=dict)
    error: ErrorBody | None = None


class EnvelopeError(Exception):
    """A request that cannot be processed; becomes an ``error`` reply."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        details: dict[str, Any] | None = None,
        parent_id: str | None = None,
        command: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}
        self.parent_id = parent_id
        self.command = command


def field_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """Pydantic errors as ``[{"field": "content.number", "message": ...}]`` without input values."""
    out: list[dict[str, str]] = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        out.append(
            {
                "field": f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(root)",
                "message": err["msg"],
                "type": err["type"],
            }
        )
    return out


class _Refused(ValueError):
    """Valid to Python's json module, refused by the protocol (NaN, duplicate key...)."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("a number is out of the range of a 64-bit float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate object key {key!r:.40}")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_float=_finite_float, parse_constant=_no_constant
)


def _depth_exceeds(data: Any, limit: int) -> bool:
    """True if ``data`` nests arrays/objects deeper than ``limit`` (iterative walk)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def loads_strict(body: bytes) -> Any:
    """Decode one JSON frame as the protocol defines it, or raise :class:`EnvelopeError`
    (code ``bad_json``; ``details.position`` is the byte or character offset when known)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(
            ErrorCode.BAD_JSON, "message frame is not UTF-8 text", {"position": exc.start}
        ) from None
    try:
        data = _DECODER.decode(text)
    except RecursionError:
        raise EnvelopeError(
            ErrorCode.BAD_JSON,
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
            {"max_depth": MAX_JSON_DEPTH},
        ) from None
    except _Refused as exc:
        raise EnvelopeError(ErrorCode.BAD_JSON, f"message frame refused: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
        pos = getattr(exc, "pos", None)
        raise EnvelopeError(
            ErrorCode.BAD_JSON,
            "message frame is not valid JSON",
            {"position": pos} if pos is not None else {},
        ) from None
    if (
        isinstance(data, dict | list)
        and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
        and _depth_exceeds(data, MAX_JSON_DEPTH)
    ):
        raise EnvelopeError(
            ErrorCode.BAD_JSON,
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
            {"max_depth": MAX_JSON_DEPTH},
        )
    return data


def parse_request(body: bytes) -> RequestEnvelope:
    """Decode one request frame or raise :class:`EnvelopeError` naming the bad field."""
    data = loads_strict(body)
    if not isinstance(data, dict):
        raise EnvelopeError(
            ErrorCode.BAD_ENVELOPE,
            f"envelope must be a JSON object, got {type(data).__name__}",
            {"field": "(root)"},
        )
    raw_id = data.get("id")
    parent_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_LENGTH else None
    raw_cmd = data.get("command")
    command = raw_cmd if isinstance(raw_cmd, str) and len(raw_cmd) <= 64 else None
    if "v" not in data:
        raise EnvelopeError(
            ErrorCode.BAD_ENVELOPE,
            "field 'v' (protocol version) is missing",
            {"field": "v", "supported": sorted(SUPPORTED_VERSIONS)},
            parent_id,
            command,
        )
    version = data["v"]
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise EnvelopeError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r:.20} is not supported",
            {"field": "v", "supported": sorted(SUPPORTED_VERSIONS)},
            parent_id,
            command,
        )
    mtype = data.get("type")
    if mtype not in REQUEST_TYPES:
        shown = mtype if isinstance(mtype, str) else type(mtype).__name__
        raise EnvelopeError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {shown!r:.40}",
            {"field": "type", "supported": list(REQUEST_TYPES)},
            parent_id,
            command,
        )
    try:
        env = RequestEnvelope.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc)
        fields = ", ".join(e["field"] for e in errors)
        raise EnvelopeError(
            ErrorCode.BAD_ENVELOPE,
            f"invalid envelope field(s): {fields}",
            {"field": errors[0]["field"], "errors": errors},
            parent_id,
            command,
        ) from None
    if env.type == "request" and env.command is None:
        raise EnvelopeError(
            ErrorCode.BAD_ENVELOPE,
            "field 'command' is required in a request",
            {"field": "command"},
            parent_id,
        )
    return env


class CanonicalRequest(NamedTuple):
    """The fields of a request in the canonical form (see :func:`parse_canonical`)."""

    id: str
    type: str
    command: str | None


#: A request exactly as :func:`request_bytes` writes it with empty content: compact
#: separators, keys in order, an id of letters, digits and ``_.:-``, a plain decimal
#: ``ts`` of at most 16 integer digits (always finite), optional command and ``{}``.
_CANONICAL_REQUEST = re.compile(
    rb'\{"v":%d,"id":"([A-Za-z0-9_.:-]{1,%d})","type":"(request|heartbeat)",'
    rb'"ts":-?(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,20})?'
    rb'(?:,"command":"([a-z][a-z0-9_.]{0,63})","content":\{\})?\}'
    % (PROTOCOL_VERSION, MAX_ID_LENGTH)
)


def parse_canonical(body: bytes) -> CanonicalRequest | None:
    """The request in ``body`` if it is in the canonical form, else None (then
    :func:`parse_request` decides). Every body this accepts is one that
    :func:`parse_request` accepts with the same id, type and command and empty content;
    it only skips the general parser's cost (a few microseconds) for the common case."""
    m = _CANONICAL_REQUEST.fullmatch(body)
    if m is None:
        return None
    mtype = m.group(2).decode()
    raw_cmd = m.group(3)
    if raw_cmd is None and mtype == "request":
        return None  # the general parser names the missing field
    return CanonicalRequest(
        m.group(1).decode(), mtype, raw_cmd.decode() if raw_cmd is not None else None
    )


class IdMaker:
    """Cheap unique message ids: a random per-process prefix and a counter."""

    def __init__(self, tag: str) -> None:
        self._prefix = f"{tag}{os.urandom(4).hex()}-"
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count)}"


#: one encoder for every message (``json.dumps`` with options builds a new one per call)
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps(obj: dict[str, Any]) -> bytes:
    """Compact JSON (raises TypeError/ValueError for non-JSON values, NaN included)."""
    return _ENCODER.encode(obj).encode()


def reply_bytes(
    msg_id: str,
    parent_id: str | None,
    command: str | None,
    content: dict[str, Any],
    mtype: str = "reply",
) -> bytes:
    return dumps(
        {
            "v": PROTOCOL_VERSION,
            "id": msg_id,
            "type": mtype,
            "ts": time.time(),
            "parent_id": parent_id,
            "command": command,
            "content": content,
        }
    )


def error_bytes(  # noqa: PLR0917
    msg_id: str,
    parent_id: str | None,
    command: str | None,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": msg_id,
        "type": "error",
        "ts": time.time(),
        "parent_id": parent_id,
        "command": command,
        "error": {"code": str(code), "message": message, "details": details or {}},
    }
    try:
        return dumps(body)
    except (TypeError, ValueError):
        body["error"]["details"] = {"note": "details were not JSON-serialisable"}
        return dumps(body)


_PLAIN_ID = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_ID_LENGTH}}}")
_PLAIN_COMMAND = re.compile(r"[a-z][a-z0-9_.]{0,63}")


def request_bytes(
    msg_id: str, command: str | None, content: dict[str, Any], mtype: str = "request"
) -> bytes:
    """A request (or heartbeat) frame. Requests without content whose id and command need
    no JSON escaping (every id our clients make) are formatted directly, in the canonical
    form (:func:`parse_canonical`): the same bytes as the general encoder, in a fraction
    of its time."""
    if (
        not content
        and mtype in REQUEST_TYPES
        and _PLAIN_ID.fullmatch(msg_id)
        and (command is None or _PLAIN_COMMAND.fullmatch(command))
    ):
        tail = b"}" if command is None else b',"command":"%s","content":{}}' % command.encode()
        return b'{"v":%d,"id":"%s","type":"%s","ts":%r%s' % (
            PROTOCOL_VERSION,
            msg_id.encode(),
            mtype.encode(),
            time.time(),
            tail,
        )
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": msg_id, "type": mtype, "ts": time.time()}
    if command is not None:
        body["command"] = command
        body["content"] = content
    return dumps(body)


def parse_reply(body: bytes) -> ReplyEnvelope:
    """Decode a reply frame (client side); raises ValueError on anything malformed."""
    try:
        return ReplyEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise ValueError(f"malformed reply: {field_errors(exc)[:3]}") from None
