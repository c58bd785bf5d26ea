"""The light-loss test: stated false-alarm probability, power against a cut, 10 k-10 M/s.

Reference values come from the Poisson distribution itself (a direct sum of its terms,
not the library call the module uses), and the behaviour over time from Poisson draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdnode.lightloss import (
    MISS_PROBABILITY,
    LightLossTest,
    LightWatch,
    Verdict,
    poisson_cdf,
    poisson_lower_threshold,
)

RATES_HZ = [1e4, 1e5, 1e6, 1e7]


def cdf_by_sum(k: int, mean: float) -> float:
    """P(X <= k), X ~ Poisson(mean), by summing terms in log space."""
    if k < 0:
        return 0.0
    logs = [-mean + i * math.log(mean) - math.lgamma(i + 1) for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * sum(math.exp(v - top) for v in logs)


@pytest.mark.parametrize("mean", [3.0, 30.0, 250.0, 2000.0])
@pytest.mark.parametrize("p", [1e-3, 1e-6, 1e-9])
def test_the_threshold_is_the_largest_count_within_the_probability(mean: float, p: float) -> None:
    k = poisson_lower_threshold(mean, p)
    if k < 0:
        assert cdf_by_sum(0, mean) > p
        return
    assert cdf_by_sum(k, mean) <= p * (1 + 1e-9)
    assert cdf_by_sum(k + 1, mean) > p * (1 - 1e-9)
    assert poisson_cdf(k, mean) == pytest.approx(cdf_by_sum(k, mean), rel=1e-6)


@pytest.mark.parametrize("rate_hz", RATES_HZ)
@pytest.mark.parametrize("dark_share", [0.0, 0.05, 0.3])
def test_a_link_at_its_fade_floor_is_called_dark_at_most_at_the_stated_rate(
    rate_hz: float, dark_share: float
) -> None:
    # Stated probability 1e-3 so that it can be observed: 400 000 windows at the floor.
    test = LightLossTest(rate_hz, dark_share * rate_hz, false_alarm_probability=1e-3)
    span = test.decision_window_s()
    lam = test.floor_rate_hz() * span
    draws = np.random.default_rng(int(rate_hz) + int(100 * dark_share)).poisson(lam, 400_000)
    observed = float(np.mean(draws <= test.threshold_counts(span)))
    sigma = math.sqrt(1e-3 / 400_000)
    assert observed <= 1e-3 + 5 * sigma
    # and the exact figure at the production setting
    prod = LightLossTest(rate_hz, dark_share * rate_hz)
    k = prod.threshold_counts(span)
    assert cdf_by_sum(k, prod.floor_rate_hz() * span) <= 1e-9 * (1 + 1e-9)


@pytest.mark.parametrize("rate_hz", RATES_HZ)
@pytest.mark.parametrize("dark_share", [0.0, 0.05, 0.3])
def test_a_cut_is_confirmed_within_three_windows_and_a_healthy_hour_never(
    rate_hz: float, dark_share: float
) -> None:
    rng = np.random.default_rng(7)
    dark = dark_share * rate_hz
    watch = LightWatch(dark_rate_hz=dark)
    assert watch.add(int(rng.poisson(rate_hz)), 1.0) is Verdict.LIGHT  # learns R
    test = watch.test()
    assert test is not None and test.sensitive
    assert test.miss_probability(test.decision_window_s()) <= MISS_PROBABILITY
    # One hour in 0.1 s tag blocks: the rate wanders +-10 % and drifts down to 60 %.
    blocks = 36_000
    drift = np.linspace(1.0, 0.6, blocks) * (1 + 0.1 * np.sin(np.arange(blocks) / 500))
    light = (rate_hz - dark) * drift
    counts = rng.poisson((dark + light) * 0.1)
    verdicts = [watch.add(int(c), 0.1) for c in counts]
    assert Verdict.GONE not in verdicts and Verdict.SUSPECT not in verdicts
    # Cut: dark counts only. Confirmed after 1 + confirm_windows decision windows.
    window_blocks = round(test.decision_window_s() / 0.1)
    gone_at = None
    for i in range(window_blocks * 4):
        if watch.add(int(rng.poisson(dark * 0.1)), 0.1) is Verdict.GONE:
            gone_at = i + 1
            break
    assert gone_at is not None
    assert gone_at <= window_blocks * (1 + watch.confirm_windows) + window_blocks
    assert "fiber cut" in watch.explain()


def test_one_window_with_light_clears_the_suspicion() -> None:
    watch = LightWatch()
    watch.add(100_000, 1.0)
    assert watch.add(0, 1.0) is Verdict.SUSPECT
    assert watch.add(0, 1.0) is Verdict.SUSPECT
    assert watch.add(95_000, 1.0) is Verdict.LIGHT
    assert watch.dark_windows == 0
    assert watch.add(0, 1.0) is Verdict.SUSPECT  # starts again from one


def test_blocks_that_do_not_say_their_span_are_not_counted_as_dark() -> None:
    watch = LightWatch()
    watch.add(100_000, 1.0)
    for _ in range(100):
        assert watch.add_block(0, 5_000, 5_000) is Verdict.LIGHT
    assert watch.windows_decided == 0


def test_slow_links_get_longer_windows_and_hopeless_ones_say_so() -> None:
    # 10 k/s of which 8 k/s dark: the faded floor (8.4 k/s) sits close to the dark rate.
    slow = LightLossTest(10_000.0, 8_000.0)
    assert slow.decision_window_s() > 1.0
    assert slow.sensitive
    # dark counts as high as the light: no window separates them, and it is said
    hopeless = LightLossTest(10_000.0, 9_990.0)
    assert not hopeless.sensitive
    span = hopeless.decision_window_s()
    draws = np.random.default_rng(1).poisson(10_000.0 * span, 10_000)
    assert int(draws.min()) > hopeless.threshold_counts(span)


def test_negative_counts_or_spans_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        LightWatch().add(-1, 1.0)


def test_a_cut_at_the_first_second_is_seen_with_the_rate_read_at_the_start() -> None:
    # the detectors read 200 k/s as the exchange started; the fiber is cut at once
    watch = LightWatch(reference_rate_hz=200_000.0)
    verdicts = [watch.add(3, 0.5) for _ in range(6)]
    assert verdicts[-1] is Verdict.GONE and Verdict.LEARNING not in verdicts


def test_the_tagger_count_replaces_the_rate_read_at_the_start() -> None:
    watch = LightWatch(reference_rate_hz=1_000_000.0)  # the detectors read too high
    assert watch.add(150_000, 1.0) is Verdict.SUSPECT  # below 0.2 x 1 M: suspicious
    assert watch.add(300_000, 1.0) is Verdict.LIGHT  # above: light, and the new reference
    assert watch.reference_rate_hz == pytest.approx(300_000.0)
    assert watch.add(150_000, 1.0) is Verdict.LIGHT  # half of the reference: faded, not cut


def test_a_restarted_window_forgets_the_clicks_before_the_lock_was_lost() -> None:
    watch = LightWatch(reference_rate_hz=100_000.0)
    watch.add(90_000, 0.9)  # light, then the cut: the lock is lost here
    watch.restart_window()
    verdicts = [watch.add(2, 0.5) for _ in range(6)]
    assert verdicts[1] is Verdict.SUSPECT and verdicts[-1] is Verdict.GONE


def test_a_dark_floor_that_rose_unseen_hides_a_cut_and_the_new_floor_finds_it() -> None:
    """Dark counts rose from 10/s to 30 k/s on a link of 1.2 M clicks/s that may fade to
    2 %: with the old floor a cut (30 k/s left) is never a dark window; with the floor
    set to the new rate (LightWatch.set_dark_rate) three windows in a row confirm it."""
    rng = np.random.default_rng(7)
    reference, dark_now = 1.2e6, 3e4
    stale = LightWatch(dark_rate_hz=10.0, fade_floor=0.02, reference_rate_hz=reference)
    fresh = LightWatch(dark_rate_hz=10.0, fade_floor=0.02, reference_rate_hz=reference)
    fresh.set_dark_rate(dark_now)
    test = fresh.test()
    assert test is not None and test.dark_rate_hz == dark_now and test.sensitive
    for watch in (stale, fresh):  # the link with light: no suspicion either way
        assert watch.add(int(rng.poisson(reference + dark_now)), 1.0) is Verdict.LIGHT
    verdicts = {"stale": [], "fresh": []}
    for _ in range(5):  # the cut: dark counts only
        verdicts["stale"].append(stale.add(int(rng.poisson(dark_now)), 1.0))
        verdicts["fresh"].append(fresh.add(int(rng.poisson(dark_now)), 1.0))
    assert set(verdicts["stale"]) == {Verdict.LIGHT}
    assert Verdict.GONE in verdicts["fresh"]
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="not a rate"):
            fresh.set_dark_rate(bad)
    assert fresh.dark_rate_hz == dark_now
