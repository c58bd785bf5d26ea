"""Instrument simulators that speak the real byte protocols on a pty pair or a TCP socket.

The drivers connect to them unchanged (``socket://127.0.0.1:PORT`` or the pty path), so
tests exercise real framing, timeouts and checksums. See :mod:`drivers.serialsim.server`
for fault injection (garbled reply, bad checksum, no reply, truncation, unplug/replug).
"""

from drivers.serialsim.server import Fault, ProtocolHandler, SimServer

__all__ = ["Fault", "ProtocolHandler", "SimServer"]
