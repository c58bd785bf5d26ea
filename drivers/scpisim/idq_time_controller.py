"""Simulated ID Quantique Time Controller (ID1000) and its Data Link Target, over ZeroMQ.

:class:`IdqTimeControllerSim` serves, on loopback, what the driver
(:mod:`drivers.idq_time_controller`) talks to on real hardware:

* the controller's SCPI endpoint answering every message (an empty message for an accepted
  setting, the value for a query, ``Error: ...`` otherwise); it is a ROUTER socket, which a
  REQ client cannot tell from the device's REP but which may leave a request unanswered;
* the Data Link Target service, a REP socket taking ``start-stream``/``stop`` command lines
  and answering JSON;
* the streams: while ``REC`` plays and ``RAW<n>:SEND`` is on, the DLT connects to the
  client's PAIR socket and sends that input's events as ``uint64`` ``(timestamp_ps,
  ref_index)`` pairs every ``chunk_s`` of wall time.

Physics kept to what the settings change: each input sees pulses at ``rate_hz`` (a test
hook, :meth:`IdqTimeControllerSim.set_rate`) evenly spaced from the start of the
acquisition, ``pulse_amplitude_v`` high and ``pulse_width_ps`` wide; a threshold above the
amplitude sees nothing, the falling edge comes one pulse width later, the delay block adds
its delay, pulses closer than the dead time are lost, and tags are rounded to the bin width.
Counters count the same pulses over their cycle. Not modelled: coupling, the START input,
histograms, loops from an output back to an input.

The generator blocks (``GEN1``-``GEN8``), timestamp combiners (``TSCO1``-``TSCO24``) and
outputs (``OUTP1``-``OUTP4``) keep every setting the gate-generator driver
(:mod:`drivers.idq_gate_generator`) makes and answer its queries; no pulse is produced.
:meth:`IdqTimeControllerSim.gate_output` says what an output would send: the pulse train
of the generator it is routed to through a combiner, or None when the routing, an enable
or the play state leaves it idle (tests couple a detector model to it). Several clients
(a tagger driver and a gate-generator driver) may talk to the controller at once, each
on its own socket; their messages are served one at a time.

Faults (:meth:`IdqTimeControllerSim.inject`): ``garble`` (the next reply is not UTF-8),
``no_reply`` (the next request is swallowed), ``down``/``up`` (the controller stops
answering; the driver sees a timeout).

Run standalone: ``python -m drivers.scpisim.idq_time_controller --rate-hz 10000`` prints
the controller endpoint and the data link's, e.g. for ``qkdnode drivers probe``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

IDN = "ID Quantique,ID1000,SIM00042,2.0.0 (simulated)"
_SET_RE = re.compile(r"^([A-Z*]+)(\d*)((?::[A-Z]+)*)(\?)?(?:\s+(.*))?$")
_ABBREV = {
    "INPUT": "INPU",
    "ENABLE": "ENAB",
    "THRESHOLD": "THRE",
    "DEADTIME": "DEAD",
    "COUNTER": "COUN",
    "INTEGRATION": "INTE",
    "DELAY": "DELA",
    "VALUE": "VALU",
    "DEVICE": "DEVI",
    "RESOLUTION": "RES",
    "SYNCHRONIZATION": "SYNC",
    "RECORD": "REC",
    "GENERATOR": "GEN",
    "TRIGGER": "TRIG",
    "MODE": "MODE",
    "OUTPUT": "OUTP",
    "PULSE": "PULS",
    "WIDTH": "WIDT",
    "WINDOW": "WIND",
    "BEGIN": "BEGI",
    "FIRST": "FIR",
    "SECOND": "SEC",
    "OPOUT": "OPOU",
}
#: A block named as a link target: canonical short name and number ("GEN3", "NONE").
_LINK_RE = re.compile(
    r"^(GEN|GENERATOR|TSCO|INPU|INPUT|DELA|DELAY|STAR|START|REC|RECORD|NONE)(\d*)$"
)
_LINK_SHORT = {"GENERATOR": "GEN", "INPUT": "INPU", "DELAY": "DELA", "START": "STAR"}
_LINK_SHORT |= {"RECORD": "REC"}
_LINK_COUNT = {"GEN": 8, "TSCO": 24, "INPU": 4, "DELA": 8, "STAR": 0, "REC": 0, "NONE": 0}
#: Longest generator period, width and trigger delay the simulator takes, ps.
MAX_GEN_TIME_PS = 3_600_000_000_000
MAX_PULSE_COUNT = 2**31 - 1


@dataclass
class _Input:
    enabled: bool = False
    threshold_v: float = 0.1
    edge: str = "RISING"
    dead_ps: int = 0
    rate_hz: float = 0.0
    count_mode: str = "CYCL"
    integration_ms: int = 1000


@dataclass
class _Generator:
    """A GEN block at its power-on state (the simulator's choice: no source gives it)."""

    enabled: bool = False
    pulse_count: int | None = 1  # None: INF
    period_ps: int = 100_000
    width_ps: int = 4_000
    trigger_delay_ps: int = 0
    trigger_link: str = "NONE"
    arm_mode: str = "MANUAL"
    armed: bool = False
    playing: bool = False


@dataclass
class _Combiner:
    window_enabled: bool = False
    first_link: str = "NONE"
    second_link: str = "NONE"
    op_in: str = "ONLYFIR"
    op_out: str = "MUTE"


@dataclass
class _Output:
    enabled: bool = False
    link: str = "NONE"
    mode: str = "NIM"
    delay_ps: int = 0
    pulse: bool = False
    pulse_width_ps: int = 1_000


@dataclass(frozen=True)
class GateTrain:
    """What an output sends: a pulse of ``width_ps`` every ``period_ps``, ``delay_ps``
    after each trigger (``trigger`` a block such as ``STAR``, or ``NONE``: free-running
    from the PLAY), ``pulses_per_trigger`` at a time (None: without end)."""

    period_ps: int
    width_ps: int
    delay_ps: int
    trigger: str
    pulses_per_trigger: int | None
    level: str


class IdqTimeControllerSim:
    """Controller and data link on ``tcp://127.0.0.1`` (random ports); a thread serves both."""

    def __init__(
        self,
        reference_period_ps: int = 100_000_000,
        bin_width_ps: int = 1,
        chunk_s: float = 0.01,
        pulse_amplitude_v: float = 0.8,
        pulse_width_ps: int = 1000,
    ) -> None:
        self.reference_period_ps = reference_period_ps
        self.bin_width_ps = bin_width_ps
        self.chunk_s = chunk_s
        self.pulse_amplitude_v = pulse_amplitude_v
        self.pulse_width_ps = pulse_width_ps
        self.inputs = {n: _Input() for n in range(1, 5)}
        self.delays_ps = dict.fromkeys(range(1, 9), 0)
        self.sync = "INTERNAL"
        self.raw_send = dict.fromkeys(range(1, 5), False)
        self.playing_since: float | None = None
        self._reset_generators()
        self.requests_seen = 0
        #: every message the controller endpoint received, as bytes (test hook)
        self.received: list[bytes] = []
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._faults: dict[str, int] = {}
        self._down = False
        self._lock = threading.RLock()
        self._streams: dict[int, tuple[int, zmq.Socket[Any]]] = {}  # id -> (channel, socket)
        self._sent_until_ps: dict[int, int] = {}
        self._next_id = 1
        self._stop = threading.Event()
        self._tc = self._bind(zmq.ROUTER)
        self._dlt = self._bind(zmq.REP)
        self.endpoint = self._tc.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dlt_endpoint = self._dlt.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="idq-tc-sim", daemon=True)

    def _bind(self, kind: int, endpoint: str = "tcp://127.0.0.1:0") -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        return sock

    # --- life cycle and test hooks -------------------------------------------------------

    def start(self) -> IdqTimeControllerSim:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with self._lock:
            for _, sock in self._streams.values():
                sock.close(0)
            self._streams.clear()
        self._tc.close(0)
        self._dlt.close(0)

    def __enter__(self) -> IdqTimeControllerSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_rate(self, channel: int, rate_hz: float) -> None:
        """Pulses per second arriving at input ``channel``."""
        with self._lock:
            self.inputs[channel].rate_hz = rate_hz

    def power_cycle(self) -> None:
        """Off and on: every input, delay and the reference back at power-on defaults,
        nothing recording. ZeroMQ hides the restart from the client (it reconnects)."""
        with self._lock:
            self.inputs = {n: _Input() for n in range(1, 5)}
            self.delays_ps = dict.fromkeys(range(1, 9), 0)
            self.sync = "INTERNAL"
            self.raw_send = dict.fromkeys(range(1, 5), False)
            self.playing_since = None
            self._reset_generators()
            self._faults.clear()

    def _reset_generators(self) -> None:
        self.generators = {n: _Generator() for n in range(1, _LINK_COUNT["GEN"] + 1)}
        self.combiners = {n: _Combiner() for n in range(1, _LINK_COUNT["TSCO"] + 1)}
        self.outputs = {n: _Output() for n in range(1, 5)}

    def gate_output(self, output: int) -> GateTrain | None:
        """The pulse train output ``output`` sends: routed from a generator through a
        combiner that passes its first input (window off), the output, the generator
        enabled, and the generator running (played when free-running, re-armed by
        itself when triggered); None otherwise."""
        with self._lock:
            out = self.outputs[output]
            m = _LINK_RE.match(out.link)
            if not out.enabled or m is None or m.group(1) != "TSCO":
                return None
            tsco = self.combiners[int(m.group(2))]
            g = _LINK_RE.match(tsco.first_link)
            passes = tsco.op_in == "ONLYFIR" and tsco.op_out == "ONLYFIR"
            if g is None or g.group(1) != "GEN" or tsco.window_enabled or not passes:
                return None
            gen = self.generators[int(g.group(2))]
            free = gen.trigger_link == "NONE"
            running = gen.playing if free else gen.arm_mode == "AUTO"
            if not gen.enabled or not running or gen.width_ps >= gen.period_ps:
                return None
            return GateTrain(
                period_ps=gen.period_ps,
                width_ps=gen.width_ps,
                delay_ps=gen.trigger_delay_ps + out.delay_ps,
                trigger=gen.trigger_link,
                pulses_per_trigger=gen.pulse_count,
                level=out.mode,
            )

    def inject(self, fault: str, count: int = 1) -> None:
        """``garble`` or ``no_reply`` for the next ``count`` requests; ``down``/``up``."""
        with self._lock:
            if fault == "down":
                self._down = True
            elif fault == "up":
                self._down = False
            elif fault in ("garble", "no_reply"):
                self._faults[fault] = count
            else:
                raise ValueError(f"unknown fault {fault!r}")

    # --- server loop ----------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._tc, zmq.POLLIN)
        poller.register(self._dlt, zmq.POLLIN)
        next_chunk = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(5))
            if self._tc in events:
                frames = self._tc.recv_multipart()
                if len(frames) == 3 and frames[1] == b"":  # [peer, delimiter, message]
                    self._serve_controller(frames[0], frames[2])
            if self._dlt in events:
                self._dlt.send_string(self._handle_dlt(self._dlt.recv().decode("utf-8", "replace")))
            if time.monotonic() >= next_chunk:
                next_chunk = time.monotonic() + self.chunk_s
                self._send_chunks()

    def _serve_controller(self, peer: bytes, message: bytes) -> None:
        with self._lock:
            self.requests_seen += 1
            self.received.append(message)
            down = self._down
            fault = next((f for f, n in self._faults.items() if n > 0), None)
            if fault:
                self._faults[fault] -= 1
        if down or fault == "no_reply":
            return  # the request is lost, as on a dead device
        if fault == "garble":
            reply = b"\xff\xfe\x00garbage\x80"
        else:
            try:
                text = message.decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            replies = [self.handle(part.strip()) for part in text.split(";:")] if text else []
            reply = ("\n".join(r for r in replies if r) if text else "Error: not text").encode()
        self._tc.send_multipart([peer, b"", reply])

    # --- the controller's commands ------------------------------------------------------

    def handle(self, message: str) -> str:
        """One message (possibly ``;``-joined settings of one block); '' for accepted
        settings, the value for a query, ``Error: ...`` otherwise."""
        with self._lock:
            parts = [p.strip() for p in message.split(";")]
            if parts and not parts[-1] and len(parts) > 1:
                parts.pop()  # "...;LINK NONE;" ends with a separator
            replies: list[str] = []
            parent = ""
            for n, part in enumerate(parts):
                # SCPI: a command after ';' is relative to the previous one's path less its
                # last node ("GEN1:TRIG:DELA 0;LINK NONE" sets GEN1:TRIG:LINK)
                command = part if n == 0 else f"{parent}:{part}"
                replies.append(self._one(command))
                header = command.split(None, 1)[0] if command else ""
                parent = header.rsplit(":", 1)[0] if ":" in header else header
            errors = [r for r in replies if r.startswith("Error")]
            return errors[0] if errors else "\n".join(r for r in replies if r)

    def _one(self, command: str) -> str:
        m = _SET_RE.match(command.strip().upper())
        if m is None:
            return f"Error: syntax '{command}'"
        block, index_s, path, query, arg = m.groups()
        block = _ABBREV.get(block, block)
        keys = [_ABBREV.get(k, k) for k in path.split(":") if k]
        index = int(index_s) if index_s else 0
        arg = (arg or "").strip()
        if block == "*IDN" and query:
            return IDN
        if block == "INPU" and index in self.inputs:
            return self._input(self.inputs[index], index, keys, bool(query), arg)
        if block == "DELA" and index in self.delays_ps and keys == ["VALU"]:
            if query:
                return str(self.delays_ps[index])
            value = _int(arg)
            if value is None or not 0 <= value <= 1_000_000_000:
                return f"Error: value out of range '{command}'"
            self.delays_ps[index] = value
            return ""
        if block == "DEVI" and keys == ["RES", "BWID"] and query:
            return str(self.bin_width_ps)
        if block == "DEVI" and keys == ["SYNC"]:
            if query:
                return self.sync
            word = {"INT": "INTERNAL", "INTERNAL": "INTERNAL", "EXT": "EXTERNAL"}.get(arg)
            word = word or {"EXTERNAL": "EXTERNAL"}.get(arg)
            if word is None:
                return f"Error: invalid value '{command}'"
            self.sync = word
            return ""
        if block == "RAW" and index in self.raw_send and keys == ["SEND"] and not query:
            if arg not in ("ON", "OFF"):
                return f"Error: invalid value '{command}'"
            self.raw_send[index] = arg == "ON"
            return ""
        if block == "GEN" and index in self.generators:
            return self._generator(self.generators[index], f"GEN{index}", keys, query, arg)
        if block == "TSCO" and index in self.combiners:
            return self._combiner(self.combiners[index], f"TSCO{index}", keys, query, arg)
        if block == "OUTP" and index in self.outputs:
            return self._output(self.outputs[index], f"OUTP{index}", keys, query, arg)
        if block == "REC" and not query:
            if keys == ["PLAY"]:
                if self.playing_since is None:
                    self.playing_since = time.monotonic()
                    self._sent_until_ps = {}
                return ""
            if keys == ["STOP"]:
                self.playing_since = None
                return ""
            if keys in (["ENAB"], ["NUM"]):
                return ""
        return f"Error: undefined header '{command}'"

    def _input(self, inp: _Input, index: int, keys: list[str], query: bool, arg: str) -> str:
        name = f"INPU{index}:{':'.join(keys)}"
        if keys == ["ENAB"]:
            if query:
                return "ON" if inp.enabled else "OFF"
            if arg not in ("ON", "OFF", ""):
                return f"Error: invalid value '{name}'"
            inp.enabled = arg != "OFF"
            return ""
        if keys == ["THRE"]:
            if query:
                return f"{inp.threshold_v:.4f}V"
            value = _float(arg.removesuffix("V"))
            if value is None or not -2.0 <= value <= 2.0:
                return f"Error: value out of range '{name}'"
            inp.threshold_v = value
            return ""
        if keys == ["EDGE"]:
            if query:
                return inp.edge
            word = {"RISI": "RISING", "RISING": "RISING", "FALL": "FALLING"}.get(arg)
            word = word or {"FALLING": "FALLING"}.get(arg)
            if word is None:
                return f"Error: invalid value '{name}'"
            inp.edge = word
            return ""
        if keys == ["DEAD"]:
            if query:
                return str(inp.dead_ps)
            value = _int(arg)
            if value is None or not 0 <= value <= 1_000_000_000:
                return f"Error: value out of range '{name}'"
            inp.dead_ps = value
            return ""
        if keys == ["COUN", "MODE"] and not query and arg in ("CYCL", "ACCU"):
            inp.count_mode = arg
            return ""
        if keys in (["COUN", "INTE"], ["INTE"]) and not query:
            value = _int(arg)
            if value is None or not 1 <= value <= 100_000:
                return f"Error: value out of range '{name}'"
            inp.integration_ms = value
            return ""
        if keys == ["COUN"] and query:
            period = self._period_ps(inp)
            if period is None:
                return "0"
            return str(math.floor(inp.integration_ms * 1e9 / period))
        return f"Error: undefined header '{name}'"

    def _generator(
        self, gen: _Generator, name: str, keys: list[str], query: str | None, arg: str
    ) -> str:
        path = f"{name}:{':'.join(keys)}"
        if keys == ["ENAB"]:
            return _on_off(gen, "enabled", query, arg, path)
        if keys == ["PNUM"]:
            if query:
                return "INF" if gen.pulse_count is None else str(gen.pulse_count)
            if arg in ("INF", "INFINITE"):
                gen.pulse_count = None
                return ""
            value = _int(arg)
            if value is None or not 1 <= value <= MAX_PULSE_COUNT:
                return f"Error: value out of range '{path}'"
            gen.pulse_count = value
            return ""
        if keys in (["PPER"], ["PWID"], ["TRIG", "DELA"]):
            attr = {"PPER": "period_ps", "PWID": "width_ps", "DELA": "trigger_delay_ps"}[keys[-1]]
            if query:
                return str(getattr(gen, attr))
            value = _int(arg)
            low = 0 if keys[-1] == "DELA" else 1
            if value is None or not low <= value <= MAX_GEN_TIME_PS:
                return f"Error: value out of range '{path}'"
            setattr(gen, attr, value)
            return ""
        if keys == ["TRIG", "LINK"]:
            if query:
                return gen.trigger_link
            link = _link(arg)
            if link is None or link == name:
                return f"Error: invalid value '{path}'"
            gen.trigger_link = link
            return ""
        if keys == ["TRIG", "ARM", "MODE"]:
            if query:
                return gen.arm_mode
            word = {"AUTO": "AUTO", "AUTOMATIC": "AUTO", "MANU": "MANUAL", "MANUAL": "MANUAL"}
            if arg not in word:
                return f"Error: invalid value '{path}'"
            gen.arm_mode = word[arg]
            return ""
        if keys == ["TRIG", "ARM"] and not query and not arg:
            gen.armed = True
            return ""
        if keys in (["PLAY"], ["STOP"]) and not query and not arg:
            gen.playing = keys == ["PLAY"]
            return ""
        return f"Error: undefined header '{path}'"

    def _combiner(
        self, tsco: _Combiner, name: str, keys: list[str], query: str | None, arg: str
    ) -> str:
        path = f"{name}:{':'.join(keys)}"
        if keys == ["WIND", "ENAB"]:
            return _on_off(tsco, "window_enabled", query, arg, path)
        if keys in (["FIR", "LINK"], ["SEC", "LINK"]):
            attr = "first_link" if keys[0] == "FIR" else "second_link"
            if query:
                return str(getattr(tsco, attr))
            link = _link(arg)
            if link is None or link == name:
                return f"Error: invalid value '{path}'"
            setattr(tsco, attr, link)
            return ""
        if keys in (["OPIN"], ["OPOU"]):
            attr = "op_in" if keys == ["OPIN"] else "op_out"
            allowed = {"OPIN": ("ONLYFIR", "ONLYSEC", "AND", "OR"), "OPOU": ("ONLYFIR", "MUTE")}
            if query:
                return str(getattr(tsco, attr))
            if arg not in allowed[keys[0]]:
                return f"Error: invalid value '{path}'"
            setattr(tsco, attr, arg)
            return ""
        return f"Error: undefined header '{path}'"

    def _output(self, out: _Output, name: str, keys: list[str], query: str | None, arg: str) -> str:
        path = f"{name}:{':'.join(keys)}"
        if keys == ["ENAB"]:
            return _on_off(out, "enabled", query, arg, path)
        if keys == ["PULS"]:
            return _on_off(out, "pulse", query, arg, path)
        if keys == ["LINK"]:
            if query:
                return out.link
            link = _link(arg)
            if link is None or not (link == "NONE" or link.startswith("TSCO")):
                return f"Error: invalid value '{path}'"
            out.link = link
            return ""
        if keys == ["MODE"]:
            if query:
                return out.mode
            if arg not in ("TTL", "NIM"):
                return f"Error: invalid value '{path}'"
            out.mode = arg
            return ""
        if keys in (["DELA"], ["PULS", "WIDT"]):
            attr = "delay_ps" if keys == ["DELA"] else "pulse_width_ps"
            if query:
                return str(getattr(out, attr))
            value = _int(arg)
            if value is None or not 0 <= value <= 1_000_000_000:
                return f"Error: value out of range '{path}'"
            setattr(out, attr, value)
            return ""
        return f"Error: undefined header '{path}'"

    # --- events ------------------------------------------------------------------------------

    def _period_ps(self, inp: _Input) -> int | None:
        """Spacing of the tagged pulses, or None when the input sees none."""
        if not inp.enabled or inp.rate_hz <= 0 or inp.threshold_v >= self.pulse_amplitude_v:
            return None
        period = round(1e12 / inp.rate_hz)
        if period < inp.dead_ps:  # every other pulse (or more) falls in the dead time
            period *= math.ceil(inp.dead_ps / period)
        return max(period, 1)

    def _events(self, channel: int, start_ps: int, stop_ps: int) -> np.ndarray[Any, Any]:
        """Tag times in [start_ps, stop_ps) of ``channel`` since the acquisition started."""
        inp = self.inputs[channel]
        period = self._period_ps(inp)
        if period is None:
            return np.zeros(0, np.int64)
        offset = self.delays_ps[channel] + (self.pulse_width_ps if inp.edge == "FALLING" else 0)
        first = max(0, math.ceil((start_ps - offset) / period))
        last = math.ceil((stop_ps - offset) / period)
        t = offset + np.arange(first, max(first, last), dtype=np.int64) * period
        return (t // self.bin_width_ps) * self.bin_width_ps

    def _send_chunks(self) -> None:
        with self._lock:
            if self.playing_since is None:
                return
            now_ps = int((time.monotonic() - self.playing_since) * 1e12)
            for stream_id, (channel, sock) in list(self._streams.items()):
                if not self.raw_send[channel]:
                    continue
                since = self._sent_until_ps.get(stream_id, 0)
                t = self._events(channel, since, now_ps)
                self._sent_until_ps[stream_id] = now_ps
                if not len(t):
                    continue
                rec = np.empty(len(t), dtype=[("ts", "<u8"), ("ref", "<u8")])
                rec["ref"] = t // self.reference_period_ps
                rec["ts"] = t % self.reference_period_ps
                try:
                    sock.send(rec.tobytes(), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # the client is not there (yet): the data link drops the chunk

    # --- the data link service -----------------------------------------------------------

    def _handle_dlt(self, line: str) -> str:
        try:
            words = shlex.split(line)
        except ValueError:
            return json.dumps({"error": "cannot parse command"})
        if not words:
            return json.dumps({"error": "empty command"})
        opts = {
            words[i][2:]: (words[i + 1] if i + 1 < len(words) else "")
            for i in range(1, len(words))
            if words[i].startswith("--")
        }
        with self._lock:
            if words[0] == "start-stream":
                try:
                    channel = int(opts["channel"])
                    port = int(opts["stream-port"])
                except (KeyError, ValueError):
                    return json.dumps({"error": "start-stream needs --channel and --stream-port"})
                if channel not in self.inputs:
                    return json.dumps({"error": f"no channel {channel}"})
                sock = self._ctx.socket(zmq.PAIR)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://127.0.0.1:{port}")
                stream_id = self._next_id
                self._next_id += 1
                self._streams[stream_id] = (channel, sock)
                return json.dumps({"id": stream_id})
            if words[0] == "stop":
                try:
                    _, sock = self._streams.pop(int(opts["id"]))
                except (KeyError, ValueError):
                    return json.dumps({"error": f"no acquisition {opts.get('id')!r}"})
                sock.close(0)
                return json.dumps({})
        return json.dumps({"error": f"unknown command {words[0]!r}"})


def _on_off(target: object, attr: str, query: str | None, arg: str, path: str) -> str:
    """An ON/OFF setting of a block: its state for a query, '' when set."""
    if query:
        return "ON" if getattr(target, attr) else "OFF"
    if arg not in ("ON", "OFF", "1", "0"):
        return f"Error: invalid value '{path}'"
    setattr(target, attr, arg in ("ON", "1"))
    return ""


def _link(text: str) -> str | None:
    """A link target as the canonical block name ("GEN3", "STAR", "NONE"), or None."""
    m = _LINK_RE.match(text.strip())
    if m is None:
        return None
    block = _LINK_SHORT.get(m.group(1), m.group(1))
    count = _LINK_COUNT[block]
    if count == 0:
        return block if not m.group(2) else None
    if not m.group(2) or not 1 <= int(m.group(2)) <= count:
        return None
    return f"{block}{int(m.group(2))}"


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Simulated ID Quantique Time Controller")
    parser.add_argument("--rate-hz", type=float, default=0.0, help="pulse rate on inputs 1-4")
    parser.add_argument("--reference-period-ps", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    with IdqTimeControllerSim(reference_period_ps=args.reference_period_ps) as sim:
        for channel in range(1, 5):
            sim.set_rate(channel, args.rate_hz)
        print(f"{sim.endpoint} dlt_endpoint={sim.dlt_endpoint}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
