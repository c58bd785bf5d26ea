"""Small synthetic BB84 decoy-state channel for the post-processing tests (not the link sim).

Per pulse: intensity class, basis, bit; Poisson photon number; each photon survives with
probability ``eta``; background click with probability ``y0``; optical error ``e_d`` (``e_d_x`` in the X basis if given);
optional intercept-resend eavesdropper on every pulse. Returns the receiver's detections
plus a ``prepared`` lookup for the transmitter and the true photon numbers for coverage
checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from drivers.interfaces import PreparedStates
from qkdnode.postproc.params import PostprocParams


@dataclass
class Synth:
    slot_index: npt.NDArray[np.int64]
    channel: npt.NDArray[np.int8]
    basis: npt.NDArray[np.uint8]
    bit: npt.NDArray[np.uint8]
    intensity: npt.NDArray[np.uint8]
    photons_detected: npt.NDArray[np.int64]  # photon number of the detected pulses
    bob_basis: npt.NDArray[np.uint8]

    def prepared(self, slots: npt.NDArray[np.int64]) -> PreparedStates:
        return PreparedStates(self.basis[slots], self.bit[slots], self.intensity[slots])


def generate(
    n_pulses: int,
    params: PostprocParams,
    seed: int,
    eta: float = 0.1,
    y0: float = 1e-5,
    e_d: float = 0.01,
    eve: bool = False,
    double_click_p: float = 0.0,
    e_d_x: float | None = None,
) -> Synth:
    rng = np.random.default_rng(seed)
    basis = (rng.random(n_pulses) >= params.p_basis_z).astype(np.uint8)
    bit = rng.integers(0, 2, n_pulses, dtype=np.uint8)
    u = rng.random(n_pulses)
    intensity = np.where(
        u < params.p_signal, 0, np.where(u < params.p_signal + params.p_decoy, 1, 2)
    )
    intensity = intensity.astype(np.uint8)
    mus = np.array([params.mu_signal, params.mu_decoy, params.mu_vacuum])
    photons = rng.poisson(mus[intensity])
    arrived = rng.binomial(photons, eta)
    dark = rng.random(n_pulses) < y0
    det = (arrived > 0) | dark
    idx = np.flatnonzero(det)
    bob_basis = (rng.random(idx.shape[0]) >= params.p_basis_z).astype(np.uint8)
    a_basis, a_bit = basis[idx], bit[idx]
    if eve:
        eve_basis = rng.integers(0, 2, idx.shape[0], dtype=np.uint8)
        sent_bit = np.where(eve_basis == a_basis, a_bit, rng.integers(0, 2, idx.shape[0]))
        sent_basis = eve_basis
    else:
        sent_bit, sent_basis = a_bit, a_basis
    e_d_per_basis = np.array([e_d, e_d if e_d_x is None else e_d_x])
    flip = rng.random(idx.shape[0]) < e_d_per_basis[bob_basis]
    b_bit = np.where(sent_basis == bob_basis, sent_bit ^ flip, rng.integers(0, 2, idx.shape[0]))
    from_dark = arrived[idx] == 0
    b_bit = np.where(from_dark, rng.integers(0, 2, idx.shape[0]), b_bit).astype(np.uint8)
    channel = (bob_basis * 2 + b_bit).astype(np.int8)
    slots = idx.astype(np.int64)
    if double_click_p > 0:
        extra = rng.random(idx.shape[0]) < double_click_p
        slots = np.concatenate([slots, slots[extra]])
        channel = np.concatenate([channel, rng.integers(0, 4, int(extra.sum())).astype(np.int8)])
        order = np.argsort(slots, kind="stable")
        slots, channel = slots[order], channel[order]
    return Synth(slots, channel, basis, bit, intensity, photons[idx], bob_basis)
