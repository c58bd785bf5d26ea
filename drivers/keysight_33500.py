"""Keysight 33500B/33600A two-channel waveform generator driving the modulators.

Channel 1 drives the modulator's RF port with a short arbitrary waveform that holds one
level per class (intensity class or BB84 state), repeated ``samples_per_level`` times;
channel 2 is a DC output that sets the modulator bias. On the bench the slot pattern comes
from the transmitter's FPGA; this driver owns the *levels*.

A level table ``{class: volts}`` maps onto the generator as (pure function
:func:`levels_to_waveform`)::

    amplitude_vpp = max(max(levels) - min(levels), MIN_AMPLITUDE_VPP)
    offset_v      = (max(levels) + min(levels)) / 2
    point[class]  = (level[class] - offset_v) / (amplitude_vpp / 2)     in [-1, 1]

Commands (33500 series SCPI)::

    SOUR1:DATA:VOL:CLE                    clear volatile arb memory
    SOUR1:DATA:ARB QKDIM,p0,p1,...        upload normalised points
    SOUR1:FUNC:ARB QKDIM ; SOUR1:FUNC ARB select and play it
    SOUR1:VOLT:OFFS 0 ; SOUR1:VOLT a ; SOUR1:VOLT:OFFS o   amplitude (Vpp) and offset
    SOUR2:FUNC DC ; SOUR2:VOLT:OFFS b     bias
    OUTP1 1|0, OUTP2 1|0 ; OUTP1?         outputs
    SYST:ERR?                             error queue

The generator cannot read back arbitrary-waveform points, so the driver keeps the points
it uploaded and combines them with the amplitude and offset it reads back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import IntEnum

from pydantic import Field

from drivers.common import check_range
from drivers.errors import DriverConfigError
from drivers.interfaces import BB84State, Encoder, IntensityClass, IntensityModulator
from drivers.scpi import ScpiInstrument, VisaOptions
from drivers.transports.base import MessageTransport

#: Smallest amplitude the 33500 accepts (1 mVpp into 50 ohm), with margin.
MIN_AMPLITUDE_VPP = 0.002


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


class Awg33500Options(VisaOptions):
    drive_range_v: tuple[float, float] = (-5.0, 5.0)
    bias_range_v: tuple[float, float] = (-5.0, 5.0)
    samples_per_level: int = Field(4, ge=1, le=1024, description="arb points per level")
    initial_levels_v: list[float] | None = Field(
        None, description="levels uploaded at connect, in class order (default: 0 V each)"
    )


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
        self._levels_v = [float(v) for v in initial]
        self._points: list[float] = levels_to_waveform(self._levels_v)[2]

    def _configure(self) -> None:
        for i, v in enumerate(self._levels_v):
            check_range(
                self.name, "options.initial_levels_v", f"level {i}", v, self.drive_range_v, "V"
            )
        self._upload(self._levels_v)
        self._set("SOUR2:FUNC DC")

    def _safe_commands(self) -> list[str]:
        return ["OUTP1 0", "OUTP2 0"]

    def _upload(self, levels_v: Sequence[float]) -> None:
        amplitude, offset, points = levels_to_waveform(levels_v)
        samples = [p for p in points for _ in range(self.options.samples_per_level)]
        data = ",".join(f"{p:.6f}" for p in samples)
        with self.transport.lock:
            self._set("SOUR1:DATA:VOL:CLE")
            self._set(f"SOUR1:DATA:ARB {self.ARB_NAME},{data}")
            self._set(f"SOUR1:FUNC:ARB {self.ARB_NAME}")
            self._set("SOUR1:FUNC ARB")
            self._set("SOUR1:VOLT:OFFS 0.000000")
            self._set(f"SOUR1:VOLT {amplitude:.6f}")
            self._set(f"SOUR1:VOLT:OFFS {offset:.6f}")
            self._levels_v = list(levels_v)
            self._points = points

    def _set_level(self, index: int, drive_v: float, what: str) -> None:
        v = check_range(
            self.name, "SOUR1:DATA:ARB", f"{what} level", drive_v, self.drive_range_v, "V"
        )
        with self.transport.lock:
            levels = list(self._levels_v)
            levels[index] = v
            self._upload(levels)

    def _level(self, index: int) -> float:
        with self.transport.lock:
            amplitude = self._query_float("SOUR1:VOLT?")
            offset = self._query_float("SOUR1:VOLT:OFFS?")
            return waveform_to_levels(amplitude, offset, self._points)[index]

    def levels_v(self) -> Mapping[int, float]:
        """All levels as read back, keyed by class value (an addition for diagnostics)."""
        with self.transport.lock:
            amplitude = self._query_float("SOUR1:VOLT?")
            offset = self._query_float("SOUR1:VOLT:OFFS?")
        return dict(enumerate(waveform_to_levels(amplitude, offset, self._points)))

    def set_bias_v(self, bias_v: float) -> None:
        b = check_range(self.name, "SOUR2:VOLT:OFFS", "bias", bias_v, self.bias_range_v, "V")
        self._set(f"SOUR2:VOLT:OFFS {b:.6f}")

    def bias_v(self) -> float:
        return self._query_float("SOUR2:VOLT:OFFS?")

    def set_output(self, on: bool) -> None:
        with self.transport.lock:
            self._set(f"OUTP1 {int(on)}")
            self._set(f"OUTP2 {int(on)}")

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
