"""How an intensity-modulator bias offset moves each intensity class, from the calibrated
transfer function.

The decoy-state bound takes each class's mean photon number (signal, decoy, vacuum)
within its calibrated interval, widened by the common relative drift allowance. A drift
of the modulator's bias does not act alike on the classes: the signal sits at the drive
curve's maximum (``dT/dV = 0``, a second-order change), the decoy on its slope (first
order), the vacuum near its minimum (a tiny level that changes by large fractions). The
tap power reads the key mixture, dominated by the signal, so it barely sees what the
decoy does. This module gives the per-class picture from the modulator's calibration.

**Model** (:class:`ClassDriftModel`). The drive curve relative to its maximum,
``T(x) = t_min + (1 - t_min) cos^2(pi/2 (x - x0) / V_pi_rf)``
(:meth:`~qkdnode.procedures.modulator.TransferFit.relative`), with class ``k`` at drive
``x_k`` (V). A bias ``e`` volts away from the transmission optimum shifts the curve like a
drive offset of ``e * V_pi_rf / V_pi_dc`` (the bias and drive ports have their own
half-wave voltages; :class:`~qkdnode.procedures.modulator.BiasTracker` uses the same
model). Laser power, VOA, tap and output attenuation scale every class alike and cancel
in a ratio, so class ``k`` measured at offset ``e_ref`` is at offset ``e``

    mu_k(e) / mu_k(e_ref) = T(x_k + e s) / T(x_k + e_ref s),   s = V_pi_rf / V_pi_dc

and the tap power of the mixture (class probabilities ``p_k``) goes as
``M(e) = sum_k p_k T(x_k + e s)``. Offsets are in volts at the bias port; relative
changes are dimensionless (0.05 is +5 %).

**Between tracking steps** (:meth:`ClassDriftModel.worst_change`). A tracking step sees
the offset just before its correction; the one before left it at its residual. Assuming
the bias moved monotonically in between, every block in between saw an offset on the
segment between the two, so the largest change of each class over that segment (not only
at its ends: the signal's change peaks where the segment crosses the optimum) bounds what
those blocks saw. A random walk can leave the segment by its excursion: the segment is
widened by ``margin_v`` on both sides (the caller sizes it from the walk rate it allows
for; 0 accepts the monotonic assumption).

**Attribution of a mixture change** (:func:`attribute_mixture_change`): the tap-power
check reads ``M(e) / M(e_m)`` against a reading taken at a known offset ``e_m`` (right
after a tracking step, which saw the bias directly: a laser drift since then is tiny,
where against the calibration it would be blamed on the bias); attributing all of the
change to the bias gives the offset and hence each class's change. ``M`` has a maximum
near the optimum, so a reading has two roots: the one nearest the offset the last
tracking step left is taken (the bias moves continuously and the tracking follows it;
the other root lies on the far side of the mixture's maximum). Where ``M`` is flat (the
reading's noise maps to offsets at which a class could already be beyond the allowance)
the attribution says so (``conditioned`` False) and decides nothing: the tracking steps
see the bias directly.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import brentq

from qkdnode.procedures.modulator import ModulatorResult, TransferFit

__all__ = [
    "CLASS_NAMES",
    "ClassDriftModel",
    "MixtureAttribution",
    "attribute_mixture_change",
]

F64 = npt.NDArray[np.float64]
CLASS_NAMES = ("signal", "decoy", "vacuum")
#: points per volt of a segment searched for the largest change (at least 64 points)
_GRID_PER_V = 2000.0


class ClassDriftModel(BaseModel):
    """The calibrated drive curve, the class drives and the key mixture (module
    docstring). Voltages in V; probabilities of signal, decoy, vacuum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drive_fit: TransferFit
    bias_v_pi_v: float = Field(gt=0, description="half-wave voltage of the bias port (V)")
    drives_v: tuple[float, float, float] = Field(description="signal, decoy, vacuum drive (V)")
    class_probabilities: tuple[float, float, float]

    @classmethod
    def from_calibration(
        cls,
        modulator: ModulatorResult,
        drives_v: tuple[float, float, float],
        class_probabilities: tuple[float, float, float],
    ) -> ClassDriftModel:
        """The model of ``modulator``'s calibration with the drives in use."""
        return cls(
            drive_fit=modulator.drive_fit,
            bias_v_pi_v=modulator.bias_fit.v_pi_v,
            drives_v=drives_v,
            class_probabilities=class_probabilities,
        )

    @property
    def scale(self) -> float:
        """Drive volts per bias volt (``V_pi_rf / V_pi_dc``)."""
        return self.drive_fit.v_pi_v / self.bias_v_pi_v

    def transmission(self, offset_v: F64 | float) -> F64:
        """Each class's transmission relative to the curve's maximum with the bias
        ``offset_v`` from the optimum: shape ``offset_v.shape + (3,)``."""
        e = np.asarray(offset_v, dtype=np.float64)
        x = np.asarray(self.drives_v, dtype=np.float64) + e[..., None] * self.scale
        return np.asarray(self.drive_fit.relative(x))

    def class_change(self, offset_v: F64 | float, reference_offset_v: float = 0.0) -> F64:
        """``mu_k(offset) / mu_k(reference) - 1`` for signal, decoy, vacuum
        (dimensionless, shape ``offset_v.shape + (3,)``)."""
        ref = self.transmission(reference_offset_v)
        return np.asarray(self.transmission(offset_v) / ref - 1.0)

    def mixture_change(self, offset_v: F64 | float, reference_offset_v: float = 0.0) -> F64:
        """``M(offset) / M(reference) - 1``: the key mixture's tap power (dimensionless)."""
        p = np.asarray(self.class_probabilities, dtype=np.float64)
        m = self.transmission(offset_v) @ p
        m_ref = float(self.transmission(reference_offset_v) @ p)
        return np.asarray(m / m_ref - 1.0)

    def worst_change(
        self,
        start_offset_v: float,
        end_offset_v: float,
        reference_offset_v: float,
        margin_v: float = 0.0,
    ) -> tuple[float, float, float]:
        """The change of largest magnitude of each class (signed) over the offsets from
        ``start_offset_v`` to ``end_offset_v``, widened by ``margin_v`` on both sides
        (module docstring): what a block between two tracking steps may have seen."""
        lo = min(start_offset_v, end_offset_v) - abs(margin_v)
        hi = max(start_offset_v, end_offset_v) + abs(margin_v)
        n = max(64, math.ceil((hi - lo) * _GRID_PER_V) + 1)
        grid = np.linspace(lo, hi, n)
        # the curve's extrema inside the segment are on the grid only approximately: add
        # them (a class's change peaks where its drive crosses a maximum or a minimum)
        fit = self.drive_fit
        extra = []
        for x in self.drives_v:
            # T has extrema at x + e s = x0 + m V_pi
            m_lo = math.ceil((x + lo * self.scale - fit.v0_v) / fit.v_pi_v)
            m_hi = math.floor((x + hi * self.scale - fit.v0_v) / fit.v_pi_v)
            extra += [(fit.v0_v + m * fit.v_pi_v - x) / self.scale for m in range(m_lo, m_hi + 1)]
        grid = np.concatenate([grid, np.asarray(extra, dtype=np.float64)])
        ch = self.class_change(grid, reference_offset_v)
        idx = np.argmax(np.abs(ch), axis=0)
        return float(ch[idx[0], 0]), float(ch[idx[1], 1]), float(ch[idx[2], 2])

    def mixture_slope_per_v(self, offset_v: float, reference_offset_v: float = 0.0) -> float:
        """``d(M / M_ref) / d offset`` at ``offset_v`` (1/V), analytic."""
        fit = self.drive_fit
        k = math.pi / 2 / fit.v_pi_v
        p = np.asarray(self.class_probabilities, dtype=np.float64)
        x = np.asarray(self.drives_v, dtype=np.float64) + offset_v * self.scale
        amp = (fit.p_max_w - fit.p_min_w) / fit.p_max_w
        dT = -amp * np.sin(2 * k * (x - fit.v0_v)) * k * self.scale
        m_ref = float(self.transmission(reference_offset_v) @ p)
        return float(dT @ p) / m_ref

    def allowance_offset_v(
        self,
        allowances: tuple[float, float, float],
        reference_offset_v: float = 0.0,
    ) -> float:
        """The smallest ``|offset - reference|`` (V) at which the signal or the decoy
        changes (either way) or the vacuum rises by its allowance in ``allowances``
        (signal, decoy, vacuum; relative), searched within half a bias V_pi."""
        half = self.bias_v_pi_v / 2
        d = np.linspace(0.0, half, 4001)[1:]
        best = half
        for sign in (1.0, -1.0):
            ch = self.class_change(reference_offset_v + sign * d, reference_offset_v)
            beyond = (
                (np.abs(ch[:, 0]) > allowances[0])
                | (np.abs(ch[:, 1]) > allowances[1])
                | (ch[:, 2] > allowances[2])
            )
            over = np.nonzero(beyond)[0]
            if over.size:
                best = min(best, float(d[over[0]]))
        return best


