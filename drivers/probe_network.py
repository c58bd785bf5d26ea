"""Identifying what answers on a TCP endpoint, or what a vendor library sees.

Used by :func:`drivers.registry.probe` for ``tcp://``, ``qutag:`` and ``aurea:`` resources. Each
attempt runs the real driver's connect, so a probe that succeeds means the driver works.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from drivers.errors import DriverConfigError, InstrumentError, ProtocolError


def probe_tcp(resource: str, timeout_s: float) -> dict[str, Any]:
    """Try a Single Quantum SNSPD controller, then an ID Quantique Time Controller."""
    from drivers.idq_time_controller import IDN_PATTERN
    from drivers.single_quantum import SingleQuantumOptions, SingleQuantumSnspd
    from drivers.transports.zmq_req import ZmqReqTransport

    attempt_s = max(timeout_s / 2, 0.1)
    errors: list[str] = []
    snspd = SingleQuantumSnspd("probe", resource, attempt_s, SingleQuantumOptions())
    try:
        snspd.connect()
        return {
            "resource": resource,
            "transport": "tcp",
            "protocol": "single-quantum-json",
            "identity": snspd.identify(),
            "suggested_drivers": ["single_quantum_snspd"],
        }
    except InstrumentError as exc:
        errors.append(f"single-quantum: {exc.reason}")
    finally:
        snspd.close()
    zmq_req = ZmqReqTransport("probe", resource, timeout_s=attempt_s)
    suggested = []
    try:
        zmq_req.open()
        identity = zmq_req.query("*IDN?")
        if re.search(IDN_PATTERN, identity, re.I):
            suggested = ["idq_time_controller"]
            # generator blocks (the ID1000's; an ID900 has none): asked, nothing set
            if zmq_req.query("GEN1:ENAB?").strip().upper() in ("ON", "OFF"):
                suggested += ["idq_gate_generator", "externally_gated_detector"]
    except InstrumentError as exc:
        if not suggested:
            errors.append(f"zeromq scpi: {exc.reason}")
            raise ProtocolError(
                "probe", resource, "no known protocol answered: " + "; ".join(errors)
            ) from exc
    finally:
        zmq_req.close()
    return {
        "resource": resource,
        "transport": "zeromq",
        "protocol": "scpi",
        "identity": identity,
        "suggested_drivers": suggested,
    }


def probe_qutag(resource: str, timeout_s: float) -> dict[str, Any]:
    """``qutag:`` or ``qutag:MODULE``: connect through the vendor wrapper and identify."""
    from drivers.qutag import QutagOptions, QutagTimeTagger

    module = resource.partition(":")[2] or QutagOptions().vendor_module
    try:
        options = QutagOptions(vendor_module=module, channels=[1])
    except ValidationError:
        raise DriverConfigError("probe", "resource", f"{module!r} is not a module name") from None
    tagger = QutagTimeTagger("probe", "", timeout_s, options)
    try:
        tagger.connect()
        identity = tagger.identify()
    finally:
        tagger.close()
    return {
        "resource": resource,
        "transport": "vendor library",
        "protocol": module,
        "identity": identity,
        "suggested_drivers": ["qutag"],
    }


def probe_aurea(resource: str, timeout_s: float) -> dict[str, Any]:
    """``aurea:`` or ``aurea:MODULE``: open the first detector through Aurea's wrapper and
    identify it (nothing is set on it)."""
    from drivers.aurea_spd import AureaSpd, AureaSpdOptions

    module = resource.partition(":")[2] or AureaSpdOptions().vendor_module
    try:
        options = AureaSpdOptions(vendor_module=module)
    except ValidationError:
        raise DriverConfigError("probe", "resource", f"{module!r} is not a module name") from None
    detector = AureaSpd("probe", "", timeout_s, options)
    try:
        detector.connect()
        identity = detector.identify()
    finally:
        detector.close()
    return {
        "resource": resource,
        "transport": "vendor library",
        "protocol": module,
        "identity": identity,
        "suggested_drivers": ["aurea_spd"],
    }
