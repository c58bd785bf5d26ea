"""The compensation closed around the simulated link: a touched fiber (a jump of the
SU(2) rotation) is undone within seconds of link time, and the drift in between is held
at the misalignment floor. (Ten minutes of drift: tests/system/test_polarization_drift.py.)"""

from __future__ import annotations

import numpy as np

from tests.polarization.loop import CompensatedLink, floor_qber
from tests.simlink.helpers import link

#: the acceptance band: the link's error rate within 0.5 % (absolute) of the floor
BAND = 0.005
JUMP_AT_S = 5.0


def _params():  # type: ignore[no-untyped-def]
    return link(
        chunk_slots=1 << 19,  # 21 ms: a window is one chunk, about 25 000 detections
        fiber={"polarization": {"jump_times_s": (JUMP_AT_S,), "jump_angle_rad": 2.0}},
    )


def test_a_touched_fiber_is_back_at_the_floor_within_five_seconds() -> None:
    params = _params()
    floor_z, floor_x = floor_qber(params, 2.0)
    compensated = CompensatedLink(params)
    try:
        run = compensated.run(JUMP_AT_S + 6.0, bin_s=0.25)
    finally:
        compensated.close()
    before = [s for s in run.samples if s.t_s + 0.25 <= JUMP_AT_S]
    hit = [s for s in run.samples if JUMP_AT_S <= s.t_s < JUMP_AT_S + 0.5]
    after = [s for s in run.samples if s.t_s >= JUMP_AT_S + 5.0]
    assert before and hit and after
    # held at the floor before, the jump costs tens of per cent, then back within 5 s
    assert max(s.qber_z - floor_z for s in before) < BAND
    assert max(s.qber_x - floor_x for s in before) < BAND
    assert min(s.qber_z for s in hit) > floor_z + 0.1
    assert max(s.qber_z - floor_z for s in after) < BAND
    assert max(s.qber_x - floor_x for s in after) < BAND
    recovered = min(
        s.t_s
        for s in run.samples
        if s.t_s > JUMP_AT_S
        and all(
            t.qber_z - floor_z < BAND and t.qber_x - floor_x < BAND
            for t in run.samples
            if t.t_s >= s.t_s
        )
    )
    assert recovered - JUMP_AT_S < 5.0
    # the jump was seen as one (gain 1, the next step at once)
    jump_steps = [step for t, step in run.steps if t > JUMP_AT_S and step.again]
    assert jump_steps and jump_steps[0].estimate.error_rad > 1.5
    # what the compensation disclosed: two windows every 2 s, about 2 % of the detections,
    # and the jump's confirmation and follow-up steps
    share = run.disclosed_chunks / (run.disclosed_chunks + run.key_chunks)
    assert share < 0.035


def test_without_compensation_the_jump_stays() -> None:
    """The control: the same link and jump, no compensation."""
    params = _params()
    floor_z, _ = floor_qber(params, 1.0)
    plain = CompensatedLink(params, interval_s=None)
    try:
        run = plain.run(JUMP_AT_S + 3.0, bin_s=1.0, sample_every=4)
    finally:
        plain.close()
    after = [s.qber_z for s in run.samples if s.t_s >= JUMP_AT_S + 1.0]
    assert after and float(np.min(after)) > floor_z + 0.1
