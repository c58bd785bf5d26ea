"""ID Quantique Time Controller (ID900 / ID1000) as a time tagger, over ZeroMQ.

Sources: the ID1000 Time Controller's remote interface as its user manual describes it
(SCPI-style commands, one per ZeroMQ message, REQ/REP on TCP port 5555), read through the
Python examples IDQ ships with the instrument (``Examples/Python``: ``utils/common.py``
``zmq_exec``, ``Inputs_status``, ``Coincidence_counters_acquisition``,
``Timestamp_acquisition``, ``Timestamp_acquisition_stream``) and a lab's ID900 driver built
on the same commands (``INPU<n>:THRE``, ``INPU<n>:COUN?``, ``GEN``/``TSCO``/``OUTP``
blocks). The manual's own pages were not read here. The ID900 answers the same commands.

Commands this driver sends (``n`` is the input 1-4; numbers in the units shown)::

    *IDN?                                  identity
    INPU<n>:ENAB ON|OFF                    input on/off
    INPU<n>:THRE <v>V      INPU<n>:THRE?   discriminator threshold, V
    INPU<n>:EDGE RISI|FALL INPU<n>:EDGE?   tagged edge
    INPU<n>:DEAD <ps>      INPU<n>:DEAD?   input dead time, ps
    INPU<n>:COUN:MODE CYCL;INTE <ms>       counter integrating over cycles of <ms>
    INPU<n>:COUN?                          counts of the last completed cycle
    DELA<k>:VALU <ps>      DELA<k>:VALU?   delay block of input n (k = n + delay_block_offset)
    DEVI:RES:BWID?                         time bin of the tags, ps
    DEVI:SYNC INT|EXT      DEVI:SYNC?      time base: internal oscillator or external reference
    RAW<n>:SEND ON|OFF                     send input n's timestamps to the data link
    REC:ENAB ON;NUM INF    REC:PLAY        REC:STOP     the acquisition window

``DEVI:SYNC`` and ``INPU<n>:DEAD`` appear in no source read here: they follow the command
set's naming (block, then four-letter nodes) for settings the instrument has (reference
input, input dead time) and must be checked against the manual before use;
docs/drivers.md lists them with the other uncertain points.
Every message gets one reply: a setting is answered with an empty message, a query with
its value; any other answer to a setting is the instrument refusing it
(:class:`InstrumentReportedError` with its text).

Timestamps do not come over port 5555. The vendor's Data Link Target service (DLT, a
ZeroMQ REP server, port 6060 on the host that receives the data) is told
``start-stream --address <tc> --channel <n> --stream-port <p> --with-ref-index`` and
replies JSON ``{"id": ...}``; it then sends that input's timestamps to a ZeroMQ PAIR socket
listening on port ``p`` as little-endian ``uint64`` pairs ``(timestamp_ps, ref_index)``:
time since the last reference pulse and the number of that pulse. ``stop --id <id>``
ends it. With a periodic reference (``options.reference_period_ps``: the internal
reference or the slot clock on START) the driver puts every tag on one axis,
``ref_index * reference_period_ps + timestamp_ps``, and merges the inputs in time order
within each block.

Every public method raises only :class:`drivers.errors.InstrumentError` subclasses: a
silent controller is an :class:`InstrumentTimeoutError`, a garbled reply a
:class:`ProtocolError`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
import threading
import time
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import zmq
from pydantic import Field

from drivers.common import DriverOptions, check_choice, check_range, health_check
from drivers.errors import (
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeoutError,
    NotConnectedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.interfaces import (
    TAG_DTYPE,
    Edge,
    HealthLevel,
    InstrumentHealth,
    ReferenceClock,
    TagBlock,
    TimeTagger,
)
from drivers.restore import SettingsMemory, identity_fields
from drivers.transports.base import MessageTransport
from drivers.transports.zmq_req import ZmqReqTransport

IDN_PATTERN = r"ID\s*Quantique.*(ID900|ID1000)|(ID900|ID1000).*"
_NUMBER_RE = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*$")
_EDGES = {"RISI": Edge.RISING, "RISING": Edge.RISING, "FALL": Edge.FALLING, "FALLING": Edge.FALLING}
_SYNC = {"INT": ReferenceClock.INTERNAL, "INTERNAL": ReferenceClock.INTERNAL}
_SYNC |= {"EXT": ReferenceClock.EXTERNAL, "EXTERNAL": ReferenceClock.EXTERNAL}
_ON_OFF = {"ON": True, "OFF": False, "1": True, "0": False}

#: Record of the data link: (timestamp since the last reference, reference index).
STREAM_DTYPE = np.dtype([("timestamp_ps", "<u8"), ("ref_index", "<u8")])


#: the controller's SCPI port (REQ/REP)
SCPI_PORT = 5555


def scpi_endpoint(resource: str) -> str:
    """The ZeroMQ endpoint of a controller's SCPI interface: ``resource`` as given when
    it names a transport (``tcp://HOST:PORT``), else ``tcp://resource:5555``."""
    return resource if "://" in resource else f"tcp://{resource}:{SCPI_PORT}"


class IdqTimeControllerOptions(DriverOptions):
    channels: list[Annotated[int, Field(ge=1, le=4)]] = Field(
        default_factory=lambda: [1, 2, 3, 4], min_length=1, description="inputs 1-4 to use"
    )
    dlt_endpoint: str = Field(
        "tcp://127.0.0.1:6060", description="the vendor's Data Link Target service (REQ/REP)"
    )
    stream_host: str = Field(
        "127.0.0.1", description="address the DLT reaches this host's stream sockets at"
    )
    reference_period_ps: int = Field(
        100_000_000,
        gt=0,
        le=10**12,
        description="period of the reference pulses the tags count from",
    )
    delay_block_offset: int = Field(0, ge=0, le=16, description="DELA<n + offset> delays INPU<n>")
    counter_integration_ms: int = Field(100, ge=1, le=100_000)
    threshold_range_v: tuple[float, float] = (-2.0, 2.0)
    delay_range_ps: tuple[int, int] = (0, 100_000_000)
    dead_time_range_ps: tuple[int, int] = (0, 1_000_000_000)


class IdqTimeController(TimeTagger):
    """``resource`` is the controller's SCPI endpoint, ``tcp://HOST:5555`` (a bare host
    name gets port 5555)."""

    Options = IdqTimeControllerOptions

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: IdqTimeControllerOptions | None = None,
        transport: MessageTransport | None = None,
    ) -> None:
        self.name = name
        self.options = options or IdqTimeControllerOptions()
        endpoint = scpi_endpoint(resource)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.transport = transport or ZmqReqTransport(name, endpoint, timeout_s=timeout_s)
        self._identity = ""
        self._lock = threading.RLock()
        self._streams: dict[int, tuple[str, zmq.Socket[Any]]] = {}
        self._dlt: ZmqReqTransport | None = None
        #: settings made through this driver, put back after the controller restarted
        self.memory = SettingsMemory(name)
        self.transport.after_reopen.callback = self.check_settings

    # --- SCPI helpers ------------------------------------------------------------

    def _set(self, command: str) -> None:
        reply = self.transport.query(command)
        if reply:
            raise InstrumentReportedError(self.name, command, f"controller answered {reply!r}")

    def _number(self, command: str) -> float:
        reply = self.transport.query(command)
        m = _NUMBER_RE.match(reply)
        if m is None or not math.isfinite(float(m.group(1))):
            raise ProtocolError(self.name, command, f"expected a number, got {reply!r}")
        return float(m.group(1))

    def _word(self, command: str, table: dict[str, Any]) -> Any:
        reply = self.transport.query(command).upper()
        if reply not in table:
            raise ProtocolError(self.name, command, f"unexpected reply {reply!r}")
        return table[reply]

    def _channel(self, command: str, channel: int) -> int:
        if channel not in self.options.channels:
            raise OutOfRangeError(
                self.name, command, f"channel {channel} is not one of {self.options.channels}"
            )
        return int(channel)

    # --- Instrument --------------------------------------------------------------

    def connect(self) -> None:
        with self._lock:
            if self._identity and self.transport.is_open:
                return
            self.transport.open()
            try:
                identity = self.transport.query("*IDN?")
                if not re.search(IDN_PATTERN, identity, re.IGNORECASE):
                    raise ProtocolError(
                        self.name, "*IDN?", f"{identity!r} is not an ID900/ID1000 Time Controller"
                    )
                # another controller at this address since the first connect: refuse it
                self.memory.check_identity(identity_fields(identity))
                self.memory.remember_identity(
                    identity_fields(identity),
                    lambda: identity_fields(self.transport.query("*IDN?")),
                )
                reconnecting = len(self.memory) > 0  # settings made before a close
                self._enable_inputs()
                if reconnecting:
                    self.check_settings()
            except InstrumentError:
                self.transport.close()
                raise
            self._identity = identity

    def _enable_inputs(self) -> None:
        """Connect-time setup: every input of ``options.channels`` on, counting."""
        integration = self.options.counter_integration_ms
        for ch in self.options.channels:
            self._set(f"INPU{ch}:ENAB ON")
            self._set(f"INPU{ch}:COUN:MODE CYCL;INTE {integration}")
            self.memory.remember(
                f"input_enabled[{ch}]",
                True,
                self._enable_inputs,
                functools.partial(self._input_enabled, ch),
            )

    def _input_enabled(self, channel: int) -> bool:
        return bool(self._word(f"INPU{channel}:ENAB?", _ON_OFF))

    def check_settings(self) -> None:
        """Read back the settings made through this driver; put them back if the
        controller lost them (it restarted). Raises SettingsLostError if that fails."""
        with self._lock:
            self.memory.restore(self._enable_inputs, self.transport.drop_connection)

    def close(self) -> None:
        with self._lock:
            self._close_streams()
            self._identity = ""
            self.transport.close()

    def identify(self) -> str:
        return self.transport.query("*IDN?")

    def safe_state(self) -> None:
        """Stops the stream (a tagger emits nothing; stopping loses no hardware safety)."""
        self.stop_stream()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.check_settings()
            self.identify()
            return InstrumentHealth(HealthLevel.OK, "answers *IDN?")

        return self.memory.report(health_check(self.name, probe))

    # --- TimeTagger settings -----------------------------------------------------

    def channels(self) -> list[int]:
        return list(self.options.channels)

    def set_input_delay_ps(self, channel: int, delay_ps: int) -> None:
        ch = self._channel("DELA:VALU", channel)
        k = ch + self.options.delay_block_offset
        lo, hi = self.options.delay_range_ps
        v = check_range(self.name, f"DELA{k}:VALU", "delay", delay_ps, (lo, hi), "ps")
        self._set(f"DELA{k}:VALU {round(v)}")
        self.memory.remember(
            f"input_delay_ps[{ch}]",
            float(round(v)),
            lambda: self.set_input_delay_ps(ch, round(v)),
            lambda: float(self.input_delay_ps(ch)),
        )

    def input_delay_ps(self, channel: int) -> int:
        k = self._channel("DELA:VALU?", channel) + self.options.delay_block_offset
        return round(self._number(f"DELA{k}:VALU?"))

    def set_trigger_level_v(self, channel: int, level_v: float) -> None:
        ch = self._channel("INPU:THRE", channel)
        v = check_range(
            self.name, f"INPU{ch}:THRE", "threshold", level_v, self.options.threshold_range_v, "V"
        )
        self._set(f"INPU{ch}:THRE {v:.4f}V")
        self.memory.remember(
            f"trigger_level_v[{ch}]",
            v,
            lambda: self.set_trigger_level_v(ch, v),
            lambda: self.trigger_level_v(ch),
            tolerance=5e-5,
        )

    def trigger_level_v(self, channel: int) -> float:
        ch = self._channel("INPU:THRE?", channel)
        return self._number(f"INPU{ch}:THRE?")

    def set_edge(self, channel: int, edge: Edge) -> None:
        ch = self._channel("INPU:EDGE", channel)
        word = {Edge.RISING: "RISI", Edge.FALLING: "FALL"}[
            check_choice(self.name, f"INPU{ch}:EDGE", Edge, edge)
        ]
        self._set(f"INPU{ch}:EDGE {word}")
        chosen = Edge(edge)
        self.memory.remember(
            f"edge[{ch}]",
            chosen.name,
            lambda: self.set_edge(ch, chosen),
            lambda: self.edge(ch).name,
        )

    def edge(self, channel: int) -> Edge:
        ch = self._channel("INPU:EDGE?", channel)
        return Edge(self._word(f"INPU{ch}:EDGE?", _EDGES))

    def set_dead_time_ps(self, channel: int, dead_time_ps: int) -> None:
        ch = self._channel("INPU:DEAD", channel)
        lo, hi = self.options.dead_time_range_ps
        v = check_range(self.name, f"INPU{ch}:DEAD", "dead time", dead_time_ps, (lo, hi), "ps")
        self._set(f"INPU{ch}:DEAD {round(v)}")
        self.memory.remember(
            f"dead_time_ps[{ch}]",
            float(round(v)),
            lambda: self.set_dead_time_ps(ch, round(v)),
            lambda: float(self.dead_time_ps(ch)),
        )

    def dead_time_ps(self, channel: int) -> int:
        ch = self._channel("INPU:DEAD?", channel)
        return round(self._number(f"INPU{ch}:DEAD?"))

    def set_reference_clock(self, source: ReferenceClock) -> None:
        word = {ReferenceClock.INTERNAL: "INT", ReferenceClock.EXTERNAL: "EXT"}[
            check_choice(self.name, "DEVI:SYNC", ReferenceClock, source)
        ]
        self._set(f"DEVI:SYNC {word}")
        clock = ReferenceClock(source)
        self.memory.remember(
            "reference_clock",
            clock.name,
            lambda: self.set_reference_clock(clock),
            lambda: self.reference_clock().name,
        )

    def reference_clock(self) -> ReferenceClock:
        return ReferenceClock(self._word("DEVI:SYNC?", _SYNC))

    def resolution_ps(self) -> float:
        bin_ps = self._number("DEVI:RES:BWID?")
        if not bin_ps > 0:
            raise ProtocolError(self.name, "DEVI:RES:BWID?", f"bin width {bin_ps} ps")
        return bin_ps

    def count_rates_hz(self) -> dict[int, float]:
        """Counts of each input's last completed counter cycle over the cycle length (the
        counter integrates over ``options.counter_integration_ms``; no blocking)."""
        window_s = self.options.counter_integration_ms / 1000
        rates = {}
        for ch in self.options.channels:
            counts = self._number(f"INPU{ch}:COUN?")
            if counts < 0 or counts != int(counts):
                raise ProtocolError(self.name, f"INPU{ch}:COUN?", f"count {counts!r}")
            rates[ch] = counts / window_s
        return rates

    # --- streaming -----------------------------------------------------------------

    def _dlt_query(self, command: str) -> dict[str, Any]:
        assert self._dlt is not None
        reply = self._dlt.query(command)
        try:
            value = json.loads(reply)
        except json.JSONDecodeError:
            raise ProtocolError(self.name, command, f"data link answered {reply[:80]!r}") from None
        if not isinstance(value, dict):
            raise ProtocolError(self.name, command, f"data link answered {reply[:80]!r}")
        if "error" in value:
            raise InstrumentReportedError(self.name, command, f"data link: {value['error']}")
        return value

    def start_stream(self) -> None:
        """Open one PAIR socket per input, ask the DLT to stream into it, start sending."""
        with self._lock:
            if not self._identity:
                raise NotConnectedError(self.name, "start_stream", "not connected")
            if self._streams:
                return
            self._dlt = ZmqReqTransport(
                self.name, self.options.dlt_endpoint, timeout_s=self.timeout_s
            )
            self._dlt.open()
            context: zmq.Context[Any] = zmq.Context.instance()
            try:
                for ch in self.options.channels:
                    sock = context.socket(zmq.PAIR)
                    sock.setsockopt(zmq.LINGER, 0)
                    port = sock.bind_to_random_port(f"tcp://{self.options.stream_host}")
                    self._streams[ch] = ("", sock)
                    reply = self._dlt_query(
                        shlex.join(
                            [
                                "start-stream",
                                "--address",
                                self.endpoint,
                                "--channel",
                                str(ch),
                                "--stream-port",
                                str(port),
                                "--with-ref-index",
                            ]
                        )
                    )
                    self._streams[ch] = (str(reply.get("id", "")), sock)
                    self._set(f"RAW{ch}:SEND ON")
                self._set("REC:ENAB ON;NUM INF")
                self._set("REC:PLAY")
            except (InstrumentError, zmq.ZMQError) as exc:
                self._stop_data_link()
                self._close_streams()
                if isinstance(exc, InstrumentError):
                    raise
                raise ProtocolError(self.name, "start_stream", f"ZeroMQ: {exc}") from None

    def read_block(self, timeout_s: float) -> TagBlock | None:
        """Everything the inputs' streams delivered, waiting up to ``timeout_s`` for the
        first message; tags of all inputs merged in time order."""
        with self._lock:
            if not self._streams:
                raise NotConnectedError(self.name, "read_block", "stream not started")
            poller = zmq.Poller()
            for _, sock in self._streams.values():
                poller.register(sock, zmq.POLLIN)
            deadline = time.monotonic() + timeout_s
            chunks: list[tuple[int, bytes]] = []
            try:
                ready = dict(poller.poll(max(0, round(timeout_s * 1000))))
                while ready:
                    for ch, (_, sock) in self._streams.items():
                        while sock in ready:
                            try:
                                chunks.append((ch, sock.recv(zmq.NOBLOCK)))
                            except zmq.Again:
                                break
                    if time.monotonic() >= deadline:
                        break
                    ready = dict(poller.poll(0))
            except zmq.ZMQError as exc:
                raise ProtocolError(self.name, "read_block", f"ZeroMQ: {exc}") from None
        if not chunks:
            return None
        return self._decode(chunks)

    def _decode(self, chunks: list[tuple[int, bytes]]) -> TagBlock:
        period = self.options.reference_period_ps
        channels: list[npt.NDArray[np.int16]] = []
        times: list[npt.NDArray[np.int64]] = []
        for ch, data in chunks:
            if len(data) % STREAM_DTYPE.itemsize:
                raise ProtocolError(
                    self.name,
                    "read_block",
                    f"input {ch}: {len(data)} bytes is not a whole number of "
                    f"{STREAM_DTYPE.itemsize}-byte records",
                )
            rec = np.frombuffer(data, dtype=STREAM_DTYPE)
            if len(rec) and (
                int(rec["timestamp_ps"].max()) >= period
                or (int(rec["ref_index"].max()) + 1) * period >= 2**62
            ):
                raise ProtocolError(
                    self.name,
                    "read_block",
                    f"input {ch}: timestamp beyond the {period} ps reference period or an "
                    "implausible reference index (wrong reference_period_ps, or not a data link "
                    "stream)",
                )
            t = rec["ref_index"].astype(np.int64) * period + rec["timestamp_ps"].astype(np.int64)
            times.append(t)
            channels.append(np.full(len(t), ch, dtype=np.int16))
        t_all = np.concatenate(times)
        order = np.argsort(t_all, kind="stable")
        tags = np.empty(len(t_all), dtype=TAG_DTYPE)
        tags["time_ps"] = t_all[order]
        tags["channel"] = np.concatenate(channels)[order]
        start = int(tags["time_ps"][0]) if len(tags) else 0
        stop = int(tags["time_ps"][-1]) + 1 if len(tags) else 0
        return TagBlock(tags, start_ps=start, stop_ps=stop)

    def stop_stream(self) -> None:
        """Stop the acquisition and the data link; local sockets are closed even when the
        controller does not answer (the error is raised after)."""
        with self._lock:
            if not self._streams:
                return
            first_error: InstrumentError | None = None
            for command in ["REC:STOP", *(f"RAW{ch}:SEND OFF" for ch in self._streams)]:
                try:
                    self._set(command)
                except InstrumentError as exc:
                    first_error = first_error or exc
                    if isinstance(exc, InstrumentTimeoutError | NotConnectedError):
                        break
            link_error = self._stop_data_link()
            first_error = first_error or link_error
            self._close_streams()
            if first_error is not None:
                raise first_error

    def _stop_data_link(self) -> InstrumentError | None:
        """Tell the data link to stop every stream it started (it is a separate service: it
        may answer when the controller does not); the first error, if any."""
        for stream_id, _ in self._streams.values():
            if not stream_id or self._dlt is None:
                continue
            try:
                self._dlt_query(shlex.join(["stop", "--id", stream_id]))
            except InstrumentError as exc:
                return exc  # a silent data link would make every further stop wait too
        return None

    def _close_streams(self) -> None:
        streams, self._streams = self._streams, {}
        for _, sock in streams.values():
            sock.close(0)
        if self._dlt is not None:
            self._dlt.close()
            self._dlt = None
