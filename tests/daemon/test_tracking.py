"""Drift tracking: the lock-in estimate, the receiver's diversion of window detections and
the transmitter's refusal of any block that announces a window slot."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from qkdnode.postproc.sifting import KeySlotFloor, SiftingError
from qkdnode.tracking import (
    DetectionAccumulator,
    TrackingError,
    TrackingWindow,
    bias_offset_v,
    next_bias_v,
)

V_PI = 2.9


def _qber(bias: float, b_star: float, e0: float = 0.012, amp: float = 0.98) -> float:
    return e0 + amp * math.sin(math.pi / 2 * (bias - b_star) / V_PI) ** 2


@pytest.mark.parametrize("offset", [-0.6, -0.2, -0.03, 0.0, 0.01, 0.3, 0.9])
def test_offset_from_two_dithered_error_rates(offset: float) -> None:
    """The model QBER(b) = e0 + A sin^2(k (b - b*)) at b +/- dither gives b - b* back."""
    b_star, dither = 0.8, 0.03 * V_PI
    b = b_star + offset
    est = bias_offset_v(
        _qber(b + dither, b_star),
        _qber(b - dither, b_star),
        dither_v=dither,
        v_pi_v=V_PI,
        amplitude=0.98,
    )
    assert est == pytest.approx(offset, abs=1e-9)


def test_offset_saturates_with_the_right_sign_beyond_the_capture_range() -> None:
    b_star, dither = 0.0, 0.1 * V_PI
    far = 0.7 * V_PI  # 63 degrees of polarisation: past the monotone range of sin(2 k eps)
    est = bias_offset_v(
        _qber(far + dither, b_star), _qber(far - dither, b_star), dither_v=dither, v_pi_v=V_PI
    )
    assert est > 0


def test_step_is_limited_and_moves_towards_the_minimum() -> None:
    dither = 0.03 * V_PI
    b = 1.5
    offset, new = next_bias_v(
        b,
        _qber(b + dither, 0.8),
        _qber(b - dither, 0.8),
        dither_v=dither,
        v_pi_v=V_PI,
        gain=0.5,
        max_step_v=0.1,
        amplitude=0.98,
    )
    assert offset == pytest.approx(0.7, abs=1e-6)
    assert new == pytest.approx(1.4)


@pytest.mark.parametrize(("dither", "v_pi"), [(0.0, V_PI), (-0.1, V_PI), (0.1, 0.0), (V_PI, V_PI)])
def test_bad_dither_or_v_pi_refused(dither: float, v_pi: float) -> None:
    with pytest.raises(TrackingError):
        bias_offset_v(0.02, 0.01, dither_v=dither, v_pi_v=v_pi)


def test_window_must_be_non_empty() -> None:
    with pytest.raises(TrackingError):
        TrackingWindow(10, 10)
    with pytest.raises(TrackingError):
        TrackingWindow(-1, 5)


def _batch(start: int, stop: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    s = np.arange(start, stop, step, dtype=np.int64)
    return s, (s % 4).astype(np.int8)


def test_window_detections_never_reach_a_block() -> None:
    async def run() -> None:
        acc = DetectionAccumulator()
        acc.add(*_batch(0, 1000))
        # Accepted late: slots 900..1099 partly collected already; they move to the sample.
        done = acc.open_window(TrackingWindow(900, 1100))
        acc.add(*_batch(1000, 1050))
        assert not done.done()
        acc.add(*_batch(1050, 3000))
        assert done.done()
        slots, chans = done.result()
        assert slots.tolist() == list(range(900, 1100))
        assert chans.tolist() == [s % 4 for s in range(900, 1100)]
        # late detections of a closed window are dropped, never keyed
        acc.add(np.array([950, 3000], dtype=np.int64), np.array([1, 2], dtype=np.int8))
        block = acc.cut(1500)
        assert block is not None
        bs, _ = block
        assert not np.any((bs >= 900) & (bs < 1100))
        assert bs.size >= 1500 and np.all(np.diff(bs) >= 0)
        assert acc.diverted == 200

    asyncio.run(run())


def test_window_inside_a_block_already_cut_is_refused() -> None:
    async def run() -> None:
        acc = DetectionAccumulator()
        acc.add(*_batch(0, 2000))
        assert acc.cut(1000) is not None
        with pytest.raises(TrackingError, match="already cut"):
            acc.open_window(TrackingWindow(500, 600))
        done = acc.open_window(TrackingWindow(1000, 1010))
        with pytest.raises(TrackingError, match="overlaps"):
            acc.open_window(TrackingWindow(1005, 1020))
        acc.add(*_batch(2000, 2100))
        assert done.result()[0].tolist() == list(range(1000, 1010))

    asyncio.run(run())


def test_abandoned_window_stays_excluded() -> None:
    async def run() -> None:
        acc = DetectionAccumulator()
        done = acc.open_window(TrackingWindow(100, 200))
        acc.abandon(done)
        acc.add(*_batch(0, 400))
        block = acc.cut(10)
        assert block is not None
        assert not np.any((block[0] >= 100) & (block[0] < 200))
        assert not done.done()

    asyncio.run(run())


def test_a_skip_overlapping_a_tracking_window_is_excluded_whole() -> None:
    """A withheld window that runs into a tracking window the receiver already accepted
    (an IM-bias window extended past its end): every slot of it stays out of the blocks,
    the tracking window still gets its own detections, and the slots beyond are keyed.
    Refusing the overlap instead left the uncovered part keyed here but withheld at the
    transmitter, which then aborted the block."""

    async def run() -> None:
        acc = DetectionAccumulator()
        acc.add(*_batch(0, 500))  # collected before the skip arrives: 300..499 leave too
        done = acc.open_window(TrackingWindow(400, 600))
        acc.exclude(TrackingWindow(300, 800))
        acc.add(*_batch(500, 2000))
        assert done.result()[0].tolist() == list(range(400, 600))
        block = acc.cut(1000)
        assert block is not None
        bs = block[0]
        assert not np.any((bs >= 300) & (bs < 800))
        assert bs.tolist()[:300] == list(range(300)) and bs[300] == 800
        with pytest.raises(TrackingError, match="already cut"):
            acc.exclude(TrackingWindow(900, 1000))

    asyncio.run(run())


def test_cut_keeps_the_clicks_of_one_slot_together() -> None:
    async def run() -> None:
        acc = DetectionAccumulator()
        s = np.array([1, 2, 2, 3, 4, 4, 5], dtype=np.int64)
        acc.add(s, np.zeros(7, dtype=np.int8))
        block = acc.cut(3)  # the 3rd detection is in slot 2, whose 2 clicks stay together
        assert block is not None and block[0].tolist() == [1, 2, 2]
        rest = acc.cut(4)
        assert rest is not None and rest[0].tolist() == [3, 4, 4, 5]

    asyncio.run(run())


def test_transmitter_refuses_a_block_announcing_a_window_slot() -> None:
    floor = KeySlotFloor(100)
    floor.withhold(500, 600)
    with pytest.raises(SiftingError, match="tracking window"):
        floor.claim(np.array([200, 300, 599, 700], dtype=np.int64))
    assert floor.floor == 100  # a refused announcement moves nothing
    floor.claim(np.array([200, 499, 600, 700], dtype=np.int64))  # around the window: fine
    assert floor.floor == 701
    assert floor.withheld == []  # below the floor now: forgotten
    floor.withhold(800, 900)
    with pytest.raises(SiftingError, match="tracking window"):
        floor.claim(np.array([800], dtype=np.int64))


def test_claim_counts_the_withheld_slots_a_block_spans() -> None:
    floor = KeySlotFloor(0)
    floor.withhold(100, 150)  # inside the first block's span
    floor.withhold(200, 230)  # inside too
    floor.withhold(5, 8)  # before its first slot: not in its span
    floor.withhold(400, 410)  # beyond its last slot: the next block's
    assert floor.claim(np.array([10, 99, 150, 300], dtype=np.int64)) == 50 + 30
    assert floor.claim(np.array([320, 399, 410, 420], dtype=np.int64)) == 10
    assert floor.claim(np.array([500, 600], dtype=np.int64)) == 0


def test_a_shortened_window_gives_its_end_back_to_the_key_and_nothing_else() -> None:
    floor = KeySlotFloor(0)
    floor.withhold(1000, 3000)
    # a range only shrinks: no growing, no emptying, no range that was never withheld
    for stop, end in ((3000, 3500), (3000, 1000), (2999, 2000), (4000, 2000)):
        with pytest.raises(SiftingError):
            floor.shorten(1000, stop, end)
    floor.shorten(1000, 3000, 1200)
    assert floor.withheld == [(1000, 1200)]
    with pytest.raises(SiftingError, match="tracking window"):
        floor.claim(np.array([900, 1199], dtype=np.int64))  # still withheld
    assert floor.claim(np.array([900, 999, 1200, 2500], dtype=np.int64)) == 200


def test_receiver_shortens_only_a_dropped_window() -> None:
    async def run() -> None:
        acc = DetectionAccumulator()
        dropped = TrackingWindow(100, 300)
        acc.abandon(acc.open_window(dropped))
        acc.add(*_batch(0, 150))  # 100..149 arrive before the window is shortened
        short = acc.shorten(dropped, 120)
        assert short == TrackingWindow(100, 120)
        with pytest.raises(TrackingError, match="no dropped window"):
            acc.shorten(dropped, 110)  # the old window is gone
        with pytest.raises(TrackingError, match="only shrinks"):
            acc.shorten(short, 130)
        # a window whose detections were disclosed never shrinks
        disclosed = TrackingWindow(400, 450)
        sample = acc.open_window(disclosed)
        acc.add(*_batch(150, 600))
        assert sample.done()
        with pytest.raises(TrackingError, match="no dropped window"):
            acc.shorten(disclosed, 420)
        block = acc.cut(acc.have)
        assert block is not None
        kept = set(block[0].tolist())
        assert kept.isdisjoint(range(100, 150))  # dropped before the shortening: gone
        assert set(range(150, 300)) <= kept  # after it: key again
        assert kept.isdisjoint(range(400, 450))

    asyncio.run(run())


def test_windows_waiting_when_collection_stops_fail_at_once() -> None:
    async def run() -> None:
        acc = DetectionAccumulator()
        done = acc.open_window(TrackingWindow(100, 200))
        acc.close("stopped")
        with pytest.raises(TrackingError, match="stopped"):
            await done

    asyncio.run(run())


def test_a_peer_channel_that_cannot_send_is_a_link_error() -> None:
    """Callers of the pair coordination handle LinkError (abandon an activation, skip a
    tracking step); a channel that raises its own error when the peer is gone must not
    slip past them."""
    from qkdnode.link import LinkCoordinator, LinkError

    class Gone(RuntimeError):
        pass

    async def send(kind: str, header: dict[str, object]) -> None:
        raise Gone("no live peer connection")

    async def run() -> None:
        link = LinkCoordinator(send)
        with pytest.raises(LinkError, match="no live peer connection"):
            await link.request("track", 1.0, start_slot=1, stop_slot=2)

    asyncio.run(run())


def test_steps_are_spaced_so_windows_stay_a_small_share_of_the_detections() -> None:
    from qkdnode.config.sections import TrackingSection
    from qkdnode.tracking import step_interval_s

    cfg = TrackingSection()  # 10 s, 2 x 20 000 detections, at most 2 %
    assert step_interval_s(cfg, 1.2e6) == 10.0  # 25 km: 0.3 % of the detections
    assert step_interval_s(cfg, 36e3) == pytest.approx(40_000 / (0.02 * 36e3))  # 100 km
    assert step_interval_s(cfg, 0.0) == 10.0
    for rate in (1e4, 3e4, 1e5, 1e6, 1e7):
        seconds = step_interval_s(cfg, rate)
        assert 2 * cfg.window_detections <= 0.02 * rate * seconds * (1 + 1e-12)


def test_a_step_stopped_while_the_bias_is_put_back_leaves_nothing_behind() -> None:
    """The exchange stops (the step is cancelled) just while the bias is being put back
    after a window whose request the peer refused: the bias still ends where it began,
    and the refusal is not left as a never-retrieved task error."""
    import gc
    import threading

    from qkdnode.config.sections import TrackingSection
    from qkdnode.link import LinkError
    from qkdnode.tracking import lock_in_step

    restoring, release = threading.Event(), threading.Event()

    class Encoder:
        bias_range_v = (-5.0, 5.0)

        def __init__(self) -> None:
            self.volts = 1.0
            self.sets: list[float] = []

        def bias_v(self) -> float:
            return self.volts

        def set_bias_v(self, volts: float) -> None:
            self.sets.append(volts)
            if len(self.sets) == 3:  # the restore after both dithered windows
                restoring.set()
                release.wait(5.0)
            self.volts = volts

    class Source:
        slot = 0

        def next_slot(self) -> int:
            self.slot += 10_000
            return self.slot

    async def refused(window: TrackingWindow) -> tuple[np.ndarray, np.ndarray]:
        raise LinkError("peer refused 'track': the receiver stopped collecting detections")

    async def main() -> tuple[list[str], Encoder]:
        unretrieved: list[str] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx["message"]))
        encoder = Encoder()
        step = asyncio.ensure_future(
            lock_in_step(
                encoder,  # type: ignore[arg-type]
                Source(),  # type: ignore[arg-type]
                refused,
                TrackingSection(),
                v_pi_v=V_PI,
                detections_per_slot=1.0,
                poll_s=0.0,
            )
        )
        await asyncio.to_thread(restoring.wait, 5.0)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        release.set()
        await asyncio.sleep(0.05)  # the restoring thread finishes
        del step
        gc.collect()
        await asyncio.sleep(0)
        return unretrieved, encoder

    unretrieved, encoder = asyncio.run(main())
    assert unretrieved == []
    assert encoder.sets[0] != 1.0 and encoder.volts == 1.0
