"""OZ Optics EPC-400 electric polarisation controller on its EPC driver (PolarizationController).

The EPC-400 is a row of four piezo fiber squeezers; its driver box (EPC-DRIVER-04, RS-232
or USB-serial) holds each squeezer at a DC voltage, or scrambles them (AC mode). A
squeezer is a linear retarder whose fast axis is fixed by its mounting and whose
retardance follows its voltage; that is exactly the :class:`PolarizationController`
model.

Sources. OZ Optics' own operating manual of the EPC driver was not found in readable
form. The command set below is the one two independent public drivers of the instrument
use and agree on, with the replies recorded in the tests of one of them (QuTech's QMI
``ozoptics/epc_driver`` and its unit tests; pylablib's ``OZOptics.EPC04``). Every fact
the driver relies on, and how sure it is:

* Serial line, 9600 baud, 8N1 (pylablib's default for every OZ Optics device);
  requests end with CR LF. [both]
* Every reply is one or more CR LF terminated text lines ending with a line ``Done``;
  a refused request ends with a line ending ``Error!`` instead. The instrument may echo
  the request as the first line. [pylablib; the QMI tests pin ``<text>`` + ``Done``]
* ``V<ch>,<mV>``: DC voltage of channel 1..4 in mV, -5000..+5000
  (reply ``Set CH3 DC Voltage at: 2500mV``). [both; range from both]
* ``V?``: ``Voltage(mV): CH1 +2200 CH2 +5000 CH3 -1000 CH4 -4000``. [QMI tests]
* ``M?``: ``Work Mode: DC`` or ``Work Mode: AC(Sine)``; ``MDC``, ``MAC`` switch
  (replies ``Set To DC Mode``, ``Set To AC Mode``). In AC mode the channels scramble
  and the DC voltages are not what the light sees. [QMI tests]
* At power-on the driver box comes back at the state last stored with ``SAVE``
  (pylablib: "save current state as a power-up preset"); this driver never sends
  ``SAVE``, so a power cycle loses what it set and :mod:`drivers.restore` puts it back.
* Unconfirmed, hence configurable: the squeezers' fast axes (default 0, 45, 0, 45
  degrees, alternating, the layout the receiver's compensation solves for) and their
  half-wave voltages (default 2500 mV, so +/-5000 mV spans +/-2 pi). Calibrate both
  against a polarimeter before use; the compensation converges with an imperfect
  calibration (it estimates and corrects the residual every step) but more slowly.
* The driver box answers no identification or serial-number request we know of, so
  :meth:`identify` reports the protocol and mode, and a different EPC driver on the same
  port cannot be told from this one (docs/driver-robustness.md).

Mapping (docs/drivers.md): retarder ``i`` is channel ``i + 1``;
``voltage_mv = zero_retardance_mv[i] + retardance_rad / pi * half_wave_mv[i]``, rounded
to the instrument's 1 mV step (about 1.3 mrad at the default half-wave voltage), and
``retardance_range_rad`` is the range every channel can reach within
``voltage_limit_mv``. Read-backs convert the voltages back, so they show the 1 mV
rounding.

Simulation: :mod:`drivers.serialsim.epc_sim` (``python -m drivers.serialsim.epc_sim``).
"""

from __future__ import annotations

import math
import re

from pydantic import Field, model_validator

from drivers.common import DriverOptions, health_check
from drivers.errors import InstrumentReportedError, OutOfRangeError, ProtocolError
from drivers.interfaces import HealthLevel, InstrumentHealth, PolarizationController
from drivers.restore import SettingsMemory
from drivers.transports.serial import ReplyReader, SerialTransport

#: Channels of the EPC driver (one per squeezer).
CHANNELS = 4
#: The instrument's voltage limit, mV (both public drivers).
MAX_VOLTAGE_MV = 5000
#: Reply lines read at most before ``Done`` (an echo, the answer, spare).
MAX_REPLY_LINES = 6

_VOLTAGES_RE = re.compile(r"^Voltage\(mV\):\s*((?:CH\d\s*[+-]?\d+\s*){4})$")
_CHANNEL_RE = re.compile(r"CH(\d)\s*([+-]?\d+)")
_MODE_RE = re.compile(r"^Work Mode:\s*(AC|DC)\b")


