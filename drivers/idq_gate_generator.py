"""ID Quantique Time Controller (ID1000) as the gate generator of a gated detector.

The Time Controller's generator blocks make pulses; a timestamp combiner passes them to
an output, which drives the external gate (clock) input of a gated InGaAs detector. This
driver talks to the same SCPI endpoint as the time-tagger driver
(:mod:`drivers.idq_time_controller`: ZeroMQ REQ/REP, TCP port 5555, one reply per
message) but is a separate instrument in the node config with its own socket: a ZeroMQ
socket must not be used from two threads, and the tagger's socket is busy with its own
commands. The controller serves both clients' messages one at a time.

Sources: a lab's ID1000 driver (a ``TimeController`` class over ZeroMQ with
``config_generator``, ``config_combiner``, ``config_output``, ``play``, ``stop``,
``link``, ``delay``, and the commands it sends written out in its comments), and IDQ's
shipped Python examples (``Examples/Python``: the filtered-histogram example's dummy
signals, the streamed-timestamps example's dummy timestamps, the counts-over-long-time
example's generators linked to the record signal). A third-party summary of the same
examples (generators ``GEN1``-``GEN8``, outputs ``OUTP1``-``OUTP4``, ``MODE NIM``) was
read too. The manual's pages were not.

Commands this driver sends (``n`` the generator, ``k`` the combiner, ``m`` the output;
times are integers in ps)::

    *IDN?
    OUTP<m>:ENAB OFF                                  output idle while configuring
    GEN<n>:ENAB ON;PNUM <count|INF>;TRIG:LINK <src>;ARM:MODE AUTO|MANU
    TSCO<k>:WIND:ENAB OFF;:TSCO<k>:FIR:LINK GEN<n>;:TSCO<k>:OPIN ONLYFIR;OPOU ONLYFIR
    OUTP<m>:LINK TSCO<k>;MODE TTL|NIM
    GEN<n>:PLAY                                       free-running only
    GEN<n>:PPER <ps>        GEN<n>:PPER?              gate period
    GEN<n>:PWID <ps>        GEN<n>:PWID?              gate width
    GEN<n>:TRIG:DELA <ps>   GEN<n>:TRIG:DELA?         gate delay after the trigger
    OUTP<m>:ENAB ON|OFF     OUTP<m>:ENAB?             gates to the detector or not
    GEN<n>:ENAB?  GEN<n>:TRIG:LINK?  TSCO<k>:FIR:LINK?  TSCO<k>:OPOU?  OUTP<m>:LINK?
    OUTP<m>:MODE?                                     read back the routing

Commands after ``;`` continue the previous command's path (``GEN1:TRIG:LINK NONE;ARM:MODE
AUTO`` sets ``GEN1:TRIG:ARM:MODE``); ``;:`` starts again from the root. Both sources
write them so.

**Gates tied to the slots.** A free-running generator (``TRIG:LINK NONE``, ``PNUM INF``,
``PLAY``) repeats at its own period from the moment PLAY arrives: its phase relative to
the transmitter's slots is whatever that moment was, and it walks off unless the
controller's time base is locked to the transmitter's reference. A delay then means
nothing relative to the slots, and a delay scan cannot find the pulse. So by default the
generator is *triggered* by the slot clock (``options.trigger_link``, the START input):
each trigger starts ``options.gates_per_trigger`` gates, ``gate_period_ps`` apart,
``gate_delay_ps`` after it, and the generator re-arms itself (``ARM:MODE AUTO``). With
one gate per trigger the gate rate is the slot clock's (the period must still exceed the
width); a slower reference (10 MHz) with N gates per trigger gives N slots' gates per
reference pulse. ``trigger_link = "NONE"`` gives the free-running generator, for bench
work without a transmitter (dark counts).

Confirmed by both sources: ``GEN<n>:ENAB``, ``PNUM`` (a count or ``INF``), ``PPER``,
``PWID`` in ps, ``TRIG:DELA``, ``TRIG:LINK`` (``NONE``, another generator in the lab's
driver, ``REC`` in IDQ's), ``TRIG:ARM:MODE AUTO|MANU``, ``PLAY``; linked generators in
``AUTO`` need no PLAY of their own; ``TSCO<k>:FIR:LINK GEN<n>``, ``OPIN ONLYFIR``,
``OPOU ONLYFIR``, ``WIND:ENAB OFF``; ``OUTP<m>:ENAB ON|OFF``, ``LINK TSCO<k>``, ``MODE``.

**Unconfirmed** (one source or none; docs/drivers.md lists them too):

* linking a generator's trigger to the START input or an input (``STAR``, ``INPU<i>``,
  ``DELA<i>``): no source shows it (a third-party driver links a histogram to ``STAR``);
* the query forms (``GEN<n>:PPER?`` ...) and their reply format: sources query other
  blocks (``INPU<n>:COUN?``, a lab's ID900 class ``TSCO<k>:OPIN?``), never a generator;
  the reply is taken as an integer with an optional unit;
* ``MODE TTL`` (the lab's driver only; ``MODE NIM`` is in both IDQ's examples and the
  summary); ``GEN<n>:STOP`` (the lab's driver only, not sent here);
* the limits: no source gives the shortest period or width, the time step, the largest
  pulse count or delay. The defaults (``options.period_range_ps``, ``width_range_ps``,
  ``delay_range_ps``, ``time_step_ps``) are the span the sources' values cover (periods
  80 ns to 1.5 s, widths from 4 ns, a delay bound of 3.6 s in IDQ's example, a period of
  4000100 ps, so a step of at most 100 ps) widened to what a gated detector needs (a 1 ns
  gate, a 10 ns period); check them on the instrument;
* the number of blocks: ``GEN1``-``GEN8`` and ``OUTP1``-``OUTP4`` (the summary; the
  examples use up to GEN4, OUTP3), ``TSCO1``-``TSCO24`` (a lab's ID900 class);
* the ID900: a lab's ID900 class has event generators ``TSGE<n>`` and no ``GEN``; this
  driver is for the ID1000 (an ID900 refuses the first GEN command at connect);
* whether the detector's gate is as wide as the pulse: a detector that makes its own
  gate on the clock edge ignores ``gate_width_ps``.

Power cycles (:mod:`drivers.restore`): the identity is compared and the routing, the
period, width, delay and output state set through this driver are read back at every
:meth:`health`, after a reconnect and at a connect after a close; lost ones are put back,
the output last. Every public method raises only :class:`InstrumentError` subclasses.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from drivers.common import DriverOptions, check_range, health_check
from drivers.errors import (
    InstrumentError,
    InstrumentReportedError,
    OutOfRangeError,
    ProtocolError,
)
from drivers.idq_time_controller import IDN_PATTERN, scpi_endpoint
from drivers.interfaces import GateGenerator, HealthLevel, InstrumentHealth
from drivers.restore import SettingsMemory, identity_fields
from drivers.transports.base import MessageTransport
from drivers.transports.zmq_req import ZmqReqTransport

_INTEGER_RE = re.compile(r"^\s*\+?(\d+(?:\.0*)?)\s*(?:PS)?\s*$", re.IGNORECASE)
_ON_OFF = {"ON": True, "OFF": False, "1": True, "0": False}
#: a generator's trigger source: none (free-running), START, an input, its delay block,
#: another generator, the record signal
TRIGGER_LINK_PATTERN = r"^(NONE|STAR|INPU[1-4]|DELA[1-8]|GEN[1-8]|REC)$"


class IdqGateGeneratorOptions(DriverOptions):
    generator: int = Field(1, ge=1, le=8, description="GEN block making the gates")
    combiner: int = Field(
        9, ge=1, le=24, description="TSCO block passing the generator to the output"
    )
    output: int = Field(1, ge=1, le=4, description="OUTP connector wired to the detector's gate")
    output_level: Literal["TTL", "NIM"] = Field(
        "TTL", description="logic level of the output: what the detector's gate input takes"
    )
    trigger_link: str = Field(
        "STAR",
        pattern=TRIGGER_LINK_PATTERN,
        description="block whose pulses start the gates (the slot clock's input); NONE: "
        "free-running from PLAY, not tied to the slots",
    )
    gates_per_trigger: int = Field(
        1, ge=1, le=2**31 - 1, description="gates after each trigger (ignored when free-running)"
    )
    period_range_ps: tuple[int, int] = Field(
        (10_000, 1_500_000_000_000), description="accepted periods (unconfirmed, see module)"
    )
    width_range_ps: tuple[int, int] = Field(
        (1_000, 1_000_000_000_000), description="accepted widths (unconfirmed)"
    )
    delay_range_ps: tuple[int, int] = Field(
        (0, 3_600_000_000_000), description="accepted trigger delays (unconfirmed)"
    )
    time_step_ps: int = Field(
        1, ge=1, le=1_000_000, description="times are rounded to this step (unconfirmed)"
    )
    gate_period_ps: int = Field(1_000_000, gt=0, description="period set at connect (slot period)")
    gate_width_ps: int = Field(2_500, gt=0, description="gate width set at connect")
    gate_delay_ps: int = Field(0, ge=0, description="gate delay set at connect")

    @field_validator("period_range_ps", "width_range_ps", "delay_range_ps")
    @classmethod
    def _interval(cls, limits: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= limits[0] <= limits[1]:
            raise ValueError(f"{limits} is not an interval of times >= 0 ps")
        return limits

    @field_validator("gate_period_ps", "gate_width_ps", "gate_delay_ps")
    @classmethod
    def _within(cls, value: int, info: ValidationInfo) -> int:
        quantity = str(info.field_name).removeprefix("gate_").removesuffix("_ps")
        limits = info.data.get(f"{quantity}_range_ps")
        if limits is not None and not limits[0] <= value <= limits[1]:
            raise ValueError(f"{value} ps outside {quantity}_range_ps [{limits[0]}, {limits[1]}]")
        period = info.data.get("gate_period_ps")
        if quantity == "width" and period is not None and value >= period:
            raise ValueError(f"{value} ps is not shorter than gate_period_ps {period} ps")
        return value


class IdqGateGenerator(GateGenerator):
    """``resource`` is the controller's SCPI endpoint, ``tcp://HOST:5555`` (a bare host
    name gets port 5555): the same endpoint as the tagger driver's."""

    Options = IdqGateGeneratorOptions

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: IdqGateGeneratorOptions | None = None,
        transport: MessageTransport | None = None,
    ) -> None:
        self.name = name
        self.options = options or IdqGateGeneratorOptions()
        endpoint = scpi_endpoint(resource)
        self.endpoint = endpoint
        self.transport = transport or ZmqReqTransport(name, endpoint, timeout_s=timeout_s)
        self.period_range_ps = self.options.period_range_ps
        self.width_range_ps = self.options.width_range_ps
        self.delay_range_ps = self.options.delay_range_ps
        self._lock = threading.RLock()
        self._identity = ""
        self._configured = False  # the first connect's setup completed
        # what this driver told the instrument (the width-below-period check uses them)
        self._period_ps = self.options.gate_period_ps
        self._width_ps = self.options.gate_width_ps
        #: settings made through this driver, put back after the controller restarted
        self.memory = SettingsMemory(name)
        self.transport.after_reopen.callback = self.check_settings

    # --- SCPI helpers ------------------------------------------------------------

    @property
    def _gen(self) -> str:
        return f"GEN{self.options.generator}"

    @property
    def _tsco(self) -> str:
        return f"TSCO{self.options.combiner}"

    @property
    def _outp(self) -> str:
        return f"OUTP{self.options.output}"

    @property
    def _free_running(self) -> bool:
        return self.options.trigger_link == "NONE"

    def _set(self, command: str) -> None:
        reply = self.transport.query(command)
        if reply:
            raise InstrumentReportedError(self.name, command, f"controller answered {reply!r}")

    def _integer(self, command: str) -> int:
        reply = self.transport.query(command)
        m = _INTEGER_RE.match(reply)
        if m is None:
            raise ProtocolError(self.name, command, f"expected a time in ps, got {reply[:60]!r}")
        value = float(m.group(1))
        if not math.isfinite(value) or value > 2**62:
            raise ProtocolError(self.name, command, f"implausible time {reply[:60]!r}")
        return int(value)

    def _word(self, command: str) -> str:
        reply = self.transport.query(command).strip().upper()
        if not re.fullmatch(r"[A-Z]+\d*", reply):
            raise ProtocolError(self.name, command, f"unexpected reply {reply[:60]!r}")
        return reply

    def _on_off(self, command: str) -> bool:
        word = self._word(command)
        if word not in _ON_OFF:
            raise ProtocolError(self.name, command, f"expected ON or OFF, got {word!r}")
        return _ON_OFF[word]

    def _time(self, command: str, quantity: str, value: int, limits: tuple[int, int]) -> int:
        """``value`` rounded to the time step, refused (nothing sent) outside ``limits``."""
        v = check_range(self.name, command, quantity, value, limits, "ps")
        step = self.options.time_step_ps
        rounded = round(v / step) * step
        return int(check_range(self.name, command, quantity, rounded, limits, "ps"))

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
                        self.name,
                        "*IDN?",
                        f"{identity[:80]!r} is not an ID Quantique Time Controller",
                    )
                self.memory.check_identity(identity_fields(identity))
                self.memory.remember_identity(
                    identity_fields(identity),
                    lambda: identity_fields(self.transport.query("*IDN?")),
                )
                if self._configured:  # a connect after a close: read back, put back
                    self.check_settings()
                else:
                    self._configure_routing()
                    self._initial_settings()
                    self._configured = True
            except InstrumentError:
                self.transport.close()
                raise
            self._identity = identity

    def _initial_settings(self) -> None:
        """First connect: the options' gate settings, the output remembered OFF."""
        opts = self.options
        self.set_gate_period_ps(opts.gate_period_ps)
        self.set_gate_width_ps(opts.gate_width_ps)
        self.set_gate_delay_ps(opts.gate_delay_ps)
        self.memory.remember(
            "output_enabled", False, self._output_off, self.output_enabled, enables=True
        )

    def _configure_routing(self) -> None:
        """Generator -> combiner -> output, the output left OFF (the gates go out only
        after :meth:`set_output_enabled`). Also the reconfiguration before a restore puts
        the remembered settings back (the output last)."""
        opts = self.options
        gen, tsco, outp = self._gen, self._tsco, self._outp
        self._set(f"{outp}:ENAB OFF")
        count = "INF" if self._free_running else str(opts.gates_per_trigger)
        arm = "MANU" if self._free_running else "AUTO"
        self._set(f"{gen}:ENAB ON;PNUM {count};TRIG:LINK {opts.trigger_link};ARM:MODE {arm}")
        self._set(f"{tsco}:WIND:ENAB OFF;:{tsco}:FIR:LINK {gen};:{tsco}:OPIN ONLYFIR;OPOU ONLYFIR")
        self._set(f"{outp}:LINK {tsco};MODE {opts.output_level}")
        if self._free_running:
            self._set(f"{gen}:PLAY")
        self.memory.remember(
            "routing", self._expected_routing(), self._configure_routing, self._routing
        )

    def _expected_routing(self) -> str:
        opts = self.options
        return (
            f"{self._outp}<-{self._tsco}<-{self._gen}<-{opts.trigger_link} "
            f"enabled=ON combiner=ONLYFIR level={opts.output_level}"
        )

    def _routing(self) -> str:
        """The routing as the controller reports it, in :meth:`_expected_routing`'s form."""
        outp_link = self._word(f"{self._outp}:LINK?")
        fir_link = self._word(f"{self._tsco}:FIR:LINK?")
        trigger = self._word(f"{self._gen}:TRIG:LINK?")
        enabled = "ON" if self._on_off(f"{self._gen}:ENAB?") else "OFF"
        op_out = self._word(f"{self._tsco}:OPOU?")
        level = self._word(f"{self._outp}:MODE?")
        return (
            f"{self._outp}<-{outp_link}<-{fir_link}<-{trigger} "
            f"enabled={enabled} combiner={op_out} level={level}"
        )

    def check_settings(self) -> None:
        """Read back the settings made through this driver; put them back if the
        controller lost them (it restarted). Raises SettingsLostError if that fails."""
        with self._lock:
            self.memory.restore(self._configure_routing, self.transport.drop_connection)

    def close(self) -> None:
        """Release the socket. The output keeps its state: :meth:`safe_state` first."""
        with self._lock:
            self._identity = ""
            self.transport.close()

    def identify(self) -> str:
        return self.transport.query("*IDN?")

    def safe_state(self) -> None:
        """Output OFF: no gate reaches the detector. Works on a closed driver too (the
        socket is opened for the one command)."""
        with self._lock:
            opened_here = not self.transport.is_open
            if opened_here:
                self.transport.open()
            try:
                self._output_off()
                self.memory.made_safe()
            finally:
                if opened_here:
                    self.transport.close()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.check_settings()
            on = self.output_enabled()
            period = self.gate_period_ps()
            return InstrumentHealth(
                HealthLevel.OK,
                f"output {'ON' if on else 'OFF'}, {self._gen} every {period} ps "
                f"after {self.options.trigger_link}",
            )

        return self.memory.report(health_check(self.name, probe))

    # --- GateGenerator -----------------------------------------------------------

    def set_gate_period_ps(self, period_ps: int) -> None:
        """Gate period in ps, within ``period_range_ps`` and above the gate width."""
        command = f"{self._gen}:PPER"
        v = self._time(command, "period", period_ps, self.period_range_ps)
        if v <= self._width_ps:
            raise OutOfRangeError(
                self.name, command, f"period {v} ps not above the gate width {self._width_ps} ps"
            )
        with self._lock:
            self._set(f"{command} {v}")
            self._period_ps = v
            self.memory.remember(
                "gate_period_ps",
                float(v),
                lambda: self.set_gate_period_ps(v),
                lambda: float(self.gate_period_ps()),
            )

    def gate_period_ps(self) -> int:
        """The period the generator reports, in ps (ProtocolError for 0: no period)."""
        period = self._integer(f"{self._gen}:PPER?")
        if period <= 0:
            raise ProtocolError(self.name, f"{self._gen}:PPER?", f"period {period} ps")
        return period

    def set_gate_width_ps(self, width_ps: int) -> None:
        """Gate width in ps, within ``width_range_ps`` and below the gate period."""
        command = f"{self._gen}:PWID"
        v = self._time(command, "width", width_ps, self.width_range_ps)
        if v >= self._period_ps:
            raise OutOfRangeError(
                self.name, command, f"width {v} ps not below the gate period {self._period_ps} ps"
            )
        with self._lock:
            self._set(f"{command} {v}")
            self._width_ps = v
            self.memory.remember(
                "gate_width_ps",
                float(v),
                lambda: self.set_gate_width_ps(v),
                lambda: float(self.gate_width_ps()),
            )

    def gate_width_ps(self) -> int:
        return self._integer(f"{self._gen}:PWID?")

    def set_gate_delay_ps(self, delay_ps: int) -> None:
        """Delay of the gates after the trigger in ps, within ``delay_range_ps``."""
        command = f"{self._gen}:TRIG:DELA"
        v = self._time(command, "delay", delay_ps, self.delay_range_ps)
        with self._lock:
            self._set(f"{command} {v}")
            self.memory.remember(
                "gate_delay_ps",
                float(v),
                lambda: self.set_gate_delay_ps(v),
                lambda: float(self.gate_delay_ps()),
            )

    def gate_delay_ps(self) -> int:
        return self._integer(f"{self._gen}:TRIG:DELA?")

    def _output_off(self) -> None:
        self.memory.switching_off("output_enabled")
        self._set(f"{self._outp}:ENAB OFF")

    def set_output_enabled(self, on: bool) -> None:
        with self._lock:
            if on:
                self._set(f"{self._outp}:ENAB ON")
            else:
                self._output_off()
            state = bool(on)
            self.memory.remember(
                "output_enabled",
                state,
                lambda: self.set_output_enabled(state),
                self.output_enabled,
                enables=True,
            )

    def output_enabled(self) -> bool:
        return self._on_off(f"{self._outp}:ENAB?")
