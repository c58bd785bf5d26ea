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
changing sign together, and near the identity those two parts enter the error rates
only quadratically (ill-conditioned). So a step takes two windows with the controller
moved by a small ``dither`` about two different axes (its last two retarders): each
window then sees one of the two parts to first order, and a weighted least-squares fit
of the model ``v (C_w F)[:2, :2]`` to both windows' blocks gives ``F``, the mirror image
fitting worse (:func:`estimate_fiber_rotation`).

The step (:func:`next_retardances`): the controller is set so that ``C' F`` moves a
fraction ``gain`` of the way to the identity (below 1 it averages the estimates' noise
while the fiber drifts slowly). An estimate more than ``jump_rad`` from the previous one
moves nothing until the next step, taken at once, confirms it (one bad pair of windows
must not throw the controller); an error above ``jump_rad`` is a jump, not drift: the
step undoes the whole estimate and the next one follows at once, which brings the link
back within three or four steps (:class:`CompensationSettings`), with
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
    block, totals = _block_and_totals(window)
    return block, int(totals.min())


def _block_and_totals(window: WindowCounts) -> tuple[F64, F64]:
    """The measured block and the detections behind each of its entries."""
    c = window.counts.astype(np.float64)
    block = np.zeros((2, 2))
    totals = np.zeros((2, 2))
    for b in range(2):  # prepared basis: +S_b is state 2b, -S_b is 2b+1
        for a in range(2):  # measured arm: channel 2a (+S_a) or 2a+1 (-S_a)
            plus, minus = c[2 * b], c[2 * b + 1]
            signed = (plus[2 * a] - plus[2 * a + 1]) - (minus[2 * a] - minus[2 * a + 1])
            total = plus[2 * a] + plus[2 * a + 1] + minus[2 * a] + minus[2 * a + 1]
            totals[a, b] = total
            block[a, b] = signed / total if total > 0 else 0.0
    return block, totals


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
    """The fiber's rotation as estimated from a step's windows.

    ``fiber``: the rotation ``F`` (3x3); ``visibility``: ``v``; ``error_rad``: the
    rotation angle of ``E = C F`` at the controller's setting before the step (0 at the
    floor); ``mismatch``: the fit's weighted squared residual per block entry (about 1
    when the model explains the windows: larger when the fiber moved during them or the
    windows mixed settings); ``margin``: how much worse (same units) the best fit of the
    mirror image was (near 0 when the two are the same rotation: no ambiguity left);
    ``continuous``: the fit is within ``jump_rad`` of the previous estimate (drift, not a
    jump); ``rotation_sigma_rad``: standard uncertainty of the estimate about ``S1``,
    ``S2``, ``S3`` (the rotation vector of ``F_true F^T``, radians on the sphere), from the
    fit's covariance (binomial weights of the block entries) scaled by the square root of
    the mismatch per degree of freedom when it exceeds 1; ``visibility_sigma``: that of
    ``v``."""

    fiber: F64
    visibility: float
    error_rad: float
    mismatch: float
    margin: float
    continuous: bool = False
    rotation_sigma_rad: tuple[float, float, float] = (math.inf, math.inf, math.inf)
    visibility_sigma: float = math.inf


@dataclass(frozen=True)
class _Observed:
    block: F64
    weight: F64
    controller: F64


def _residuals(f: F64, v: float, observed: Sequence[_Observed]) -> F64:
    out = [
        (np.sqrt(o.weight) * (v * (o.controller @ f)[:2, :2] - o.block)).ravel() for o in observed
    ]
    return np.concatenate(out)


def _jacobian(f: F64, v: float, r: F64, observed: Sequence[_Observed]) -> F64:
    """Residuals' derivatives by the left perturbation ``phi`` of ``F`` and by ``v``."""
    jac = np.empty((r.shape[0], 4))
    eps = 1e-6
    for k in range(3):
        d = np.zeros(3)
        d[k] = eps
        jac[:, k] = (_residuals(rotation_matrix(d) @ f, v, observed) - r) / eps
    jac[:, 3] = (_residuals(f, v + eps, observed) - r) / eps
    return jac


def _covariance(f: F64, v: float, observed: Sequence[_Observed]) -> F64:
    """Covariance of ``(phi, v)`` at the fit: the inverse of ``J^T J`` (the residuals are
    weighted by their standard deviations), scaled by the weighted squared residual per
    degree of freedom when that exceeds 1 (the windows scatter more than counting)."""
    r = _residuals(f, v, observed)
    jac = _jacobian(f, v, r, observed)
    dof = max(r.shape[0] - 4, 1)
    scale = max(1.0, float(r @ r) / dof)
    try:
        return np.asarray(np.linalg.inv(jac.T @ jac) * scale)
    except np.linalg.LinAlgError:
        return np.full((4, 4), np.inf)


def _fit(start: F64, v0: float, observed: Sequence[_Observed]) -> tuple[F64, float, float]:
    """Weighted least squares of ``v (C_w F)[:2, :2]`` to every window's block over the
    rotation ``F`` (a left perturbation ``exp([phi]x) F``) and ``v``, from ``start``:
    ``(F, v, cost)`` with cost the mean squared weighted residual."""
    f, v = start.copy(), v0
    r = _residuals(f, v, observed)
    cost = float(r @ r)
    damping = 1e-3
    for _ in range(30):
        jac = _jacobian(f, v, r, observed)
        jtj = jac.T @ jac
        g = jac.T @ r
        improved = False
        for _ in range(8):
            step = -np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), g)
            f_new = rotation_matrix(step[:3]) @ f
            v_new = min(1.0, max(0.0, v + float(step[3])))
            r_new = _residuals(f_new, v_new, observed)
            cost_new = float(r_new @ r_new)
            if cost_new < cost:
                f, v, r, cost = nearest_rotation(f_new), v_new, r_new, cost_new
                damping = max(damping / 10.0, 1e-9)
                improved = True
                break
            damping *= 10.0
        if not improved or float(np.linalg.norm(step)) < 1e-9:
            break
    return f, v, cost / r.shape[0]