class OzOpticsEpcOptions(DriverOptions):
    baudrate: int = Field(9600)
    axes_deg: tuple[float, float, float, float] = (0.0, 45.0, 0.0, 45.0)
    """Fast axis of each squeezer, degrees (real space), channel 1 first (the light
    crosses channel 1 first). Unconfirmed default: measure it."""
    half_wave_mv: tuple[float, float, float, float] = (2500.0, 2500.0, 2500.0, 2500.0)
    """Voltage change that changes each squeezer's retardance by pi, mV. Unconfirmed
    default: calibrate it."""
    zero_retardance_mv: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """Voltage the driver calls retardance 0, per channel, mV."""
    voltage_limit_mv: float = Field(MAX_VOLTAGE_MV, gt=0, le=MAX_VOLTAGE_MV)
    """Largest voltage magnitude the driver sends, mV (the instrument takes 5000)."""

    @model_validator(mode="after")
    def _consistent(self) -> OzOpticsEpcOptions:
        if not all(math.isfinite(v) and v > 0 for v in self.half_wave_mv):
            raise ValueError(f"half_wave_mv must be positive, got {self.half_wave_mv}")
        if not all(math.isfinite(a) for a in self.axes_deg):
            raise ValueError(f"axes_deg must be finite, got {self.axes_deg}")
        lim = self.voltage_limit_mv
        if not all(math.isfinite(z) and -lim < z < lim for z in self.zero_retardance_mv):
            raise ValueError(
                f"zero_retardance_mv {self.zero_retardance_mv} must lie inside +/-{lim:g} mV"
            )
        return self


def parse_voltages(instrument: str, text: str) -> tuple[int, ...]:
    """The four channel voltages (mV) of a ``V?`` answer; ProtocolError otherwise."""
    m = _VOLTAGES_RE.match(text.strip())
    if m is None:
        raise ProtocolError(instrument, "V?", f"not a voltage report: {text!r}")
    pairs = _CHANNEL_RE.findall(m.group(1))
    channels = [int(ch) for ch, _ in pairs]
    if channels != list(range(1, CHANNELS + 1)):
        raise ProtocolError(instrument, "V?", f"channels {channels} in {text!r}")
    values = tuple(int(v) for _, v in pairs)
    if any(abs(v) > MAX_VOLTAGE_MV for v in values):
        raise ProtocolError(instrument, "V?", f"voltage beyond +/-{MAX_VOLTAGE_MV} mV: {text!r}")
    return values


