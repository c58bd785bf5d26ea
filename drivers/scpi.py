"""Shared SCPI plumbing for the VISA drivers: identity check, error queue, typed queries.

Every setting goes through :meth:`ScpiInstrument._set`, which holds the transport lock
for the command and the error-queue read that follows it, so an error is attributed to
the command that caused it. Replies are parsed strictly: anything that is not the
expected number raises :class:`ProtocolError`.
"""

from __future__ import annotations

import logging
import re

from drivers.common import DriverOptions, health_check
from drivers.errors import InstrumentChangedError, InstrumentReportedError, ProtocolError
from drivers.interfaces import HealthLevel, InstrumentHealth
from drivers.restore import SettingsMemory, identity_fields
from drivers.transports.base import MessageTransport
from drivers.transports.visa import VisaTransport, resolve_visa

log = logging.getLogger(__name__)

_ERR_RE = re.compile(r'^\s*([+-]?\d+)\s*(?:,\s*"?(.*?)"?)?\s*$')

#: Error-queue entries read at most after one command (a full queue must not loop forever).
MAX_ERRORS_READ = 20


class VisaOptions(DriverOptions):
    visa_library: str = ""
    """pyvisa backend: "" (default), "@py", "@ivi", "@sim" (the shipped definition) or
    "path/to/definition.yaml@sim"."""

    check_identity: bool = True
    """Refuse an instrument whose ``*IDN?`` does not name the expected model family."""


class ScpiInstrument:
    """Mixin implementing the :class:`drivers.interfaces.Instrument` life cycle over SCPI.

    Subclasses set ``SIM_YAML`` (shipped pyvisa-sim definition), ``IDN_PATTERN`` (regex
    the identity must match), ``ERROR_QUERY`` and implement :meth:`_configure` (settings
    made once after connecting) and :meth:`_safe_commands`.
    """

    SIM_YAML: str = ""
    IDN_PATTERN: str = ""
    ERROR_QUERY: str = ":SYST:ERR?"

    name: str

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float,
        options: VisaOptions,
        transport: MessageTransport | None,
    ) -> None:
        self.name = name
        self._visa_options = options
        if transport is None:
            res, library = resolve_visa(resource, options.visa_library, self.SIM_YAML)
            transport = VisaTransport(
                name,
                res,
                visa_library=library,
                timeout_s=timeout_s,
                reconnect_timeout_s=options.reconnect_timeout_s,
            )
        self.transport = transport
        self._identity = ""
        #: settings made through this driver, put back after a power cycle
        self.memory = SettingsMemory(name)
        self.transport.after_reopen.callback = self.check_settings

    # --- life cycle ------------------------------------------------------------

    def connect(self) -> None:
        with self.transport.lock:
            if self.transport.is_open and self._identity:
                return
            self.transport.open()
            identity = self.transport.query("*IDN?")
            if self._visa_options.check_identity and not re.search(
                self.IDN_PATTERN, identity, re.IGNORECASE
            ):
                self.transport.close()
                raise ProtocolError(
                    self.name,
                    "*IDN?",
                    f"identity {identity!r} is not a {self.IDN_PATTERN!r} instrument",
                )
            try:
                # another instrument at this address since the first connect: refuse it
                self.memory.check_identity(identity_fields(identity))
            except InstrumentChangedError:
                self.transport.close()
                raise
            self.memory.remember_identity(identity_fields(identity), self._identity_now)
            self._identity = identity
            reconnecting = len(self.memory) > 0  # settings made before a close
            self._drain_errors()
            self._configure()
            if reconnecting:
                self.check_settings()

    def check_settings(self) -> None:
        """Read back the settings made through this driver; if the instrument lost them
        (a power cycle), make the connect-time settings and those again
        (:mod:`drivers.restore`). Raises SettingsLostError if that fails."""
        with self.transport.lock:
            self.memory.restore(self._reconfigure, self.transport.drop_connection)

    def _identity_now(self) -> str:
        return identity_fields(self.transport.query("*IDN?"))

    def _reconfigure(self) -> None:
        self._drain_errors()
        self._configure()

    def close(self) -> None:
        self._identity = ""
        self.transport.close()

    def identify(self) -> str:
        return self.transport.query("*IDN?")

    def safe_state(self) -> None:
        with self.transport.lock:
            self.memory.made_safe()
            for command in self._safe_commands():
                self._set(command)

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            with self.transport.lock:
                self.check_settings()
                self.transport.query("*IDN?")
                self._check_errors("*IDN?")
            return InstrumentHealth(HealthLevel.OK, "answers *IDN?, error queue empty")

        return self.memory.report(health_check(self.name, probe))

    # --- subclass hooks --------------------------------------------------------

    def _configure(self) -> None:
        """Settings made once after each connect (units, channel modes)."""

    def _safe_commands(self) -> list[str]:
        raise NotImplementedError

    # --- SCPI helpers ----------------------------------------------------------

    def _read_errors(self) -> list[tuple[int, str]]:
        errors: list[tuple[int, str]] = []
        for _ in range(MAX_ERRORS_READ):
            reply = self.transport.query(self.ERROR_QUERY)
            m = _ERR_RE.match(reply)
            if m is None:
                raise ProtocolError(self.name, self.ERROR_QUERY, f"malformed error entry {reply!r}")
            code = int(m.group(1))
            if code == 0:
                break
            errors.append((code, m.group(2) or ""))
        return errors

    def _drain_errors(self) -> None:
        stale = self._read_errors()
        if stale:
            log.info("%s: cleared stale instrument errors %s", self.name, stale)

    def _check_errors(self, command: str) -> None:
        errors = self._read_errors()
        if errors:
            text = "; ".join(f"{code},{msg!r}" for code, msg in errors)
            raise InstrumentReportedError(self.name, command, f"instrument error queue: {text}")

    def _set(self, command: str) -> None:
        """Send a setting and check the error queue, atomically."""
        with self.transport.lock:
            self.transport.write(command)
            self._check_errors(command)

    def _query_float(self, command: str) -> float:
        reply = self.transport.query(command)
        try:
            return float(reply)
        except ValueError:
            raise ProtocolError(self.name, command, f"expected a number, got {reply!r}") from None

    def _query_bool(self, command: str) -> bool:
        reply = self.transport.query(command).upper()
        if reply in ("1", "+1", "ON"):
            return True
        if reply in ("0", "+0", "OFF"):
            return False
        raise ProtocolError(self.name, command, f"expected 0 or 1, got {reply!r}")
