"""Hidden hardware truths of the simulated boxes, drawn from documented spreads.

The hardware values in :mod:`drivers.simlink.params` are *nominal* (datasheet) values.
Each box draws its actual values once, from its own ``hardware_seed``: the same seed gives
the same box, another seed another unit of the same model. Each side draws only its own
truths (the transmitter's world its box, the receiver's world its detectors and clock).

Every truth below is ``nominal + d`` (``nominal * (1 + d)`` where the deviation is
relative), with ``|d|`` uniform between the two bounds of the table times
``spread_scale`` and a random sign, so a truth never sits on its nominal value: a node
that assumes the datasheet value (a default in its configuration) is never right by
luck, and only calibration finds the truth.

===============================  ==========  =================  ===========
truth                            nominal     deviation ``|d|``  box
===============================  ==========  =================  ===========
``laser_power_error_db``         0 dB        0.1 - 0.5 dB       transmitter
``tap_to_output_db`` (1)         50 dB       0.3 - 1.5 dB       transmitter
``tap_ratio_db`` (2)             10 dB       0.05 - 0.5 dB      transmitter
``power_meter_gain``             1           0.5 - 2.5 %        transmitter
``im_v_pi_v``                    3.7 V       2 - 8 %            transmitter
``im_bias_opt_v``                1.23 V      0.1 - 0.5 V        transmitter
``im_extinction_db``             40 dB       0.5 - 4 dB         transmitter
``encoder_v_pi_v``               3.0 V       2 - 5 %            transmitter
``encoder_bias_opt_v``           0.8 V       0.1 - 0.3 V        transmitter
``detector_efficiency`` (3)      0.6         2 - 10 %           receiver
``dark_count_rates_hz`` (3)      100 Hz      10 - 50 %          receiver
``true_delay_ps`` (4)            12345 ps    300 - 3000 ps      receiver
clock ``offset_s``               0 s         0.05 - 2 s         receiver
clock ``frequency_offset_ppm``   0 ppm       2 - 20 ppm         receiver
===============================  ==========  =================  ===========

(1) from the power meter's port to the box output (what commissioning measures);
(2) the meter's port below the through path; (3) each detector drawn on its own;
(4) the detectors' optical delay after the slot edge.
(The nominal column gives the defaults; a configured nominal value moves the centre.)
Values are clipped to their fields' ranges (an efficiency never exceeds 1).

The resolved parameters (:func:`resolve_truths` and the per-side functions) hold the
truths with ``spread_scale = 0``: resolving them again changes nothing, and a world
built from them has the same truths. The demo's theory comparison and the tests read
truths this way; the simulated instruments never expose them.

Commissioning: a box's tap-to-output attenuation cannot be measured in the field. The
factory measures it once, with calibrated meters at both ports, to within
:data:`TAP_COMMISSIONING_UNCERTAINTY_DB`; :func:`commissioning_record` is that
measurement for a simulated box (its truth plus an error drawn within the uncertainty,
never exactly zero). The meter's own gain error is not in it: it stays hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

from drivers.simlink.params import (
    ClockParams,
    LinkParams,
    ReceiverParams,
    ReceiverSimParams,
    TransmitterHardwareParams,
    TransmitterSimParams,
)

__all__ = [
    "RECEIVER_SPREADS",
    "TAP_COMMISSIONING_UNCERTAINTY_DB",
    "TRANSMITTER_SPREADS",
    "Commissioning",
    "Spread",
    "commissioning_record",
    "receiver_truths",
    "resolve_receiver",
    "resolve_transmitter",
    "resolve_truths",
    "transmitter_truths",
]

#: Stated uncertainty (a bound) of the factory's tap-to-output measurement, in dB.
TAP_COMMISSIONING_UNCERTAINTY_DB = 0.1

_DOMAIN_TRANSMITTER = 0x7478_6877  # "txhw"
_DOMAIN_RECEIVER = 0x7278_6877  # "rxhw"
_DOMAIN_COMMISSIONING = 0x636F_6D6D  # "comm"


@dataclass(frozen=True)
class Spread:
    """Deviation of a truth from its nominal value: ``min <= |d| <= max``."""

    min: float
    max: float
    relative: bool = False


TRANSMITTER_SPREADS: dict[str, Spread] = {
    "laser_power_error_db": Spread(0.1, 0.5),
    "tap_to_output_db": Spread(0.3, 1.5),
    "tap_ratio_db": Spread(0.05, 0.5),
    "power_meter_gain": Spread(0.005, 0.025, relative=True),
    "im_v_pi_v": Spread(0.02, 0.08, relative=True),
    "im_bias_opt_v": Spread(0.1, 0.5),
    "im_extinction_db": Spread(0.5, 4.0),
    "encoder_v_pi_v": Spread(0.02, 0.05, relative=True),
    "encoder_bias_opt_v": Spread(0.1, 0.3),
}

RECEIVER_SPREADS: dict[str, Spread] = {
    "detector_efficiency": Spread(0.02, 0.10, relative=True),
    "dark_count_rates_hz": Spread(0.10, 0.50, relative=True),
    "true_delay_ps": Spread(300.0, 3000.0),
    "clock.offset_s": Spread(0.05, 2.0),
    "clock.frequency_offset_ppm": Spread(2.0, 20.0),
}


def _deviation(rng: np.random.Generator, spread: Spread, scale: float) -> float:
    magnitude = float(rng.uniform(spread.min, spread.max))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return sign * magnitude * scale


def _apply(nominal: float, d: float, spread: Spread) -> float:
    return nominal * (1.0 + d) if spread.relative else nominal + d


def _clip(model: type[BaseModel], name: str, value: float) -> float:
    """``value`` within the bounds the model declares for field ``name``."""
    for bound in model.model_fields[name].metadata:
        if isinstance(bound, Ge):
            value = max(value, float(cast(float, bound.ge)))
        elif isinstance(bound, Gt):
            value = max(value, math.nextafter(float(cast(float, bound.gt)), math.inf))
        elif isinstance(bound, Le):
            value = min(value, float(cast(float, bound.le)))
        elif isinstance(bound, Lt):
            value = min(value, math.nextafter(float(cast(float, bound.lt)), -math.inf))
    return value


def _draw(
    model: type[BaseModel],
    values: dict[str, Any],
    spreads: dict[str, Spread],
    rng: np.random.Generator,
    scale: float,
    *,
    prefix: str = "",
) -> dict[str, Any]:
    """The truths of ``values`` for the spreads named ``prefix + field`` (in table order)."""
    out: dict[str, Any] = {}
    for key, spread in spreads.items():
        if not key.startswith(prefix) or "." in key.removeprefix(prefix):
            continue
        name = key.removeprefix(prefix)
        nominal = values[name]
        if isinstance(nominal, tuple):
            drawn: Any = tuple(_apply(x, _deviation(rng, spread, scale), spread) for x in nominal)
        else:
            drawn = _clip(model, name, _apply(nominal, _deviation(rng, spread, scale), spread))
        out[name] = drawn
    return out


def transmitter_truths(hw: TransmitterHardwareParams) -> TransmitterHardwareParams:
    """The transmitter box's truths for its ``hardware_seed`` (``spread_scale`` 0 after)."""
    if hw.spread_scale == 0.0:
        return hw
    rng = np.random.default_rng([hw.hardware_seed, _DOMAIN_TRANSMITTER])
    drawn = _draw(
        TransmitterHardwareParams, hw.model_dump(), TRANSMITTER_SPREADS, rng, hw.spread_scale
    )
    return TransmitterHardwareParams.model_validate(
        {**hw.model_dump(), **drawn, "spread_scale": 0.0}
    )


