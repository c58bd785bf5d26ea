"""One step of the intensity modulator's bias tracking while key flows, and the check of
the mean photon numbers that follows it.

Transmitter side. The caller (the node, on its schedule) has withheld from every block
the slots during which this runs, so the dither and any re-measurement touch no key.

* **Bias**: :class:`~qkdnode.procedures.modulator.BiasTracker` reads the tap power at the
  bias ``b - dither``, ``b + dither`` and ``b``, fits where the optimum has moved to
  (``offset_v`` from the calibrated optimum, with the class mix of the key slots as the
  model) and moves the bias towards it.
* **Mean photon numbers**: at the corrected bias the tap power of the key mixture is read
  again (``readings`` readings, the meter's zero subtracted) and compared with what the
  last calibration predicts for that mixture. The finite-key bound takes each intensity
  within its calibrated interval, which allows a relative drift of
  ``intensity_drift_allowance``: a ratio within ``intensity_remeasure_at`` of that
  allowance (plus three standard errors of the meter's noise) holds (``hold``); beyond,
  but within the allowance, the mean photon numbers must be measured again before they
  leave their intervals (``remeasure``); beyond the allowance they may already have left
  them (``stop``: the exchange stops and the node calibrates again).

**Per class** (with a :class:`ClassDriftState`): the mixture is dominated by the signal,
at the top of the modulator's curve, while the decoy sits on its slope, so a bias drift
can take the decoy out of its interval with the mixture well within the allowance. From
the calibrated curve (:mod:`qkdnode.procedures.class_drift`) the step takes the offset
from the optimum just before its correction (``offset_before_v``) and the residual the
previous step left (``previous_offset_v``). Assumption: the bias moved monotonically in
between, so every block since saw an offset on that segment; a random walk leaves it by
its excursion, allowed for by widening the segment by three standard deviations of
``walk_v_per_sqrt_s`` over the elapsed time (0: the assumption as it is). The largest
change of each class over the segment, relative to where the intervals in use were
measured (``reference_offset_v``), is what those blocks may have seen:

* each class against its own allowance, the one the finite-key bound widens that class's
  interval by (:meth:`~qkdnode.procedures.mean_photon_number.MeanPhotonResult.class_bounds`,
  from the intensities' ``uncertainty``): the signal and the decoy against
  ``signal_drift_allowance`` and ``decoy_drift_allowance`` (either way), the vacuum's
  rise against ``vacuum_drift_allowance`` (a fall too while its lower bound is above 0).
  Beyond: ``stop``, naming the class. What the check lets through lies in the set the
  bound takes;
* the next interval (:func:`next_track_interval_s`): halved while a class moved by more
  than ``remeasure_at`` of its allowance or would by the next step at the drift rate just
  measured (``drift_rate_v_per_s``), never below ``floor_interval_s``; doubled back
  towards ``base_interval_s`` while the classes moved by less than half of that;
* when even the floor is too long for that rate to keep every class within the
  allowances: ``stop`` now, before blocks use intervals that will not hold.

The correction moves the bias ``gain`` of the way: while the residual still moves a
class by more than ``remeasure_at`` of its room the step corrects again (at most
``MAX_CORRECTIONS`` in all, in the same window). When the caller withheld every slot
since the previous step (``unkeyed_since_last``: the node's first step after a
calibration) only the offset the step leaves is judged. A per-class verdict never asks
for a re-measurement (the correction brings the classes back; ``remeasure`` stays the
mixture's). The result carries both verdicts
(``mixture_action``, ``per_class.action``); ``action`` is the worse.

:func:`remeasure_intensities` measures the three classes again at the node's settings
(never brighter: the VOA moves by at most ``max_step_db`` towards the targets, so the
receiver's armed detectors see single-photon levels throughout).

A drift of the meter's own gain reads as a drift of the light: it makes the check
re-measure (harmless) and the re-measurement set the light by a meter that is off
(bounded only by ``power_meter_uncertainty``, which the intervals include).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from drivers.interfaces import (
    IntensityClass,
    IntensityModulator,
    OpticalPowerMeter,
    VariableAttenuator,
)
from qkdnode.procedures.class_drift import (
    CLASS_NAMES,
    ClassDriftModel,
    MixtureAttribution,
    attribute_mixture_change,
)
from qkdnode.procedures.common import (
    CalibrationError,
    CalibrationResult,
    Publisher,
    call,
    data_and_residuals,
    finish,
    utc_now,
)
from qkdnode.procedures.mean_photon_number import (
    IntensityInterval,
    IntensityUncertainty,
    MeanPhotonResult,
    intensity_interval,
    plot_mean_photon_number,
)
from qkdnode.procedures.modulator import BiasTracker, ModulatorResult, read_power, set_all_levels

__all__ = [
    "BiasTrackingPoint",
    "BiasTrackingResult",
    "ClassDriftState",
    "IntensityAction",
    "attribute_tap_reading",
    "class_fractions",
    "intensity_action",
    "next_track_interval_s",
    "plot_bias_tracking",
    "remeasure_intensities",
    "track_bias",
]

#: What the check of the mean photon numbers asks for (module docstring).
IntensityAction = Literal["hold", "remeasure", "stop"]

#: Tap-power readings averaged for the check of the mean photon numbers.
CHECK_READINGS = 20
#: Corrections of the bias one tracking step makes at most (per-class check on: again
#: while the residual moves a class by more than ``remeasure_at`` of its room).
MAX_CORRECTIONS = 4


class BiasTrackingPoint(BaseModel):
    """One earlier step, for the history panel (seconds since the tracking started)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time_s: float
    bias_v: float
    offset_v: float
    power_ratio: float | None
    #: the largest change of signal, decoy, vacuum since the previous step (relative)
    class_change: tuple[float, float, float] | None = None
    #: seconds to the next step chosen after this one
    interval_s: float | None = None


