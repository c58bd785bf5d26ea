"""Calibration on a schedule while key flows, both halves in one process: the
transmitter's intensity-modulator bias drifts (about 10 times faster than a real one's)
and its node tracks it in windows withheld from the key. Key flows throughout, the
stores stay identical, and the intervals the bound uses hold the truth; without the
tracking the decoy leaves its interval while the exchange goes on.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from drivers.simlink.world import get_world
from qkdnode.statemachine import Event, State
from tests.pair.harness import InProcessPair, in_process_pair

DRIFT_V_PER_S = 0.001  # about 10 times a real modulator's


WINDOW_S = 0.2


def _tx_extra(interval_s: float) -> dict[str, Any]:
    return {
        "calibration": {"bias_track_interval_s": interval_s, "bias_track_window_s": WINDOW_S},
        "simulation": {"transmitter": {"hardware": {"drift": {"im_bias_v_per_s": DRIFT_V_PER_S}}}},
    }


def _decoy_holds(p: InProcessPair) -> bool:
    """The world's true intensities within the set the bound uses (each class within its
    class bounds times one common factor; truth read in the test only). Not while the
    transmitter dithers its bias or measures: those slots are withheld from every block
    (checked without an await in between: no dither starts meanwhile)."""
    if p.tx.session._im_lock.locked():
        return True
    assert p.tx.backend is not None
    world: Any = get_world(p.tx.backend.name)
    m = p.tx.session.intensities
    return bool(m.admits(world.mu_per_class()))


def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.system  # a minute or two: `make test` keeps its budget
def test_bias_tracked_while_key_flows(tmp_path: Path) -> None:
    async def go() -> None:
        with structlog.testing.capture_logs() as logs:
            await exchange()
        # each window ended shortly after its step, not at its planned end: the rest of
        # it carried key (the receiver kept those detections: the stores still agree)
        windows = [e["window_slots"] for e in logs if e.get("event") == "im_bias_tracked"]
        assert len(windows) >= 8
        planned = int(WINDOW_S * rate_hz[0])
        assert sum(w < planned for w in windows) >= len(windows) // 2, (windows, planned)

    rate_hz: list[float] = []

    async def exchange() -> None:
        async with in_process_pair(tmp_path, extra_tx=_tx_extra(2.0)) as p:
            rate_hz.append(p.tx.cfg.source.slot_rate_hz)
            assert await p.drive(Event.CALIBRATE) is State.IDLE
            assert await p.drive(Event.SYNC) is State.IDLE
            await p.drive(Event.EXCHANGE)
            await p.wait_until("the receiver exchanging", lambda: p.rx.sm.state is State.EXCHANGING)
            cal_tx = p.tx.state_dir / "calibration"
            cal_rx = p.rx.state_dir / "calibration"
            committed_at_start = p.committed()
            seen_hold: list[bool] = []

            def progressed() -> bool:
                assert p.rx.sm.state is State.EXCHANGING, p.rx.stats.last_failure
                seen_hold.append(_decoy_holds(p))
                path = cal_tx / "bias_tracking.json"
                steps = len(_read(path)["history"]) if path.exists() else 0
                return steps >= 8 and min(p.committed()) > max(committed_at_start)

            await p.wait_until("tracking steps and key", progressed, 240)
            assert p.tx.sm.state is State.EXCHANGING and p.rx.sm.state is State.EXCHANGING
            assert all(seen_hold), "the decoy left its interval while tracked"
            tracked = _read(cal_tx / "bias_tracking.json")
            assert tracked["action"] == "hold"
            assert {s["name"] for s in tracked["instruments"]} >= {"intensity_modulator"}
            # the receiver's dark counts of its calibration, with their Poisson bounds
            dark = _read(cal_rx / "dark_rate.json")
            assert all(d["lower_hz"] <= d["rate_hz"] <= d["upper_hz"] for d in dark["detectors"])
            assert p.tx.stats.blocks_aborted == 0 and p.rx.stats.blocks_aborted == 0
            await p.tx.sm.trigger(Event.STOP, "test")
            await p.wait_until("both idle", lambda: p.rx.sm.state is State.IDLE)
            digests = [await n.session.keys_digest() for n in p.nodes]
            assert digests[0] == digests[1] and digests[0]["count"] > 0

    asyncio.run(go())


@pytest.mark.system
def test_without_tracking_the_decoy_leaves_its_interval_unnoticed(tmp_path: Path) -> None:
    """The same drift, tracking off: the decoy leaves its interval while the exchange
    goes on (the 10 s tap-power check sees the key mixture, dominated by the signal):
    the bound would run on a wrong intensity."""

    async def go() -> None:
        async with in_process_pair(tmp_path, extra_tx=_tx_extra(0.0)) as p:
            assert await p.drive(Event.CALIBRATE) is State.IDLE
            assert await p.drive(Event.SYNC) is State.IDLE
            await p.drive(Event.EXCHANGE)
            await p.wait_until("the decoy out of its interval", lambda: not _decoy_holds(p), 240)
            assert p.tx.sm.state is State.EXCHANGING
            await p.tx.sm.trigger(Event.STOP, "test")

    asyncio.run(go())


@pytest.mark.system
def test_fast_bias_drift_shortens_the_tracking_interval(tmp_path: Path) -> None:
    """A drift three times the one above with the tracking on a 6 s interval: between
    two steps at that interval the bias would move by 18 mV, the decoy by about 3 % and
    the vacuum (near the curve's minimum) by over 10 %, while the tap power of the
    mixture barely moves. The per-class check sees each class's change and shortens the
    interval (towards its 0.5 s floor here): the decoy stays within its interval whenever
    it is checked, and key flows."""
    extra = _tx_extra(6.0)
    extra["calibration"]["bias_track_min_interval_s"] = 0.5
    extra["simulation"]["transmitter"]["hardware"]["drift"]["im_bias_v_per_s"] = 3 * DRIFT_V_PER_S

    async def go() -> None:
        async with in_process_pair(tmp_path, extra_tx=extra) as p:
            assert await p.drive(Event.CALIBRATE) is State.IDLE
            assert await p.drive(Event.SYNC) is State.IDLE
            await p.drive(Event.EXCHANGE)
            await p.wait_until("the receiver exchanging", lambda: p.rx.sm.state is State.EXCHANGING)
            cal_tx = p.tx.state_dir / "calibration"
            committed_at_start = p.committed()
            seen_hold: list[bool] = []
            intervals: list[float] = []

            def progressed() -> bool:
                assert p.tx.sm.state is State.EXCHANGING, p.tx.stats.last_failure
                seen_hold.append(_decoy_holds(p))
                state = p.tx.session.class_drift
                if state is not None:
                    intervals.append(state.interval_s)
                path = cal_tx / "bias_tracking.json"
                steps = len(_read(path)["history"]) if path.exists() else 0
                return steps >= 12 and min(p.committed()) > max(committed_at_start)

            await p.wait_until("tracking steps and key", progressed, 240)
            assert all(seen_hold), "the decoy left its interval while tracked"
            assert min(intervals) <= 1.5
            tracked = _read(cal_tx / "bias_tracking.json")
            assert tracked["action"] == "hold" and tracked["mixture_action"] == "hold"
            per_class = tracked["per_class"]
            assert per_class["drift_rate_v_per_s"] is not None
            assert abs(per_class["drift_rate_v_per_s"]) > 1.5 * DRIFT_V_PER_S
            changes = [h["class_change"] for h in tracked["history"] if h["class_change"]]
            assert max(abs(c[1]) for c in changes) <= 0.05  # the decoy, every step
            await p.tx.sm.trigger(Event.STOP, "test")
            await p.wait_until("both idle", lambda: p.rx.sm.state is State.IDLE)

    asyncio.run(go())
