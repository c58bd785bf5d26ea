"""Polarisation in the simulated fiber and in the receiver's polarisation controller.

A lossless fiber acts on the polarisation by a unitary in SU(2), i.e. a rotation ``R``
of the Poincaré sphere (:mod:`drivers.poincare` for the conventions and arithmetic).

The BB84 states are linear polarisations at angle ``a`` (real space), i.e. on the
equator: ``s = (cos 2a, sin 2a, 0)``. The receiver's analysers measure ``S1`` (Z basis)
and ``S2`` (X basis): a photon in state ``s`` leaves the Z arm's second port (V) with
probability ``(1 - s1) / 2`` and the X arm's second port (A) with ``(1 - s2) / 2``. So
the whole link, from prepared to analysed state, enters the detection probabilities
only through the 2x2 block ``R[:2, :2]`` (:func:`drivers.poincare.analysis_block`): a rotation by
``delta`` about ``S3`` (the old "reference angle" ``delta / 2`` in real space) is the
special case the encoder bias can undo; every other axis mixes in ``S3``, which neither
basis sees to first order and which the encoder cannot undo.

* :class:`FiberPolarization`: the fiber's slowly varying rotation: a random walk on SO(3)
  (each step an isotropic rotation vector with standard deviation
  ``drift_rad_per_sqrt_s * sqrt(dt)`` per axis) and jumps (a fiber being touched: a
  rotation by ``jump_angle_rad`` about a uniformly random axis) at given times and/or as
  a Poisson process of ``jump_rate_per_hour``.
* :class:`ControllerModel`: the receiver's electronic polarisation controller, a row of
  variable retarders (fiber squeezers) whose fast axes lie at 0 and 45 degrees in real
  space, i.e. rotations about ``S1`` and ``S2`` by their retardances. Three alternating
  retarders reach every rotation (Euler angles); the fourth of a four-squeezer
  controller gives room to avoid the ends of the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from drivers.poincare import (
    nearest_rotation,
    random_axis,
    retarder_rotation,
    rotation_about,
    rotation_matrix,
)
from drivers.simlink.params import PolarizationDriftParams

__all__ = ["ControllerModel", "FiberPolarization"]

F64 = npt.NDArray[np.float64]


@dataclass
class FiberPolarization:
    """The fiber's rotation ``R(t)``, advanced chunk by chunk (see the module docstring).

    ``matrix`` is the rotation now; :meth:`advance` moves it forward by ``dt_s`` with the
    caller's generator (the transmitter world gives one per chunk, so the same seed gives
    the same drift however the chunks are paced). ``jumps`` counts the jumps applied.
    """

    params: PolarizationDriftParams
    matrix: F64 = field(default_factory=lambda: np.eye(3))
    time_s: float = 0.0
    jumps: int = 0

    def __post_init__(self) -> None:
        if self.params.initial_rotation_rad is not None:
            self.matrix = rotation_matrix(self.params.initial_rotation_rad)

    def advance(self, dt_s: float, rng: np.random.Generator) -> F64:
        """Advance by ``dt_s`` seconds (>= 0); returns the new rotation."""
        if not dt_s >= 0.0:
            raise ValueError(f"fiber polarisation cannot go back in time (dt {dt_s} s)")
        p = self.params
        t0, t1 = self.time_s, self.time_s + dt_s
        if p.drift_rad_per_sqrt_s > 0.0 and dt_s > 0.0:
            step = rng.normal(0.0, p.drift_rad_per_sqrt_s * math.sqrt(dt_s), size=3)
            self.matrix = rotation_matrix(step) @ self.matrix
        n_jumps = sum(1 for t in p.jump_times_s if t0 < t <= t1)
        if p.jump_rate_per_hour > 0.0 and dt_s > 0.0:
            n_jumps += int(rng.poisson(p.jump_rate_per_hour * dt_s / 3600.0))
        for _ in range(n_jumps):
            self.matrix = rotation_about(random_axis(rng), p.jump_angle_rad) @ self.matrix
            self.jumps += 1
        self.matrix = nearest_rotation(self.matrix)  # no round-off creep over days
        self.time_s = t1
        return self.matrix


@dataclass
class ControllerModel:
    """A row of variable retarders: light crosses retarder 0 first.

    ``axes_deg[i]`` is retarder ``i``'s fast axis in real space (0 or 45 degrees: a
    rotation about ``S1`` or ``S2``); ``retardances_rad[i]`` its retardance. The
    retardance of a real squeezer is a function of its drive voltage; that mapping is the
    driver's (:mod:`drivers.simlink.instruments`), this model is the optics.
    """

    axes_deg: tuple[float, ...] = (0.0, 45.0, 0.0, 45.0)
    retardances_rad: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])

    def __post_init__(self) -> None:
        if len(self.retardances_rad) != len(self.axes_deg):
            raise ValueError(
                f"{len(self.axes_deg)} retarders need {len(self.axes_deg)} retardances, got "
                f"{len(self.retardances_rad)}"
            )

    def matrix(self) -> F64:
        """The controller's rotation (retarder 0 applied first)."""
        return retarder_rotation(self.axes_deg, self.retardances_rad)
