"""Finding a power-cycled instrument and putting back what the driver told it.

An instrument that loses power comes back at its factory defaults: a detector at its
default efficiency and DISARMED, a laser dark, a waveform generator at a 50 ohm load with
no waveform. A driver that went on as if nothing happened would run the node on those
defaults while every health check said OK. So a driver keeps a :class:`SettingsMemory`:
each setting it made, with how to make it again and how to read it back.

When the memory is checked (:meth:`SettingsMemory.restore`):

* the driver's transport reopened a lost connection (a USB or TCP instrument that was
  switched off drops it): the check runs after the reopen and before the interrupted
  command is sent again, so nothing is read from or done on a defaulted instrument;
* :meth:`~drivers.interfaces.Instrument.connect` after a close (the node's recovery);
* every :meth:`~drivers.interfaces.Instrument.health` (a power cycle the link does not
  notice, as on GPIB, is found at the next health check).

Before anything is read back, the instrument's identity (manufacturer, model, serial
number, as the driver reads it) is compared with the one found at the first connect
(:meth:`SettingsMemory.remember_identity`): another instrument on the same port or
address (swapped, or a second unit answering) raises
:class:`~drivers.errors.InstrumentChangedError` naming both identities, and nothing is
set on it. Every remembered setting is then read back; if one differs, the driver's
connect-time setup runs again (``reconfigure``), every remembered setting is applied
again in the order it was made, those that switch something on (``enables``: emission,
arming, outputs, shutter) last, and all are read back once more. What was found and put
back is recorded (:class:`RestoreRecord`); the next health check reports it
(``InstrumentHealth.restored``, level at least DEGRADED). A setting whose read-back
still differs raises :class:`~drivers.errors.SettingsLostError`; the errors of the
instrument calls themselves propagate unchanged (all
:class:`~drivers.errors.InstrumentError`).

The memory holds what the driver was told, so a setting changed on purpose through the
driver is never "restored" away; only a change behind the driver's back is.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from drivers.errors import InstrumentChangedError, SettingsLostError
from drivers.interfaces import HealthLevel, InstrumentHealth

log = logging.getLogger(__name__)

#: A setting's value as the driver remembers it and reads it back.
Value = float | bool | str


@dataclass(frozen=True)
class SettingChange:
    """One setting found different from what the driver had set."""

    name: str
    found: Value
    wanted: Value

    def __str__(self) -> str:
        return f"{self.name}: {_show(self.found)} -> {_show(self.wanted)}"


@dataclass(frozen=True)
class RestoreRecord:
    """Settings found lost at ``at_unix_s`` and put back."""

    at_unix_s: float
    changes: tuple[SettingChange, ...]

    def lines(self) -> tuple[str, ...]:
        return tuple(str(c) for c in self.changes)


@dataclass
class _Remembered:
    value: Value
    apply: Callable[[], None]
    read: Callable[[], Value]
    tolerance: float
    enables: bool


def identity_fields(identity: str, fields: int = 3) -> str:
    """The first ``fields`` comma-separated fields of an identity string (``*IDN?``:
    manufacturer, model, serial number; the firmware version is left out, so that an
    update of it is not taken for another instrument)."""
    return ",".join(part.strip() for part in identity.split(",")[:fields])


def _show(v: Value) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _same(found: Value, wanted: Value, tolerance: float) -> bool:
    if isinstance(wanted, bool) or isinstance(found, bool):
        return found is wanted
    if isinstance(wanted, str) or isinstance(found, str):
        return found == wanted
    return math.isclose(found, wanted, rel_tol=1e-6, abs_tol=tolerance)


class SettingsMemory:
    """The settings a driver made, in order, to find and undo a power cycle.

    Call it with the driver's transport lock held (the driver's calls take it anyway);
    a check started from inside a check (a setting re-applied over a connection that
    drops again) does nothing, the outer check goes on.
    """

    def __init__(self, instrument: str) -> None:
        self.instrument = instrument
        self._settings: dict[str, _Remembered] = {}
        self._records: list[RestoreRecord] = []
        self._identity: tuple[str, Callable[[], str]] | None = None
        self._restoring = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._settings)

    def remember(
        self,
        name: str,
        value: Value,
        apply: Callable[[], None],
        read: Callable[[], Value],
        *,
        tolerance: float = 0.0,
        enables: bool = False,
    ) -> None:
        """Record that setting ``name`` was made with ``value``.

        ``apply`` makes it again, ``read`` reads it back (a number is compared within
        ``tolerance``, in its unit, or 1 ppm); ``enables`` marks a setting that switches
        something on, re-applied after all others. A setting made again moves to the end
        of the order.
        """
        self._settings.pop(name, None)
        self._settings[name] = _Remembered(value, apply, read, tolerance, enables)

    def remember_identity(self, identity: str, read: Callable[[], str]) -> None:
        """The instrument answering at the first connect is ``identity``; ``read`` reads
        it again (the same fields, e.g. manufacturer, model and serial number). Kept for
        the driver's life: a later identity is compared with it, never replaces it."""
        if self._identity is None:
            self._identity = (identity, read)

    @property
    def identity(self) -> str | None:
        """The identity remembered at the first connect (None: none known)."""
        return None if self._identity is None else self._identity[0]

    def check_identity(self, found: str | None = None) -> None:
        """Compare the identity now answering (``found``, or read) with the remembered
        one; :class:`InstrumentChangedError` naming both when they differ."""
        if self._identity is None:
            return
        expected, read = self._identity
        now = read() if found is None else found
        if now != expected:
            log.error(
                "%s: another instrument answers: expected %r, found %r",
                self.instrument,
                expected,
                now,
            )
            raise InstrumentChangedError(self.instrument, "identity", expected, now)

    def snapshot(self) -> tuple[tuple[str, Value], ...]:
        """Every remembered setting as ``(name, value)``, in the order they were made: what
        the driver told the instrument (a calibration result records it beside the
        instrument's identity, as a QCoDeS snapshot does). Reads nothing from the
        instrument."""
        return tuple((name, entry.value) for name, entry in self._settings.items())

    def switching_off(self, name: str) -> None:
        """Setting ``name`` (one that switches something on) is about to be switched off:
        forget it first, so that a check that runs meanwhile (the connection reopened for
        the switch-off command itself) does not switch it on again."""
        entry = self._settings.get(name)
        if entry is not None and entry.enables:
            del self._settings[name]

    def made_safe(self) -> None:
        """The instrument was put in its safe state: forget every setting that switched
        something on, so that a check never switches it on again."""
        for name in [n for n, e in self._settings.items() if e.enables]:
            del self._settings[name]

    def lost(self) -> list[SettingChange]:
        """Read back every remembered setting; those that differ."""
        changes = []
        for name, entry in list(self._settings.items()):
            found = entry.read()
            if not _same(found, entry.value, entry.tolerance):
                changes.append(SettingChange(name, found, entry.value))
        return changes

    def restore(
        self, reconfigure: Callable[[], None], drop_connection: Callable[[], None]
    ) -> RestoreRecord | None:
        """Check and, when settings were lost, put everything back (see the module).

        Returns what was put back, or None when nothing was lost (or a check is already
        running). Raises :class:`InstrumentChangedError` when another instrument answers,
        :class:`SettingsLostError` when the read-back still differs.
        On any failure ``drop_connection`` is called first (the transport's), so that
        the next message reopens the connection and checks again: nothing is used from
        an instrument that is not in the state the driver configured.
        """
        if self._restoring or (not self._settings and self._identity is None):
            return None
        self._restoring = True
        try:
            return self._restore(reconfigure)
        except BaseException:
            drop_connection()
            raise
        finally:
            self._restoring = False

    def _restore(self, reconfigure: Callable[[], None]) -> RestoreRecord | None:
        self.check_identity()
        changes = self.lost()
        if not changes:
            return None
        log.warning(
            "%s: settings lost (power cycle?): %s; putting them back",
            self.instrument,
            "; ".join(str(c) for c in changes),
        )
        reconfigure()
        entries = list(self._settings.values())
        for entry in sorted(entries, key=lambda e: e.enables):  # stable: order kept
            entry.apply()
        still = self.lost()
        if still:
            raise SettingsLostError(
                self.instrument,
                "restore settings",
                "read-back differs after re-applying: " + "; ".join(str(c) for c in still),
            )
        record = RestoreRecord(time.time(), tuple(changes))
        with self._lock:
            self._records.append(record)
        log.warning("%s: settings restored: %s", self.instrument, "; ".join(record.lines()))
        return record

    def take_records(self) -> list[RestoreRecord]:
        """The restorations since the last call (each is reported once)."""
        with self._lock:
            records, self._records = self._records, []
        return records

    def report(self, health: InstrumentHealth) -> InstrumentHealth:
        """``health`` with the restorations since the last report added: level at least
        DEGRADED, the message naming what was put back, ``restored`` listing it."""
        records = self.take_records()
        if not records:
            return health
        lines = tuple(line for r in records for line in r.lines())
        level = max(health.level, HealthLevel.DEGRADED)
        note = "settings lost (power cycle?) and restored: " + "; ".join(lines)
        message = f"{note}; {health.message}" if health.message else note
        return InstrumentHealth(HealthLevel(level), message, lines)
