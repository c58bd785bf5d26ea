"""Structured logging for the daemon and the CLI.

One pipeline for everything: structlog loggers and stdlib loggers (pyvisa, zmq, aiohttp)
go through the same processors and renderer. JSON lines when the stream is not a
terminal (journald, files, pipes), a readable console view on a terminal. Context such as
node id, role, session and block ids is bound with :func:`bind_context` (contextvars) and
appears on every line logged in that context.

The :func:`redact_secrets` processor runs last before rendering and guarantees that key
material never reaches a log line, even when code logs a key object by mistake, while
leaving the figures an operator needs (counts, sizes, key IDs, public keys) readable:

* numbers (``int``, ``float``, ``bool``, numpy scalars) and ``None`` are never redacted,
  whatever the field is called: ``keys=5`` is a count;
* ``bytes``/``bytearray``/``memoryview`` values, numpy arrays and :class:`Secret` objects
  are replaced by a size-only placeholder;
* under secret field names (``secret``, ``psk``, ``pad``, ``otp``, ``seed``, ``password``,
  ``token``, ``private``...) every string is replaced;
* under key field names (``key``, ``keys``, ``*_key``) strings that look like encoded key
  bytes (hex, base64) are replaced; a Z85 CURVE public key (``client_key=...``) and
  other text (``config_key="delivery.crl_file"``) stay;
* strings under names of identifiers, files, digests and public values (``key_ID``,
  ``key_file``, ``keys_digest``, ``public_key``...) are shown as they are;
* long runs of hex or base64 characters inside any other string (how keys look when
  printed) are masked.

An exception logged as a field value is rendered as one string (``"ValueError: ..."``),
as are traceback objects; ``exc_info`` becomes the standard ``exception`` field, one JSON
string whose newlines are escaped once by the renderer.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
import types
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


#: Field names whose string values are secrets, whatever they look like.
_SECRET_NAME = re.compile(
    r"(^|_)(secrets?|psk|pad|otp|seed|password|passphrase|token|private|material|bits_array)"
    r"($|_)",
    re.IGNORECASE,
)
#: Field names that may hold key bytes, but also key IDs, public keys or config keys.
_KEY_NAME = re.compile(r"(^|_)keys?($|_)", re.IGNORECASE)
#: Identifiers, paths, digests and public values: never sensitive by name.
_HARMLESS_PART = re.compile(
    r"(^|_)(public|pub)($|_)|_(ids?|file|files|path|paths|dir|name|names|digest|hash|sha256"
    r"|fingerprint)$",
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
# A whole value that is encoded key bytes: hex or base64 / base64url of 8 bytes or more.
_HEX_KEY = re.compile(r"(?:[0-9a-fA-F]{2}){8,}")
_B64_KEY = re.compile(r"[A-Za-z0-9+/]{11,}={0,2}|[A-Za-z0-9_\-]{11,}={0,2}")
# A UUID (ETSI key_ID): an identifier, not key bytes.
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# A CURVE key in Z85 (40 characters of the Z85 alphabet).
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

_Kind = str  # "secret" | "key" | "harmless" | "" (ordinary field)


def _name_kind(name: str) -> _Kind:
    if not name:
        return ""
    low = name.lower()
    if low in _HARMLESS_NAMES or _HARMLESS_PART.search(low):
        return "harmless"
    if _SECRET_NAME.search(low):
        return "secret"
    if _KEY_NAME.search(low):
        return "key"
    return ""


def _looks_like_key_bytes(text: str) -> bool:
    """True for a whole string that is hex or base64 of key bytes (not a word or a path)."""
    s = text.strip()
    if _HEX_KEY.fullmatch(s):
        return True
    if _UUID.fullmatch(s):
        return False
    if not _B64_KEY.fullmatch(s):
        return False
    # base64 of random bytes mixes classes; an identifier such as "transmitter_store" does not
    classes = sum(
        (
            any(c.isdigit() for c in s),
            any(c.isupper() for c in s),
            any(c.islower() for c in s),
            any(c in "+/=" for c in s),
        )
    )
    return classes >= 2 and not s.replace("_", "").isalpha()


def _mask_string(text: str) -> str:
    if len(text) < 24:
        return text
    text = _HEX_RUN.sub(lambda m: f"<redacted {len(m.group())} hex chars>", text)
    return _B64_RUN.sub(lambda m: f"<redacted {len(m.group())} chars>", text)


def _traceback_text(value: Any) -> str | None:
    """One string for an exception or traceback given as a field value, else None."""
    if isinstance(value, BaseException):
        text = str(value)
        return f"{type(value).__name__}: {text}" if text else type(value).__name__
    if isinstance(value, types.TracebackType):
        return "".join(traceback.format_tb(value)).rstrip("\n")
    if isinstance(value, traceback.TracebackException | traceback.StackSummary):
        return "".join(value.format()).rstrip("\n")
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, str) for v in value)
        and str(value[0]).startswith(("Traceback (most recent call last)", "Stack (most recent"))
    ):
        return "".join(value).rstrip("\n")
    return None


def redact_value(value: Any, name: str = "", _kind: _Kind | None = None) -> Any:
    """Return ``value`` with anything that could be key material replaced.

    ``name`` is the field name; it decides how strings are treated (see the module doc).
    """
    kind = _name_kind(name) if _kind is None else _kind
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return value.item()
    if isinstance(value, Secret):
        return repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<redacted {len(value)} bytes>"
    if isinstance(value, np.ndarray):
        return f"<redacted array shape={value.shape} dtype={value.dtype}>"
    if isinstance(value, str):
        if kind == "harmless":
            return value  # an ID, a path, a digest or a public value: shown as it is
        if kind == "secret":
            return "<redacted>"
        if kind == "key" and _looks_like_key_bytes(value):
            return "<redacted>"
        if kind == "key" and _Z85_KEY.fullmatch(value):
            return value  # a CURVE public key (a secret one would sit under a secret name)
        return _mask_string(value)
    if isinstance(value, Mapping):
        # inside a secret value everything is secret; otherwise each field by its own name
        return {
            k: redact_value(v, str(k), "secret" if kind == "secret" else None)
            for k, v in value.items()
        }
    tb_text = _traceback_text(value)
    if tb_text is not None:
        return "<redacted>" if kind == "secret" else _mask_string(tb_text)
    if isinstance(value, list | tuple | set | frozenset):
        # the items of ``keys=[...]`` are keys: they keep the list's name
        return [redact_value(v, name, kind) for v in value]
    if kind == "secret":
        return "<redacted>"
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


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Info-level structlog calls become no-ops while the block runs (warnings and errors
    still go through; the previous configuration is restored): for benchmarks, whose
    figures are those of the code measured, not of its log output."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        yield
    finally:
        structlog.configure(**saved)
