"""The alarm board and the key-flow watch: every condition raised and cleared."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from qkdnode.alarms import ALARMS, AlarmBoard, Severity
from qkdnode.config.sections import AlarmsSection
from qkdnode.keyflow import KeyFlow, Resources
from qkdnode.watch import DEFAULT_BLOCK_S, Snapshot, evaluate, expected_block_s


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def board() -> tuple[AlarmBoard, list[tuple[str, dict[str, Any]]]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    return AlarmBoard(lambda topic, payload: sent.append((topic, payload))), sent


def test_raise_is_idempotent_and_clear_publishes_once() -> None:
    b, sent = board()
    assert b.raise_("no_key", "nothing for 300 s")
    assert not b.raise_("no_key", "nothing for 310 s")  # still one alarm, cause updated
    assert [a.cause for a in b.active()] == ["nothing for 310 s"]
    assert b.critical()
    assert b.clear("no_key", "block committed")
    assert not b.clear("no_key")
    assert not b.critical()
    kinds = [(t, p["event"], p["name"]) for t, p in sent]
    assert kinds == [("alarm", "raise", "no_key"), ("alarm", "clear", "no_key")]
    assert sent[0][1]["severity"] == "critical"
    assert b.known()[0].raised_count == 1
    b.raise_("no_key", "again")
    assert b.known()[0].raised_count == 2


def test_active_alarms_are_ordered_by_severity_then_age() -> None:
    b, _ = board()
    b.raise_("qber_high", "x")
    b.raise_("calibration_stale", "y")
    b.raise_("peer_down", "z")
    assert [a.name for a in b.active()] == ["peer_down", "qber_high", "calibration_stale"]
    assert b.active()[0].severity is Severity.CRITICAL


def test_every_alarm_is_documented() -> None:
    text = (Path(__file__).parents[2] / "docs" / "alarms.md").read_text()
    missing = [name for name in ALARMS if f"`{name}`" not in text]
    assert not missing, f"alarms not in docs/alarms.md: {missing}"


def snap(**kw: Any) -> Snapshot:
    base: dict[str, Any] = {
        "now": 10_000.0,
        "role": "transmitter",
        "state": "EXCHANGING",
        "should_produce": True,
        "producing_since": 0.0,
        "peer_connected": True,
        "peer_down_since": None,
        "peer_state": "EXCHANGING",
        "peer_state_mismatch_since": None,
        "exchanging_since": 9_000.0,
        "last_commit_at": 9_990.0,
        "block_intervals_s": [10.0, 12.0, 11.0],
        "block_detections": 8_000_000,
        "detection_rate_hz": 0.0,
        "consecutive_aborts": 0,
        "last_abort_reason": None,
        "auth_balance_bits": 1_000_000,
        "auth_bits_per_block": 4000,
        "disk_free_bytes": 50 * 10**9,
        "disk_total_bytes": 100 * 10**9,
        "instruments_down": [],
        "last_qber": 0.02,
        "qber_warning": 0.04,
        "calibrated_at": 9_000.0,
    }
    base.update(kw)
    return Snapshot(**base)


def active(s: Snapshot) -> set[str]:
    return {name for name, (on, _) in evaluate(s).items() if on}


def test_a_healthy_exchanging_link_raises_nothing() -> None:
    assert active(snap()) == set()


def test_no_key_after_several_expected_block_times() -> None:
    # median interval 11 s -> limit max(60, 4 * 11) = 60 s
    assert "no_key" not in active(snap(last_commit_at=9_950.0))
    s = snap(last_commit_at=9_930.0)
    assert "no_key" in active(s)
    assert "70 s" in evaluate(s)["no_key"][1]
    # slow blocks: limit follows them (4 x 100 s)
    assert "no_key" not in active(snap(block_intervals_s=[100.0], last_commit_at=9_700.0))
    assert "no_key" in active(snap(block_intervals_s=[100.0], last_commit_at=9_590.0))


def test_no_key_when_exchanging_and_no_block_ever() -> None:
    s = snap(last_commit_at=None, block_intervals_s=[], exchanging_since=10_000.0 - 241)
    assert expected_block_s(s) == DEFAULT_BLOCK_S
    assert "no_key" in active(s)
    assert "no_key" not in active(dataclasses.replace(s, exchanging_since=9_900.0))


def test_no_key_when_the_link_should_produce_but_is_not_exchanging() -> None:
    assert "no_key" not in active(snap(state="IDLE", producing_since=9_500.0))
    assert "no_key" in active(snap(state="IDLE", producing_since=9_000.0))
    # an operator stopped the link: not expected to produce, no alarm
    assert "no_key" not in active(snap(state="IDLE", should_produce=False))


def test_aborts_auth_disk_peer_pair_instruments_qber_calibration() -> None:
    assert "blocks_aborting" in active(snap(consecutive_aborts=3, last_abort_reason="qber"))
    assert "blocks_aborting" not in active(snap(consecutive_aborts=2))
    assert "auth_pool_low" in active(snap(auth_balance_bits=3000))
    assert "auth_pool_low" in active(
        snap(auth_bits_per_block=None, last_abort_reason="AuthPoolExhaustedError: pool")
    )
    assert "disk_nearly_full" in active(snap(disk_free_bytes=100_000_000))
    assert "disk_nearly_full" in active(snap(disk_free_bytes=10**9, disk_total_bytes=10**12))
    assert "peer_down" in active(snap(peer_connected=False, peer_down_since=9_900.0))
    assert "peer_down" not in active(snap(peer_connected=False, peer_down_since=9_995.0))
    assert "pair_inconsistent" in active(snap(peer_state="IDLE", peer_state_mismatch_since=9_900.0))
    assert "pair_inconsistent" not in active(
        snap(peer_state="IDLE", peer_state_mismatch_since=9_990.0)
    )
    assert "instrument_down" in active(snap(instruments_down=["tagger"]))
    assert "qber_high" in active(snap(last_qber=0.05))
    assert "calibration_stale" in active(snap(calibrated_at=10_000.0 - 8 * 86400))


def test_thresholds_come_from_the_config() -> None:
    cfg = AlarmsSection(aborted_blocks=1, no_key_min_s=5, no_key_block_factor=2)
    assert "blocks_aborting" in active(snap(cfg=cfg, consecutive_aborts=1))
    assert "no_key" in active(snap(cfg=cfg, last_commit_at=10_000.0 - 23))


@pytest.mark.parametrize("role", ["transmitter", "receiver"])
def test_key_flow_raises_and_clears_through_the_board(tmp_path: Path, role: str) -> None:
    clock = Clock()
    b, sent = board()
    flow = KeyFlow(
        b,
        AlarmsSection(not_exchanging_grace_s=10, no_key_min_s=5),
        role=role,
        block_detections=1000,
        qber_warning=0.04,
        state_dir=tmp_path,
        clock=clock,
    )
    res = Resources(state="IDLE", auth_balance_bits=10**6, instruments_down=[], detection_rate_hz=0)
    flow.peer_link(True)
    if role == "transmitter":
        flow.producing(True)
    else:
        flow.peer_status("EXCHANGING", True)  # the transmitter says it wants key
    flow.state_changed("IDLE")
    clock.t += 11
    flow.evaluate(res)
    assert b.is_active("no_key")
    # the pair starts exchanging and a block commits: cleared
    flow.state_changed("EXCHANGING")
    clock.t += 1
    flow.block_committed()
    flow.evaluate(dataclasses.replace(res, state="EXCHANGING"))
    assert not b.is_active("no_key")
    # FAULT is an alarm while it lasts
    flow.state_changed("FAULT")
    assert b.is_active("fault") and b.critical()
    flow.state_changed("IDLE")
    assert not b.is_active("fault")
    events = [(p["event"], p["name"]) for _, p in sent]
    assert events[:2] == [("raise", "no_key"), ("clear", "no_key")]


def test_grace_restarts_when_exchange_stops_and_fault_causes_clear(tmp_path: Path) -> None:
    clock = Clock()
    b, _ = board()
    flow = KeyFlow(
        b,
        AlarmsSection(not_exchanging_grace_s=100),
        role="transmitter",
        block_detections=1000,
        qber_warning=0.04,
        state_dir=tmp_path,
        clock=clock,
    )
    flow.peer_link(True)
    flow.producing(True)
    flow.state_changed("EXCHANGING")
    clock.t += 5000  # a long, good exchange
    flow.block_committed()
    b.raise_("no_light", "count rate collapsed")
    flow.state_changed("FAULT")
    res = Resources(
        state="FAULT", auth_balance_bits=10**6, instruments_down=[], detection_rate_hz=0
    )
    clock.t += 50
    flow.evaluate(res)
    assert not b.is_active("no_key")  # 50 s into the recovery: within the grace
    assert b.is_active("fault") and b.is_active("no_light")
    flow.state_changed("IDLE")
    assert not b.is_active("fault") and not b.is_active("no_light")
    clock.t += 60
    flow.evaluate(dataclasses.replace(res, state="IDLE"))
    assert b.is_active("no_key")  # 110 s without exchanging


def test_a_slow_links_first_block_raises_no_key_only_past_its_design_length() -> None:
    # 90 k detections/s, 48 M per block, blocks of at most 300 s of light: the first
    # block takes 300 s (the transmitter may not know the rate: the bound alone says so)
    for rate in (90_000.0, 0.0):
        s = snap(
            last_commit_at=None,
            block_intervals_s=[],
            block_detections=48_000_000,
            detection_rate_hz=rate,
            max_block_s=300.0,
            exchanging_since=10_000.0 - 310,
        )
        assert expected_block_s(s) == 300.0
        assert "no_key" not in active(s)
        assert "no_key" in active(dataclasses.replace(s, exchanging_since=10_000.0 - 1201))


def test_between_passes_no_key_is_expected_unless_the_last_pass_gave_none() -> None:
    """A satellite link waits between passes: not producing then is no alarm (whereas a
    fibre link IDLE that long is), but a pass that gave no key stays one, with its reason,
    until a pass gives key."""
    idle_fibre = evaluate(snap(state="IDLE", exchanging_since=None, producing_since=0.0))
    assert idle_fibre["no_key"][0]
    waiting = evaluate(snap(state="AWAITING_PASS", exchanging_since=None, producing_since=0.0))
    assert not waiting["no_key"][0]
    failed = evaluate(
        snap(
            state="AWAITING_PASS",
            exchanging_since=None,
            pass_no_key="the pass set while the node was SYNCHRONIZING",
        )
    )
    active, cause = failed["no_key"]
    assert active and "SYNCHRONIZING" in cause
