"""The demo's link in theory: asymptotic decoy-state key rate and the PLOB bound.

The formulas live in :mod:`qkdnode.postproc.theory`; this module only translates the
simulation parameters (:class:`drivers.simlink.params.LinkParams`) and the protocol
settings into that module's inputs, for exactly the link the daemons simulate:

- channel transmittance ``eta_ch`` = fiber and insertion loss (``FiberParams.transmittance``);
- ``eta = eta_ch * eta_det`` with ``eta_det`` the mean detector efficiency;
- background yield ``Y0`` = probability that any of the four detectors gives a dark count
  in the detection window of one slot: ``1 - exp(-4 * dark_rate * gate_width)``;
- optical error ``e_d`` = ``FiberParams.misalignment``;
- intensities, their probabilities and both parties' Z-basis probabilities as simulated;
- error-correction inefficiency ``f`` = ``protocol.ec_efficiency_target``.

Dead time, afterpulsing and the polarisation drift (which the nodes track) are not in
the asymptotic model; at the default rates they cost well under one percent.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass
from typing import Any

from drivers.simlink.params import LinkParams
from qkdnode.config.sections import ProtocolSection

N_DETECTORS = 4


@dataclass(frozen=True)
class TheoryInputs:
    """The simulated link as the asymptotic model sees it. All rates are per slot."""

    channel_transmittance: float
    detector_efficiency: float
    transmittance: float
    y0: float
    e_d: float
    mu_signal: float
    mu_decoy: float
    mu_vacuum: float
    p_signal: float
    p_decoy: float
    p_basis_z_tx: float
    p_basis_z_rx: float
    ec_efficiency: float
    slot_rate_hz: float

    @classmethod
    def from_link(cls, link: LinkParams, protocol: ProtocolSection) -> TheoryInputs:
        rx = link.receiver
        eta_det = sum(rx.detector_efficiency) / len(rx.detector_efficiency)
        eta_ch = link.fiber.transmittance
        dark_per_slot = rx.dark_count_rate_hz * rx.gate_width_ps * 1e-12
        return cls(
            channel_transmittance=eta_ch,
            detector_efficiency=eta_det,
            transmittance=eta_ch * eta_det,
            y0=-math.expm1(-N_DETECTORS * dark_per_slot),
            e_d=link.fiber.misalignment,
            mu_signal=link.source.mu_signal,
            mu_decoy=link.source.mu_decoy,
            mu_vacuum=link.source.mu_vacuum,
            p_signal=link.source.p_signal,
            p_decoy=link.source.p_decoy,
            p_basis_z_tx=link.source.p_basis_z,
            p_basis_z_rx=rx.p_basis_z,
            ec_efficiency=protocol.ec_efficiency_target,
            slot_rate_hz=link.source.slot_rate_hz,
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def link_theory(link: LinkParams, protocol: ProtocolSection) -> dict[str, Any]:
    """``secret_bits_per_pulse`` (asymptotic decoy GLLP), ``plob_bits_per_pulse``,
    ``transmittance`` (channel) and ``note`` for the given link.

    The two rates are None (and ``note`` says why) when :mod:`qkdnode.postproc.theory`
    is not available.
    """
    inputs = TheoryInputs.from_link(link, protocol)
    result: dict[str, Any] = {
        "secret_bits_per_pulse": None,
        "plob_bits_per_pulse": None,
        "transmittance": inputs.channel_transmittance,
        "note": None,
    }
    try:
        theory = importlib.import_module("qkdnode.postproc.theory")
    except ImportError:
        result["note"] = "qkdnode.postproc.theory not available"
        return result
    try:
        result.update(_evaluate(theory, inputs))
    except (AttributeError, TypeError, ValueError) as exc:
        result["note"] = f"theory evaluation failed: {type(exc).__name__}: {exc}"
    return result


def _evaluate(theory: Any, inputs: TheoryInputs) -> dict[str, Any]:
    """Call the theory module (the only place that knows its API)."""
    p_vac = max(0.0, 1.0 - inputs.p_signal - inputs.p_decoy)
    rate = theory.rate_decoy_biased(
        inputs.transmittance,
        inputs.y0,
        inputs.e_d,
        [
            (inputs.p_signal, inputs.mu_signal),
            (inputs.p_decoy, inputs.mu_decoy),
            (p_vac, inputs.mu_vacuum),
        ],
        p_z_tx=inputs.p_basis_z_tx,
        p_z_rx=inputs.p_basis_z_rx,
        f=inputs.ec_efficiency,
    )
    plob = theory.plob_bound(inputs.channel_transmittance)
    return {"secret_bits_per_pulse": float(rate), "plob_bits_per_pulse": float(plob)}
