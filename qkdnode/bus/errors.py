"""Error codes and exceptions of the bus.

Every refusal the control server sends is an :class:`ErrorCode` with a human-readable
message and a ``details`` object naming the offending field. Error texts never contain
message content (which may carry key material), only field names, sizes and types.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Stable, machine-readable error codes of control replies (documented in protocol.md).

    The first group is sent by the server itself, in the order of its checks; the second
    by command handlers (each command lists its own in ``commands``).
    """

    BAD_FRAMES = "bad_frames"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    BAD_JSON = "bad_json"
    BAD_ENVELOPE = "bad_envelope"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_COMMAND = "unknown_command"
    FORBIDDEN = "forbidden"
    INVALID_CONTENT = "invalid_content"
    NOT_ALLOWED_IN_STATE = "not_allowed_in_state"
    BUSY = "busy"
    INTERNAL = "internal"
    # refusals of command handlers
    COMMAND_FAILED = "command_failed"
    NO_KEY = "no_key"
    NOT_READY = "not_ready"
    WRONG_NODE = "wrong_node"
    REFUSED = "refused"
    NOT_SIMULATED = "not_simulated"


class BusError(Exception):
    """Base class of every bus exception."""


class CommandError(BusError):
    """Raised by a command handler to refuse with a structured error.

    The server turns it into an ``error`` reply with the same code, message and details.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = ErrorCode.COMMAND_FAILED,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.details: dict[str, Any] = details or {}


class RemoteError(BusError):
    """An ``error`` reply received by a client: ``code``, ``message`` and ``details``."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class BusTimeout(BusError, TimeoutError):
    """No reply (or no message) within the allowed time."""


class KeyFileError(BusError):
    """A CURVE key file is missing, unreadable or malformed (never shows the key)."""


class PeerTimeout(BusTimeout):
    """``PeerChannel.recv`` saw no message within ``timeout_s``."""


class PeerDisconnected(BusError):
    """The peer link is down, or messages of the block in progress were lost.

    ``reason`` is one of ``"down"`` (no live peer), ``"restarted"`` (the peer process
    restarted: its new session id differs) or ``"lost"`` (a gap in the sequence numbers).
    After a ``"restarted"`` or ``"lost"`` event the caller must abort the block in
    progress; later messages flow normally.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
