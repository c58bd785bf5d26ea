"""Helpers shared by every driver: option models, limit checks, health wrapping."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from drivers.errors import InstrumentError, OutOfRangeError
from drivers.interfaces import HealthLevel, InstrumentHealth

log = logging.getLogger(__name__)


class DriverOptions(BaseModel):
    """Base of every driver's options model (``[instruments.X.options]`` in a node config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reconnect_timeout_s: float = Field(
        5.0, ge=0, le=600, description="how long a lost connection is retried before failing"
    )


def check_range(  # noqa: PLR0917 - mirrors the wording of the error it builds
    instrument: str,
    command: str,
    quantity: str,
    value: float,
    limits: tuple[float, float],
    unit: str,
) -> float:
    """Return ``value`` as float, or raise :class:`OutOfRangeError` (NaN is out of range)."""
    lo, hi = limits
    v = float(value)
    if math.isnan(v) or not lo <= v <= hi:
        raise OutOfRangeError(
            instrument,
            command,
            f"{quantity} {v:g} {unit} outside the limits [{lo:g}, {hi:g}] {unit}",
        )
    return v


E = TypeVar("E", bound=Enum)


def check_choice(instrument: str, command: str, choices: type[E], value: object) -> E:
    """``value`` as a member of the enum ``choices`` (by value or member), or
    :class:`OutOfRangeError` naming the allowed members."""
    try:
        return choices(value)
    except ValueError:
        allowed = ", ".join(m.name for m in choices)
        raise OutOfRangeError(instrument, command, f"{value!r} is not one of {allowed}") from None


def health_check(instrument: str, probe: Callable[[], InstrumentHealth]) -> InstrumentHealth:
    """Run ``probe``; a driver error or anything unexpected becomes a FAULT (never raises)."""
    try:
        return probe()
    except InstrumentError as exc:
        return InstrumentHealth(HealthLevel.FAULT, str(exc))
    except Exception as exc:
        log.exception("health check of %s failed unexpectedly", instrument)
        return InstrumentHealth(HealthLevel.FAULT, f"{instrument}: health: {exc!r}")
