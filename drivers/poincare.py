"""Polarisation on the Poincaré sphere: the SO(3) arithmetic shared by the simulated
link and the node's polarisation compensation.

A lossless fiber or retarder acts on the Jones vector by a unitary ``U`` in SU(2); on
the Poincaré sphere (Stokes vector ``s = (S1, S2, S3)``: ``S1`` horizontal/vertical,
``S2`` diagonal/antidiagonal, ``S3`` circular) it is the rotation ``R`` in SO(3)
(``U`` and ``-U`` give the same ``R``). A rotation by ``phi`` radians about the unit axis
``n`` (rotation vector ``phi n``, right-handed) is ``U = exp(-i phi/2 n.sigma)``.

Linear polarisation at angle ``a`` (real space) is ``(cos 2a, sin 2a, 0)``. A retarder
whose fast axis lies at ``theta`` (real space) with retardance ``phi`` rotates the sphere
by ``phi`` about ``(cos 2 theta, sin 2 theta, 0)``: at 0 degrees about ``S1``, at 45
about ``S2``.

Pure numpy; no instrument, no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "analysis_block",
    "nearest_rotation",
    "random_axis",
    "retarder_axis",
    "retarder_rotation",
    "rotation_about",
    "rotation_angle_rad",
    "rotation_matrix",
    "rotation_vector",
    "stokes_of_angle",
]

F64 = npt.NDArray[np.float64]


def rotation_matrix(vector_rad: npt.ArrayLike) -> F64:
    """The rotation by ``|v|`` radians about ``v / |v|`` (Rodrigues), a 3x3 matrix."""
    v = np.asarray(vector_rad, dtype=np.float64).reshape(3)
    angle = float(np.linalg.norm(v))
    if angle < 1e-300:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    out = np.eye(3) + math.sin(angle) * kx + (1.0 - math.cos(angle)) * (kx @ kx)
    return np.asarray(out, dtype=np.float64)


def rotation_about(axis: npt.ArrayLike, angle_rad: float) -> F64:
    """The rotation by ``angle_rad`` about the (not necessarily unit) ``axis``."""
    a = np.asarray(axis, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(a))
    if norm == 0.0:
        raise ValueError("a rotation axis must not be the zero vector")
    return rotation_matrix(a / norm * angle_rad)


def rotation_vector(r: npt.ArrayLike) -> F64:
    """The rotation vector ``phi n`` (``0 <= phi <= pi``) of the rotation matrix ``r``
    (the inverse of :func:`rotation_matrix`); ``r`` need not be exactly orthogonal (it is
    projected onto SO(3) first)."""
    m = nearest_rotation(np.asarray(r, dtype=np.float64).reshape(3, 3))
    cos_phi = max(-1.0, min(1.0, (float(np.trace(m)) - 1.0) / 2.0))
    phi = math.acos(cos_phi)
    w = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]])
    if phi < 1e-7:
        return w / 2.0
    if math.pi - phi > 1e-4:
        return w / (2.0 * math.sin(phi)) * phi
    # near pi: the axis from the symmetric part, its sign from w
    b = (m + np.eye(3)) / 2.0
    i = int(np.argmax(np.diag(b)))
    axis = b[:, i] / math.sqrt(max(b[i, i], 1e-300))
    if float(axis @ w) < 0.0:
        axis = -axis
    return axis * phi


def rotation_angle_rad(r: npt.ArrayLike) -> float:
    """The rotation angle (radians on the Poincaré sphere, in [0, pi]) of ``r``."""
    return float(np.linalg.norm(rotation_vector(r)))


def nearest_rotation(m: F64) -> F64:
    """The rotation closest to ``m`` in the Frobenius norm (SVD, determinant +1)."""
    u, _, vt = np.linalg.svd(m)
    d = np.diag([1.0, 1.0, float(np.sign(np.linalg.det(u @ vt))) or 1.0])
    return np.asarray(u @ d @ vt, dtype=np.float64)


def analysis_block(r: npt.ArrayLike) -> F64:
    """The 2x2 block ``r[:2, :2]`` as four floats ``(r00, r01, r10, r11)``: all that the
    Z and X analysers see of a rotation acting on equatorial (linear) states."""
    m = np.asarray(r, dtype=np.float64).reshape(3, 3)
    return np.ascontiguousarray([m[0, 0], m[0, 1], m[1, 0], m[1, 1]], dtype=np.float64)


def stokes_of_angle(angle_rad: float) -> F64:
    """Stokes vector of linear polarisation at ``angle_rad`` (real space)."""
    return np.array([math.cos(2.0 * angle_rad), math.sin(2.0 * angle_rad), 0.0])


def random_axis(rng: np.random.Generator) -> F64:
    """A unit vector uniform on the sphere."""
    v = rng.normal(size=3)
    return np.asarray(v / np.linalg.norm(v), dtype=np.float64)


def retarder_axis(axis_deg: float) -> F64:
    """Poincaré-sphere axis of a retarder whose fast axis is at ``axis_deg`` (real space)."""
    t = math.radians(2.0 * axis_deg)
    return np.array([math.cos(t), math.sin(t), 0.0])


def retarder_rotation(axes_deg: Sequence[float], retardances_rad: Sequence[float]) -> F64:
    """The rotation of a row of retarders (light crosses the first one first)."""
    if len(axes_deg) != len(retardances_rad):
        raise ValueError(
            f"{len(axes_deg)} retarders need {len(axes_deg)} retardances, got "
            f"{len(retardances_rad)}"
        )
    out = np.eye(3)
    for axis_deg, phi in zip(axes_deg, retardances_rad, strict=True):
        out = rotation_about(retarder_axis(axis_deg), float(phi)) @ out
    return out
