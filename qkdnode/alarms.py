"""Alarms of a node: named conditions that stop (or threaten) key production.

An alarm is raised while its cause lasts and cleared when the cause goes; each raise and
clear is one event (published on telemetry topic ``alarm`` and logged), and the set of
active alarms drives ``status.alarms``, the metric ``qkdnode_alarm_active{alarm,severity}``
and ``qkdnode health``: a node with an active ``critical`` alarm is not healthy.

Severities: ``critical`` (no key flows, or will not from the next block), ``major`` (key
flows worse than it should, or a fault is being recovered), ``warning`` (look soon).

Thread-safety: call from the event loop only.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Severity(enum.StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    WARNING = "warning"


#: Every alarm the node raises, with its severity and what it means. docs/alarms.md
#: lists the same table; a test keeps them in step.
ALARMS: dict[str, tuple[Severity, str]] = {
    "no_key": (
        Severity.CRITICAL,
        "the link should be producing key and no block was committed for several expected "
        "block times (or the pair is not exchanging)",
    ),
    "blocks_aborting": (Severity.MAJOR, "several consecutive blocks aborted"),
    "auth_pool_low": (
        Severity.CRITICAL,
        "the authentication key pool holds less than the next block needs",
    ),
    "keystore_write_error": (Severity.CRITICAL, "the key store could not store a block"),
    "keystore_full": (Severity.MAJOR, "the key store is full: blocks are dropped"),
    "disk_nearly_full": (Severity.MAJOR, "the state directory's file system is nearly full"),
    "pair_inconsistent": (
        Severity.CRITICAL,
        "the two nodes of the link are in states that cannot produce key together",
    ),
    "peer_down": (Severity.CRITICAL, "the peer node is not reachable"),
    "instrument_down": (Severity.CRITICAL, "an instrument does not answer"),
    "instrument_restored": (
        Severity.WARNING,
        "an instrument lost the settings its driver made (power cycle?) and the driver put "
        "them back",
    ),
    "qber_high": (Severity.MAJOR, "the error rate is above protocol.qber_warning"),
    "calibration_stale": (Severity.WARNING, "the last calibration is older than allowed"),
    "calibration_failed": (Severity.MAJOR, "the last calibration failed"),
    "intensity_drift": (
        Severity.MAJOR,
        "the transmitter's output left the intensity intervals the key length assumes: "
        "key exchange stopped for a new calibration",
    ),
    "dark_count_rise": (
        Severity.MAJOR,
        "the receiver's dark count rate measured while key flows (vacuum decoy class) is "
        "above calibration.dark_rise_factor times the light-off calibration's upper bound "
        "(detector warming, light leak): a fiber cut may go unnoticed by a floor that old",
    ),
    "sync_failed": (Severity.MAJOR, "the last synchronisation failed"),
    "exchange_failed": (Severity.MAJOR, "key exchange stopped on an error"),
    "lock_lost": (
        Severity.MAJOR,
        "the receiver lost the timing lock, or (transmitter) a block's bits came out random: "
        "the slot alignment slipped",
    ),
    "fault": (Severity.CRITICAL, "the node is in FAULT (instrument or light fault)"),
    "no_light": (Severity.MAJOR, "the receiver's count rate collapsed (fiber cut?): FAULT"),
    "bright_light": (Severity.MAJOR, "a detector latched on bright light (blinding?): FAULT"),
    "instrument": (Severity.MAJOR, "an instrument failed during the exchange: FAULT"),
    "crl_reload_failed": (Severity.WARNING, "the delivery CRL could not be reloaded"),
    "network_unreachable": (
        Severity.MAJOR,
        "the site's key manager has had no route to another site of the network for "
        "network.unreachable_alarm_s: end-to-end keys to it fail",
    ),
    "internal_error": (
        Severity.MAJOR,
        "a background loop of the daemon failed and was restarted (the log has the trace)",
    ),
}


@dataclass
class Alarm:
    """One alarm's current state."""

    name: str
    severity: Severity
    since: float  # Unix time of the raise
    cause: str
    active: bool = True
    cleared_at: float | None = None
    raised_count: int = 1
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "severity": self.severity.value,
            "since": self.since,
            "cause": self.cause,
            "active": self.active,
            "cleared_at": self.cleared_at,
            "raised_count": self.raised_count,
        }


Publish = Callable[[str, dict[str, Any]], None]
Listener = Callable[[Alarm], None]


class AlarmBoard:
    """The node's alarms. ``publish(topic, payload)`` sends telemetry; listeners (metrics)
    see every change."""

    def __init__(self, publish: Publish, *, clock: Callable[[], float] = time.time) -> None:
        self._publish = publish
        self._clock = clock
        self._alarms: dict[str, Alarm] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=200)
        self.listeners: list[Listener] = []

    def raise_(self, name: str, cause: str, **details: Any) -> bool:
        """Raise (or keep raised, updating the cause) alarm ``name``. True if it was not
        active before. Unknown names are raised as ``major``."""
        severity = ALARMS.get(name, (Severity.MAJOR, ""))[0]
        now = self._clock()
        alarm = self._alarms.get(name)
        if alarm is not None and alarm.active:
            alarm.cause = cause
            alarm.details = dict(details)
            return False
        if alarm is None:
            alarm = self._alarms[name] = Alarm(name, severity, now, cause, details=dict(details))
        else:
            alarm.active, alarm.since, alarm.cause, alarm.cleared_at = True, now, cause, None
            alarm.raised_count += 1
            alarm.details = dict(details)
        self._event("raise", alarm)
        log.warning("alarm", alarm=name, severity=severity.value, message=cause, **details)
        return True

    def clear(self, name: str, reason: str = "") -> bool:
        """Clear alarm ``name`` if active. True if it was active."""
        alarm = self._alarms.get(name)
        if alarm is None or not alarm.active:
            return False
        alarm.active = False
        alarm.cleared_at = self._clock()
        self._event("clear", alarm, reason)
        log.info("alarm_cleared", alarm=name, reason=reason)
        return True

    def set(self, name: str, on: bool, cause: str = "", **details: Any) -> None:
        """Raise with ``cause`` when ``on``, else clear."""
        if on:
            self.raise_(name, cause, **details)
        else:
            self.clear(name, "condition gone")

    def is_active(self, name: str) -> bool:
        alarm = self._alarms.get(name)
        return alarm is not None and alarm.active

    def active(self) -> list[Alarm]:
        """Active alarms, most severe first, then oldest first."""
        order = {Severity.CRITICAL: 0, Severity.MAJOR: 1, Severity.WARNING: 2}
        return sorted(
            (a for a in self._alarms.values() if a.active),
            key=lambda a: (order[a.severity], a.since),
        )

    def known(self) -> list[Alarm]:
        """Every alarm raised at least once since start (active or cleared)."""
        return list(self._alarms.values())

    def events(self) -> list[dict[str, Any]]:
        """The last raise/clear events, oldest first."""
        return list(self._events)

    def critical(self) -> bool:
        return any(a.severity is Severity.CRITICAL for a in self.active())

    def _event(self, kind: str, alarm: Alarm, reason: str = "") -> None:
        event = {"event": kind, **alarm.as_dict()}
        if reason:
            event["reason"] = reason
        self._events.append(event)
        self._publish("alarm", event)
        for listener in self.listeners:
            listener(alarm)
