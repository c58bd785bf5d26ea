"""The receiver's dark-count floor measured while key flows (the vacuum decoy class), both
halves in one process (tests/pair/harness.py).

The simulated receiver's detectors warm up a minute after power-on: their dark rates
rise 3000-fold with a 6 s time constant (a cooler failing, or stray light leaking into
the box), to tens of kHz in the gates. The link fades to ``no_light_fade_floor`` = 2 %
before it counts as cut (a link with deep fades), so a cut leaves more clicks than the
stale floor's threshold. With the in-flight measurement the floor follows the rise,
``dark_count_rise`` is raised and a fiber cut is seen as one (``no_light``); without it
the floor stays at the light-off calibration's value and the same cut is not seen as a
loss of light. A hostile value from the peer is refused with a clear error, the floor
and the exchange untouched.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from drivers.simlink.world import get_world
from qkdnode.lightloss import LightLossTest
from qkdnode.link import LinkError
from qkdnode.pair.scheduled import counted_slots, parse_dark_report
from qkdnode.statemachine import Event, State
from tests.pair.harness import InProcessPair, in_process_pair

RISE_START_S = 60.0
TAU_S = 6.0
FACTOR = 3000.0
FADE_FLOOR = 0.02


def _extra(track_interval_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    tx = {"calibration": {"dark_track_interval_s": track_interval_s, "dark_track_window_s": 8.0}}
    rx = {
        "alarms": {"no_light_fade_floor": FADE_FLOOR},
        "simulation": {
            "receiver": {
                "hardware": {
                    "drift": {
                        "dark_rate_factor": FACTOR,
                        "dark_rate_time_constant_s": TAU_S,
                        "dark_rate_rise_start_s": RISE_START_S,
                    }
                }
            }
        },
    }
    return tx, rx


def _rx_world(p: InProcessPair) -> Any:
    assert p.rx.backend is not None
    return get_world(p.rx.backend.name)


def _truth_hz(p: InProcessPair) -> float:
    """The dark clicks per second in the gates now (simulation truth, test only)."""
    return float(_rx_world(p).dark_rate_in_gates_hz(p.rx.cfg.source.slot_rate_hz))


def _sim_s(p: InProcessPair) -> float:
    return float(_rx_world(p)._true_end_ps) * 1e-12


async def _exchanging(p: InProcessPair) -> None:
    assert await p.drive(Event.CALIBRATE) is State.IDLE
    # the light-off calibration saw the detectors before the rise
    assert _sim_s(p) < RISE_START_S, "calibration took longer than the drift's delay"
    assert await p.drive(Event.SYNC) is State.IDLE
    await p.drive(Event.EXCHANGE)
    await p.wait_until("the receiver exchanging", lambda: p.rx.sm.state is State.EXCHANGING)


def _cut_seen_by(test: LightLossTest, dark_hz: float) -> bool:
    """Whether a cut (dark clicks only, at their mean) is a dark window for ``test``."""
    span = test.decision_window_s()
    return test.is_dark(int(dark_hz * span), span)


async def _hostile_values_refused(p: InProcessPair) -> None:
    session = p.rx.session
    floor = session.dark_rate_hz
    watch = session.light_watch
    assert watch is not None
    clicks = watch.reference_rate_hz
    hostile: list[tuple[dict[str, Any], str]] = [
        ({"rate_hz": -1.0, "lower_hz": 0.0, "upper_hz": 1.0}, "rate_hz = '-1.0' is not a rate"),
        ({"rate_hz": "12", "lower_hz": 0.0, "upper_hz": 20.0}, "rate_hz = '12' is not a rate"),
        ({"rate_hz": True, "lower_hz": 0.0, "upper_hz": 1.0}, "is not a rate"),
        ({"rate_hz": 5.0, "lower_hz": 0.0}, "upper_hz = 'None' is not a rate"),
        ({"rate_hz": 5.0, "lower_hz": 6.0, "upper_hz": 7.0}, "do not enclose"),
        ({"rate_hz": 1e300, "lower_hz": 1e300, "upper_hz": 1e300}, "above our own click rate"),
        ({"rate_hz": {"x": [1] * 1000}, "lower_hz": 0, "upper_hz": 1}, "is not a rate"),
    ]
    for args, message in hostile:
        with pytest.raises(LinkError, match="dark rate refused") as err:
            await p.tx.link.request("dark", 10.0, **args)
        assert message in str(err.value), str(err.value)
        assert session.dark_rate_hz == floor
        assert session.light_watch is watch and watch.dark_rate_hz == floor
    assert clicks is not None and watch.reference_rate_hz is not None
    assert p.rx.sm.state is State.EXCHANGING


@pytest.mark.system  # two to three minutes: `make test` keeps its budget
def test_floor_follows_the_drift_and_a_cut_is_seen(tmp_path: Path) -> None:
    tx_extra, rx_extra = _extra(2.0)

    async def go() -> None:
        async with in_process_pair(tmp_path, extra_tx=tx_extra, extra_rx=rx_extra) as p:
            await _exchanging(p)
            calibrated = p.rx.session.dark_calibrated
            assert calibrated is not None
            cal_rate, cal_lower, cal_upper = calibrated
            assert cal_lower <= _truth_hz(p) <= cal_upper
            await _hostile_values_refused(p)

            def followed() -> bool:
                assert p.rx.sm.state is State.EXCHANGING, p.rx.stats.last_failure
                settled = _sim_s(p) > RISE_START_S + 5 * TAU_S
                return settled and p.rx.session.dark_rate_hz > 0.7 * _truth_hz(p)

            await p.wait_until("the floor following the rise", followed, 240)
            truth = _truth_hz(p)
            floor = p.rx.session.dark_rate_hz
            assert truth > 1000 * cal_upper / 3  # the rise happened
            assert 0.7 * truth < floor < 1.1 * truth
            assert p.rx.alarms.is_active("dark_count_rise")
            assert p.tx.stats.blocks_ok > 0 and min(p.committed()) > 0
            # the result, as every calibration result: JSON with the instruments, a PNG
            cal_dir = p.tx.state_dir / "calibration"
            result = json.loads((cal_dir / "dark_inflight.json").read_text())
            assert result["risen"] and result["calibrated_upper_hz"] == pytest.approx(cal_upper)
            assert len(result["history"]) >= 3 and result["instruments"]
            latest = result["latest"]
            assert latest["lower_hz"] <= latest["rate_hz"] <= latest["upper_hz"]
            assert 0 < latest["acceptance_fraction"] < 1
            assert (cal_dir / "dark_inflight.png").stat().st_size > 10_000
            # the floor in force decides a cut correctly; the light-off floor would not
            watch = p.rx.session.light_watch
            assert watch is not None and watch.test() is not None
            test = watch.test()
            assert test is not None and test.sensitive
            stale = LightLossTest(
                test.reference_rate_hz,
                cal_rate,
                test.fade_floor,
                test.false_alarm_probability,
                test.window_s,
            )
            assert _cut_seen_by(test, truth) and not _cut_seen_by(stale, truth)
            # and the real cut
            assert p.tx.backend is not None
            get_world(p.tx.backend.name).inject("fiber_cut")
            await p.wait_until("no_light", lambda: p.rx.alarms.is_active("no_light"), 90)
            assert p.rx.sm.state is State.FAULT

    asyncio.run(go())


@pytest.mark.system
def test_without_the_update_a_cut_goes_unseen(tmp_path: Path) -> None:
    tx_extra, rx_extra = _extra(0.0)

    async def go() -> None:
        async with in_process_pair(tmp_path, extra_tx=tx_extra, extra_rx=rx_extra) as p:
            await _exchanging(p)
            calibrated = p.rx.session.dark_calibrated
            assert calibrated is not None

            def settled() -> bool:
                assert p.rx.sm.state is State.EXCHANGING, p.rx.stats.last_failure
                return _sim_s(p) > RISE_START_S + 5 * TAU_S

            await p.wait_until("the rise settled", settled, 240)
            assert p.rx.session.dark_rate_hz == calibrated[0]  # the light-off value stays
            assert not p.rx.alarms.is_active("dark_count_rise")
            assert not (p.tx.state_dir / "calibration" / "dark_inflight.json").exists()
            watch = p.rx.session.light_watch
            assert watch is not None
            test = watch.test()
            assert test is not None and test.sensitive  # it claims to see a cut...
            assert not _cut_seen_by(test, _truth_hz(p))  # ...and would not
            assert p.tx.backend is not None
            get_world(p.tx.backend.name).inject("fiber_cut")
            # several decision windows and the confirmation: no loss of light reported
            # (the clicks left are the warm detectors' dark counts, above the stale floor)
            await asyncio.sleep(max(20.0, 6 * test.decision_window_s()))
            assert not p.rx.alarms.is_active("no_light")

    asyncio.run(go())


def test_parse_dark_report_refuses_what_no_receiver_can_have() -> None:
    good = {"rate_hz": 50.0, "lower_hz": 40.0, "upper_hz": 60.0}
    assert parse_dark_report(good, 1e6) == (50.0, 40.0, 60.0)
    assert parse_dark_report({**good, "rate_hz": 50}, 1e6)[0] == 50.0
    for bad, message in [
        ({**good, "rate_hz": math.nan}, "rate_hz = 'nan' is not a rate"),
        ({**good, "upper_hz": math.inf}, "upper_hz = 'inf' is not a rate"),
        ({**good, "lower_hz": -0.5}, "lower_hz = '-0.5' is not a rate"),
        ({**good, "rate_hz": None}, "rate_hz = 'None' is not a rate"),
        ({**good, "rate_hz": False}, "rate_hz = 'False' is not a rate"),
        ({**good, "lower_hz": 55.0}, "do not enclose"),
        ({**good, "rate_hz": "x" * 10_000}, "is not a rate"),
    ]:
        with pytest.raises(LinkError, match="dark rate refused") as err:
            parse_dark_report(bad, 1e6)
        assert message in str(err.value)
        assert len(str(err.value)) < 200
    with pytest.raises(LinkError, match="above our own click rate"):
        parse_dark_report(good, 45.0)
    with pytest.raises(LinkError, match="no click rate of our own"):
        parse_dark_report(good, 0.0)


def test_a_block_counts_its_span_less_the_withheld_windows() -> None:
    # block [1000, 2000): one window inside, one straddling its start, one after it
    withheld = [(900, 1100), (1500, 1600), (2000, 2500)]
    assert counted_slots(1000, 2000, 900, withheld) == 1000 - 100 - 100
    assert counted_slots(1000, 2000, 1000, []) == 1000
    assert counted_slots(1000, 2000, 1001, []) is None  # a span below the old floor
    assert counted_slots(100, 2000, 0, [(1800, 2100)]) is None  # all withheld
    assert counted_slots(0, 2000, 0, []) is None
