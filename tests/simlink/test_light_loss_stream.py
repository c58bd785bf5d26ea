"""The light-loss test on the simulated tag stream itself (blocks, spans, dark counts):
no dark window on a healthy link, a cut confirmed within three windows, at about 10 k and
about 1 M detections/s."""

from __future__ import annotations

import pytest

from drivers.simlink.world import ReceiverWorld, TransmitterWorld
from qkdnode.lightloss import LightWatch, Verdict
from tests.simlink.helpers import link


@pytest.mark.parametrize(
    ("efficiency", "rate_low", "rate_high"), [(0.005, 5e3, 3e4), (0.6, 5e5, 3e6)]
)
def test_a_healthy_stream_never_looks_dark_and_a_cut_is_confirmed(
    efficiency: float, rate_low: float, rate_high: float
) -> None:
    params = link(
        receiver={"detector_efficiency": [efficiency] * 4, "dark_count_rates_hz": [1000.0] * 4}
    )
    tx = TransmitterWorld(params.transmitter_side())
    rx = ReceiverWorld(params.receiver_side())
    rx.start_stream()
    watch = LightWatch()
    seconds = 0.0

    def step() -> Verdict:
        nonlocal seconds
        index = tx.chunk_index
        chunk = tx.step()
        rx.process(tx.fiber_header(index, chunk), chunk.photons)
        block = rx.read_block(0.0)
        assert block is not None
        seconds += (block.stop_ps - block.start_ps) * 1e-12
        return watch.add_block(len(block), block.start_ps, block.stop_ps)

    try:
        verdicts = [step() for _ in range(round(8.0 / 0.042))]  # about 8 s of light
        assert Verdict.SUSPECT not in verdicts and Verdict.GONE not in verdicts
        assert watch.reference_rate_hz is not None
        assert rate_low < watch.reference_rate_hz < rate_high
        assert watch.windows_decided >= 6
        tx.inject("fiber_cut")
        cut_at = seconds
        while step() is not Verdict.GONE:
            assert seconds - cut_at < 5.0, "the cut was not confirmed within 5 s"
        assert seconds - cut_at <= 4.1  # three 1 s windows, plus the one the cut fell in
        assert "fiber cut" in watch.explain()
    finally:
        rx.close()
        tx.close()
