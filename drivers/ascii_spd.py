"""Single-photon detector with a line-based ASCII protocol (SinglePhotonDetector).

No vendor command set for gated InGaAs/SNSPD controllers is public in a form we can pin,
so this protocol is **ours** ("qkdnode SPD-ASCII v1"); a vendor driver maps onto the same
interface. It is served by :mod:`drivers.serialsim.spd_sim`.

Framing: one request line, one reply line, ``\\n``-terminated ASCII (``\\r\\n`` accepted)::

    request  <COMMAND>[ <ARG>]*<CS>\\n
    reply    OK[ <VALUE>]*<CS>\\n   |   ERR <CODE> <TEXT>*<CS>\\n

``CS`` is the XOR of all bytes before ``*`` as two upper-case hex digits (NMEA style).
Error codes: 1 unknown command, 2 value out of range, 3 checksum, 4 not allowed in this
state (e.g. ARM while LATCHED), 5 syntax.

Commands (values in the units of the interface)::

    IDN?            -> OK <vendor>,<model>,<serial>,<firmware>
    LIM?            -> OK EFF=<lo>:<hi> DEAD=<lo>:<hi> DELAY=<lo>:<hi> THR=<lo>:<hi>
    EFF <pct>       EFF?    -> OK <pct>        detection efficiency preset, %
    DEAD <ns>       DEAD?   -> OK <ns>         dead time, ns
    DELAY <ps>      DELAY?  -> OK <ps>         gate delay, ps
    THR <v>         THR?    -> OK <v>          discriminator threshold, V
    ARM | DISARM | RESET                       RESET clears a latch (-> DISARMED)
    STATE?          -> OK DISARMED|ARMED|LATCHED|FAULT
    RATE?           -> OK <hz>                 click rate over the last second
"""

from __future__ import annotations

import math
import re

from pydantic import Field

from drivers.common import DriverOptions, check_range, health_check
from drivers.errors import ChecksumError, InstrumentReportedError, ProtocolError
from drivers.interfaces import DetectorStatus, HealthLevel, InstrumentHealth, SinglePhotonDetector
from drivers.restore import SettingsMemory, identity_fields
from drivers.transports.serial import ReplyReader, SerialTransport

_LINE_RE = re.compile(rb"^([\x20-\x29\x2b-\x7e]*)\*([0-9A-F]{2})\r?\n$")
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_LIM_RE = re.compile(rf"(EFF|DEAD|DELAY|THR)=({_NUM}):({_NUM})(?=\s|$)")


def checksum(payload: bytes) -> int:
    """XOR of all bytes of ``payload``."""
    cs = 0
    for b in payload:
        cs ^= b
    return cs


def encode_line(payload: str) -> bytes:
    """``payload*CS\\n`` as bytes."""
    raw = payload.encode("ascii")
    return raw + f"*{checksum(raw):02X}\n".encode("ascii")


def decode_line(line: bytes) -> str:
    """Payload of a framed line; ValueError names what is wrong (checksum or framing)."""
    m = _LINE_RE.match(line)
    if m is None:
        raise ValueError(f"not a framed line: {line!r}")
    if int(m.group(2), 16) != checksum(m.group(1)):
        raise ArithmeticError(f"checksum {m.group(2).decode()} != {checksum(m.group(1)):02X}")
    return m.group(1).decode("ascii")


class AsciiSpdOptions(DriverOptions):
    baudrate: int = Field(115200)


