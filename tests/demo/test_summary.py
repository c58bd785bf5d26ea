"""Merging node statistics, the verdict, and the JSON/text forms of a run's summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qkdnode.demo.summary import (
    DemoSummary,
    LinkStats,
    build_summary,
    format_summary,
    merge_stats,
    progress_line,
    verdict,
)

REQUIRED_JSON_KEYS = {
    "distance_km",
    "duration_s",
    "pulses",
    "detections",
    "sifted_bits",
    "qber",
    "secret_bits",
    "secret_key_rate_bps",
    "secret_bits_per_pulse",
    "keys_identical",
    "blocks_ok",
    "blocks_aborted",
    "theory_secret_bits_per_pulse",
    "plob_bits_per_pulse",
}

TX = {
    "pulses": 750_000_000,
    "detections": 0,
    "sifted_bits": 2_400_000,
    "qber": 0.012,
    "secret_bits": 900_000,
    "blocks_ok": 3,
    "blocks_aborted": 1,
    "secret_key_rate_bps": 29_000.0,
}
RX = {"pulses": 0, "detections": 3_100_000, "sifted_bits": 2_400_000, "qber": 0.012}


def _summary(**over: Any) -> DemoSummary:
    kw: dict[str, Any] = {
        "stats": merge_stats(TX, RX),
        "distance_km": 25.0,
        "exchange_wall_s": 30.0,
        "requested_duration_s": 30.0,
        "digests": {
            "alice": {"count": 3, "sha256": "ab" * 32},
            "bob": {"count": 3, "sha256": "ab" * 32},
        },
        "theory": {
            "secret_bits_per_pulse": 2.0e-3,
            "three_intensity_bits_per_pulse": 1.6e-3,
            "plob_bits_per_pulse": 0.4,
            "transmittance": 0.25,
        },
        "eve": None,
        "seed": 1,
        "security": "curve",
        "exit_codes": {"alice": 0, "bob": 0},
        "out_dir": "/tmp/x",
    }
    kw.update(over)
    return build_summary(**kw)


def test_merge_counts_the_transmitters_blocks() -> None:
    # Stopped runs: the receiver finished one block more than the transmitter (discarded
    # by the two-phase commit). Its pulses and detections must not enter the rate.
    tx = {**TX, "detections": 3_000_000}
    rx = {**RX, "pulses": 1_000_000_000, "detections": 4_000_000}
    s = merge_stats(tx, rx)
    assert (s.pulses, s.detections) == (750_000_000, 3_000_000)


def test_merge_falls_back_to_the_receiver_for_missing_counts() -> None:
    s = merge_stats(TX, RX)
    assert s.pulses == 750_000_000
    assert s.detections == 3_100_000
    assert s.secret_bits == 900_000
    assert s.blocks_ok == 3 and s.blocks_aborted == 1
    assert s.qber == pytest.approx(0.012)


def test_merge_tolerates_missing_and_null_fields() -> None:
    s = merge_stats({"qber": None}, {})
    assert s == LinkStats()


def test_rates_are_computed_from_the_measured_wall_time() -> None:
    s = _summary()
    assert s.secret_key_rate_bps == pytest.approx(900_000 / 30.0)
    assert s.detection_rate_hz == pytest.approx(3_100_000 / 30.0)
    assert s.secret_bits_per_pulse == pytest.approx(900_000 / 750_000_000)
    assert s.ratio_to_theory == pytest.approx((900_000 / 750_000_000) / 2.0e-3)
    assert s.ratio_to_protocol == pytest.approx((900_000 / 750_000_000) / 1.6e-3)
    assert s.below_plob is True
    assert s.keys_identical and s.ok and s.failure is None


def test_json_line_has_the_required_keys_and_is_one_line() -> None:
    line = _summary().to_json_line()
    assert "\n" not in line
    obj = json.loads(line)
    assert obj.keys() >= REQUIRED_JSON_KEYS
    assert obj["keys_identical"] is True


def test_different_digests_fail() -> None:
    s = _summary(
        digests={
            "alice": {"count": 3, "sha256": "ab" * 32},
            "bob": {"count": 3, "sha256": "cd" * 32},
        }
    )
    assert not s.keys_identical and not s.ok
    assert s.failure == "the key stores differ"


def test_different_counts_fail() -> None:
    s = _summary(
        digests={
            "alice": {"count": 3, "sha256": "ab" * 32},
            "bob": {"count": 2, "sha256": "ab" * 32},
        }
    )
    assert not s.keys_identical


def test_one_missing_digest_is_not_identical() -> None:
    assert not _summary(digests={"alice": {"count": 0, "sha256": "e3" * 32}}).keys_identical


def test_unclean_shutdown_fails() -> None:
    s = _summary(exit_codes={"alice": 0, "bob": -9})
    assert not s.clean_shutdown and not s.ok


def test_rate_above_plob_is_flagged() -> None:
    s = _summary(theory={"secret_bits_per_pulse": 1e-3, "plob_bits_per_pulse": 1e-4})
    assert s.below_plob is False and not s.ok


def test_missing_theory_gives_nulls_and_the_note() -> None:
    s = _summary(theory={"secret_bits_per_pulse": None, "plob_bits_per_pulse": None, "note": "n/a"})
    assert s.ratio_to_theory is None and s.below_plob is None and s.ok
    assert "n/a" in format_summary(s)


def test_step_failure_overrides_success() -> None:
    s = _summary(failure="sync: not done after 5 s")
    assert not s.ok and s.failure == "sync: not done after 5 s"


@pytest.mark.parametrize(
    ("identical", "blocks", "eve", "clean", "expected"),
    [
        (True, 1, False, True, True),
        (True, 0, False, True, False),
        (True, 0, True, True, True),  # Eve detected: no key, and that is the right answer
        (False, 0, True, True, False),
        (True, 2, True, True, True),
        (True, 2, False, False, False),
    ],
)
def test_verdict(identical: bool, blocks: int, eve: bool, clean: bool, expected: bool) -> None:
    ok, why = verdict(
        keys_identical=identical, blocks_ok=blocks, eve_active=eve, clean_shutdown=clean
    )
    assert ok is expected
    assert (why is None) is expected


def test_text_summary_and_progress_line() -> None:
    s = _summary()
    text = format_summary(s)
    assert "identical" in text and "25 km" in text and "OK" in text
    line = progress_line(10.0, 30.0, "EXCHANGING", "EXCHANGING", merge_stats(TX, RX))
    assert "EXCHANGING" in line and "1.20 %" in line and "\n" not in line


def test_steady_rate_counts_only_between_the_first_and_last_commit() -> None:
    from qkdnode.demo.runner import steady_rate

    assert steady_rate([]) is None
    assert steady_rate([(5.0, 8_000_000)]) is None
    # first block committed at 5 s, three more by 17 s: 24e6 detections in 12 s
    commits = [(5.0, 8_000_000), (9.0, 16_000_000), (13.0, 24_000_000), (17.0, 32_000_000)]
    assert steady_rate(commits) == pytest.approx(2e6)


def test_merge_takes_each_loss_from_the_node_that_counts_it() -> None:
    # the transmitter withholds tracking windows, the receiver's tagger drops tags: a
    # node's zero for what the other counts must not hide the other's count
    tx = {**TX, "withheld_slots": 2_000_000, "tags_missed": 0}
    rx = {**RX, "withheld_slots": 0, "tags_missed": 4_096}
    s = merge_stats(tx, rx)
    assert (s.withheld_slots, s.tags_missed) == (2_000_000, 4_096)
    summary = _summary(stats=s)
    assert (summary.withheld_slots, summary.tags_missed) == (2_000_000, 4_096)


def test_block_times_take_only_well_formed_blocks_of_the_receiver() -> None:
    from qkdnode.demo.config import DemoConfig
    from qkdnode.demo.runner import DemoRunner

    runner = DemoRunner(DemoConfig())
    rate = DemoConfig().link.source.slot_rate_hz
    good = {"block_id": 3, "pulses": int(10 * rate), "seconds": {"sifting": 4.0, "ec": 3.0}}
    for junk in (
        None,
        {"block_id": "3", "pulses": 1, "seconds": {}},
        {"block_id": 4, "pulses": 0, "seconds": {"sifting": 1.0}},  # no light
        {"block_id": 5, "pulses": 10, "seconds": "fast"},
        {"block_id": 6, "seconds": {"sifting": 1.0}},
    ):
        runner._note_block(junk)
    runner._note_block(good)
    runner._note_block(good)  # seen on two polls: one block
    assert runner.block_times == {3: (7.0, pytest.approx(10.0))}
