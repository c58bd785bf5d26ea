"""The pure parts of the fault campaign (tests/faults/campaign.py): no daemons here."""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.campaign import (
    FAULT_KINDS,
    RECOVERY_DELAY_MAX_S,
    DeliveryLedger,
    Telemetry,
    build_report,
    format_table,
    label_phase,
    schedule,
    verdict,
)

CLEAN = {
    "mismatched_stores": 0,
    "double_deliveries": 0,
    "key_bytes_mismatches": 0,
    "unrecovered_faults": 0,
}


# --------------------------------------------------------------------------- schedule
def test_schedule_is_reproducible_from_the_seed() -> None:
    a = schedule(100, 7)
    assert a == schedule(100, 7)
    assert a != schedule(100, 8)
    # a shorter campaign is the start of the longer one (the smoke run is a prefix)
    assert schedule(3, 7) == a[:3]


def test_schedule_draws_valid_faults() -> None:
    plans = schedule(300, 1, max_delay_s=12.0, peer_timeout_s=10.0)
    assert [p.index for p in plans] == list(range(300))
    assert {p.kind for p in plans} == set(FAULT_KINDS)
    assert plans[0].anchor == "exchange"
    assert {p.anchor for p in plans} == {"exchange", "recovery"}
    for p in plans:
        assert p.victim in ("transmitter", "receiver")
        if p.kind == "kill_transmitter" or p.kind == "fiber_cut":
            assert p.victim == "transmitter"
        if p.kind == "kill_receiver" or p.kind == "detector_disconnect":
            assert p.victim == "receiver"
        limit = RECOVERY_DELAY_MAX_S if p.anchor == "recovery" else 12.0
        assert 0.0 <= p.delay_s <= limit
        if p.kind == "peer_drop":
            assert p.hold_s > 10.0  # longer than the peer timeout
        assert p.hold_s > 0.0
    assert {p.victim for p in plans if p.kind == "peer_drop"} == {"transmitter", "receiver"}


def test_schedule_with_one_kind() -> None:
    plans = schedule(5, 3, kinds=("fiber_cut",))
    assert {p.kind for p in plans} == {"fiber_cut"}
    with pytest.raises(ValueError):
        schedule(1, 3, kinds=())


# --------------------------------------------------------------------------- verdict
def test_verdict_passes_a_clean_campaign() -> None:
    assert verdict(CLEAN) == (True, [])


@pytest.mark.parametrize(
    "key", ["mismatched_stores", "double_deliveries", "key_bytes_mismatches", "unrecovered_faults"]
)
def test_verdict_fails_on_each_kind_of_failure(key: str) -> None:
    passed, reasons = verdict({**CLEAN, key: 1})
    assert not passed
    assert len(reasons) == 1 and reasons[0].startswith(key)


def fault(i: int, **kw: Any) -> dict[str, Any]:
    base = {
        "index": i,
        "kind": "fiber_cut",
        "victim": "transmitter",
        "at_s": 10.0 * i,
        "phase": "collecting",
        "injected": True,
        "recovery_s": 30.0,
        "outcome": "recovered",
        "digest_match": True,
        "alarms_left": [],
    }
    return {**base, **kw}


def report(faults: list[dict[str, Any]], ledger: DeliveryLedger) -> dict[str, Any]:
    return build_report(seed=1, requested=len(faults), faults=faults, deliveries=ledger.summary())


def clean_ledger() -> DeliveryLedger:
    led = DeliveryLedger()
    led.record_enc("alice", [{"key_ID": "k1", "key": "AAAA"}, {"key_ID": "k2", "key": "BBBB"}], 1)
    led.record_dec("bob", [{"key_ID": "k1", "key": "AAAA"}, {"key_ID": "k2", "key": "BBBB"}], 2)
    led.record_enc("bob", [{"key_ID": "k3", "key": "CCCC"}], 3)
    led.record_dec("alice", [{"key_ID": "k3", "key": "CCCC"}], 4)
    led.record_replay("bob", "k1", 400, 5)
    return led


def test_report_of_a_clean_campaign_passes() -> None:
    r = report([fault(0), fault(1, outcome="interrupted"), fault(2)], clean_ledger())
    assert r["passed"] and r["failures"] == []
    t = r["totals"]
    assert t["faults_injected"] == 3 and t["keys_delivered"] == 3
    assert r["deliveries"]["issued_per_kme"] == {"alice": 2, "bob": 1}
    assert r["deliveries"]["replays_refused"] == 1
    # an interrupted fault (the next one landed during its recovery) is not unrecovered
    assert t["unrecovered_faults"] == 0
    text = format_table(r)
    assert "PASS" in text and "interrupted" in text


def test_a_store_mismatch_fails_the_campaign() -> None:
    r = report([fault(0), fault(1, digest_match=False)], clean_ledger())
    assert not r["passed"]
    assert r["totals"]["mismatched_stores"] == 1
    assert "DIFF" in format_table(r)


def test_an_unrecovered_fault_fails_the_campaign() -> None:
    r = report(
        [fault(0, outcome="unrecovered", recovery_s=None, digest_match=None)], clean_ledger()
    )
    assert not r["passed"]
    assert r["totals"]["unrecovered_faults"] == 1
    assert "FAIL" in format_table(r)


def test_alarms_left_are_reported_but_do_not_fail() -> None:
    r = report([fault(0, alarms_left=["bob:no_key"])], clean_ledger())
    assert r["passed"] and r["totals"]["faults_with_alarms_left"] == 1


