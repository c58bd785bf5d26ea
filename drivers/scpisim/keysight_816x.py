"""Keysight 8164B mainframe with a tunable laser module in one slot, as a SCPI model.

Answers the messages :class:`drivers.keysight_816x.Keysight816xLaser` sends (short or
long form), with the status registers of the programming guide ("The Status Model"):

* switching the laser on (``:SOURn:POW:STAT 1``) starts a settling period of
  ``settle_time_s``; while it lasts the Questionable Slot Status Condition Register
  (``:STATn:QUES:COND?``) has bit 4 "Module has not settled" set, then it clears;
* the Operation Slot Status Condition Register (``:STATn:OPER:COND?``) has bit 0 "Laser
  is switched on" while the laser is on;
* :meth:`set_laser_protection` (test hook) sets bit 3 "Laser protection on";
* ``*OPC?`` answers 1: every command here completes before the next is read;
* :meth:`power_cycle` (test hook) switches the mainframe off and on: every setting back
  at its default, laser off, error queue empty. A GPIB instrument does this without the
  bus noticing, so the message transport stays up;
* errors go to the queue read by ``:SYST:ERR?``: -113 "Undefined header" (unknown
  command or another slot), -222 "Data out of range" (a setting outside the module's
  limits, which are narrower than the driver's family-wide defaults, as in the YAML).

``clock`` (seconds, monotonic) is injectable so tests can step time instead of sleeping.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable

from drivers.scpisim import ScpiModel

QUES_LASER_PROTECTION = 1 << 3
QUES_NOT_SETTLED = 1 << 4
OPER_LASER_ON = 1 << 0

_NUMBER = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"


def _header(short: str, rest: str) -> str:
    """Regex for a SCPI mnemonic in short or long form (``SOUR`` + ``CE`` -> SOUR(?:CE)?)."""
    return f"{short}(?:{rest})?" if rest else short


_SRC = rf":?{_header('SOUR', 'CE')}(\d)"
_STAT = rf":?{_header('STAT', 'US')}(\d)"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(rx, re.IGNORECASE))
    for name, rx in [
        ("idn", r"\*IDN\?"),
        ("opc", r"\*OPC\?"),
        ("cls", r"\*CLS"),
        ("err", rf":?{_header('SYST', 'EM')}:{_header('ERR', 'OR')}\?"),
        ("unit_q", rf"{_SRC}:{_header('POW', 'ER')}:UNIT\?"),
        ("unit", rf"{_SRC}:{_header('POW', 'ER')}:UNIT\s+([01])"),
        ("state_q", rf"{_SRC}:{_header('POW', 'ER')}:{_header('STAT', 'E')}\?"),
        ("state", rf"{_SRC}:{_header('POW', 'ER')}:{_header('STAT', 'E')}\s+(0|1|ON|OFF)"),
        ("power_q", rf"{_SRC}:{_header('POW', 'ER')}\?"),
        ("power", rf"{_SRC}:{_header('POW', 'ER')}\s+{_NUMBER}\s*DBM"),
        ("wav_q", rf"{_SRC}:{_header('WAV', 'ELENGTH')}\?"),
        ("wav", rf"{_SRC}:{_header('WAV', 'ELENGTH')}\s+{_NUMBER}"),
        ("ques_q", rf"{_STAT}:{_header('QUES', 'TIONABLE')}:{_header('COND', 'ITION')}\?"),
        ("oper_q", rf"{_STAT}:{_header('OPER', 'ATION')}:{_header('COND', 'ITION')}\?"),
    ]
]


class Keysight816xModel(ScpiModel):
    def __init__(
        self,
        slot: int = 1,
        settle_time_s: float = 0.5,
        power_limits_dbm: tuple[float, float] = (-10.0, 10.0),
        wavelength_limits_m: tuple[float, float] = (1.49e-6, 1.64e-6),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slot = slot
        self.settle_time_s = settle_time_s
        self.power_limits_dbm = power_limits_dbm
        self.wavelength_limits_m = wavelength_limits_m
        self.clock = clock
        self.identity = "Keysight Technologies,8164B,MY00000002,V5.25(72637)"
        self.power_unit = 0
        self.power_dbm = 0.0
        self.wavelength_m = 1.55e-6
        self.laser_on = False
        self.laser_protection = False
        self._settled_at = 0.0
        self._errors: deque[tuple[int, str]] = deque()

    # --- test hooks ----------------------------------------------------------------

    def set_laser_protection(self, on: bool) -> None:
        self.laser_protection = on

    def power_cycle(self) -> None:
        """Off and on again: power-on defaults (0 dBm, 1550 nm, laser off, dBm unit)."""
        self.power_unit = 0
        self.power_dbm = 0.0
        self.wavelength_m = 1.55e-6
        self.laser_on = False
        self._settled_at = 0.0
        self._errors.clear()

    # --- registers -----------------------------------------------------------------

    def settled(self) -> bool:
        return not self.laser_on or self.clock() >= self._settled_at

    def questionable_condition(self) -> int:
        bits = QUES_LASER_PROTECTION if self.laser_protection else 0
        return bits | (0 if self.settled() else QUES_NOT_SETTLED)

    def operation_condition(self) -> int:
        return OPER_LASER_ON if self.laser_on else 0

    # --- ScpiModel -----------------------------------------------------------------

    def _error(self, code: int, text: str) -> None:
        self._errors.append((code, text))

    def handle(self, message: str) -> str | None:
        message = message.strip()
        for name, pattern in _PATTERNS:
            m = pattern.fullmatch(message)
            if m is not None:
                if name not in ("idn", "opc", "cls", "err") and int(m.group(1)) != self.slot:
                    break  # no module of this kind in that slot
                return self._execute(name, m.groups())
        self._error(-113, "Undefined header")
        return None

    def _execute(self, name: str, groups: tuple[str | None, ...]) -> str | None:
        arg = groups[1] if len(groups) > 1 else None
        if name == "idn":
            return self.identity
        if name == "opc":
            return "1"
        if name == "cls":
            self._errors.clear()
            return None
        if name == "err":
            code, text = self._errors.popleft() if self._errors else (0, "No error")
            return f'{code:+d},"{text}"'
        if name == "unit_q":
            return f"{self.power_unit:+d}"
        if name == "unit":
            self.power_unit = int(arg or 0)
            return None
        if name == "state_q":
            return "1" if self.laser_on else "0"
        if name == "state":
            on = (arg or "").upper() in ("1", "ON")
            if on and not self.laser_on:
                self._settled_at = self.clock() + self.settle_time_s
            self.laser_on = on
            return None
        if name == "power_q":
            return f"{self.power_dbm:+.8E}"
        if name == "power":
            self._set_in_range("power_dbm", float(arg or "nan"), self.power_limits_dbm)
            return None
        if name == "wav_q":
            return f"{self.wavelength_m:+.8E}"
        if name == "wav":
            self._set_in_range("wavelength_m", float(arg or "nan"), self.wavelength_limits_m)
            return None
        if name == "ques_q":
            return f"{self.questionable_condition():+d}"
        return f"{self.operation_condition():+d}"  # oper_q

    def _set_in_range(self, attr: str, value: float, limits: tuple[float, float]) -> None:
        if limits[0] <= value <= limits[1]:
            setattr(self, attr, value)
        else:
            self._error(-222, "Data out of range")