class OzOpticsEpc(PolarizationController):
    """OZ Optics EPC-400 behind an EPC driver box (see the module for the protocol)."""

    Options = OzOpticsEpcOptions

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: OzOpticsEpcOptions | None = None,
        transport: SerialTransport | None = None,
    ) -> None:
        self.name = name
        self.options = options or OzOpticsEpcOptions()
        self.transport = transport or SerialTransport.for_driver(
            name, resource, timeout_s, self.options
        )
        self.axes_deg = tuple(self.options.axes_deg)
        lim = self.options.voltage_limit_mv
        calib = list(zip(self.options.zero_retardance_mv, self.options.half_wave_mv, strict=True))
        lows = [math.pi * (-lim - z) / hw for z, hw in calib]
        highs = [math.pi * (lim - z) / hw for z, hw in calib]
        self.retardance_range_rad = (max(lows), min(highs))
        self._connected = False
        #: settings made through this driver, put back after a power cycle
        self.memory = SettingsMemory(name)
        self.transport.after_reopen.callback = self.check_settings

    # --- protocol -----------------------------------------------------------------

    def command(self, request: str) -> str:
        """Send ``request``; return its answer line (the lines before ``Done``, an echo
        of the request dropped). InstrumentReportedError for an ``Error!`` reply,
        ProtocolError for anything that does not end in ``Done``."""

        def read(reader: ReplyReader) -> bytes:
            lines: list[bytes] = []
            for _ in range(MAX_REPLY_LINES):
                line = reader.line(b"\n", max_bytes=256)
                lines.append(line)
                text = line.strip()
                if text == b"Done" or text.endswith(b"Error!"):
                    return b"\n".join(lines)
            raise ProtocolError(
                self.name, request, f"no 'Done' after {MAX_REPLY_LINES} lines: {lines!r}"
            )

        raw = self.transport.exchange(request, f"{request}\r\n".encode("ascii"), read)
        try:
            lines = [ln.strip() for ln in raw.decode("ascii").split("\n") if ln.strip()]
        except UnicodeDecodeError:
            self.transport.discard_input()
            raise ProtocolError(self.name, request, f"reply not ASCII: {raw!r}") from None
        if lines and lines[0] == request:
            lines = lines[1:]
        if lines and lines[-1].endswith("Error!"):
            raise InstrumentReportedError(
                self.name, request, "controller reports: " + " / ".join(lines)
            )
        return " ".join(lines[:-1])

    def voltages_mv(self) -> tuple[int, ...]:
        """The four channel voltages in force, mV (an addition to the interface)."""
        return parse_voltages(self.name, self.command("V?"))

    def mode(self) -> str:
        """``"DC"`` (voltages held) or ``"AC"`` (scrambling); an addition to the interface."""
        text = self.command("M?")
        m = _MODE_RE.match(text)
        if m is None:
            raise ProtocolError(self.name, "M?", f"not a mode report: {text!r}")
        return m.group(1)

    def _set_dc_mode(self) -> None:
        self.command("MDC")

    def _configure(self) -> None:
        """Connect-time setup: DC mode (voltages held, no scrambling)."""
        self._set_dc_mode()

    # --- Instrument -------------------------------------------------------------------

    def connect(self) -> None:
        """Open, check it answers ``V?`` as an EPC driver does, switch to DC mode and,
        after a close, put back what was set before if it was lost."""
        with self.transport.lock:
            if self._connected:
                return
            with self.transport.opened_for_setup():
                self.voltages_mv()
                reconnecting = len(self.memory) > 0
                if not reconnecting:
                    self._configure()
                    # remembered, so a power-cycled box whose preset is AC is switched back
                    self.memory.remember("mode", "DC", self._set_dc_mode, self.mode)
                self.check_settings()
            self._connected = True

    def check_settings(self) -> None:
        """Read back what this driver set; put it back if the box lost it (a power
        cycle). SettingsLostError if that fails."""
        with self.transport.lock:
            self.memory.restore(self._configure, self.transport.drop_connection)

    def close(self) -> None:
        self._connected = False
        self.transport.close()

    def identify(self) -> str:
        """No identification request is known: the protocol, the voltages and the mode."""
        with self.transport.lock:
            volts = ",".join(f"{v:+d}" for v in self.voltages_mv())
            return f"OZ Optics EPC driver (4 channels), {self.mode()} mode, {volts} mV"

    def safe_state(self) -> None:
        """Nothing to make safe: the retardances stay (see the interface)."""

    def health(self) -> InstrumentHealth:
        def probe() -> InstrumentHealth:
            with self.transport.lock:
                self.check_settings()
                mode = self.mode()
                volts = self.voltages_mv()
            if mode != "DC":
                return InstrumentHealth(HealthLevel.DEGRADED, f"{mode} mode (scrambling)")
            return InstrumentHealth(HealthLevel.OK, f"DC mode, {volts} mV")

        return self.memory.report(health_check(self.name, probe))

    # --- PolarizationController ---------------------------------------------------------

    def _to_mv(self, retardances_rad: tuple[float, ...]) -> tuple[int, ...]:
        command = "set_retardances_rad"
        try:
            values = [float(v) for v in retardances_rad]
        except (TypeError, ValueError):
            raise OutOfRangeError(
                self.name, command, f"{CHANNELS} numbers needed, got {retardances_rad!r}"
            ) from None
        if len(values) != CHANNELS:
            raise OutOfRangeError(
                self.name, command, f"{CHANNELS} retardances needed, got {len(values)}"
            )
        lo, hi = self.retardance_range_rad
        for i, v in enumerate(values):
            if not (math.isfinite(v) and lo <= v <= hi):
                raise OutOfRangeError(
                    self.name,
                    command,
                    f"retardance {v:g} rad of channel {i + 1} outside [{lo:g}, {hi:g}] rad",
                )
        return tuple(
            round(z + v / math.pi * hw)
            for v, z, hw in zip(
                values, self.options.zero_retardance_mv, self.options.half_wave_mv, strict=True
            )
        )

    def _to_rad(self, voltages_mv: tuple[int, ...]) -> tuple[float, ...]:
        return tuple(
            math.pi * (v - z) / hw
            for v, z, hw in zip(
                voltages_mv, self.options.zero_retardance_mv, self.options.half_wave_mv, strict=True
            )
        )

    def _apply_mv(self, voltages_mv: tuple[int, ...]) -> None:
        with self.transport.lock:
            for ch, mv in enumerate(voltages_mv, start=1):
                self.command(f"V{ch},{mv}")

    def _read_mv_text(self) -> str:
        return ",".join(str(v) for v in self.voltages_mv())

    def set_retardances_rad(self, retardances_rad: tuple[float, ...]) -> None:
        """Set the four squeezers (one ``V<ch>,<mV>`` each, channel 1 first); every value
        checked before anything is sent (OutOfRangeError)."""
        mv = self._to_mv(retardances_rad)
        with self.transport.lock:
            self._apply_mv(mv)
            self.memory.remember(
                "voltages_mv",
                ",".join(str(v) for v in mv),
                lambda: self._apply_mv(mv),
                self._read_mv_text,
            )

    def retardances_rad(self) -> tuple[float, ...]:
        return self._to_rad(self.voltages_mv())
