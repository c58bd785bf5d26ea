"""Drifting transmitter hardware against the calibration that the finite-key bound uses.

The simulated box drifts (intensity-modulator bias, laser power) while simulated time
runs; the truth (the mean photon numbers the world really emits) is read here only, in
assertions. The finite-key bound takes each intensity within the interval its
calibration reported, until the next calibration: these tests play the months after
commissioning on fast-forward and check that the interval in use still holds the truth,
without the node's scheduled tracking (it does not: the link is wrong, or stops) and with
it (it does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from drivers.simlink.params import (
    DriftParams,
    FiberParams,
    LinkParams,
    SourceParams,
    TransmitterHardwareParams,
)
from qkdnode.procedures.bias_tracking import (
    BiasTrackingPoint,
    intensity_action,
    remeasure_intensities,
    track_bias,
)
from qkdnode.procedures.mean_photon_number import (
    MeanPhotonConfig,
    MeanPhotonResult,
    calibrate_mean_photon_number,
)
from qkdnode.procedures.modulator import BiasTracker, ModulatorResult, calibrate_modulator
from qkdnode.procedures.simharness import SimLink

ALLOWANCE = 0.05  # the default intensity_drift_allowance (in the intervals)
REMEASURE_AT = 0.5


@dataclass
class Box:
    link: SimLink
    inst: dict[str, Any]
    modulator: ModulatorResult
    mu: MeanPhotonResult


def make_box(drift: DriftParams, source: SourceParams | None = None) -> Box:
    # a long fiber: few detections to simulate, the transmitter's physics unchanged
    link = SimLink(
        LinkParams(
            chunk_slots=1 << 20,
            transmitter=TransmitterHardwareParams(drift=drift),
            fiber=FiberParams(length_km=150.0),
            **({} if source is None else {"source": source}),
        )
    )
    inst = link.connect()

    async def calibrate() -> Box:
        inst["laser"].set_emission(True)
        while inst["laser"].status() != 2:
            await asyncio.sleep(0.05)
        mod = await calibrate_modulator(inst["im"], inst["meter"], voa=inst["voa"])
        src = link.params.source
        mu = await calibrate_mean_photon_number(
            inst["laser"],
            inst["im"],
            inst["voa"],
            inst["meter"],
            mod,
            mu_signal=src.mu_signal,
            mu_decoy=src.mu_decoy,
            slot_rate_hz=src.slot_rate_hz,
            cfg=MeanPhotonConfig(tap_to_output_db=link.params.transmitter.tap_to_output_db),
        )
        inst["encoder"].set_output(True)
        return Box(link, inst, mod, mu)

    return asyncio.run(calibrate())


@pytest.fixture
def boxes() -> Iterator[list[Box]]:
    made: list[Box] = []
    yield made
    for b in made:
        b.link.close()


def holds(box: Box, m: MeanPhotonResult) -> bool:
    """Whether the world's true signal and decoy intensities lie in the intervals ``m``
    reports (what the decoy-state bound assumes)."""
    sig, dec, _ = box.link.tx.mu_per_class()
    return m.signal.lower <= sig <= m.signal.upper and m.decoy.lower <= dec <= m.decoy.upper


def probabilities(box: Box) -> tuple[float, float, float]:
    src = box.link.params.source
    return src.p_signal, src.p_decoy, src.p_vacuum


async def tap_action(box: Box, m: MeanPhotonResult) -> str:
    """What the node's tap-power check makes of the light now (20 readings)."""
    from qkdnode.procedures.modulator import read_power

    reading = await read_power(box.inst["meter"], 20, 0.0) - m.zero_w
    expected = m.mix_power_w(*probabilities(box))
    noise = 3 * m.signal.tap_power_sigma_w / expected
    return intensity_action(reading / expected, noise, ALLOWANCE, REMEASURE_AT)


BIAS_DRIFT = DriftParams(im_bias_v_per_s=0.01)  # 100x faster than a real modulator


def test_bias_drift_breaks_the_decoy_interval_unseen_without_tracking(boxes: list[Box]) -> None:
    """The bias drifts 0.01 V/s: after 15 s the decoy (on the steep side of the transfer
    curve) has left its interval while the tap power of the key mixture (dominated by
    the signal at the curve's maximum) has barely moved: the tap-power check holds, and
    the bound would go on using a decoy intensity that is no longer the one sent."""
    box = make_box(BIAS_DRIFT)
    boxes.append(box)
    assert holds(box, box.mu)
    box.link.advance(15.0)
    assert box.link.tx.optics.im_bias_drift_v == pytest.approx(0.15, rel=0.05)
    assert not holds(box, box.mu)
    assert asyncio.run(tap_action(box, box.mu)) != "stop"


