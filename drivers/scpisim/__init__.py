"""SCPI instrument models in Python, behind a message transport the drivers use unchanged.

pyvisa-sim (``drivers/sim/*.yaml``) pins command formats and the error queue, but its
properties are independent and it has no clock. A model here keeps state that changes
with time or couples settings (a laser that settles for a while after it is switched on)
and answers through :class:`ScpiModelTransport`, a message transport: the driver
sends the same strings as to a real instrument.
"""

from __future__ import annotations

import abc

from drivers.errors import InstrumentTimeoutError, NotConnectedError
from drivers.transports.base import InProcessTransport


class ScpiModel(abc.ABC):
    """An instrument that takes one SCPI message and returns its reply (None: no reply)."""

    @abc.abstractmethod
    def handle(self, message: str) -> str | None:
        """Execute ``message``; a query returns its reply, a setting None. A message the
        instrument does not understand goes to its error queue and returns None."""


class ScpiModelTransport(InProcessTransport):
    """Messages to a :class:`ScpiModel`. A query the model leaves unanswered raises
    :class:`InstrumentTimeoutError` at once, as a real instrument's silence would."""

    def __init__(self, instrument: str, model: ScpiModel) -> None:
        super().__init__()
        self.instrument = instrument
        self.model = model

    def _send(self, command: str) -> str | None:
        with self.lock:
            if not self._open:
                raise NotConnectedError(self.instrument, command, "not connected")
            self.reopen_if_dropped()
            return self.model.handle(command)

    def write(self, command: str) -> None:
        self._send(command)

    def query(self, command: str) -> str:
        reply = self._send(command)
        if reply is None:
            raise InstrumentTimeoutError(self.instrument, command, "no reply")
        return reply
