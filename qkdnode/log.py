"""Structured logging for the daemon and the CLI.

One pipeline for everything: structlog loggers and stdlib loggers (pyvisa, zmq, aiohttp)
go through the same processors and renderer. JSON lines when the stream is not a
terminal (journald, files, pipes), a readable console view on a terminal. Context such as
node id, role, session and block ids is bound with :func:`bind_context` (contextvars) and
appears on every line logged in that context.

The :func:`redact_secrets` processor runs last before rendering and guarantees that key
material never reaches a log line, even when code logs a key object by mistake:

* ``bytes``/``bytearray``/``memoryview`` values, numpy arrays and :class:`Secret` objects
  are replaced by a size-only placeholder;
* values under sensitive field names (``key``, ``secret``, ``psk``, ``pad``, ``seed``...)
  are replaced, except for known-harmless names such as ``key_id`` or ``key_size_bits``;
* long runs of hex or base64 characters inside strings (how keys look when printed) are
  masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import numpy as np
import structlog
from structlog.types import EventDict, Processor, WrappedLogger

__all__ = [
    "Secret",
    "bind_context",
    "bound_context",
    "configure_logging",
    "redact_secrets",
    "redact_value",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class Secret:
    """Wrapper for secret bytes whose ``repr``/``str`` never show the content.

    ``Secret(b"...").reveal()`` returns the bytes; logging the object shows
    ``<secret 32 bytes>``.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<secret {len(self._value)} bytes>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        import hmac

        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))


_SENSITIVE_NAME = re.compile(
    r"(^|_)(keys?|secret|secrets|psk|pad|otp|seed|password|token|"
    r"private|material|bits_array)($|_)",
    re.IGNORECASE,
)
_HARMLESS_NAMES = frozenset(
    {
        "key_id",
        "key_ids",
        "key_size",
        "key_size_bits",
        "key_count",
        "keys_count",
        "key_bits",
        "final_key_bits",
        "secret_bits",
        "secret_key_bits",
        "keys_available",
        "key_rate_bps",
        "secret_key_rate_bps",
        "public_key",
        "server_public_key",
        "key_state",
        "stored_key_count",
        "max_key_count",
        "auth_key_bits",
        "auth_key_bits_spent",
        "key_file",
        "secret_key_file",
        "psk_file",
        "seed_public",
        "public_seed",
        "keys_delivered",
        "keys_stored",
        "number_of_keys",
    }
)
# 32+ characters of hex, or 24+ of base64 with at least one digit (catches printed keys).
_HEX_RUN = re.compile(r"\b[0-9a-fA-F]{32,}\b")
_B64_RUN = re.compile(r"(?=[A-Za-z0-9+/]*\d)[A-Za-z0-9+/]{24,}={0,2}")


def _mask_string(text: str) -> str:
    if len(text) < 24:
        return text
    text = _HEX_RUN.sub(lambda m: f"<redacted {len(m.group())} hex chars>", text)
    return _B64_RUN.sub(lambda m: f"<redacted {len(m.group())} chars>", text)


def redact_value(value: Any, name: str = "") -> Any:
    """Return ``value`` with anything that could be key material replaced."""
    if name and name not in _HARMLESS_NAMES and _SENSITIVE_NAME.search(name):
        if isinstance(value, bool | int | float) and not isinstance(value, bool) and "bits" in name:
            return value
        return "<redacted>"
    if isinstance(value, Secret):
        return repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<redacted {len(value)} bytes>"
    if isinstance(value, np.ndarray):
        return f"<redacted array shape={value.shape} dtype={value.dtype}>"
    if isinstance(value, str):
        return _mask_string(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v) for v in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    # Unknown objects: render now, then mask, so a __repr__ that prints bytes is caught.
    return _mask_string(repr(value))


def redact_secrets(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: see the module docstring."""
    for k in list(event_dict.keys()):
        event_dict[k] = redact_value(event_dict[k], "" if k == "event" else k)
    return event_dict


def _drop_color_message(_: WrappedLogger, __: str, ed: EventDict) -> EventDict:
    ed.pop("color_message", None)
    return ed


def configure_logging(
    level: str = "info",
    *,
    stream: TextIO | None = None,
    json: bool | None = None,
) -> None:
    """Configure structlog and the stdlib root logger. Idempotent.

    ``stream`` defaults to stderr (stdout stays free for command output; journald
    captures both). ``json`` defaults to "stream is not a terminal".
    """
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _drop_color_message,
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_qkdnode", False):
            root.removeHandler(h)
    handler._qkdnode = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    for noisy in ("asyncio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def bind_context(**values: Any) -> None:
    """Bind fields (node_id, role, session_id, block_id...) to every later log line."""
    structlog.contextvars.bind_contextvars(**values)


@contextmanager
def bound_context(**values: Any) -> Iterator[None]:
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def redacted_dict(values: MutableMapping[str, Any]) -> dict[str, Any]:
    """Redact a dict destined for telemetry or an error reply (same rules as logs)."""
    return {k: redact_value(v, k) for k, v in values.items()}