class AsciiSpd(SinglePhotonDetector):
    Options = AsciiSpdOptions

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: AsciiSpdOptions | None = None,
        transport: SerialTransport | None = None,
    ) -> None:
        self.name = name
        self.options = options or AsciiSpdOptions()
        self.transport = transport or SerialTransport.for_driver(
            name, resource, timeout_s, self.options
        )
        self.efficiency_range_pct = (0.0, 100.0)
        self.dead_time_range_ns = (0.0, 1e6)
        self.delay_range_ps = (0.0, 1e6)
        self.threshold_range_v = (-10.0, 10.0)
        self._connected = False
        #: settings made through this driver, put back after a power cycle
        self.memory = SettingsMemory(name)
        self.transport.after_reopen.callback = self.check_settings

    def command(self, payload: str) -> str:
        """Send one command; return the text after ``OK`` (raises on ERR or a bad line)."""
        raw = self.transport.exchange(payload, encode_line(payload), ReplyReader.line)
        try:
            text = decode_line(raw)
        except ArithmeticError as exc:
            self.transport.discard_input()
            raise ChecksumError(self.name, payload, f"reply {raw!r}: {exc}") from None
        except ValueError as exc:
            self.transport.discard_input()
            raise ProtocolError(self.name, payload, str(exc)) from None
        if text == "OK":
            return ""
        if text.startswith("OK "):
            return text[3:]
        if text.startswith("ERR "):
            if text.startswith("ERR 3 "):
                raise ChecksumError(self.name, payload, f"detector reports: {text[4:]}")
            raise InstrumentReportedError(self.name, payload, f"detector reports: {text[4:]}")
        raise ProtocolError(self.name, payload, f"unexpected reply {text!r}")

    def _float(self, payload: str) -> float:
        text = self.command(payload)
        try:
            return float(text)
        except ValueError:
            raise ProtocolError(self.name, payload, f"expected a number, got {text!r}") from None

    # --- Instrument -------------------------------------------------------------------

    def connect(self) -> None:
        """Open, read the limits and, after a close (the node's recovery), put back the
        settings made before if the detector lost them (:mod:`drivers.restore`)."""
        with self.transport.lock:
            if self._connected:
                return
            with self.transport.opened_for_setup():
                identity = identity_fields(self.identify())
                # another detector on this port since the first connect: refuse it
                self.memory.check_identity(identity)
                self.memory.remember_identity(identity, lambda: identity_fields(self.identify()))
                self._read_limits()
                self.check_settings()
            self._connected = True

    def _read_limits(self) -> None:
        reply = self.command("LIM?")
        limits = {k: (float(lo), float(hi)) for k, lo, hi in _LIM_RE.findall(reply)}
        missing = {"EFF", "DEAD", "DELAY", "THR"} - limits.keys()
        if missing:
            raise ProtocolError(
                self.name, "LIM?", f"limits missing for {sorted(missing)} in {reply!r}"
            )
        bad = [k for k, (lo, hi) in limits.items() if not math.isfinite(lo + hi) or lo > hi]
        if bad:
            raise ProtocolError(self.name, "LIM?", f"implausible limits for {bad} in {reply!r}")
        self.efficiency_range_pct = limits["EFF"]
        self.dead_time_range_ns = limits["DEAD"]
        self.delay_range_ps = limits["DELAY"]
        self.threshold_range_v = limits["THR"]

    def check_settings(self) -> None:
        """Read back the settings made through this driver; put them back if the
        detector lost them (a power cycle). Raises SettingsLostError if that fails."""
        with self.transport.lock:
            self.memory.restore(self._read_limits, self.transport.drop_connection)

    def close(self) -> None:
        self._connected = False
        self.transport.close()

    def identify(self) -> str:
        return self.command("IDN?")

    def safe_state(self) -> None:
        self.disarm()

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            self.check_settings()
            status = self.status()
            if status is DetectorStatus.FAULT:
                return InstrumentHealth(HealthLevel.FAULT, "detector reports FAULT")
            if status is DetectorStatus.LATCHED:
                return InstrumentHealth(HealthLevel.DEGRADED, "latched after bright light")
            return InstrumentHealth(HealthLevel.OK, status.name)

        return self.memory.report(health_check(self.name, probe))

    # --- SinglePhotonDetector -------------------------------------------------------

    def set_efficiency_pct(self, efficiency_pct: float) -> None:
        v = check_range(
            self.name, "EFF", "efficiency", efficiency_pct, self.efficiency_range_pct, "%"
        )
        self.command(f"EFF {v:.3f}")
        self.memory.remember(
            "efficiency_pct",
            v,
            lambda: self.set_efficiency_pct(v),
            self.efficiency_pct,
            tolerance=1e-3,
        )

    def efficiency_pct(self) -> float:
        return self._float("EFF?")

    def set_dead_time_ns(self, dead_time_ns: float) -> None:
        v = check_range(self.name, "DEAD", "dead time", dead_time_ns, self.dead_time_range_ns, "ns")
        self.command(f"DEAD {v:.3f}")
        self.memory.remember(
            "dead_time_ns", v, lambda: self.set_dead_time_ns(v), self.dead_time_ns, tolerance=1e-3
        )

    def dead_time_ns(self) -> float:
        return self._float("DEAD?")

    def set_delay_ps(self, delay_ps: float) -> None:
        v = check_range(self.name, "DELAY", "delay", delay_ps, self.delay_range_ps, "ps")
        self.command(f"DELAY {v:.1f}")
        self.memory.remember(
            "delay_ps", v, lambda: self.set_delay_ps(v), self.delay_ps, tolerance=0.05
        )

    def delay_ps(self) -> float:
        return self._float("DELAY?")

    def set_threshold_v(self, threshold_v: float) -> None:
        v = check_range(self.name, "THR", "threshold", threshold_v, self.threshold_range_v, "V")
        self.command(f"THR {v:.4f}")
        self.memory.remember(
            "threshold_v", v, lambda: self.set_threshold_v(v), self.threshold_v, tolerance=1e-4
        )

    def threshold_v(self) -> float:
        return self._float("THR?")

    def arm(self) -> None:
        self.command("ARM")
        self._remember_armed(True)

    def disarm(self) -> None:
        self.memory.switching_off("armed")
        self.command("DISARM")
        self._remember_armed(False)

    def _remember_armed(self, armed: bool) -> None:
        # A latched detector was armed (light latched it): that is not a lost setting.
        self.memory.remember(
            "armed",
            armed,
            self.arm if armed else self.disarm,
            lambda: self.status() in (DetectorStatus.ARMED, DetectorStatus.LATCHED),
            enables=True,
        )

    def status(self) -> DetectorStatus:
        text = self.command("STATE?")
        try:
            return DetectorStatus[text]
        except KeyError:
            raise ProtocolError(self.name, "STATE?", f"unknown state {text!r}") from None

    def reset_latch(self) -> None:
        self.memory.switching_off("armed")
        self.command("RESET")
        self._remember_armed(False)

    def count_rate_hz(self) -> float:
        return self._float("RATE?")
