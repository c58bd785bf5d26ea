"""VISA transport through pyvisa, with pyvisa-sim definitions for simulation.

``visa_library`` is handed to :class:`pyvisa.ResourceManager`: ``""`` (default backend),
``"@py"``, ``"@ivi"``, or ``"path/to/definition.yaml@sim"`` for a pyvisa-sim instrument.
The driver code path is the same in every case.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyvisa
import pyvisa.constants
import pyvisa.errors

from drivers.errors import (
    ConnectionLostError,
    DriverConfigError,
    InstrumentTimeoutError,
    NotConnectedError,
    ProtocolError,
)
from drivers.transports.base import MessageTransport, reopen_with_backoff
from drivers.transports.reconnect import (
    close_quietly,
    retry_once_after_reconnect,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean the session is lost (reopen and send once more); a VISA timeout is
#: turned into InstrumentTimeoutError before this applies.
_SESSION_LOST_ERRORS: tuple[type[BaseException], ...] = (
    pyvisa.errors.VisaIOError,
    pyvisa.errors.InvalidSession,
    OSError,
)

#: Folder of the pyvisa-sim definitions shipped with the drivers (package data).
SIM_DIR = Path(__file__).resolve().parent.parent / "sim"


def sim_library(yaml_name: str) -> str:
    """The ``visa_library`` string for a shipped simulation definition (``name.yaml@sim``)."""
    return f"{SIM_DIR / yaml_name}@sim"


def resolve_visa(resource: str, visa_library: str, default_sim_yaml: str) -> tuple[str, str]:
    """Split a ``RESOURCE@sim`` shorthand and resolve shipped definition paths.

    * ``"GPIB0::20::INSTR@sim"`` -> the driver's shipped definition ``default_sim_yaml``;
    * ``visa_library="@sim"`` -> same;
    * ``visa_library="drivers/sim/x.yaml@sim"`` -> the shipped file when that relative path
      does not exist from the working directory (so configs work from any directory).
    """
    if resource.endswith("@sim"):
        resource = resource[: -len("@sim")]
        visa_library = visa_library or "@sim"
    if visa_library == "@sim":
        return resource, sim_library(default_sim_yaml)
    if visa_library.endswith("@sim"):
        path = Path(visa_library[: -len("@sim")])
        if not path.exists() and (SIM_DIR / path.name).exists():
            return resource, sim_library(path.name)
    return resource, visa_library


class VisaTransport(MessageTransport):
    """SCPI messages over a pyvisa resource.

    Every call has a timeout (``timeout_s``). A VISA timeout raises
    :class:`InstrumentTimeoutError` (after a device clear so a late reply cannot be read
    as the answer to the next query). A lost session (closed, invalid, I/O error) is
    reopened with backoff for up to ``reconnect_timeout_s`` and the message is sent once
    more; if that fails :class:`ConnectionLostError` is raised.
    """

    def __init__(
        self,
        instrument: str,
        resource: str,
        *,
        visa_library: str = "",
        timeout_s: float = 2.0,
        read_termination: str = "\n",
        write_termination: str = "\n",
        reconnect_timeout_s: float = 5.0,
    ) -> None:
        super().__init__()
        self.instrument = instrument
        self.resource_name = resource
        self.visa_library = visa_library
        self.timeout_s = timeout_s
        self.read_termination = read_termination
        self.write_termination = write_termination
        self.reconnect_timeout_s = reconnect_timeout_s
        self._rm: Any = None
        self._res: Any = None
        self._wanted = False  # open() was called and close() was not: reconnect when lost

    @property
    def is_open(self) -> bool:
        return self._res is not None

    def _open_once(self) -> None:
        if self._rm is None:
            try:
                self._rm = pyvisa.ResourceManager(self.visa_library)
            except (OSError, ValueError, pyvisa.errors.Error) as exc:
                raise DriverConfigError(
                    self.instrument, "visa_library", f"cannot load {self.visa_library!r}: {exc}"
                ) from exc
        res = self._rm.open_resource(
            self.resource_name,
            read_termination=self.read_termination,
            write_termination=self.write_termination,
        )
        res.timeout = max(1, round(self.timeout_s * 1000))
        self._res = res

    def open(self) -> None:
        with self.lock:
            if self._res is not None:
                return
            self._wanted = True
            try:
                self._open_once()
            except DriverConfigError:
                raise
            except (OSError, ValueError, pyvisa.errors.Error) as exc:
                raise ConnectionLostError(
                    self.instrument, "open", f"cannot open {self.resource_name!r}: {exc}"
                ) from exc

    def close(self) -> None:
        with self.lock:
            self._wanted = False
            self._drop()

    def drop_connection(self) -> None:
        self._drop()

    def _drop(self) -> None:
        with self.lock:
            res, self._res = self._res, None
            close_quietly(log, self.instrument, res)

    def _reconnect(self, command: str) -> None:
        self._drop()
        reopen_with_backoff(self.instrument, command, self._open_once, self.reconnect_timeout_s)
        self.after_reopen.run(self._drop)

    def _call(self, command: str, fn: Callable[[Any], T]) -> T:
        with self.lock:
            if self._res is None:
                if not self._wanted:
                    raise NotConnectedError(self.instrument, command, "not connected")
                self._reconnect(command)

            def attempt() -> T:
                try:
                    return fn(self._res)
                except pyvisa.errors.VisaIOError as exc:
                    if exc.error_code == pyvisa.constants.StatusCode.error_timeout:
                        self._clear_after_timeout()
                        raise InstrumentTimeoutError(
                            self.instrument, command, f"no reply within {self.timeout_s:g} s"
                        ) from exc
                    raise  # any other I/O error: the session is lost
                except UnicodeDecodeError as exc:
                    raise ProtocolError(
                        self.instrument, command, f"reply is not text: {exc}"
                    ) from exc

            return retry_once_after_reconnect(
                log,
                self.instrument,
                command,
                attempt,
                lost_errors=_SESSION_LOST_ERRORS,
                reconnect=lambda: self._reconnect(command),
            )

    def _clear_after_timeout(self) -> None:
        try:
            self._res.clear()
        except Exception:
            log.debug("%s: device clear failed", self.instrument, exc_info=True)

    def write(self, command: str) -> None:
        self._call(command, lambda res: res.write(command))

    def query(self, command: str) -> str:
        reply: str = self._call(command, lambda res: res.query(command))
        return reply.strip()

    def session(self) -> Any:
        """The underlying pyvisa resource (for diagnostics and tests)."""
        return self._res