def test_bias_tracking_keeps_the_intervals_true(boxes: list[Box]) -> None:
    """The same drift with a tracking step every simulated second (the node's schedule,
    sped up like the drift): the intervals hold the truth throughout, and the tracker's
    optimum follows the world's."""
    box = make_box(BIAS_DRIFT)
    boxes.append(box)
    tracker = BiasTracker(box.inst["im"], box.inst["meter"], box.modulator, probabilities(box))
    history: list[BiasTrackingPoint] = []
    t0 = time.monotonic()

    async def run() -> None:
        for _ in range(15):
            box.link.advance(1.0)
            res = await track_bias(
                tracker,
                box.mu,
                probabilities(box),
                allowance=ALLOWANCE,
                remeasure_at=REMEASURE_AT,
                history=history,
                started_at=t0,
            )
            assert res.action == "hold"
            assert holds(box, box.mu)

    asyncio.run(run())
    o = box.link.tx.optics
    true_offset = o.im_bias_opt_v(box.link.tx.hardware) - box.modulator.bias_set_v
    # the bias set sits on the moving optimum (within the last second's drift)
    assert o.im_bias_v - box.modulator.bias_set_v == pytest.approx(true_offset, abs=0.015)
    assert len(history) == 15


LASER_DRIFT = DriftParams(laser_power_db_per_s=-0.05)


def test_laser_drift_stops_the_link_without_the_schedule(boxes: list[Box]) -> None:
    """The laser loses 0.05 dB/s: after 6 s (-0.3 dB, -6.7 %) the tap-power check asks
    for a stop (the exchange stops and a full calibration follows)."""
    box = make_box(LASER_DRIFT)
    boxes.append(box)
    box.link.advance(6.0)
    assert asyncio.run(tap_action(box, box.mu)) == "stop"


def test_laser_drift_remeasured_in_time_with_the_schedule(boxes: list[Box]) -> None:
    """With a check every simulated second, the mean photon numbers are measured again
    when the tap power has moved by half the allowance: the exchange never has to stop,
    the intervals in use hold the truth throughout, and the VOA is moved back towards the
    targets."""
    box = make_box(LASER_DRIFT)
    boxes.append(box)
    inst = box.inst
    tracker = BiasTracker(inst["im"], inst["meter"], box.modulator, probabilities(box))
    history: list[BiasTrackingPoint] = []
    t0 = time.monotonic()
    in_use = box.mu
    remeasured = 0
    voa_before = inst["voa"].attenuation_db()

    async def run() -> None:
        nonlocal in_use, remeasured
        for _ in range(12):
            box.link.advance(1.0)
            res = await track_bias(
                tracker,
                in_use,
                probabilities(box),
                allowance=ALLOWANCE,
                remeasure_at=REMEASURE_AT,
                history=history,
                started_at=t0,
            )
            assert res.action != "stop"
            if res.action == "remeasure":
                in_use = await remeasure_intensities(
                    inst["im"], inst["voa"], inst["meter"], box.modulator, in_use
                )
                remeasured += 1
            assert holds(box, in_use)

    asyncio.run(run())
    assert remeasured >= 2
    assert inst["voa"].attenuation_db() < voa_before  # less attenuation for a dimmer laser


def test_tracking_without_drift_keeps_the_bias_whatever_decoy_drive_is_in_use(
    boxes: list[Box],
) -> None:
    """A decoy/signal ratio other than the modulator calibration's default (here 1/8, as on
    the satellite link) makes the mean-photon-number calibration choose another decoy
    drive. The tracker models the drives in use: with nothing drifting it leaves the bias
    and the intensities where they are (with the modulator's own drives in its model it
    walked the bias 0.4 V off in four steps and the decoy to a quarter)."""
    box = make_box(
        DriftParams(),
        SourceParams(slot_rate_hz=100e6, mu_signal=0.8, mu_decoy=0.1, p_signal=0.5, p_decoy=0.25),
    )
    boxes.append(box)
    tracker = BiasTracker(box.inst["im"], box.inst["meter"], box.modulator, probabilities(box))
    before = box.link.tx.mu_per_class()

    async def steps() -> list[float]:
        out = []
        for _ in range(4):
            out.append(await tracker.step())
            box.link.step(1)
        return out

    biases = asyncio.run(steps())
    assert max(abs(b - box.modulator.bias_set_v) for b in biases) < 0.01
    after = box.link.tx.mu_per_class()
    assert after[1] == pytest.approx(before[1], rel=0.01)
    assert holds(box, box.mu)