def test_the_same_key_from_enc_keys_on_both_kmes_is_a_double_delivery() -> None:
    led = clean_ledger()
    led.record_enc("bob", [{"key_ID": "k1", "key": "AAAA"}], 6)
    r = report([fault(0)], led)
    assert not r["passed"] and r["totals"]["double_deliveries"] == 1
    assert r["deliveries"]["double_delivery_cases"][0]["how"] == "enc_keys_on_both_kmes"


def test_the_same_key_twice_from_one_kme_is_a_double_delivery() -> None:
    led = clean_ledger()
    led.record_enc("alice", [{"key_ID": "k2", "key": "BBBB"}], 6)
    assert led.double[0]["how"] == "enc_keys_twice_same_kme"
    led2 = clean_ledger()
    led2.record_dec("bob", [{"key_ID": "k1", "key": "AAAA"}], 6)
    assert led2.double[0]["how"] == "dec_keys_twice"
    led3 = clean_ledger()
    led3.record_replay("bob", "k2", 200, 6)
    assert led3.double[0]["how"] == "dec_keys_replay_served"
    for led_ in (led, led2, led3):
        assert not report([fault(0)], led_)["passed"]


def test_different_enc_and_dec_bytes_fail_the_campaign() -> None:
    led = clean_ledger()
    led.record_enc("alice", [{"key_ID": "k4", "key": "DDDD"}], 6)
    led.record_dec("bob", [{"key_ID": "k4", "key": "EEEE"}], 7)
    r = report([fault(0)], led)
    assert not r["passed"] and r["totals"]["key_bytes_mismatches"] == 1


def test_lost_keys_are_counted_but_do_not_fail() -> None:
    led = clean_ledger()
    led.record_enc("alice", [{"key_ID": "k5", "key": "FFFF"}], 6)
    led.record_lost("bob", ["k5"], "dec_keys: 400", 7)
    r = report([fault(0)], led)
    assert r["passed"] and r["totals"]["keys_lost"] == 1


def test_delivered_before_lists_fetched_keys() -> None:
    led = clean_ledger()
    assert led.delivered_before(3, 5) == [("k1", "bob"), ("k2", "bob")]
    # the last ones of each KME
    assert led.delivered_before(10, 1) == [("k3", "alice"), ("k2", "bob")]


# --------------------------------------------------------------------------- phase
def status(state: str = "EXCHANGING", in_step: bool = True, pending: int = 0) -> dict[str, Any]:
    return {"state": state, "delivery_in_step": in_step, "keystore": {"pending": pending}}


def progress(ts: float, block: int, done: int = 1000) -> Telemetry:
    return Telemetry(
        ts, "receiver", "progress", {"what": "block", "block_id": block, "done": done, "total": 9}
    )


def block(ts: float, role: str, block_id: int, **seconds: float) -> Telemetry:
    payload: dict[str, Any] = {"block_id": block_id, "ok": True}
    payload.update({f"seconds_{k}": v for k, v in seconds.items()})
    return Telemetry(ts, role, "block", payload)


def test_phase_from_states() -> None:
    assert label_phase(None, status(), [], 0)[0] == "node_not_answering"
    assert label_phase(status("CALIBRATING"), status("IDLE"), [], 0)[0] == "calibrating"
    assert label_phase(status("EXCHANGING"), status("SYNCHRONIZING"), [], 0)[0] == "synchronizing"
    assert label_phase(status("PAUSED"), status("EXCHANGING"), [], 0)[0] == "paused"
    assert label_phase(status(), status(in_step=False), [], 0)[0] == "key_id_sync"
    assert label_phase(status(pending=5), status(pending=5), [], 0)[0] == "two_phase_commit"


def test_phase_while_key_flows() -> None:
    prev = block(100, "receiver", 3, sifting=1.0, estimation=0.5, error_correction=2.0)
    tx_prev = block(100, "transmitter", 3)
    # block 4 collected 100..103, block 5 being collected from 104: block 4 in processing
    evs = [prev, tx_prev, *(progress(t, 4) for t in (100.5, 101.5, 102.5)), progress(104, 5)]
    assert label_phase(status(), status(), evs, 104.5)[0] == "pp:sifting"
    assert label_phase(status(), status(), evs, 106.0)[0] == "pp:error_correction"
    assert label_phase(status(), status(), evs, 120.0)[0] == "pp:privacy_amplification"
    # the receiver finished block 4, the transmitter not yet: the commit is under way
    done_rx = [*evs, block(106, "receiver", 4)]
    assert label_phase(status(), status(), done_rx, 106.2)[0] == "two_phase_commit"
    # receiver committed (nothing pending there), transmitter still holds pending keys
    assert label_phase(status(pending=3), status(), done_rx, 106.2)[0] == "between_commits"
    # both done: only collecting
    done = [*done_rx, block(106.3, "transmitter", 4)]
    assert label_phase(status(), status(), done, 107)[0] == "collecting"


def test_an_abandoned_block_is_not_in_processing() -> None:
    # block 4's collection stopped at 101 (a fault), block 5 began 60 s later
    evs = [progress(100, 4), progress(101, 4), progress(161, 5)]
    assert label_phase(status(), status(), evs, 162)[0] == "collecting"
    assert label_phase(status(), status(), [], 1)[0] == "collecting"
