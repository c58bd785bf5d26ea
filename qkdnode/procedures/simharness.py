"""Both halves of the simulated link in one process, stepped synchronously.

For tests and benchmarks of the procedures: the transmitter world PUSHes each chunk of
photons over an inproc ZeroMQ "fiber" and the receiver world pulls and processes it at
once, deterministic and as fast as the physics. Instruments are the real simulated
drivers, each connected to the world of its role (a daemon has one world per link;
here both live together, so connection briefly points the drivers' world lookup at the
right one, whatever link name the instrument gives).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

import drivers.simlink.instruments as sim
from drivers.interfaces import TAG_DTYPE, TimeTagger
from drivers.simlink.params import LinkParams
from drivers.simlink.truths import resolve_truths
from drivers.simlink.world import ReceiverWorld, TransmitterWorld

__all__ = ["SimLink", "drain"]

_ids = itertools.count()


@contextlib.contextmanager
def _world_lookup(world: TransmitterWorld | ReceiverWorld) -> Iterator[None]:
    saved = sim.__dict__["get_world"]
    setattr(sim, "get_world", lambda name="": world)  # noqa: B010
    try:
        yield
    finally:
        setattr(sim, "get_world", saved)  # noqa: B010


class SimLink:
    def __init__(self, params: LinkParams) -> None:
        #: the link with both boxes' drawn truths (tests compare the procedures with them)
        self.params = resolve_truths(params)
        self.ctx: zmq.Context[Any] = zmq.Context()
        endpoint = f"inproc://fiber-{next(_ids)}"
        self.tx = TransmitterWorld(params.transmitter_side(), endpoint, self.ctx)
        self.rx = ReceiverWorld(params.receiver_side(), endpoint, self.ctx)
        self.slot_rate_hz = params.source.slot_rate_hz
        self.chunk_s = params.chunk_slots / self.slot_rate_hz
        #: truth of every detection processed while ``record_truth`` is set (tests only)
        self.record_truth = False
        self.truth_time: list[npt.NDArray[np.int64]] = []
        self.truth_slot: list[npt.NDArray[np.int64]] = []

    def step(self, chunks: int = 1) -> None:
        for _ in range(chunks):
            self.tx.step()
            rec = self.rx.receive(5.0)
            if rec is None:
                raise RuntimeError("simulated fiber lost a chunk")
            if self.record_truth:
                self.truth_time.append(rec.time_ps.copy())
                self.truth_slot.append(rec.slot.copy())

    def advance(self, seconds: float) -> None:
        self.step(max(1, round(seconds / self.chunk_s)))

    def truth(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(tagger time, true slot) of the recorded detections."""
        return np.concatenate(self.truth_time), np.concatenate(self.truth_slot)

    def connect(self) -> dict[str, Any]:
        """Real simulated instruments connected to the two worlds, by config name."""
        out: dict[str, Any] = {}
        with _world_lookup(self.tx):
            for name, cls in (
                ("laser", sim.SimLaser),
                ("im", sim.SimIntensityModulator),
                ("encoder", sim.SimEncoder),
                ("voa", sim.SimAttenuator),
                ("meter", sim.SimPowerMeter),
                ("source", sim.SimStateSource),
            ):
                inst = cls(name)
                inst.connect()
                out[name] = inst
        with _world_lookup(self.rx):
            dets = []
            for ch in range(4):
                det = sim.SimDetector(f"spd{ch}", options=sim.SimDetectorOptions(channel=ch))
                det.connect()
                dets.append(det)
            out["detectors"] = dets
            tagger = sim.SimTimeTagger("tagger")
            tagger.connect()
            out["tagger"] = tagger
            controller = sim.SimPolarizationController("polarization")
            controller.connect()
            out["polarization"] = controller
        return out

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        self.ctx.term()


def drain(tagger: TimeTagger) -> npt.NDArray[np.void]:
    """All tags queued in ``tagger`` now."""
    parts = []
    while True:
        block = tagger.read_block(0.0)
        if block is None:
            break
        parts.append(block.tags)
    return np.concatenate(parts) if parts else np.zeros(0, TAG_DTYPE)