class MixtureAttribution(BaseModel):
    """A tap-power reading attributed to the bias (:func:`attribute_mixture_change`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mixture_change: float = Field(description="measured M / M_ref - 1")
    offset_v: float | None = Field(description="the root taken (V from the optimum); None: none")
    class_change: tuple[float, float, float] | None = Field(
        description="signal, decoy, vacuum change at that offset (relative)"
    )
    offset_sigma_v: float | None = Field(
        description="the reading's noise mapped to the offset (V), one standard error x 3"
    )
    conditioned: bool = Field(
        description="False: the mixture is too flat in the bias here to say anything"
    )
    explanation: str


def attribute_mixture_change(
    model: ClassDriftModel,
    mixture_change: float,
    noise: float,
    *,
    last_offset_v: float,
    mixture_reference_offset_v: float,
    reference_offset_v: float,
    allowances: tuple[float, float, float],
) -> MixtureAttribution:
    """The bias offset that explains a mixture change ``mixture_change`` (measured over
    predicted tap power minus 1) alone, and each class's change there (module docstring).

    ``noise`` is the change's relative uncertainty (three standard errors);
    ``mixture_reference_offset_v`` the offset (V from the optimum) at which the tap power
    the reading is compared with was read; ``last_offset_v`` the offset the last
    tracking step left, which picks the root; ``reference_offset_v`` the offset at which
    the intervals were measured (the classes' changes are relative to it).
    ``conditioned`` is False when no root lies within half a bias V_pi (a change the bias
    cannot make: the laser's or the meter's) or when ``noise`` maps to an offset span
    wider than the one at which a class reaches its allowance in ``allowances`` (signal,
    decoy, vacuum's rise; relative).
    """
    half = model.bias_v_pi_v / 2
    mref = mixture_reference_offset_v
    grid = np.linspace(mref - half, mref + half, 2001)
    f = model.mixture_change(grid, mref) - mixture_change
    roots: list[float] = []
    for i in np.nonzero(np.sign(f[:-1]) * np.sign(f[1:]) <= 0)[0]:
        a, b = float(grid[i]), float(grid[i + 1])
        if f[i] == 0:
            roots.append(a)
            continue
        if f[i + 1] == 0:
            continue
        roots.append(
            float(
                brentq(
                    lambda e: float(model.mixture_change(e, mref)) - mixture_change,
                    a,
                    b,
                    xtol=1e-9,
                )
            )
        )
    if not roots:
        return MixtureAttribution(
            mixture_change=mixture_change,
            offset_v=None,
            class_change=None,
            offset_sigma_v=None,
            conditioned=False,
            explanation="no bias offset within half a V_pi gives this tap power: not the bias",
        )
    e = min(roots, key=lambda r: abs(r - last_offset_v))
    ch = model.class_change(e, reference_offset_v)
    slope = abs(model.mixture_slope_per_v(e, mref))
    sigma = noise / slope if slope > 0 else math.inf
    span = model.allowance_offset_v(allowances, reference_offset_v)
    conditioned = sigma < span
    if conditioned:
        why = (
            f"offset {1e3 * e:+.1f} +/- {1e3 * sigma:.1f} mV explains the tap power "
            f"({len(roots)} root(s), the one nearest the tracked {1e3 * last_offset_v:+.1f} mV)"
        )
    else:
        why = (
            f"the tap power is insensitive to the bias here: its noise spans "
            f"{1e3 * sigma:.1f} mV of offset, a class reaches the allowance within "
            f"{1e3 * span:.1f} mV; the tracking steps decide"
        )
    return MixtureAttribution(
        mixture_change=mixture_change,
        offset_v=e,
        class_change=(float(ch[0]), float(ch[1]), float(ch[2])),
        offset_sigma_v=sigma if math.isfinite(sigma) else None,
        conditioned=conditioned,
        explanation=why,
    )
