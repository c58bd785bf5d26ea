"""Polarisation compensation on the receiver: estimate the link's SU(2) rotation from
disclosed detections and steer the polarisation controller to undo it.

The fiber turns the Poincaré sphere by a slowly drifting rotation ``F`` (and now and then
by a jump, when somebody touches it). The receiver's controller, a row of retarders
in front of the analysers, applies its own rotation ``C``; the analysers see
``E = C F``, and the link is at its error-rate floor when ``E`` is the identity. The
encoder bias (:mod:`qkdnode.tracking`) can undo only a rotation about ``S3``; any
other axis mixes in circular polarisation and needs the controller.

What a disclosed window tells (:class:`WindowCounts`). The transmitter discloses, for
each of the receiver's detections in a window of slots that is then withheld from every
block, which state it prepared (H, V, D, A). For a state with Stokes vector ``s`` on the
equator the Z arm measures ``S1`` and the X arm ``S2`` of ``v E s``, ``v = 1 - 2 e`` the
visibility that misalignment and background leave. So per window the four
expectation values ``<S_a>`` for prepared ``S_b`` give the 2x2 block ``v E[:2, :2]``
(:func:`measured_block`): the error rates in Z and X are its diagonal and the
cross-basis outcomes (a prepared H measured in X, a prepared D in Z) carry the sign of
the rotation about ``S3``. That block fixes ``v`` (its largest singular value: any 2x2
block of a rotation has one singular value equal to 1) and ``E`` up to one reflection:
``E`` and ``D E D`` with ``D = diag(1, 1, -1)`` have the same block
(:func:`rotation_candidates`), the rotation vector's ``S1`` and ``S2`` components
changing sign together. No Z/X measurement can tell them apart, so the loop takes two
windows with the controller's last retarder dithered by ``+/- delta``: only one pair of
candidates is related by the known dither (:func:`estimate_fiber_rotation`).

The step (:func:`next_retardances`): the controller is set so that ``C' F`` moves a
fraction ``gain`` of the way to the identity (below 1 it averages the estimates' noise
while the fiber drifts slowly); an error above ``jump_rad`` is a jump, not drift: the
step undoes the whole estimate and the next one follows at once, which brings the link
back within two or three steps (:class:`CompensationSettings`), with
the retardances solved in closed form (Euler angles of the retarders' axes) and each
chosen nearest its present value within the controller's range (:func:`solve_retardances`).
The windows' detections never carry key, so the dither costs no key; it only sets how
much the window's estimate is worth.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from drivers.interfaces import PolarizationController
from drivers.poincare import (
    nearest_rotation,
    retarder_rotation,
    rotation_angle_rad,
    rotation_matrix,
    rotation_vector,
)

__all__ = [
    "MIN_WINDOW_DETECTIONS",
    "CompensationSettings",
    "CompensationStep",
    "PolarizationError",
    "RotationEstimate",
    "WindowCounts",
    "compensation_step",
    "estimate_fiber_rotation",
    "measured_block",
    "next_retardances",
    "rotation_candidates",
    "solve_retardances",
]

F64 = npt.NDArray[np.float64]

#: Fewer detections than this in a window (per basis pair): no step, the estimate is noise.
MIN_WINDOW_DETECTIONS = 200

#: The retarder layouts :func:`solve_retardances` solves in closed form.
_LAYOUTS = ((0.0, 45.0, 0.0, 45.0), (0.0, 45.0, 0.0))


class PolarizationError(ValueError):
    """A window that cannot be used (too few detections) or a controller layout the
    compensation does not know."""


@dataclass(frozen=True)
class WindowCounts:
    """Detections of one disclosed window: ``counts[prepared, channel]`` with the prepared
    state and the detector channel both in the order H, V, D, A."""

    counts: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        c = np.asarray(self.counts)
        if c.shape != (4, 4) or bool(np.any(c < 0)):
            raise PolarizationError(f"window counts must be a 4x4 table of counts, got {c}")

    @classmethod
    def from_detections(
        cls,
        channels: npt.ArrayLike,
        basis: npt.ArrayLike,
        bit: npt.ArrayLike,
        mask: npt.ArrayLike | None = None,
    ) -> WindowCounts:
        """The table of detections on ``channels`` (0..3 = H, V, D, A) of pulses prepared
        in ``basis`` (0 Z, 1 X) with ``bit``; ``mask`` keeps a subset (vacuum pulses out)."""
        ch = np.asarray(channels, dtype=np.int64)
        prepared = np.asarray(basis, dtype=np.int64) * 2 + np.asarray(bit, dtype=np.int64)
        if mask is not None:
            keep = np.asarray(mask, dtype=np.bool_)
            ch, prepared = ch[keep], prepared[keep]
        ok = (ch >= 0) & (ch < 4)
        flat = np.bincount(prepared[ok] * 4 + ch[ok], minlength=16)
        return cls(flat.reshape(4, 4).astype(np.int64))

    @property
    def detections(self) -> int:
        return int(self.counts.sum())

    def qber(self) -> tuple[float, float]:
        """Error rates (Z, X) of the sifted detections (NaN where there are none)."""
        c = self.counts
        z_ok, z_err = c[0, 0] + c[1, 1], c[0, 1] + c[1, 0]
        x_ok, x_err = c[2, 2] + c[3, 3], c[2, 3] + c[3, 2]
        qz = z_err / (z_ok + z_err) if z_ok + z_err else math.nan
        qx = x_err / (x_ok + x_err) if x_ok + x_err else math.nan
        return float(qz), float(qx)


def measured_block(window: WindowCounts) -> tuple[F64, int]:
    """``v E[:2, :2]`` as measured (2x2) and the fewest detections behind one of its four
    entries. Entry ``[a, b]`` is ``<S_a>`` for a prepared ``+S_b`` state (H for
    ``S1``, D for ``S2``), the orthogonal state counting with the opposite sign."""
    c = window.counts.astype(np.float64)
    block = np.zeros((2, 2))
    fewest = None
    for b in range(2):  # prepared basis: +S_b is state 2b, -S_b is 2b+1
        for a in range(2):  # measured arm: channel 2a (+S_a) or 2a+1 (-S_a)
            plus, minus = c[2 * b], c[2 * b + 1]
            signed = (plus[2 * a] - plus[2 * a + 1]) - (minus[2 * a] - minus[2 * a + 1])
            total = plus[2 * a] + plus[2 * a + 1] + minus[2 * a] + minus[2 * a + 1]
            fewest = int(total) if fewest is None else min(fewest, int(total))
            block[a, b] = signed / total if total > 0 else 0.0
    return block, int(fewest or 0)


def rotation_candidates(block: F64) -> tuple[float, F64, F64]:
    """``(v, E, D E D)``: the visibility and the two rotations whose 2x2 block is
    ``block / v`` (module docstring). ``v`` is the block's largest singular value, at
    most 1; a block of zeros (no information) gives ``v = 0`` and two identities."""
    b = np.asarray(block, dtype=np.float64).reshape(2, 2)
    v = float(np.linalg.svd(b, compute_uv=False)[0])
    if v <= 1e-9:
        return 0.0, np.eye(3), np.eye(3)
    b = b / v  # noise may put v above 1: the block is scaled to a rotation's all the same
    x = math.sqrt(max(0.0, 1.0 - b[0, 0] ** 2 - b[0, 1] ** 2))
    y = math.sqrt(max(0.0, 1.0 - b[1, 0] ** 2 - b[1, 1] ** 2))
    # rows orthogonal: b00 b10 + b01 b11 + x y = 0 fixes the relative sign of x and y
    if b[0, 0] * b[1, 0] + b[0, 1] * b[1, 1] > 0.0:
        y = -y
    out = []
    for sign in (1.0, -1.0):
        r1 = np.array([b[0, 0], b[0, 1], sign * x])
        r2 = np.array([b[1, 0], b[1, 1], sign * y])
        out.append(nearest_rotation(np.vstack([r1, r2, np.cross(r1, r2)])))
    return min(v, 1.0), out[0], out[1]


@dataclass(frozen=True)
class RotationEstimate:
    """The fiber's rotation as estimated from a pair of dithered windows.

    ``fiber``: the rotation ``F`` (3x3); ``visibility``: ``v``; ``error_rad``: the
    rotation angle of ``E = C F`` at the controller's setting before the step (0 at the
    floor); ``mismatch``: how far the chosen pair of candidates is from the dither's
    relation (Frobenius norm; small when the windows agree); ``margin``: how much worse
    the other choice was (near 0 when the rotation is about ``S3`` only, where both
    choices are the same rotation)."""

    fiber: F64
    visibility: float
    error_rad: float
    mismatch: float
    margin: float


def estimate_fiber_rotation(
    plus: WindowCounts,
    minus: WindowCounts,
    controller_plus: F64,
    controller_minus: F64,
    controller_base: F64 | None = None,
) -> RotationEstimate:
    """The fiber's rotation from two windows taken with the controller at the rotations
    ``controller_plus`` and ``controller_minus`` (module docstring).

    Raises :class:`PolarizationError` when a window has fewer than
    :data:`MIN_WINDOW_DETECTIONS` detections behind an entry of its block, or when its
    visibility is zero (no correlation at all: no light, or the wrong slots)."""
    cands = []
    visibility = []
    for window in (plus, minus):
        block, fewest = measured_block(window)
        if fewest < MIN_WINDOW_DETECTIONS:
            raise PolarizationError(
                f"a window holds {fewest} detections for one basis pair, fewer than "
                f"{MIN_WINDOW_DETECTIONS}"
            )
        v, e_a, e_b = rotation_candidates(block)
        if v <= 0.05:
            raise PolarizationError(f"no correlation in a window (visibility {v:.3f})")
        visibility.append(v)
        cands.append((e_a, e_b))
    known = controller_plus @ controller_minus.T
    scores = sorted(
        (float(np.linalg.norm(ep @ em.T - known)), i, j)
        for i, ep in enumerate(cands[0])
        for j, em in enumerate(cands[1])
    )
    best, i, j = scores[0]
    other = min(s for s, a, b in scores[1:] if (a, b) != (i, j))
    fiber = nearest_rotation(controller_plus.T @ cands[0][i] + controller_minus.T @ cands[1][j])
    base = controller_base if controller_base is not None else controller_plus
    return RotationEstimate(
        fiber=fiber,
        visibility=float(np.mean(visibility)),
        error_rad=rotation_angle_rad(base @ fiber),
        mismatch=best,
        margin=other - best,
    )


def _rx(phi: float) -> F64:
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _ry(phi: float) -> F64:
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _nearest_turn(value: float, near: float, limits: tuple[float, float]) -> float:
    """``value`` plus the multiple of 2 pi that brings it nearest ``near`` within
    ``limits`` (a retardance and that plus 2 pi are the same rotation of the sphere)."""
    lo, hi = limits
    best = None
    k0 = round((near - value) / (2.0 * math.pi))
    for k in range(k0 - 2, k0 + 3):
        cand = value + 2.0 * math.pi * k
        if lo <= cand <= hi and (best is None or abs(cand - near) < abs(best - near)):
            best = cand
    if best is None:
        raise PolarizationError(
            f"no retardance equivalent to {value:.3f} rad lies in [{lo:.3f}, {hi:.3f}] rad"
        )
    return best


def solve_retardances(
    target: F64,
    axes_deg: Sequence[float],
    current: Sequence[float],
    limits: tuple[float, float],
) -> tuple[float, ...]:
    """Retardances that make the controller's rotation ``target``.

    For the layouts (0, 45, 0, 45) and (0, 45, 0) degrees: a fourth retarder keeps its
    present value; the first three are the X-Y-X Euler angles of what is left, of the
    two solutions the one nearer the present values, each moved by whole turns nearest
    its present value within ``limits``. :class:`PolarizationError` for another layout
    or when the range has no room (a range narrower than 2 pi)."""
    axes = tuple(float(a) for a in axes_deg)
    if axes not in _LAYOUTS:
        raise PolarizationError(
            f"retarder layout {axes} degrees is not supported (supported: {_LAYOUTS})"
        )
    now = [float(v) for v in current]
    rest = np.asarray(target, dtype=np.float64)
    fourth = now[3] if len(axes) == 4 else None
    if fourth is not None:
        rest = _ry(fourth).T @ rest  # target = Ry(r3) Rx(r2) Ry(r1) Rx(r0)
    b = math.acos(max(-1.0, min(1.0, float(rest[0, 0]))))
    if math.sin(b) < 1e-9:
        # gimbal lock: only r0 + r2 (b = 0) or r2 - r0 (b = pi) matters; keep r0
        c = now[0]
        total = math.atan2(float(rest[2, 1]), float(rest[1, 1]))
        a = total - c if b < 1.0 else total + c
        solutions = [(a, b, c)]
    else:
        a = math.atan2(float(rest[1, 0]), float(-rest[2, 0]))
        c = math.atan2(float(rest[0, 1]), float(rest[0, 2]))
        solutions = [(a, b, c), (a + math.pi, -b, c + math.pi)]
    best: tuple[float, ...] | None = None
    best_cost = math.inf
    for a, b, c in solutions:
        try:
            values = [
                _nearest_turn(c, now[0], limits),
                _nearest_turn(b, now[1], limits),
                _nearest_turn(a, now[2], limits),
            ]
        except PolarizationError:
            continue
        if fourth is not None:
            values.append(fourth)
        cost = sum((v - w) ** 2 for v, w in zip(values, now, strict=True))
        if cost < best_cost:
            best, best_cost = tuple(values), cost
    if best is None:
        raise PolarizationError(f"the controller's range {limits} rad holds no solution")
    return best


def next_retardances(
    current: Sequence[float],
    fiber: F64,
    axes_deg: Sequence[float],
    limits: tuple[float, float],
    gain: float,
) -> tuple[float, ...]:
    """The controller's next retardances: ``C' F`` a fraction ``gain`` (0..1] of the way
    from ``C F`` to the identity (along the shortest rotation)."""
    if not 0.0 < gain <= 1.0:
        raise PolarizationError(f"gain must lie in (0, 1], got {gain}")
    now = retarder_rotation(axes_deg, current)
    correction = fiber.T @ now.T  # applied after the present setting: undoes C F
    partial = rotation_matrix(gain * rotation_vector(correction)) @ now
    return solve_retardances(partial, axes_deg, current, limits)


@dataclass(frozen=True)
class CompensationSettings:
    """What one step needs (the node's ``[polarization]`` section carries them)."""

    dither_rad: float = 0.4
    gain: float = 0.7
    #: below this estimated error (rad on the sphere) the controller is left alone: the
    #: estimate's noise would only shake it
    deadband_rad: float = 0.02
    #: above this estimated error (a jump, not drift) the step undoes the whole estimate
    #: (gain 1) and asks for the next step at once
    jump_rad: float = 0.2


@dataclass(frozen=True)
class CompensationStep:
    """One step: the windows' error rates, the estimate and the retardances."""

    retardances_rad: tuple[float, ...]
    new_retardances_rad: tuple[float, ...]
    qber_z: float
    qber_x: float
    detections: int
    estimate: RotationEstimate
    moved: bool
    #: the error was a jump's (above ``jump_rad``): take the next step at once
    again: bool


WindowRequest = Callable[[], Awaitable[WindowCounts]]


async def compensation_step(
    controller: PolarizationController,
    request_window: WindowRequest,
    settings: CompensationSettings,
) -> CompensationStep:
    """Receiver: one step of the compensation (module docstring).

    ``request_window()`` must collect one disclosed window with the controller as it is
    when called and return its counts. The last retarder sits at ``+/- dither`` only for
    the two windows; on any failure the controller goes back to where it was and the
    error propagates. :class:`PolarizationError` when a window is too thin to steer by.
    """
    axes = tuple(controller.axes_deg)
    limits = controller.retardance_range_rad
    base = tuple(await asyncio.to_thread(controller.retardances_rad))
    windows: list[WindowCounts] = []
    settings_used: list[tuple[float, ...]] = []
    restored = False
    try:
        for sign in (1.0, -1.0):
            dithered = list(base)
            dithered[-1] = _nearest_turn(base[-1] + sign * settings.dither_rad, base[-1], limits)
            await asyncio.to_thread(controller.set_retardances_rad, tuple(dithered))
            settings_used.append(tuple(dithered))
            windows.append(await request_window())
        estimate = estimate_fiber_rotation(
            windows[0],
            windows[1],
            retarder_rotation(axes, settings_used[0]),
            retarder_rotation(axes, settings_used[1]),
            retarder_rotation(axes, base),
        )
        moved = estimate.error_rad > settings.deadband_rad
        again = estimate.error_rad > settings.jump_rad
        gain = 1.0 if again else settings.gain
        new = next_retardances(base, estimate.fiber, axes, limits, gain) if moved else base
        await asyncio.to_thread(controller.set_retardances_rad, new)
        restored = True
    finally:
        if not restored:
            await asyncio.to_thread(controller.set_retardances_rad, base)
    total = windows[0].counts + windows[1].counts
    qz, qx = WindowCounts(total).qber()
    return CompensationStep(
        retardances_rad=base,
        new_retardances_rad=tuple(new),
        qber_z=qz,
        qber_x=qx,
        detections=int(total.sum()),
        estimate=estimate,
        moved=moved,
        again=again,
    )
