"""Keysight 33500B/33600A two-channel waveform generator driving the modulators.

Channel 1 drives the modulator's RF port with a short arbitrary waveform that holds one
level per class (intensity class or BB84 state), each repeated ``samples_per_level``
times; channel 2 is a DC output that sets the modulator bias. The transmitter's FPGA
triggers channel 1 (rear Ext Trig input by default): each trigger plays the level table
once, one level per slot, at ``slot_rate_hz``. This driver owns the *levels* and their
timing inside a trigger; the slot pattern itself comes from the FPGA.

A level table ``{class: volts}`` maps onto the generator as (pure function
:func:`levels_to_waveform`)::

    amplitude_vpp = max(max(levels) - min(levels), MIN_AMPLITUDE_VPP)
    offset_v      = (max(levels) + min(levels)) / 2
    point[class]  = (level[class] - offset_v) / (amplitude_vpp / 2)     in [-1, 1]
    high_v, low_v = offset_v + amplitude_vpp / 2, offset_v - amplitude_vpp / 2

The points always reach both -1 and +1 (except in the degenerate table where every level
is equal), so the levels do not depend on how the generator scales an arbitrary waveform
that does not use the DAC's full range (the manual's "Arbitrary Waveform Limitations" note
under ``DATA:ATTRibute:PTPeak?``).

Facts used here, with where they were checked (the Keysight 33500B/33600A Trueform
programming manual's section names where the manual itself was read; the manual's own
sections were not all reachable, and the rest is marked):

* "Output Termination" (33500 Series Operating and Service Guide, Output Configuration):
  ``OUTPut[1|2]:LOAD {<ohms>|INFinity|MIN|MAX}``, 1 ohm to 10 kohm or infinite, default
  50 ohm. The generator has a fixed 50 ohm series output and the setting only changes
  what is programmed and queried: a 50 ohm setting into an open circuit gives twice the
  programmed voltage. The load cannot be changed while voltage limits are enabled.
  ``OUTP:LOAD?`` answering 9.9E+37 for infinity is the convention of the 33120A and
  U2761A manuals of the same family (not read in the 33500 manual); both forms are parsed.
* DATA subsystem, ``[SOURce[1|2]:]DATA:ARBitrary <arb_name>, <value>, ...``: normalised
  points in [-1, +1] into volatile memory, and the "Arbitrary Waveform Limitations" note
  under ``DATA:ATTRibute:PTPeak?`` (a waveform that does not span the DAC's full range
  has a limited amplitude). Minimum length 8 points on the 33500B (also PyMeasure's
  Agilent33500 ``data_arb``: "Minimum of 8 a maximum of 65536 points"); 32 points on the
  33600A is taken from the task brief and not confirmed in a source read here.
  That loading a name already in volatile memory is an error is from PyMeasure's
  ``data_volatile_clear`` note; that ``DATA:VOLatile:CLEar`` reloads the default waveform
  is not confirmed, so it is only sent with channel 1's output off.
* SOURce subsystem: ``FUNCtion:ARBitrary <arb_name>`` selects a loaded waveform,
  ``FUNCtion ARB`` plays it, ``FUNCtion:ARBitrary:SRATe`` its sample rate: 1 uSa/s to
  250 MSa/s (PyMeasure ``arb_srate``, "device-dependent"); 1 GSa/s on the 33600A (a
  third-party Trueform summary). ``VOLTage:HIGH``/``VOLTage:LOW`` set the levels of the
  waveform's +1 and -1 points.
* BURSt and TRIGger subsystems: ``BURSt:MODE TRIGgered``, ``BURSt:NCYCles``,
  ``BURSt:STATe``, ``TRIGger[1|2]:SOURce {IMMediate|EXTernal|TIMer|BUS}``,
  ``TRIGger[1|2]:SLOPe {POSitive|NEGative}``.

Commands (33500 series SCPI)::

    OUTP1:LOAD INF ; OUTP2:LOAD INF ; OUTP1:LOAD?   expected load (set and read back)
    SOUR1:DATA:VOL:CLE                    clear volatile arb memory (connect only)
    SOUR1:DATA:ARB QKDIM1,p0,p1,...       upload normalised points under a fresh name
    SOUR1:FUNC:ARB QKDIM1 ; SOUR1:FUNC ARB   select and play it
    SOUR1:FUNC:ARB:SRAT r                 sample rate = slot_rate_hz * samples per level
    TRIG1:SOUR EXT ; TRIG1:SLOP POS       one trigger per level table
    SOUR1:BURS:MODE TRIG ; SOUR1:BURS:NCYC 1 ; SOUR1:BURS:STAT 1
    SOUR1:VOLT:HIGH h ; SOUR1:VOLT:LOW l  levels of the +1 and -1 points
    SOUR2:FUNC DC ; SOUR2:VOLT:OFFS b     bias
    OUTP1 1|0, OUTP2 1|0 ; OUTP1?         outputs
    SYST:ERR?                             error queue

Level changes (the choice made here, rather than switching the output off around each
change, which would click the output relay at every step of a calibration sweep): a
level change leaves the output on and does not send ``DATA:VOL:CLE``. The new points go
into volatile memory under a fresh name while the old waveform keeps playing, then
``FUNC:ARB`` switches to them and ``FUNC:ARB:SRAT`` restates the sample rate;
``VOLT:HIGH``/``VOLT:LOW`` follow only when the highest or lowest level changed, in the
order that keeps ``high > low``. At most
``MAX_LEVEL_CHANGE_SETTINGS`` settings, and after every one of them each point of the
playing waveform lies inside the union of the old and new tables' ranges, hence inside
``drive_range_v`` (the old driver sent 7 settings, among them ``VOLT:OFFS 0`` and a new
amplitude around the old offset, which could leave that range). After
``VOLATILE_ARB_NAMES`` fresh names the volatile memory is cleared and reloaded; that
reload is done with channel 1's output off (``OUTP1 0`` ... ``OUTP1 1``, the only level
change that touches the output). What the guarantee covers: the set of voltages on the
output between commands; each class's own level may pass through other values of that
range for the few milliseconds between commands. Whether ``FUNC:ARB`` itself switches at
a waveform boundary is not stated in the parts of the manual read here.

The generator cannot read back arbitrary-waveform points, so the driver keeps the points
it uploaded and combines them with the high and low levels it reads back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Literal

from pydantic import Field

from drivers.common import check_range
from drivers.errors import DriverConfigError, OutOfRangeError, ProtocolError
from drivers.interfaces import BB84State, Encoder, IntensityClass, IntensityModulator
from drivers.scpi import ScpiInstrument, VisaOptions
from drivers.transports.base import MessageTransport

#: Smallest amplitude the 33500 accepts (1 mVpp into 50 ohm), with margin.
MIN_AMPLITUDE_VPP = 0.002

#: Fewest points of one arbitrary waveform, by model family (``33[56]`` + two digits).
MIN_ARB_POINTS = {"335": 8, "336": 32}

#: Most points the driver sends in one ``DATA:ARB`` (ASCII); far above what it needs.
MAX_ARB_POINTS = 65_536

#: Highest arbitrary-waveform sample rate by model family (Sa/s); the lowest is 1 uSa/s.
MAX_SAMPLE_RATE_SA_S = {"335": 250e6, "336": 1e9}
MIN_SAMPLE_RATE_SA_S = 1e-6

#: ``OUTP:LOAD?`` answers this (or more) for an infinite (high-impedance) load.
INFINITE_LOAD_REPLY_OHMS = 9.9e37

#: Settings one level change sends at most: DATA:ARB, FUNC:ARB, FUNC:ARB:SRAT, VOLT:HIGH,
#: VOLT:LOW (each followed by an error-queue read).
MAX_LEVEL_CHANGE_SETTINGS = 5

#: Fresh waveform names used before the volatile memory is cleared and reloaded (a driver
#: choice that keeps the volatile memory small, not a figure from the manual).
VOLATILE_ARB_NAMES = 32

LoadSetting = float | Literal["INF"]


def levels_to_waveform(levels_v: Sequence[float]) -> tuple[float, float, list[float]]:
    """(amplitude_vpp, offset_v, normalised points in [-1, 1]) reproducing ``levels_v``."""
    hi, lo = max(levels_v), min(levels_v)
    amplitude = max(hi - lo, MIN_AMPLITUDE_VPP)
    offset = (hi + lo) / 2
    points = [(v - offset) / (amplitude / 2) for v in levels_v]
    return amplitude, offset, points


def waveform_to_levels(
    amplitude_vpp: float, offset_v: float, points: Sequence[float]
) -> list[float]:
    """Inverse of :func:`levels_to_waveform`."""
    return [offset_v + p * amplitude_vpp / 2 for p in points]


def high_low_order(
    old_high_v: float, old_low_v: float, new_high_v: float, new_low_v: float
) -> list[Literal["HIGH", "LOW"]]:
    """Which of ``VOLT:HIGH``/``VOLT:LOW`` to send, in an order that keeps high > low.

    Setting HIGH first is safe when the new high is above the old low; otherwise the whole
    table moved down past the old low, and LOW goes first (new low < new high <= old low
    < old high). Either way every intermediate (high, low) pair lies inside the union of
    the old and new ranges.
    """
    order: list[Literal["HIGH", "LOW"]] = []
    high_first = new_high_v > old_low_v
    for which in ("HIGH", "LOW") if high_first else ("LOW", "HIGH"):
        changed = new_high_v != old_high_v if which == "HIGH" else new_low_v != old_low_v
        if changed:
            order.append(which)
    return order


def samples_per_level_for(n_levels: int, samples_per_level: int, min_points: int, pad: bool) -> int:
    """Samples per level that make the waveform at least ``min_points`` long.

    Padding raises the repetition of every level (and the sample rate with it), so the
    time each level is held does not change. Without padding a short waveform is refused
    by the caller.
    """
    if pad and n_levels * samples_per_level < min_points:
        return math.ceil(min_points / n_levels)
    return samples_per_level


def parse_load_reply(reply: str) -> LoadSetting:
    """``OUTP:LOAD?`` reply as ohms, or ``"INF"`` for a high-impedance setting."""
    text = reply.strip().upper()
    if text in ("INF", "+INF", "INFINITY"):
        return "INF"
    value = float(text)
    return "INF" if value >= INFINITE_LOAD_REPLY_OHMS else value


class Awg33500Options(VisaOptions):
    drive_range_v: tuple[float, float] = (-5.0, 5.0)
    bias_range_v: tuple[float, float] = (-5.0, 5.0)
    samples_per_level: int = Field(4, ge=1, le=1024, description="arb points per level")
    initial_levels_v: list[float] | None = Field(
        None, description="levels uploaded at connect, in class order (default: 0 V each)"
    )
    drive_load: LoadSetting = Field(
        "INF",
        description=(
            "OUTP1:LOAD: the load on channel 1 in ohms (1 to 10000) or INF for a "
            "high-impedance modulator driver. INF is the safe default: if the real load "
            "is 50 ohm the output is half what is programmed, never twice"
        ),
    )
    bias_load: LoadSetting = Field("INF", description="OUTP2:LOAD, as drive_load, for the bias")
    slot_rate_hz: float = Field(
        1e6, gt=0, description="levels per second inside one trigger (one level per slot)"
    )
    trigger_source: Literal["EXT", "BUS", "IMM", "TIM"] = Field(
        "EXT", description="TRIG1:SOUR: EXT = the FPGA's slot trigger on the rear input"
    )
    trigger_slope: Literal["POS", "NEG"] = "POS"
    pad_short_waveforms: bool = Field(
        True,
        description=(
            "repeat each level more often (same timing) when the table is shorter than the "
            "model's minimum arb length; False refuses such a table"
        ),
    )


def _check_load(instrument: str, command: str, load: LoadSetting) -> LoadSetting:
    if load == "INF":
        return load
    return check_range(instrument, command, "load", load, (1.0, 10_000.0), "ohm")


class _Awg33500Levels(ScpiInstrument):
    SIM_YAML = "keysight_33500.yaml"
    IDN_PATTERN = r"(Keysight|Agilent).*,33[56]\d\d"
    ERROR_QUERY = "SYST:ERR?"
    ARB_NAME = "QKDLVL"
    LEVEL_ENUM: type[IntEnum] = IntensityClass

    def __init__(
        self,
        name: str,
        resource: str,
        timeout_s: float = 2.0,
        options: Awg33500Options | None = None,
        transport: MessageTransport | None = None,
    ) -> None:
        self.options = options or Awg33500Options()
        super().__init__(name, resource, timeout_s, self.options, transport)
        self.drive_range_v = self.options.drive_range_v
        self.bias_range_v = self.options.bias_range_v
        n = len(self.LEVEL_ENUM)
        initial = self.options.initial_levels_v or [0.0] * n
        if len(initial) != n:
            raise DriverConfigError(
                name, "options.initial_levels_v", f"needs {n} levels, got {len(initial)}"
            )
        _check_load(name, "options.drive_load", self.options.drive_load)
        _check_load(name, "options.bias_load", self.options.bias_load)
        self._levels_v = [float(v) for v in initial]
        self._points: list[float] = levels_to_waveform(self._levels_v)[2]
        self._high_low_v = (0.0, 0.0)
        self._arb_count = 0
        self._samples_per_level = self.options.samples_per_level
        self._sample_rate_sa_s = 0.0
        self.model = ""

    # --- connect-time configuration --------------------------------------------

    def _model_family(self) -> str:
        m = re.search(r"33([56])\d\d", self._identity)
        return f"33{m.group(1)}" if m else "335"

    def _plan_waveform(self) -> None:
        """Samples per level and sample rate for this model, or a typed refusal."""
        family = self._model_family()
        n = len(self.LEVEL_ENUM)
        min_points = MIN_ARB_POINTS[family]
        spl = samples_per_level_for(
            n, self.options.samples_per_level, min_points, self.options.pad_short_waveforms
        )
        if not min_points <= n * spl <= MAX_ARB_POINTS:
            raise OutOfRangeError(
                self.name,
                "SOUR1:DATA:ARB",
                f"{n * spl} points ({n} levels x {spl}) outside the {self.model or family} "
                f"limits [{min_points}, {MAX_ARB_POINTS}] (raise options.samples_per_level "
                "or allow options.pad_short_waveforms)",
            )
        rate = self.options.slot_rate_hz * spl
        check_range(
            self.name,
            "SOUR1:FUNC:ARB:SRAT",
            "sample rate",
            rate,
            (MIN_SAMPLE_RATE_SA_S, MAX_SAMPLE_RATE_SA_S[family]),
            "Sa/s",
        )
        self._samples_per_level = spl
        self._sample_rate_sa_s = rate

    def _configure(self) -> None:
        for i, v in enumerate(self._levels_v):
            check_range(
                self.name, "options.initial_levels_v", f"level {i}", v, self.drive_range_v, "V"
            )
        fields = self._identity.split(",")
        self.model = fields[1].strip() if len(fields) > 1 else ""
        self._plan_waveform()
        self._set_load(1, self.options.drive_load)
        self._set_load(2, self.options.bias_load)
        self._reload(self._levels_v)
        self._set(f"TRIG1:SOUR {self.options.trigger_source}")
        self._set(f"TRIG1:SLOP {self.options.trigger_slope}")
        self._set("SOUR1:BURS:MODE TRIG")
        self._set("SOUR1:BURS:NCYC 1")
        self._set("SOUR1:BURS:STAT 1")
        self._set("SOUR2:FUNC DC")

    def _set_load(self, channel: int, load: LoadSetting) -> None:
        text = "INF" if load == "INF" else f"{load:.6g}"
        self._set(f"OUTP{channel}:LOAD {text}")
        got = self.output_load(channel)
        if got != load:
            raise ProtocolError(
                self.name, f"OUTP{channel}:LOAD?", f"load reads back {got!r}, set {load!r}"
            )
        # a power-cycled generator is back at 50 ohm: levels off by 2x into a high impedance
        self.memory.remember(
            f"load_ohm_ch{channel}",
            load,
            lambda: self._set_load(channel, load),
            lambda: self.output_load(channel),
        )

    def _safe_commands(self) -> list[str]:
        return ["OUTP1 0", "OUTP2 0"]

    # --- waveform upload -------------------------------------------------------

    def _samples(self, points: Sequence[float]) -> str:
        return ",".join(f"{p:.6f}" for p in points for _ in range(self._samples_per_level))

    def _next_arb_name(self) -> str:
        self._arb_count += 1
        return f"{self.ARB_NAME}{self._arb_count}"

    def _set_high_low(self, high_v: float, low_v: float) -> None:
        old_high, old_low = self._high_low_v
        for which in high_low_order(old_high, old_low, high_v, low_v):
            value = high_v if which == "HIGH" else low_v
            self._set(f"SOUR1:VOLT:{which} {value:.6f}")
        self._high_low_v = (high_v, low_v)

    def _reload(self, levels_v: Sequence[float]) -> None:
        """Clear the volatile memory and load ``levels_v`` (outputs must not be on)."""
        amplitude, offset, points = levels_to_waveform(levels_v)
        with self.transport.lock:
            self._high_low_v = (
                self._query_float("SOUR1:VOLT:HIGH?"),
                self._query_float("SOUR1:VOLT:LOW?"),
            )
            self._set("SOUR1:DATA:VOL:CLE")
            self._arb_count = 0
            name = self._next_arb_name()
            self._set(f"SOUR1:DATA:ARB {name},{self._samples(points)}")
            self._set(f"SOUR1:FUNC:ARB {name}")
            self._set("SOUR1:FUNC ARB")
            self._set(f"SOUR1:FUNC:ARB:SRAT {self._sample_rate_sa_s:.9g}")
            self._set_high_low(offset + amplitude / 2, offset - amplitude / 2)
            self._levels_v = list(levels_v)
            self._points = points

    def _switch(self, levels_v: Sequence[float]) -> None:
        """Load ``levels_v`` under a fresh name and switch to it, output untouched."""
        amplitude, offset, points = levels_to_waveform(levels_v)
        with self.transport.lock:
            name = self._next_arb_name()
            self._set(f"SOUR1:DATA:ARB {name},{self._samples(points)}")
            self._set(f"SOUR1:FUNC:ARB {name}")
            self._set(f"SOUR1:FUNC:ARB:SRAT {self._sample_rate_sa_s:.9g}")
            self._set_high_low(offset + amplitude / 2, offset - amplitude / 2)
            self._levels_v = list(levels_v)
            self._points = points

    def _set_level(self, index: int, drive_v: float, what: str) -> None:
        v = check_range(
            self.name, "SOUR1:DATA:ARB", f"{what} level", drive_v, self.drive_range_v, "V"
        )
        with self.transport.lock:
            levels = list(self._levels_v)
            levels[index] = v
            if self._arb_count < VOLATILE_ARB_NAMES:
                self._switch(levels)
            else:
                was_on = self._query_bool("OUTP1?")
                if was_on:
                    self._set("OUTP1 0")
                self._reload(levels)
                if was_on:
                    self._set("OUTP1 1")
            self.memory.remember(
                f"{what.lower()}_level_v",
                v,
                lambda: self._set_level(index, v, what),
                lambda: self._level(index),
                tolerance=1e-5,
            )

    # --- read-back -------------------------------------------------------------

    def _read_levels(self) -> list[float]:
        with self.transport.lock:
            high = self._query_float("SOUR1:VOLT:HIGH?")
            low = self._query_float("SOUR1:VOLT:LOW?")
        return waveform_to_levels(high - low, (high + low) / 2, self._points)

    def _level(self, index: int) -> float:
        return self._read_levels()[index]

    def levels_v(self) -> Mapping[int, float]:
        """All levels as read back, keyed by class value (an addition for diagnostics)."""
        return dict(enumerate(self._read_levels()))

    def output_load(self, channel: int) -> LoadSetting:
        """``OUTP<channel>:LOAD?`` as ohms or ``"INF"``."""
        command = f"OUTP{channel}:LOAD?"
        reply = self.transport.query(command)
        try:
            return parse_load_reply(reply)
        except ValueError:
            raise ProtocolError(
                self.name, command, f"expected ohms or INF, got {reply!r}"
            ) from None

    def arb_sample_rate_sa_s(self) -> float:
        """Sample rate of channel 1's arbitrary waveform as read back (Sa/s)."""
        return self._query_float("SOUR1:FUNC:ARB:SRAT?")

    def trigger_source(self) -> str:
        """``TRIG1:SOUR?`` as the instrument answers it."""
        return self.transport.query("TRIG1:SOUR?").strip().upper()

    def set_bias_v(self, bias_v: float) -> None:
        b = check_range(self.name, "SOUR2:VOLT:OFFS", "bias", bias_v, self.bias_range_v, "V")
        self._set(f"SOUR2:VOLT:OFFS {b:.6f}")
        self.memory.remember("bias_v", b, lambda: self.set_bias_v(b), self.bias_v, tolerance=1e-6)

    def bias_v(self) -> float:
        return self._query_float("SOUR2:VOLT:OFFS?")

    def set_output(self, on: bool) -> None:
        if not on:
            self.memory.switching_off("output_on")
        with self.transport.lock:
            self._set(f"OUTP1 {int(on)}")
            self._set(f"OUTP2 {int(on)}")
            self.memory.remember(
                "output_on", on, lambda: self.set_output(on), self.output_on, enables=True
            )

    def output_on(self) -> bool:
        with self.transport.lock:
            return self._query_bool("OUTP1?") and self._query_bool("OUTP2?")


class Keysight33500IntensityModulator(_Awg33500Levels, IntensityModulator):
    """Signal, decoy and vacuum drive levels on channel 1, bias on channel 2."""

    Options = Awg33500Options
    ARB_NAME = "QKDIM"
    LEVEL_ENUM = IntensityClass

    def set_level_v(self, intensity_class: IntensityClass, drive_v: float) -> None:
        self._set_level(int(IntensityClass(intensity_class)), drive_v, intensity_class.name)

    def level_v(self, intensity_class: IntensityClass) -> float:
        return self._level(int(IntensityClass(intensity_class)))


class Keysight33500Encoder(_Awg33500Levels, Encoder):
    """Drive voltages of the four BB84 states on channel 1, bias on channel 2."""

    Options = Awg33500Options
    ARB_NAME = "QKDENC"
    LEVEL_ENUM = BB84State

    def set_drive_v(self, state: BB84State, drive_v: float) -> None:
        self._set_level(int(BB84State(state)), drive_v, state.name)

    def drive_v(self, state: BB84State) -> float:
        return self._level(int(BB84State(state)))
