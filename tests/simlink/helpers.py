"""Shared helpers of the simlink tests: run the two worlds in-process, without sockets."""

from __future__ import annotations

import numpy as np

from drivers.simlink.params import LinkParams
from drivers.simlink.receiver import DetectionRecords
from drivers.simlink.world import ReceiverWorld, TransmitterWorld


def link(**overrides: object) -> LinkParams:
    """Calibrated default link with nested overrides, e.g. receiver={"dead_time_ns": 0}.

    The hardware is pinned to the given values (``spread_scale`` 0: the values are the
    truths), so the physics tests compare with the formulas; override ``spread_scale`` to
    draw truths."""
    base = LinkParams(start_calibrated=True).model_dump()
    base["transmitter"]["spread_scale"] = 0.0
    base["receiver"]["spread_scale"] = 0.0
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return LinkParams.model_validate(base)


def run_link(
    params: LinkParams, n_chunks: int, tx: TransmitterWorld | None = None
) -> tuple[TransmitterWorld, ReceiverWorld, DetectionRecords]:
    """Step a transmitter and a receiver world ``n_chunks`` times; all records joined."""
    tx = tx or TransmitterWorld(params.transmitter_side())
    rx = ReceiverWorld(params.receiver_side())
    parts = []
    for _ in range(n_chunks):
        index = tx.chunk_index
        chunk = tx.step()
        parts.append(rx.process(tx.fiber_header(index, chunk), chunk.photons))
    records = DetectionRecords(
        channel=np.concatenate([p.channel for p in parts]),
        time_ps=np.concatenate([p.time_ps for p in parts]),
        true_time_ps=np.concatenate([p.true_time_ps for p in parts]),
        slot=np.concatenate([p.slot for p in parts]),
    )
    tx.close()
    rx.close()
    return tx, rx, records
