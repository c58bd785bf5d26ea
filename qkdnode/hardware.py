"""The node's instruments: opened from the config, called from worker threads, made safe.

Drivers are blocking; every call from the event loop goes through :meth:`InstrumentSet.call`
which runs it in a worker thread. :meth:`InstrumentSet.make_safe` puts every instrument in
its safe state and reads the result back, so the log shows what state each instrument
was really left in (laser emission off, detectors disarmed, modulator outputs off, shutter
closed). It is called on every exit path of the daemon.
"""

from __future__ import annotations

from typing import Any, TypeVar

import structlog

from drivers.errors import InstrumentError
from drivers.interfaces import (
    DetectorStatus,
    Encoder,
    GateGenerator,
    HealthLevel,
    Instrument,
    InstrumentHealth,
    IntensityModulator,
    Laser,
    SinglePhotonDetector,
    VariableAttenuator,
)
from qkdnode.config.sections import InstrumentSection

log = structlog.get_logger(__name__)

T = TypeVar("T")
InstT = TypeVar("InstT", bound=Instrument)


def safe_readback(inst: Instrument) -> dict[str, Any]:
    """Read back the safety-relevant state of ``inst`` (blocking)."""
    if isinstance(inst, Laser):
        return {"emission_on": inst.emission_on()}
    if isinstance(inst, SinglePhotonDetector):
        status = inst.status()
        return {"detector_status": status.name, "armed": status is DetectorStatus.ARMED}
    if isinstance(inst, IntensityModulator | Encoder):
        return {"output_on": inst.output_on()}
    if isinstance(inst, VariableAttenuator):
        return {"shutter_open": inst.shutter_open()}
    if isinstance(inst, GateGenerator):
        return {"output_on": inst.output_enabled()}
    return {}


def is_safe(readback: dict[str, Any]) -> bool:
    return not any(readback.get(k) for k in ("emission_on", "armed", "output_on", "shutter_open"))


class InstrumentSet:
    """All instruments of one node, by config name."""

    def __init__(self, sections: dict[str, InstrumentSection]) -> None:
        self.sections = sections
        self.instruments: dict[str, Instrument] = {}
        self.up: dict[str, bool] = {name: False for name in sections}

    def open_all(self) -> None:
        """Open and connect every configured instrument (blocking).

        Raises :class:`drivers.errors.InstrumentError` naming the first instrument that
        fails; instruments opened before it stay open (the caller makes them safe).
        """
        from drivers.registry import open_instrument

        for name, sec in self.sections.items():
            if name in self.instruments:
                continue
            inst = open_instrument(
                sec.driver,
                name=name,
                resource=sec.resource,
                timeout_s=sec.timeout_s,
                options=dict(sec.options),
            )
            self.instruments[name] = inst
            self.up[name] = True
            log.info(
                "instrument_connected", instrument=name, driver=sec.driver, identity=inst.identify()
            )

    def of_type(self, cls: type[InstT]) -> dict[str, InstT]:
        return {n: i for n, i in self.instruments.items() if isinstance(i, cls)}

    def one(self, cls: type[InstT]) -> InstT:
        found = self.of_type(cls)
        if len(found) != 1:
            raise LookupError(
                f"expected exactly one {cls.__name__} in [instruments], found {sorted(found)}"
            )
        return next(iter(found.values()))

    def health(self) -> dict[str, InstrumentHealth]:
        """Each instrument's health check (blocking). A driver that found its instrument
        power-cycled and put its settings back says so in ``restored`` (logged here)."""
        out: dict[str, InstrumentHealth] = {}
        for name, inst in self.instruments.items():
            h = inst.health()
            out[name] = h
            self.up[name] = h.level is not HealthLevel.FAULT
            if h.restored:
                log.warning(
                    "instrument_settings_restored", instrument=name, restored=list(h.restored)
                )
        return out

    def make_safe(self) -> dict[str, dict[str, Any]]:
        """Safe state on every instrument, read back; never raises (blocking)."""
        report: dict[str, dict[str, Any]] = {}
        # Light sources first, then detectors, then the rest.
        order = sorted(
            self.instruments.items(),
            key=lambda kv: (
                0
                if isinstance(kv[1], Laser)
                else 1
                if isinstance(kv[1], IntensityModulator | Encoder)
                else 2
                if isinstance(kv[1], SinglePhotonDetector)
                else 3
            ),
        )
        for name, inst in order:
            try:
                inst.safe_state()
                rb = safe_readback(inst)
                report[name] = {**rb, "safe": is_safe(rb)}
                log.info("instrument_safe", instrument=name, **report[name])
            except (InstrumentError, OSError) as exc:
                report[name] = {"safe": False, "error": str(exc)}
                log.error("instrument_safe_failed", instrument=name, error=str(exc))
        return report

    def close_all(self) -> None:
        for name, inst in self.instruments.items():
            try:
                inst.close()
            except Exception as exc:  # close() must never stop the shutdown
                log.warning("instrument_close_failed", instrument=name, error=str(exc))
            self.up[name] = False