def receiver_truths(rx: ReceiverParams, clock: ClockParams) -> tuple[ReceiverParams, ClockParams]:
    """The receiver box's truths (detectors and tagger clock) for its ``hardware_seed``."""
    if rx.spread_scale == 0.0:
        return rx, clock
    rng = np.random.default_rng([rx.hardware_seed, _DOMAIN_RECEIVER])
    scale = rx.spread_scale
    drawn = _draw(ReceiverParams, rx.model_dump(), RECEIVER_SPREADS, rng, scale)
    drawn["detector_efficiency"] = tuple(min(1.0, e) for e in drawn["detector_efficiency"])
    drawn_clock = _draw(
        ClockParams, clock.model_dump(), RECEIVER_SPREADS, rng, scale, prefix="clock."
    )
    return (
        ReceiverParams.model_validate({**rx.model_dump(), **drawn, "spread_scale": 0.0}),
        ClockParams.model_validate({**clock.model_dump(), **drawn_clock}),
    )


def resolve_transmitter(params: TransmitterSimParams) -> TransmitterSimParams:
    """The transmitter's side with its hardware truths in place of the nominal values."""
    return params.model_copy(update={"hardware": transmitter_truths(params.hardware)})


def resolve_receiver(params: ReceiverSimParams) -> ReceiverSimParams:
    """The receiver's side with its hardware and clock truths."""
    rx, clock = receiver_truths(params.hardware, params.clock)
    return params.model_copy(update={"hardware": rx, "clock": clock})


def resolve_truths(params: LinkParams) -> LinkParams:
    """The whole link with both boxes' truths: what the two worlds simulate.

    For the theory comparison (true detector efficiency and dark counts) and for tests;
    idempotent."""
    rx, clock = receiver_truths(params.receiver, params.clock)
    return params.model_copy(
        update={
            "transmitter": transmitter_truths(params.transmitter),
            "receiver": rx,
            "clock": clock,
        }
    )


@dataclass(frozen=True)
class Commissioning:
    """The factory's measurement of a transmitter box (what its node's config holds)."""

    tap_to_output_db: float
    tap_to_output_uncertainty_db: float


def commissioning_record(
    hw: TransmitterHardwareParams, uncertainty_db: float = TAP_COMMISSIONING_UNCERTAINTY_DB
) -> Commissioning:
    """The commissioning measurement of the box ``hw`` (nominal or resolved): its true
    tap-to-output attenuation plus an error with ``0.2 u <= |error| <= u``."""
    truth = transmitter_truths(hw)
    rng = np.random.default_rng([hw.hardware_seed, _DOMAIN_COMMISSIONING])
    error = _deviation(rng, Spread(0.2 * uncertainty_db, uncertainty_db), 1.0)
    return Commissioning(
        tap_to_output_db=round(truth.tap_to_output_db + error, 3),
        tap_to_output_uncertainty_db=uncertainty_db,
    )
