"""The receiver's polarisation compensation closed around the simulated link, in
simulated time.

Both worlds step chunk by chunk in one process (:class:`qkdnode.procedures.simharness.
SimLink`, the real simulated controller driver); the compensation step is the node's own
(:func:`qkdnode.polarization.compensation_step`) and each of its windows is one chunk of
detections with the transmitter's prepared states, as the node's disclosure gives them.
Between steps the chunks are key: their error rates are the link's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from drivers.interfaces import IntensityClass
from drivers.simlink.params import LinkParams
from qkdnode.polarization import (
    CompensationSettings,
    CompensationStep,
    WindowCounts,
    compensation_step,
)
from qkdnode.procedures.simharness import SimLink


@dataclass
class Sample:
    """Error rates of the key chunks in one bin of link time ``[t_s, t_s + bin)``."""

    t_s: float
    qber_z: float
    qber_x: float
    sifted: int


@dataclass
class LoopRun:
    samples: list[Sample] = field(default_factory=list)
    steps: list[tuple[float, CompensationStep]] = field(default_factory=list)
    disclosed_chunks: int = 0
    key_chunks: int = 0


class CompensatedLink:
    """A simulated link with the compensation every ``interval_s`` of link time (None:
    never, the uncompensated link)."""

    def __init__(
        self,
        params: LinkParams,
        settings: CompensationSettings | None = None,
        interval_s: float | None = 2.0,
    ) -> None:
        self.link = SimLink(params)
        self.controller = self.link.connect()["polarization"]
        self.settings = settings or CompensationSettings()
        self.interval_s = interval_s
        self.t_s = 0.0
        self.fiber: np.ndarray | None = None  # the last step's estimate (continuity)

    def close(self) -> None:
        self.link.close()

    def _chunk(self, count: bool = True) -> WindowCounts:
        self.link.tx.step()
        rec = self.link.rx.receive(5.0)
        if rec is None:
            raise RuntimeError("simulated fiber lost a chunk")
        self.t_s += self.link.chunk_s
        if not count:
            return WindowCounts(np.zeros((4, 4), np.int64))
        prep = self.link.tx.prepared(rec.slot)
        return WindowCounts.from_detections(
            rec.channel, prep.basis, prep.bit, mask=prep.intensity != IntensityClass.VACUUM
        )

    def run(self, seconds: float, bin_s: float = 1.0, sample_every: int = 1) -> LoopRun:
        """Run ``seconds`` of link time; the key chunks' error rates in bins of ``bin_s``
        (every ``sample_every``-th key chunk counted: the others are only stepped)."""
        out = LoopRun()
        end = self.t_s + seconds
        next_step = self.t_s if self.interval_s is not None else float("inf")

        async def window() -> WindowCounts:
            out.disclosed_chunks += 1
            return self._chunk()

        acc = np.zeros((4, 4), np.int64)
        bin_start = self.t_s
        while self.t_s < end:
            if self.t_s >= next_step and self.interval_s is not None:
                step = asyncio.run(
                    compensation_step(self.controller, window, self.settings, self.fiber)
                )
                self.fiber = step.estimate.fiber
                out.steps.append((self.t_s, step))
                next_step = self.t_s if step.again else next_step + self.interval_s
                continue
            acc += self._chunk(count=out.key_chunks % sample_every == 0).counts
            out.key_chunks += 1
            if self.t_s - bin_start >= bin_s - 1e-9:
                qz, qx = WindowCounts(acc).qber()
                out.samples.append(Sample(bin_start, qz, qx, int(acc.sum())))
                acc[:] = 0
                bin_start = self.t_s
        return out


def floor_qber(params: LinkParams, seconds: float) -> tuple[float, float]:
    """(QBER Z, QBER X) of the same link without any polarisation rotation: the
    misalignment floor (misalignment and background) the compensation aims at."""
    fiber = params.fiber.model_copy(update={"polarization": None, "drift_rad_per_sqrt_s": 0.0})
    ref = CompensatedLink(params.model_copy(update={"fiber": fiber}), interval_s=None)
    try:
        run = ref.run(seconds, bin_s=seconds)
    finally:
        ref.close()
    return run.samples[0].qber_z, run.samples[0].qber_x
