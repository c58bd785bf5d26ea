"""The link as the last key blocks measured it, in the terms the optimiser takes.

A committed block tells the transmitter, per intensity class ``k`` (mean photon number
``mu_k``, sent with probability ``p_k``), how many of the block's ``pulses`` were detected
(``D_k``): the gain ``Q_k = D_k / (p_k * pulses)``. With the usual model of a lossy channel
followed by threshold detectors (Lo, Ma, Chen, PRL 94, 230504 (2005))

    Q_k = 1 - (1 - Y0) * exp(-eta * mu_k)

the vacuum class gives the background click probability ``Y0`` (its residual ``mu_v`` is
tiny) and the signal class the overall transmittance ``eta`` (channel, receiver optics and
detector efficiency). The error rate of the sifted key ``E`` over the block's gain ``Q``
gives the optical error ``e_d`` from ``E * Q = Y0 / 2 + e_d * (Q - Y0)``; it is taken from
the key basis, whose errors error correction pays for, so effects the model leaves out
(multi-click slots resolved at random, timing jitter) count against the link, not for it.
The receiver's Z-basis probability is the share of its detections it assigned to Z.

Only the node's own statistics enter; the result steers block sizes and settings, never the
security bound (which takes the block's own counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkdnode.postproc.optimize import LinkModel


class LinkFitError(ValueError):
    """The block's statistics cannot describe a link (no pulses, no detections, ...)."""


@dataclass(frozen=True)
class BlockObservation:
    """What one committed block measured (counts, not rates)."""

    pulses: int  # slots the block spans
    detections_per_class: tuple[int, int, int]  # signal, decoy, vacuum (all detections)
    mu: tuple[float, float, float]  # measured mean photon numbers (point values)
    p_class: tuple[float, float, float]  # probabilities the source used
    qber_z: float  # error rate of the sifted key (after error correction)
    rx_basis_z_fraction: float  # share of the receiver's detections in its Z basis
    slot_rate_hz: float
    ec_inefficiency: float | None = None  # measured f of this block (None: 1.1)


def fit_link(obs: BlockObservation) -> LinkModel:
    """The :class:`LinkModel` that explains ``obs``. Raises :class:`LinkFitError` when the
    counts cannot (no pulses, no signal detections, a gain of 1)."""
    if obs.pulses <= 0:
        raise LinkFitError("a block with no pulses")
    gains = []
    for d, p in zip(obs.detections_per_class, obs.p_class, strict=True):
        if p <= 0 or d < 0:
            raise LinkFitError(f"bad class probability {p} or count {d}")
        gains.append(d / (p * obs.pulses))
    q_s, _q_d, q_v = gains
    mu_s, _mu_d, mu_v = obs.mu
    if obs.detections_per_class[0] == 0 or q_s >= 1.0:
        raise LinkFitError(f"signal gain {q_s} cannot be fitted")
    # Y0 from the vacuum class, corrected for its residual light (one fixed-point step).
    y0 = min(max(q_v, 0.0), 0.5)
    eta = 0.0
    for _ in range(3):
        eta = -math.log((1.0 - q_s) / (1.0 - y0)) / mu_s
        y0 = min(max(1.0 - (1.0 - q_v) * math.exp(eta * mu_v), 0.0), 0.5)
    eta = min(max(eta, 1e-12), 1.0)
    q_mix = sum(p * q for p, q in zip(obs.p_class, gains, strict=True))
    e = min(max(obs.qber_z, 0.0), 0.5)
    e_d = (e * q_mix - y0 / 2.0) / max(q_mix - y0, 1e-300)
    e_d = min(max(e_d, 0.0), 0.5)
    f = obs.ec_inefficiency if obs.ec_inefficiency and obs.ec_inefficiency >= 1.0 else 1.1
    pz_rx = min(max(obs.rx_basis_z_fraction, 0.01), 0.99)
    return LinkModel(
        transmittance=eta,
        background_per_pulse=y0,
        optical_error=e_d,
        slot_rate_hz=obs.slot_rate_hz,
        ec_inefficiency=float(f),
        p_basis_z_rx=pz_rx,
    )