def estimate_fiber_rotation(
    windows: Sequence[tuple[WindowCounts, F64]],
    controller_base: F64,
    previous: F64 | None = None,
    jump_rad: float = 0.2,
) -> RotationEstimate:
    """The fiber's rotation from windows taken with the controller at the given rotations
    (module docstring): a weighted least-squares fit of the model ``v (C_w F)[:2, :2]`` to
    every window's measured block, over ``F`` and ``v``.

    The fit starts from each window's two candidates (the rotation and its mirror image)
    and from ``previous``, and keeps the best. Windows taken with the controller dithered
    about two different axes make the mirror image fit worse (the dither gives each of
    the rotation's ``S1`` and ``S2`` parts a first-order effect); without a dither near
    the controller's target they would be ill-conditioned (the error rate is quadratic
    there).

    Raises :class:`PolarizationError` when a window has fewer than
    :data:`MIN_WINDOW_DETECTIONS` detections behind an entry of its block, or when its
    visibility is zero (no correlation at all: no light, or the wrong slots)."""
    observed: list[_Observed] = []
    starts: list[F64] = []
    visibility: list[float] = []
    for window, controller in windows:
        block, totals = _block_and_totals(window)
        if totals.min() < MIN_WINDOW_DETECTIONS:
            raise PolarizationError(
                f"a window holds {int(totals.min())} detections for one basis pair, fewer "
                f"than {MIN_WINDOW_DETECTIONS}"
            )
        v, e_a, e_b = rotation_candidates(block)
        if v <= 0.05:
            raise PolarizationError(f"no correlation in a window (visibility {v:.3f})")
        visibility.append(v)
        # binomial variance of each entry, floored where the entry is near +/-1
        variance = np.maximum(1.0 - block**2, 0.02) / totals
        observed.append(_Observed(block, 1.0 / variance, controller))
        starts += [controller.T @ e_a, controller.T @ e_b]
    if previous is not None:
        starts.append(np.asarray(previous, dtype=np.float64))
    v0 = float(np.mean(visibility))
    fits = sorted((_fit(start, v0, observed) for start in starts), key=lambda fit: fit[2])
    fiber, v, cost = fits[0]
    mirror_costs = [c for f, _, c in fits[1:] if rotation_angle_rad(f @ fiber.T) > 0.05]
    margin = (min(mirror_costs) - cost) if mirror_costs else 0.0
    continuous = previous is not None and rotation_angle_rad(fiber @ previous.T) < jump_rad
    cov = _covariance(fiber, v, observed)
    sigma = np.sqrt(np.maximum(np.diag(cov), 0.0))
    return RotationEstimate(
        fiber=fiber,
        visibility=v,
        error_rad=rotation_angle_rad(controller_base @ fiber),
        mismatch=cost,
        margin=margin,
        continuous=continuous,
        rotation_sigma_rad=(float(sigma[0]), float(sigma[1]), float(sigma[2])),
        visibility_sigma=float(sigma[3]),
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

    dither_rad: float = 0.15
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
    #: the error was a jump's (above ``jump_rad``), or the estimate is far from the
    #: previous one and waits for confirmation: take the next step at once
    again: bool


WindowRequest = Callable[[], Awaitable[WindowCounts]]


async def compensation_step(
    controller: PolarizationController,
    request_window: WindowRequest,
    settings: CompensationSettings,
    previous: F64 | None = None,
) -> CompensationStep:
    """Receiver: one step of the compensation (module docstring).

    ``request_window()`` must collect one disclosed window with the controller as it is
    when called and return its counts. ``previous`` is the last step's estimate of the
    fiber (:attr:`CompensationStep.estimate`; None at the first step or after a failed
    one). The last and the second-last retarder each sit at ``+dither`` for one window
    (rotations about two different axes, see :func:`estimate_fiber_rotation`); on any
    failure the controller goes back to where it was and the error propagates.
    :class:`PolarizationError` when a window is too thin to steer by.
    """
    axes = tuple(controller.axes_deg)
    limits = controller.retardance_range_rad
    base = tuple(await asyncio.to_thread(controller.retardances_rad))
    if len(base) < 2:
        raise PolarizationError("the compensation needs a controller of two retarders or more")
    windows: list[tuple[WindowCounts, F64]] = []
    restored = False
    try:
        for which in (-1, -2):  # the last two retarders: two different axes
            dithered = list(base)
            dithered[which] = _nearest_turn(base[which] + settings.dither_rad, base[which], limits)
            await asyncio.to_thread(controller.set_retardances_rad, tuple(dithered))
            windows.append((await request_window(), retarder_rotation(axes, dithered)))
        estimate = estimate_fiber_rotation(
            windows,
            retarder_rotation(axes, base),
            previous=previous,
            jump_rad=settings.jump_rad,
        )
        # An estimate far from the previous one is a jump, or a bad pair of windows: it
        # moves nothing until the next step, at once, confirms it.
        confirmed = previous is None or estimate.continuous
        moved = confirmed and estimate.error_rad > settings.deadband_rad
        again = estimate.error_rad > settings.jump_rad or not confirmed
        gain = 1.0 if again else settings.gain
        new = next_retardances(base, estimate.fiber, axes, limits, gain) if moved else base
        await asyncio.to_thread(controller.set_retardances_rad, new)
        restored = True
    finally:
        if not restored:
            await asyncio.to_thread(controller.set_retardances_rad, base)
    total = windows[0][0].counts + windows[1][0].counts
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
