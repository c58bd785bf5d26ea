"""Known drivers, and opening an instrument by driver name.

A driver class follows one convention so that :func:`open_instrument` can build it:

* ``__init__(self, name, resource, timeout_s=2.0, options=None)`` where ``options`` is
  an instance of ``Options`` (or None for the defaults);
* a class attribute ``Options``: the pydantic model of its options (``extra="forbid"``).

Entries are resolved lazily ("module:Class"), so listing drivers never imports a vendor
package. The simulated-link drivers live in :mod:`drivers.simlink`; if the module
``drivers.simlink.registry_entries`` exists it is imported on first use and may either call
:func:`register_driver` or define ``ENTRIES`` as a list of ``(name, import_path, interface,
description)`` or a dict ``{name: (import_path, interface, description)}``.
The options model is the class attribute ``Options`` or ``options_model``.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from drivers.errors import DriverConfigError, InstrumentError, InstrumentTimeoutError, ProtocolError
from drivers.interfaces import Instrument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverEntry:
    import_path: str  # "module:Class"
    interface: str  # name of the class in drivers.interfaces
    description: str


DRIVERS: dict[str, DriverEntry] = {
    # --- real drivers: VISA / SCPI ---------------------------------------------------
    "keysight_816x": DriverEntry(
        "drivers.keysight_816x:Keysight816xLaser",
        "Laser",
        "Keysight 8164B/8163B tunable laser module (SCPI over VISA)",
    ),
    "keysight_8157x": DriverEntry(
        "drivers.keysight_8157x:Keysight8157xAttenuator",
        "VariableAttenuator",
        "Keysight 8157x variable optical attenuator (SCPI over VISA)",
    ),
    "thorlabs_pm100": DriverEntry(
        "drivers.thorlabs_pm100:ThorlabsPM100",
        "OpticalPowerMeter",
        "Thorlabs PM100D/PM100USB power meter (SCPI over VISA)",
    ),
    "keysight_33500_im": DriverEntry(
        "drivers.keysight_33500:Keysight33500IntensityModulator",
        "IntensityModulator",
        "Keysight 33500/33600 AWG driving an intensity modulator (levels on ch1, bias on ch2)",
    ),
    "keysight_33500_encoder": DriverEntry(
        "drivers.keysight_33500:Keysight33500Encoder",
        "Encoder",
        "Keysight 33500/33600 AWG driving a BB84 encoder (state levels on ch1, bias on ch2)",
    ),
    # --- real drivers: serial ----------------------------------------------------------
    "oif_itla": DriverEntry(
        "drivers.oif_itla:OifItlaLaser",
        "Laser",
        "OIF-ITLA-MSA tunable laser (4-byte register protocol, serial)",
    ),
    "ascii_spd": DriverEntry(
        "drivers.ascii_spd:AsciiSpd",
        "SinglePhotonDetector",
        "single-photon detector, qkdnode SPD-ASCII v1 line protocol (serial)",
    ),
    "ozoptics_epc": DriverEntry(
        "drivers.ozoptics_epc:OzOpticsEpc",
        "PolarizationController",
        "OZ Optics EPC-400 polarisation controller on its EPC driver (4 squeezers, serial)",
    ),
    # --- real drivers: network ---------------------------------------------------------
    "single_quantum_snspd": DriverEntry(
        "drivers.single_quantum:SingleQuantumSnspd",
        "SinglePhotonDetector",
        "Single Quantum SNSPD controller, one detector (JSON over TCP 12000, counts on 12345)",
    ),
    # --- real drivers: vendor libraries ---------------------------------------------------
    "aurea_spd": DriverEntry(
        "drivers.aurea_spd:AureaSpd",
        "SinglePhotonDetector",
        "Aurea Technology gated InGaAs detector (SPD OEM) through the vendor's SPD_OEM wrapper "
        "(resource: device name or '')",
    ),
    # --- time taggers -----------------------------------------------------------------
    "idq_time_controller": DriverEntry(
        "drivers.idq_time_controller:IdqTimeController",
        "TimeTagger",
        "ID Quantique ID900/ID1000 Time Controller (SCPI over ZeroMQ 5555, data link streams)",
    ),
    # --- gate generators and externally gated detectors --------------------------------
    "idq_gate_generator": DriverEntry(
        "drivers.idq_gate_generator:IdqGateGenerator",
        "GateGenerator",
        "ID Quantique ID1000 Time Controller generator -> combiner -> output as a detector's "
        "gate (SCPI over ZeroMQ 5555, its own socket beside the tagger's)",
    ),
    "externally_gated_detector": DriverEntry(
        "drivers.gated_detector:ExternallyGatedDetector",
        "SinglePhotonDetector",
        "a gated detector and the generator of its gates as one detector (options.generator, "
        "options.detector; resource unused)",
    ),
    "qutag": DriverEntry(
        "drivers.qutag:QutagTimeTagger",
        "TimeTagger",
        "qutools quTAG through the vendor's QuTAG wrapper of tdcbase (resource unused)",
    ),
    "swabian_time_tagger": DriverEntry(
        "drivers.swabian:SwabianTimeTagger",
        "TimeTagger",
        "Swabian Time Tagger through the vendor's TimeTagger package (resource: serial number)",
    ),
    "timetag_file": DriverEntry(
        "drivers.timetag_file:TagFileReplayTagger",
        "TimeTagger",
        "replays a recorded QKDTAGS1 tag file as a virtual tagger (resource: file path)",
    ),
    # --- simulated link (drivers/simlink) ----------------------------------------------
    # Added at first use by drivers.simlink.registry_entries (see _load_plugins):
    # sim_laser, sim_intensity_modulator, sim_encoder, sim_attenuator, sim_power_meter,
    # sim_detector, sim_time_tagger, sim_state_source.
}

_plugins_loaded = False
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register_driver(name: str, import_path: str, interface: str, description: str) -> None:
    """Add (or replace) a driver entry. ``import_path`` is "module:Class"."""
    if not _NAME_RE.match(name):
        raise ValueError(f"driver name {name!r} must be lower_snake_case")
    if ":" not in import_path:
        raise ValueError(f"import path {import_path!r} must be 'module:Class'")
    from drivers import interfaces

    if not isinstance(getattr(interfaces, interface, None), type):
        raise ValueError(f"interface {interface!r} is not a class in drivers.interfaces")
    DRIVERS[name] = DriverEntry(import_path, interface, description)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    try:
        mod = importlib.import_module("drivers.simlink.registry_entries")
    except ModuleNotFoundError as exc:
        if exc.name != "drivers.simlink.registry_entries":
            raise
        return
    entries = getattr(mod, "ENTRIES", ())
    rows = (
        [(n, *rest) for n, rest in entries.items()] if isinstance(entries, dict) else list(entries)
    )
    for name, path, interface, description in rows:
        register_driver(name, path, interface, description)


def known_drivers() -> dict[str, DriverEntry]:
    """Every registered driver, by name (sorted)."""
    _load_plugins()
    return dict(sorted(DRIVERS.items()))


def resolve(name: str) -> type[Instrument]:
    """Import and return the class of driver ``name`` (DriverConfigError if unknown)."""
    drivers = known_drivers()
    entry = drivers.get(name)
    if entry is None:
        raise DriverConfigError(
            name, "driver", f"unknown driver {name!r}; known: {', '.join(drivers)}"
        )
    module_name, _, class_name = entry.import_path.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Instrument)):
        raise DriverConfigError(name, "driver", f"{entry.import_path} is not an Instrument")
    return cls


def validate_options(driver: str, name: str, options: dict[str, Any] | None) -> BaseModel | None:
    """The driver's options model built from ``options`` (errors name ``options.<key>``)."""
    cls = resolve(driver)
    model: type[BaseModel] | None = getattr(cls, "Options", None) or getattr(
        cls, "options_model", None
    )
    if model is None:
        if options:
            raise DriverConfigError(name, "options", f"driver {driver!r} takes no options")
        return None
    try:
        return model.model_validate(options or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"options.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise DriverConfigError(name, "options", problems) from None


def open_instrument(
    driver: str,
    name: str,
    resource: str,
    timeout_s: float = 2.0,
    options: dict[str, Any] | None = None,
) -> Instrument:
    """Validate options, construct driver ``driver`` and connect it."""
    cls = resolve(driver)
    validated = validate_options(driver, name, options)
    kwargs: dict[str, Any] = {"timeout_s": timeout_s}
    if validated is not None:
        kwargs["options"] = validated
    instrument = cls(name, resource, **kwargs)  # type: ignore[call-arg]
    instrument.connect()
    return instrument


# --- probing ------------------------------------------------------------------------

_SUGGEST = [
    (r"816[0-9]", ["keysight_816x", "keysight_8157x"]),
    (r"33[56]\d\d", ["keysight_33500_im", "keysight_33500_encoder"]),
    (r"Thorlabs,PM1", ["thorlabs_pm100"]),
]


def _is_visa(resource: str) -> bool:
    return "::" in resource and not resource.startswith(("socket://", "rfc2217://", "/"))


def probe(resource: str, timeout_s: float = 2.0, visa_library: str = "") -> dict[str, Any]:
    """Open ``resource``, identify what answers and return what was found.

    VISA resources (``GPIB0::20::INSTR``, optionally ``...@sim`` or with ``visa_library``)
    are asked ``*IDN?``. Serial URLs are tried as OIF-ITLA (NOP and AEA strings), then
    as SPD-ASCII (``IDN?``), then as an OZ Optics EPC driver (``V?``). ``tcp://HOST:PORT``
    is tried as a Single Quantum SNSPD controller (JSON labels) and then as a ZeroMQ SCPI
    endpoint (``*IDN?``, the ID Quantique Time Controller). ``qutag:`` (or
    ``qutag:MODULE``) loads qutools' wrapper and asks the device; ``aurea:`` (or
    ``aurea:MODULE``) loads Aurea's SPD_OEM wrapper and asks the first detector. Raises an
    :class:`InstrumentError` when nothing answers.
    """
    if resource.startswith("tcp://"):
        from drivers.probe_network import probe_tcp

        return probe_tcp(resource, timeout_s)
    if resource.startswith("qutag:"):
        from drivers.probe_network import probe_qutag

        return probe_qutag(resource, timeout_s)
    if resource.startswith("aurea:"):
        from drivers.probe_network import probe_aurea

        return probe_aurea(resource, timeout_s)
    if _is_visa(resource):
        return _probe_visa(resource, timeout_s, visa_library)
    return _probe_serial(resource, timeout_s)


def _probe_visa(resource: str, timeout_s: float, visa_library: str) -> dict[str, Any]:
    from drivers.transports.visa import VisaTransport

    if resource.endswith("@sim") and not visa_library:
        raise DriverConfigError(
            "probe",
            "visa_library",
            "a bare '@sim' needs --visa-library PATH.yaml@sim to say which definition",
        )
    res = resource[: -len("@sim")] if resource.endswith("@sim") else resource
    transport = VisaTransport(
        "probe", res, visa_library=visa_library, timeout_s=timeout_s, reconnect_timeout_s=0
    )
    transport.open()
    try:
        identity = transport.query("*IDN?")
    finally:
        transport.close()
    suggested = [d for pattern, names in _SUGGEST if re.search(pattern, identity) for d in names]
    return {
        "resource": res,
        "transport": "visa",
        "visa_library": visa_library,
        "protocol": "scpi",
        "identity": identity,
        "suggested_drivers": suggested,
    }


def _probe_serial(resource: str, timeout_s: float) -> dict[str, Any]:
    from drivers.ascii_spd import AsciiSpd
    from drivers.oif_itla import OifItlaLaser, OifItlaOptions, Reg
    from drivers.ozoptics_epc import OzOpticsEpc, OzOpticsEpcOptions

    attempt_s = max(timeout_s / 2, 0.1)
    errors: list[str] = []
    itla = OifItlaLaser("probe", resource, attempt_s, OifItlaOptions(reconnect_timeout_s=0))
    try:
        itla.transport.open()
        itla.read_register(Reg.NOP)
        identity = itla.identify()
        return {
            "resource": resource,
            "transport": "serial",
            "protocol": "oif-itla",
            "identity": identity,
            "suggested_drivers": ["oif_itla"],
        }
    except (InstrumentTimeoutError, ProtocolError) as exc:
        errors.append(f"oif-itla: {exc.reason}")
        if itla.transport.is_open:
            # an ASCII device holds our 4 bytes as a partial line: end it and drain the reply
            itla.transport.exchange("flush", b"\n", None)
            itla._resync()
    finally:
        itla.transport.close()
    spd = AsciiSpd("probe", resource, attempt_s)
    try:
        spd.transport.open()
        identity = spd.identify()
        return {
            "resource": resource,
            "transport": "serial",
            "protocol": "spd-ascii-v1",
            "identity": identity,
            "suggested_drivers": ["ascii_spd"],
        }
    except InstrumentError as exc:
        errors.append(f"spd-ascii: {exc.reason}")
    finally:
        spd.transport.close()
    epc = OzOpticsEpc("probe", resource, attempt_s, OzOpticsEpcOptions(reconnect_timeout_s=0))
    try:
        epc.transport.open()
        identity = epc.identify()
        return {
            "resource": resource,
            "transport": "serial",
            "protocol": "ozoptics-epc",
            "identity": identity,
            "suggested_drivers": ["ozoptics_epc"],
        }
    except InstrumentError as exc:
        errors.append(f"ozoptics-epc: {exc.reason}")
        raise ProtocolError(
            "probe", resource, "no known protocol answered: " + "; ".join(errors)
        ) from exc
    finally:
        epc.transport.close()
