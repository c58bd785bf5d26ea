"""Ten minutes of the default SU(2) drift, with and without the receiver's polarisation
compensation, in simulated time (both worlds and the compensation in one process; the
node's step and the real simulated controller driver)."""

from __future__ import annotations

import numpy as np

from tests.polarization.loop import CompensatedLink, floor_qber
from tests.simlink.helpers import link

BAND = 0.005  # the acceptance band: within 0.5 % (absolute) of the floor
MINUTES = 10


def test_default_drift_is_held_within_half_a_percent_of_the_floor_for_ten_minutes() -> None:
    params = link(chunk_slots=1 << 19, fiber={"polarization": {}})  # the default drift
    assert params.fiber.polarization is not None
    assert params.fiber.polarization.drift_rad_per_sqrt_s == 0.01
    floor_z, floor_x = floor_qber(params, 10.0)
    results = {}
    for name, interval in (("compensated", 2.0), ("plain", None)):
        run_link = CompensatedLink(params, interval_s=interval)
        try:
            run = run_link.run(MINUTES * 60.0, bin_s=10.0, sample_every=2)
        finally:
            run_link.close()
        qz = np.array([s.qber_z for s in run.samples])
        qx = np.array([s.qber_x for s in run.samples])
        results[name] = (float(np.max(qz - floor_z)), float(np.max(qx - floor_x)), run)
    worst_z, worst_x, run = results["compensated"]
    assert len(run.samples) >= MINUTES * 6 - 1
    assert worst_z < BAND and worst_x < BAND, (worst_z, worst_x)
    # the same drift without the compensation leaves the band (the test can fail)
    plain_z, plain_x, _ = results["plain"]
    assert max(plain_z, plain_x) > BAND, (plain_z, plain_x)
