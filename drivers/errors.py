"""Typed exceptions raised by drivers.

Every exception names the instrument (its config name), the command that failed and the
reason, so that an operator reading one log line knows what to look at.
"""

from __future__ import annotations


class InstrumentError(Exception):
    """Base of every error a driver raises."""

    def __init__(self, instrument: str, command: str, reason: str) -> None:
        self.instrument = instrument
        self.command = command
        self.reason = reason
        super().__init__(f"{instrument}: {command}: {reason}")


class InstrumentTimeoutError(InstrumentError):
    """No (complete) reply within the command's timeout."""


class ProtocolError(InstrumentError):
    """A garbled, truncated or unexpected reply."""


class ChecksumError(ProtocolError):
    """A reply whose checksum does not match its content."""


class InstrumentReportedError(InstrumentError):
    """The instrument's own error queue (e.g. SCPI ``SYST:ERR?``) reported a fault."""


class OutOfRangeError(InstrumentError, ValueError):
    """A setting outside the model's limits; refused before anything is sent."""


class ConnectionLostError(InstrumentError):
    """The transport is gone and reconnecting did not succeed (yet)."""


class NotConnectedError(InstrumentError):
    """A command on an instrument that was never connected or was closed."""


class NotSupportedError(InstrumentError):
    """The instrument, or this driver of it, has no such setting or reading (an SNSPD has no
    gate frequency, a tagger without an external clock input has no reference-clock choice).
    Nothing was sent."""


class DriverUnavailableError(InstrumentError):
    """The driver's vendor package or backend is not installed on this machine."""


class DriverConfigError(InstrumentError, ValueError):
    """A driver name, resource or option that cannot work; found before anything is sent.

    ``command`` holds the config location (``options.slot``, ``driver``, ``resource``).
    """


class SettingsLostError(InstrumentError):
    """The instrument lost settings the driver made (it was power-cycled, or changed from
    its front panel) and putting them back did not take: its read-back still differs."""


class InstrumentChangedError(InstrumentError):
    """A different instrument answers where the driver's instrument was (another serial
    number on the same port or address after a reconnect). Nothing is set on it; the
    connection is dropped and every later call checks again. ``expected_identity`` and
    ``found_identity`` hold both identities."""

    def __init__(
        self, instrument: str, command: str, expected_identity: str, found_identity: str
    ) -> None:
        self.expected_identity = expected_identity
        self.found_identity = found_identity
        super().__init__(
            instrument,
            command,
            f"another instrument answers: expected {expected_identity!r}, found "
            f"{found_identity!r}; it is not driven (restart the node to accept it)",
        )