class ClassDriftCheck(BaseModel):
    """The per-class check of one tracking step (module docstring, "Per class"). Offsets
    in V from the bias optimum, changes relative (0.05 is +5 %)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: where the intervals in use were measured, where the previous step left the bias,
    #: where this step found it before its correction and left it after
    reference_offset_v: float
    previous_offset_v: float
    offset_before_v: float
    offset_after_v: float
    #: seconds since the previous step (None: the first step) and the drift rate (V/s)
    elapsed_s: float | None
    drift_rate_v_per_s: float | None
    #: the random-walk excursion allowed for beyond the segment (V, each side)
    margin_v: float
    #: signal, decoy, vacuum: the largest change any block since the previous step may
    #: have seen (signed), and the change right after this step's correction
    class_change: tuple[float, float, float]
    class_change_after: tuple[float, float, float]
    #: the vacuum's mean photon number at the worst point, predicted from the signal's
    #: measured one and the curve (for the message; the check takes its relative change)
    vacuum_mu_predicted: float | None
    #: the class with the largest change over its own allowance, and that ratio
    worst_class: str
    worst_fraction: float
    #: the allowances the changes are judged against (signal, decoy, vacuum; relative):
    #: those the bound widens each class's interval by
    class_allowance: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: seconds to the next step (:func:`next_track_interval_s`)
    next_interval_s: float
    action: IntensityAction
    message: str


class BiasTrackingResult(CalibrationResult):
    procedure: str = "bias_tracking"
    calibrated_bias_v: float
    v_pi_v: float
    dither_v: float
    bias_before_v: float
    bias_after_v: float
    #: where the optimum has moved from the calibrated one (V)
    offset_v: float
    readings_bias_v: list[float]
    readings_w: list[float]
    #: the fitted model at the readings' biases (W)
    model_w: list[float]
    #: the fitted model over one V_pi around the optimum, for the plot
    curve_bias_v: list[float]
    curve_w: list[float]
    #: the mixture's tap power after the correction, the meter's zero subtracted (W)
    tap_power_w: float | None
    expected_power_w: float | None
    power_ratio: float | None
    #: three standard errors of the meter's noise, relative to the expected power
    noise: float | None
    allowance: float
    remeasure_at: float
    #: what the tap power of the mixture alone asks for (the check before the per-class
    #: one existed); ``action`` is the worse of it and the per-class verdict
    mixture_action: IntensityAction = "hold"
    action: IntensityAction
    history: list[BiasTrackingPoint]
    #: the per-class check (None: not asked for)
    per_class: ClassDriftCheck | None = None


@dataclass
class ClassDriftState:
    """What the per-class check carries from one tracking step to the next (transmitter;
    offsets in V from the bias optimum, times in s on the caller's clock).

    ``base_interval_s`` is ``calibration.bias_track_interval_s``, ``floor_interval_s``
    the shortest interval the schedule may choose, ``walk_v_per_sqrt_s`` the random walk
    of the bias allowed for between steps (0: the bias moves monotonically between two
    steps). Create one per calibration (its ``reference_offset_v`` 0: the intervals were
    measured with the bias at the optimum); :func:`track_bias` updates it.
    """

    base_interval_s: float
    floor_interval_s: float
    walk_v_per_sqrt_s: float = 0.0
    #: where the bias was (from the optimum) when the intervals in use were measured
    reference_offset_v: float = 0.0
    #: where the last step left the bias (from the optimum, as that step found it)
    last_offset_v: float = 0.0
    #: when the last step (or the calibration) ended; None: the first step's elapsed
    #: time is unknown (no rate, no margin from it)
    last_time_s: float | None = None
    #: the tap power of the mixture right after the last step (W, zero subtracted)
    tap_power_w: float | None = None
    #: the model of the last step (drives in use)
    model: ClassDriftModel | None = None
    #: no block has used a slot since the last step (the caller withheld them all, e.g.
    #: every slot since the calibration from the first step): the next step judges only
    #: the offset it leaves, not the path before it (reset by the step)
    unkeyed_since_last: bool = False
    interval_s: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.floor_interval_s = min(self.floor_interval_s, self.base_interval_s)
        if self.interval_s <= 0:
            self.interval_s = self.base_interval_s

    def margin_v(self, seconds: float) -> float:
        """A random walk's excursion beyond the straight path over ``seconds`` allowed for
        (V): a Brownian bridge of rate ``sigma`` exceeds ``x`` with probability
        ``exp(-2 x^2 / (sigma^2 T))``; ``x = 3 sigma sqrt(T)`` makes that 1.5e-8."""
        return 3.0 * self.walk_v_per_sqrt_s * math.sqrt(max(seconds, 0.0))


_SEVERITY: dict[IntensityAction, int] = {"hold": 0, "remeasure": 1, "stop": 2}


def class_fractions(
    state: ClassDriftState,
    intensities: MeanPhotonResult | None,
    change: tuple[float, float, float],
) -> tuple[float, float, float]:
    """Each class's ``change`` (signal, decoy, vacuum; relative to where the intervals in
    use were measured) over its own allowance in ``intensities.uncertainty`` (the
    signal's and the decoy's either way, the vacuum's rise): 1 at the edge of what the
    bound assumes; inf without a model."""
    if state.model is None:
        return math.inf, math.inf, math.inf
    f = _Rooms.of(state.model, intensities, state.reference_offset_v).fractions(change)
    return f[0], f[1], f[2]


def attribute_tap_reading(
    state: ClassDriftState,
    reading_w: float,
    expected_w: float,
    noise: float,
    intensities: MeanPhotonResult | None,
) -> MixtureAttribution | None:
    """A tap-power reading of the key mixture (``reading_w``, W, the meter's zero
    subtracted; ``noise`` three standard errors relative to ``expected_w``, what the
    intensities in use predict) attributed to the modulator's bias, class by class
    (:func:`~qkdnode.procedures.class_drift.attribute_mixture_change`).

    Compared with the tap power right after the last tracking step (read at the offset
    that step left: a laser drift since is tiny; the two readings' noise adds), or, when
    there is none (after a re-measurement), with ``expected_w`` at the offset the
    intensities were measured at. The attribution is conditioned when the reading's noise
    spans less offset than a class needs to reach its allowance (``intensities``'
    uncertainty). None before the first step (no model) or without a prediction."""
    if state.model is None or expected_w <= 0:
        return None
    u = intensities.uncertainty if intensities is not None else IntensityUncertainty()
    if state.tap_power_w is not None and state.tap_power_w > 0:
        ref_w, mix_ref = state.tap_power_w, state.last_offset_v
        rel_noise = noise * expected_w / ref_w * math.sqrt(2.0)
    else:
        ref_w, mix_ref = expected_w, state.reference_offset_v
        rel_noise = noise
    return attribute_mixture_change(
        state.model,
        reading_w / ref_w - 1.0,
        rel_noise,
        last_offset_v=state.last_offset_v,
        mixture_reference_offset_v=mix_ref,
        reference_offset_v=state.reference_offset_v,
        allowances=u.class_allowances(),
    )


def next_track_interval_s(
    state: ClassDriftState,
    worst_fraction: float,
    remeasure_at: float,
    predicted_fraction: Callable[[float], float],
) -> float:
    """Seconds to the next tracking step.

    From the interval in use: halved when the largest per-class change since the previous
    step (``worst_fraction``, of its allowance) was above ``remeasure_at``, doubled when
    it was below half of that, then kept within ``[floor_interval_s, base_interval_s]``;
    then halved (down to the floor) while ``predicted_fraction(seconds)`` (the change the
    blocks would see by then at the drift rate just measured) is above ``remeasure_at``.
    """
    t = state.interval_s
    if worst_fraction > remeasure_at:
        t /= 2
    elif worst_fraction < remeasure_at / 2:
        t *= 2
    t = min(max(t, state.floor_interval_s), state.base_interval_s)
    while t > state.floor_interval_s and predicted_fraction(t) > remeasure_at:
        t = max(state.floor_interval_s, t / 2)
    return t


def intensity_action(
    ratio: float, noise: float, allowance: float, remeasure_at: float
) -> IntensityAction:
    """What a tap-power ``ratio`` (measured over predicted) asks for, given the meter's
    ``noise`` (relative), the drift ``allowance`` the intervals include and the fraction
    of it at which to re-measure (module docstring)."""
    if not math.isfinite(ratio):
        return "stop"
    deviation = abs(ratio - 1.0) - noise
    if deviation <= remeasure_at * allowance:
        return "hold"
    if deviation <= allowance:
        return "remeasure"
    return "stop"


async def track_bias(
    tracker: BiasTracker,
    intensities: MeanPhotonResult | None,
    class_probabilities: tuple[float, float, float],
    *,
    allowance: float,
    remeasure_at: float,
    history: list[BiasTrackingPoint],
    started_at: float,
    class_state: ClassDriftState | None = None,
    now_s: float | None = None,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> BiasTrackingResult:
    """One tracking step, the intensity check of the mixture and, with ``class_state``,
    the per-class check and the next interval (module docstring).

    ``history`` (earlier steps, oldest first) is extended with this one; ``started_at``
    is the ``time.monotonic()`` the tracking started; ``now_s`` the time of this step on
    ``class_state``'s clock (default ``time.monotonic()``). ``class_state`` is updated
    (last offset, time, tap power, interval). Instrument errors propagate (the bias is
    where the tracker last set it). Saved and published as ``bias_tracking``.
    """
    started = time.monotonic()
    now = time.monotonic() if now_s is None else now_s
    im, meter = tracker.im, tracker.meter
    before = float(await call(im.bias_v))
    after = await tracker.step()
    assert tracker.last_readings is not None
    biases, powers, delta = tracker.last_readings
    first_delta = delta
    if class_state is not None:
        # The correction moves the bias part of the way (the tracker's gain): while what
        # it leaves still moves a class by more than remeasure_at of its room, correct
        # again inside this window, so the blocks after it start close to the optimum.
        classes = _class_model(tracker, class_probabilities)
        rooms = _Rooms.of(classes, intensities, class_state.reference_offset_v)
        for _ in range(MAX_CORRECTIONS - 1):
            e_after = after - tracker.cal.bias_set_v - delta
            ch = classes.class_change(e_after, class_state.reference_offset_v)
            if max(rooms.fractions((float(ch[0]), float(ch[1]), float(ch[2])))) <= remeasure_at:
                break
            after = await tracker.step()
            assert tracker.last_readings is not None
            biases, powers, delta = tracker.last_readings
    model = tracker.model_w(biases, delta, powers)
    cal = tracker.cal
    centre = cal.bias_set_v + delta
    curve_b = np.linspace(centre - cal.bias_fit.v_pi_v / 2, centre + cal.bias_fit.v_pi_v / 2, 201)
    scale = float(np.mean(model / np.maximum(tracker.relative_mean(biases, delta), 1e-300)))
    curve = scale * tracker.relative_mean(curve_b, delta)
    tap = expected = ratio = noise = None
    mixture: IntensityAction = "hold"
    if intensities is not None:
        p_s, p_d, p_v = class_probabilities
        tap = float(await read_power(meter, CHECK_READINGS, 0.0)) - intensities.zero_w
        expected = intensities.mix_power_w(p_s, p_d, p_v)
        if expected > 0:
            ratio = tap / expected
            sigma = max(
                intensities.signal.tap_power_sigma_w,
                intensities.zero_noise_w / math.sqrt(CHECK_READINGS),
            )
            noise = 3.0 * sigma / expected
            mixture = intensity_action(ratio, noise, allowance, remeasure_at)
    per_class = None
    if class_state is not None:
        per_class = _class_check(
            tracker,
            class_state,
            intensities,
            class_probabilities,
            before_v=before,
            first_delta_v=first_delta,
            after_v=after,
            delta_v=delta,
            now_s=now,
            remeasure_at=remeasure_at,
        )
        class_state.tap_power_w = tap
    action = mixture
    if per_class is not None and _SEVERITY[per_class.action] > _SEVERITY[action]:
        action = per_class.action
    history.append(
        BiasTrackingPoint(
            time_s=time.monotonic() - started_at,
            bias_v=after,
            offset_v=delta,
            power_ratio=ratio,
            class_change=None if per_class is None else per_class.class_change,
            interval_s=None if per_class is None else per_class.next_interval_s,
        )
    )
    if action == "stop" and per_class is not None and per_class.action == "stop":
        message = per_class.message
    else:
        message = {
            "hold": "",
            "remeasure": "tap power drifted: the mean photon numbers are measured again",
            "stop": "tap power outside the drift allowance: the intensities may have left "
            "their intervals",
        }[action]
    result = BiasTrackingResult(
        calibrated_bias_v=cal.bias_set_v,
        v_pi_v=cal.bias_fit.v_pi_v,
        dither_v=tracker.dither_v,
        bias_before_v=before,
        bias_after_v=after,
        offset_v=delta,
        readings_bias_v=[float(x) for x in biases],
        readings_w=[float(x) for x in powers],
        model_w=[float(x) for x in model],
        curve_bias_v=[float(x) for x in curve_b],
        curve_w=[float(x) for x in curve],
        tap_power_w=tap,
        expected_power_w=expected,
        power_ratio=ratio,
        noise=noise,
        allowance=allowance,
        remeasure_at=remeasure_at,
        mixture_action=mixture,
        action=action,
        history=list(history[-500:]),
        ok=action != "stop",
        message=message,
        per_class=per_class,
    )
    return finish(result, started, state_dir, plot_bias_tracking, publish, instruments=[im, meter])


@dataclass(frozen=True)
class _Rooms:
    """How far each class may move (relative) before it leaves what the finite-key bound
    assumes of it: its own allowance, the one
    :meth:`~qkdnode.procedures.mean_photon_number.MeanPhotonResult.class_bounds` widens
    its statistical interval by. The signal and the decoy either way; the vacuum upward
    only when its lower bound is 0 (below the meter's resolution, or an allowance of 1
    or more), else either way. ``vacuum_reference_mu`` is the vacuum predicted at the
    reference from the signal's measured mu and the curve (for the messages)."""

    allowances: tuple[float, float, float]
    vacuum_rise_only: bool
    vacuum_reference_mu: float | None

    @classmethod
    def of(
        cls,
        model: ClassDriftModel,
        intensities: MeanPhotonResult | None,
        reference_offset_v: float,
    ) -> _Rooms:
        u = intensities.uncertainty if intensities is not None else IntensityUncertainty()
        vac_ref = None
        if intensities is not None and intensities.signal.mu is not None:
            t_ref = model.transmission(reference_offset_v)
            vac_ref = intensities.signal.mu * float(t_ref[2] / t_ref[0])
        rise_only = u.vacuum_drift_allowance >= 1.0 or (
            intensities is not None and intensities.vacuum.mu is None
        )
        return cls(u.class_allowances(), rise_only, vac_ref)

    def fractions(self, ch: tuple[float, float, float]) -> list[float]:
        """Each class's change over its allowance (1: at the edge)."""
        vac = max(ch[2], 0.0) if self.vacuum_rise_only else abs(ch[2])
        a = self.allowances
        return [_over(abs(ch[0]), a[0]), _over(abs(ch[1]), a[1]), _over(vac, a[2])]


def _over(change: float, allowance: float) -> float:
    if allowance > 0:
        return change / allowance
    return 0.0 if change == 0 else math.inf


def _class_model(
    tracker: BiasTracker, class_probabilities: tuple[float, float, float]
) -> ClassDriftModel:
    d = tracker.drives_v
    return ClassDriftModel.from_calibration(
        tracker.cal, (float(d[0]), float(d[1]), float(d[2])), class_probabilities
    )


def _class_check(
    tracker: BiasTracker,
    state: ClassDriftState,
    intensities: MeanPhotonResult | None,
    class_probabilities: tuple[float, float, float],
    *,
    before_v: float,
    first_delta_v: float,
    after_v: float,
    delta_v: float,
    now_s: float,
    remeasure_at: float,
) -> ClassDriftCheck:
    """The per-class check of one step (module docstring, "Per class"); updates
    ``state`` (offsets, time, interval). ``first_delta_v`` is the optimum's offset the
    first correction of the step found (it gives the offset before), ``delta_v`` the
    last one's (the offset after)."""
    model = _class_model(tracker, class_probabilities)
    e_before = before_v - (tracker.cal.bias_set_v + first_delta_v)
    e_after = after_v - (tracker.cal.bias_set_v + delta_v)
    e_prev, e_ref = state.last_offset_v, state.reference_offset_v
    elapsed = None if state.last_time_s is None else max(now_s - state.last_time_s, 0.0)
    if state.unkeyed_since_last:
        # no block saw the path: only where this step leaves the bias counts
        margin = 0.0
        change = model.worst_change(e_after, e_after, e_ref)
        state.unkeyed_since_last = False
    else:
        margin = state.margin_v(elapsed or 0.0)
        change = model.worst_change(e_prev, e_before, e_ref, margin)
    change_after = tuple(float(x) for x in model.class_change(e_after, e_ref))
    rooms = _Rooms.of(model, intensities, e_ref)
    fractions = rooms.fractions
    vac_mu = (
        None if rooms.vacuum_reference_mu is None else rooms.vacuum_reference_mu * (1 + change[2])
    )
    now_fr = fractions(change)
    worst_i = int(np.argmax(now_fr))
    worst = now_fr[worst_i]
    rate = None if not elapsed else (e_before - e_prev) / elapsed
    # Extrapolated: the part of the rate a random walk of the allowed size would not
    # explain over ``elapsed`` (two standard deviations of its apparent rate); the walk
    # itself is the margin, counted once.
    steady = 0.0
    if rate is not None and elapsed:
        noise = 2.0 * state.walk_v_per_sqrt_s / math.sqrt(elapsed)
        steady = math.copysign(max(abs(rate) - noise, 0.0), rate)

    def predicted(seconds: float) -> float:
        end = e_after + steady * seconds
        return max(fractions(model.worst_change(e_after, end, e_ref, state.margin_v(seconds))))

    interval = next_track_interval_s(state, worst, remeasure_at, predicted)
    state.interval_s = interval
    state.last_offset_v = e_after
    state.last_time_s = now_s
    state.model = model
    action: IntensityAction = "hold"
    message = ""
    name = CLASS_NAMES[worst_i]
    if worst > 1.0:
        action = "stop"
        what = (
            f"moved {100 * change[worst_i]:+.1f} % (its allowance "
            f"{100 * rooms.allowances[worst_i]:.1f} %"
            + (f", mu about {vac_mu:.3g}" if worst_i == 2 and vac_mu is not None else "")
            + ")"
        )
        message = (
            f"the {name} class may have {what} since it was measured: the bias was "
            f"{1e3 * e_before:+.1f} mV from its optimum before this step's correction "
            f"({1e3 * e_prev:+.1f} mV after the previous one)"
        )
    elif rate is not None and predicted(interval) > 1.0:
        # even the shortest interval would let a class leave its interval before the
        # next step at the rate just measured: stop before the blocks use it
        action = "stop"
        ahead = fractions(
            model.worst_change(
                e_after, e_after + steady * interval, e_ref, state.margin_v(interval)
            )
        )
        name = CLASS_NAMES[int(np.argmax(ahead))]
        walk = (
            f" (steady part {1e3 * steady:+.2f} mV/s, and a random walk of "
            f"{1e3 * state.walk_v_per_sqrt_s:.3g} mV/sqrt(s) allowed for)"
            if state.walk_v_per_sqrt_s > 0
            else ""
        )
        message = (
            f"the bias drifts {1e3 * rate:+.2f} mV/s{walk}: the {name} class would leave "
            f"its interval within {interval:.3g} s, the shortest tracking interval"
        )
    return ClassDriftCheck(
        reference_offset_v=e_ref,
        previous_offset_v=e_prev,
        offset_before_v=e_before,
        offset_after_v=e_after,
        elapsed_s=elapsed,
        drift_rate_v_per_s=rate,
        margin_v=margin,
        class_change=change,
        class_change_after=change_after,
        vacuum_mu_predicted=vac_mu,
        worst_class=name,
        worst_fraction=worst,
        class_allowance=rooms.allowances,
        next_interval_s=interval,
        action=action,
        message=message,
    )


def plot_bias_tracking(result: BiasTrackingResult, fig: Figure) -> None:
    """Left: the dithered readings on the fitted mean-power curve (zoomed on the dither,
    the whole V_pi as an inset), residuals below. Right: the bias and the optimum's offset
    over the run (the next interval and the drift rate above), and the tap power over its
    prediction with the allowance bands, with each class's largest change between steps
    (the vacuum on its own axis)."""
    outer = fig.add_gridspec(1, 2, width_ratios=(1, 1.1))
    ax, res = data_and_residuals(fig, outer[0], residual_label="data - fit (nW)")
    b = np.asarray(result.readings_bias_v)
    p = np.asarray(result.readings_w)
    m = np.asarray(result.model_w)
    cb = np.asarray(result.curve_bias_v)
    cw = np.asarray(result.curve_w)
    half = 4 * result.dither_v
    lo, hi = float(b.min()) - half, float(b.max()) + half
    zoom = (cb >= lo) & (cb <= hi)
    ax.plot(b, p * 1e6, "o", ms=5, label="tap power, dithered")
    ax.plot(cb[zoom], cw[zoom] * 1e6, lw=1.2, label="model (class mix), fitted")
    ax.axvline(result.bias_before_v, ls=":", color="0.4", lw=0.9, label="bias before")
    ax.axvline(result.bias_after_v, ls="--", color="C3", lw=0.9, label="bias after")
    ax.set_xlim(lo, hi)
    ax.set_ylabel("tap power (uW)")
    ax.set_title(
        f"optimum moved {1e3 * result.offset_v:+.1f} mV from calibration "
        f"({result.calibrated_bias_v:.3f} V); dither +/-{1e3 * result.dither_v:.0f} mV",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left")
    inset = ax.inset_axes((0.66, 0.08, 0.3, 0.3))
    inset.plot(cb, cw * 1e6, lw=0.8)
    inset.plot(b, p * 1e6, "o", ms=2)
    inset.set_title("one V_pi", fontsize=6)
    inset.tick_params(labelsize=5)
    res.plot(b, (p - m) * 1e9, "o", ms=5)
    res.set_xlabel("IM bias (V)")
    right = outer[1].subgridspec(2, 1, hspace=0.08)
    top = fig.add_subplot(right[0])
    bottom = fig.add_subplot(right[1], sharex=top)
    t = np.asarray([h.time_s for h in result.history])
    top.plot(t, [h.bias_v for h in result.history], "o-", ms=3, lw=0.8, label="bias set")
    top.plot(
        t,
        [result.calibrated_bias_v + h.offset_v for h in result.history],
        "s",
        ms=3,
        mfc="none",
        label="optimum found",
    )
    top.set_ylabel("bias (V)")
    top.tick_params(labelbottom=False)
    top.legend(fontsize=7)
    top.grid(True, alpha=0.3, lw=0.5)
    ratios = [(h.time_s, h.power_ratio) for h in result.history if h.power_ratio is not None]
    if ratios:
        rt, rr = zip(*ratios, strict=True)
        bottom.plot(rt, [100 * (r - 1) for r in rr], "o-", ms=3, lw=0.8, label="tap (mixture)")
    per = [(h.time_s, h.class_change) for h in result.history if h.class_change is not None]
    if per:
        pt, pc = zip(*per, strict=True)
        for k, (name, marker) in enumerate((("signal", "^"), ("decoy", "v"))):
            bottom.plot(
                pt,
                [100 * c[k] for c in pc],
                marker,
                ms=3,
                mfc="none",
                color=f"C{k + 3}",
                label=f"{name}, largest since the step before",
            )
        # the vacuum's relative changes are large (it sits at the curve's minimum): its
        # own axis
        vac = bottom.twinx()
        vac.plot(pt, [100 * c[2] for c in pc], "x", ms=3, color="0.45", label="vacuum")
        vac.set_ylabel("vacuum change (%)", fontsize=7, color="0.45")
        vac.tick_params(labelsize=6, colors="0.45")
    if result.per_class is not None:
        pcr = result.per_class
        bottom.set_title(
            f"next step in {pcr.next_interval_s:.3g} s; bias drift "
            + (
                "unknown"
                if pcr.drift_rate_v_per_s is None
                else f"{1e3 * pcr.drift_rate_v_per_s:+.3g} mV/s"
            )
            + f"; worst {pcr.worst_class} at {100 * pcr.worst_fraction:.0f} % of its room",
            fontsize=7,
        )
    a = 100 * result.allowance
    bottom.axhspan(-a, a, color="C2", alpha=0.12, label="mixture allowance (common)")
    bottom.axhspan(
        -a * result.remeasure_at, a * result.remeasure_at, color="C2", alpha=0.15, label="hold"
    )
    if result.per_class is not None:
        c = 100 * result.per_class.class_allowance[1]
        for y in (-c, c):
            bottom.axhline(
                y,
                ls="--",
                color="C4",
                lw=0.8,
                label="decoy allowance (the bound's)" if y > 0 else None,
            )
    bottom.axhline(0.0, color="0.4", lw=0.8)
    bottom.set_ylabel("change vs calibration (%)")
    bottom.set_xlabel("time since tracking started (s)")
    bottom.legend(fontsize=7, loc="lower left")
    bottom.grid(True, alpha=0.3, lw=0.5)


async def _net(
    meter: OpticalPowerMeter, n: int, zero: np.ndarray
) -> tuple[float, float, list[float]]:
    r = np.array([float(await call(meter.power_w)) for _ in range(n)])
    sigma = math.sqrt(float(r.var(ddof=1)) / r.size + float(zero.var(ddof=1)) / zero.size)
    return float(r.mean() - zero.mean()), sigma, [float(x) for x in r]


async def remeasure_intensities(
    im: IntensityModulator,
    voa: VariableAttenuator,
    meter: OpticalPowerMeter,
    modulator: ModulatorResult,
    current: MeanPhotonResult,
    *,
    readings: int = CHECK_READINGS,
    max_step_db: float = 1.0,
    state_dir: Path | None = None,
    publish: Publisher | None = None,
) -> MeanPhotonResult:
    """Measure the mean photon numbers again at the current settings (module docstring).

    The meter's zero (shutter closed), then each class alone (all three drives at its
    level), ``readings`` readings each, the intervals with the uncertainty budget of
    ``current``. When the signal is off its target by more than the tolerance the VOA
    moves towards it by at most ``max_step_db`` and the classes are read there. The class
    levels are restored whatever happens; a failure after the zero reading leaves the
    shutter closed (the safe side; the node stops and calibrates again). Raises
    :class:`~qkdnode.procedures.common.CalibrationError` when the signal or decoy is
    below the meter's resolution. Saved and published as ``mean_photon_number``.
    """
    started = time.monotonic()
    levels = (modulator.signal_v, current.decoy_v, modulator.vacuum_v)
    classes: dict[str, IntensityInterval] = {}
    raw: list[list[float]] = []
    att = float(await call(voa.attenuation_db))
    history = [("signal", att, current.mu_signal)]

    def interval(net: float, sigma: float) -> IntensityInterval:
        return intensity_interval(
            net,
            sigma,
            wavelength_nm=current.wavelength_nm,
            slot_rate_hz=current.slot_rate_hz,
            tap_to_output_db=current.tap_to_output_db,
            budget=current.uncertainty,
        )

    try:
        await call(voa.set_shutter, False)
        zero = np.array([float(await call(meter.power_w)) for _ in range(readings)])
        await call(voa.set_shutter, True)
        await set_all_levels(im, levels[0])
        net, sigma, _ = await _net(meter, readings, zero)
        sig = interval(net, sigma)
        if sig.mu is not None and abs(sig.mu / current.mu_signal_target - 1) > 0.01:
            step = 10 * math.log10(sig.mu / current.mu_signal_target)
            step = float(np.clip(step, -max_step_db, max_step_db))
            lo, hi = voa.attenuation_range_db
            att = float(np.clip(att + step, lo, hi))
            await call(voa.set_attenuation_db, att)
            att = float(await call(voa.attenuation_db))
        for name, level in zip(("signal", "decoy", "vacuum"), levels, strict=True):
            await set_all_levels(im, level)
            net, sigma, r = await _net(meter, readings, zero)
            classes[name] = interval(net, sigma)
            raw.append(r)
            history.append((name, att if name == "signal" else level, classes[name].mu_or_upper))
    finally:
        # the class levels back whatever happened; the shutter is opened again on the
        # normal path only (after the zero): a failure leaves it closed, the safe side
        await call(im.set_level_v, IntensityClass.SIGNAL, levels[0])
        await call(im.set_level_v, IntensityClass.DECOY, levels[1])
        await call(im.set_level_v, IntensityClass.VACUUM, levels[2])
    for name in ("signal", "decoy"):
        if not classes[name].resolved:
            raise CalibrationError(f"the {name} class is below the power meter's resolution")
    result = current.model_copy(
        update={
            "timestamp_utc": utc_now(),
            "signal": classes["signal"],
            "decoy": classes["decoy"],
            "vacuum": classes["vacuum"],
            "zero_w": float(zero.mean()),
            "zero_noise_w": float(zero.std(ddof=1)),
            "attenuation_db": att,
            "history": history,
            "class_readings_w": [[float(x) for x in zero], *raw],
            "ok": True,
            "message": "measured again during key exchange",
        }
    )
    return finish(
        result,
        started,
        state_dir,
        plot_mean_photon_number,
        publish,
        instruments=[im, voa, meter],
    )
