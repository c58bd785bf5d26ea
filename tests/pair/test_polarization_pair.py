"""The receiver's polarisation compensation in the node runtime: both nodes in one
process (tests/pair/harness.py) on the simulated link with the default SU(2) drift, the
fiber touched while key flows. Wall-clock time: a system test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.poincare import rotation_about
from drivers.simlink.world import ReceiverWorld, TransmitterWorld, get_world
from qkdnode.statemachine import Event, State
from tests.pair.harness import in_process_pair

BAND = 0.005
RECOVERY_S = 10.0
QBER_LIMITS = {"qber_warning": 0.45, "qber_abort": 0.49}


def _excess_qber(rx: ReceiverWorld, tx: TransmitterWorld) -> tuple[float, float]:
    """The error rates (Z, X) the link's rotations add to the floor now, from the
    simulation's truth: the prepared H state's angle (encoder bias and the fiber's turn
    about S3), the fiber's SU(2) rotation, the controller's."""
    with tx.lock:
        angle = tx.emission_settings().state_angle_rad[0] + tx.reference_angle_rad
    with rx.lock:
        total = rx.polarization_controller.matrix() @ rx.last_fiber_rotation
    total = total @ rotation_about([0.0, 0.0, 1.0], 2.0 * angle)
    return (1.0 - total[0, 0]) / 2.0, (1.0 - total[1, 1]) / 2.0


@pytest.mark.system
def test_the_receiver_holds_the_drift_and_undoes_a_touched_fiber(tmp_path: Path) -> None:
    async def go() -> None:
        extra_tx = {
            "simulation": {"transmitter": {"fiber": {"polarization": {}}}},
            # the controller undoes every rotation: the encoder's lock-in would only
            # share the one about S3 with it (docs/polarization.md)
            "tracking": {"interval_s": 0},
            # this pair's blocks are 2 s of light: the jump spoils a whole block, and the
            # block-fed encoder compensation (above qber_warning) or a recalibration
            # (above qber_abort) would take over; what is under test is the controller
            "protocol": QBER_LIMITS,
        }
        extra_rx = {
            "instruments": {
                "polarization": {"driver": "sim_polarization_controller", "resource": "receiver"}
            },
            "protocol": QBER_LIMITS,
        }
        async with in_process_pair(tmp_path, extra_tx=extra_tx, extra_rx=extra_rx) as p:
            assert await p.drive(Event.CALIBRATE) is State.IDLE
            assert await p.drive(Event.SYNC) is State.IDLE
            await p.drive(Event.EXCHANGE)
            world, tx_world = get_world("receiver"), get_world("transmitter")
            assert isinstance(world, ReceiverWorld)
            assert isinstance(tx_world, TransmitterWorld)
            loop = asyncio.get_running_loop()

            async def excess_per_second(seconds: float) -> list[tuple[float, float]]:
                """(start, mean excess error rate) of every two seconds (the light of one
                of this pair's small blocks; a default block holds minutes): the truth
                sampled ten times a second, so that a dithered window's lead counts as
                it does in the key, for its share of the time."""
                out = []
                for _ in range(int(seconds) // 2):
                    t0 = loop.time()
                    samples = []
                    for _ in range(20):
                        samples.append(max(_excess_qber(world, tx_world)))
                        await asyncio.sleep(0.1)
                    out.append((t0, sum(samples) / len(samples)))
                return out

            await asyncio.sleep(5.0)
            held = await excess_per_second(20)  # the drift is held while key flows
            assert sum(e for _, e in held) / len(held) < BAND, held
            # somebody touches the fiber: a 2 rad turn of the Poincaré sphere
            assert p.tx.backend is not None
            jumped_at = loop.time()
            p.tx.backend.faults.inject("polarization_jump", angle_rad=2.0)
            after = await excess_per_second(20)
            assert after[0][1] > 0.05, after  # the jump reached the receiver and hurt
            last_bad = max((i for i, (_, e) in enumerate(after) if e >= BAND), default=-1)
            assert last_bad < len(after) - 1, after  # back for good
            back_at = after[last_bad + 1][0]
            # In wall-clock time, with both nodes, both simulated worlds and their
            # post-processing in one process: a loaded machine slows the steps down (the
            # 5 s of the acceptance are pinned in simulated time, tests/polarization).
            assert back_at - jumped_at < RECOVERY_S, (back_at - jumped_at, after)
            assert p.rx.sm.state is State.EXCHANGING and p.tx.sm.state is State.EXCHANGING
            await p.tx.sm.trigger(Event.STOP, "test")

    asyncio.run(go())
