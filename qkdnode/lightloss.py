"""Is the light gone? A Poisson test on the receiver's own detection stream.

The receiver counts the clicks of its time tagger over windows of tagger time (each tag
block says which span of tagger time it covers, so a host that reads late still sees the
right counts over the right span). Clicks in a window of ``T`` seconds are Poisson with
mean ``(D + s) * T``: ``D`` the dark-count rate (measured with the transmitter's light off
at calibration), ``s`` the rate of clicks from light.

* **Null hypothesis, light present.** The link may fade (polarisation, drift, a worse
  splice) without being cut: the test allows the light part to fall to
  ``fade_floor * (R - D)``, ``R`` the rate the exchange started with (followed slowly
  afterwards). The lowest mean a healthy window can have is
  ``lam_floor = (D + fade_floor * (R - D)) * T``.
* **Decision.** A window is *dark* when its count ``k`` is at most ``k_thr``, the largest
  count with ``P(Poisson(lam_floor) <= k_thr) <= false_alarm_probability``. So a window of
  a link that is at least at its fade floor is called dark with probability at most
  ``false_alarm_probability`` (default 1e-9), at any rate.
* **Confirmation.** The light is declared gone only after ``1 + confirm_windows``
  consecutive dark windows (Poisson windows are independent: a false "gone" has
  probability at most ``false_alarm_probability ** (1 + confirm_windows)``); one window
  that is not dark clears the suspicion.
* **Power.** With the light gone the mean is ``D * T``; the window is lengthened (whole
  multiples of ``window_s``) until a cut is missed with probability at most
  ``MISS_PROBABILITY`` per window. When even a 60 s window cannot separate ``D`` from the
  fade floor (dark counts as high as the faded light), :attr:`LightLossTest.sensitive` is
  False and the owner says so (the test still runs and still never false-alarms).

Everything here is pure arithmetic: no I/O, no clock.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field

from scipy import special

#: A cut must be seen in one window with at least this probability (1 - miss).
MISS_PROBABILITY = 1e-6
#: The longest window the test lengthens to (seconds).
MAX_WINDOW_S = 60.0


def poisson_cdf(k: int, mean: float) -> float:
    """``P(X <= k)`` for ``X ~ Poisson(mean)`` (0 for ``k < 0``)."""
    if k < 0:
        return 0.0
    if mean <= 0:
        return 1.0
    return float(special.pdtr(k, mean))


def poisson_lower_threshold(mean: float, probability: float) -> int:
    """The largest ``k`` with ``P(Poisson(mean) <= k) <= probability``; -1 when even
    ``k = 0`` is more likely than that (the window is too short to decide)."""
    if mean <= 0 or poisson_cdf(0, mean) > probability:
        return -1
    # pdtrik inverts the CDF in a continuous k; settle the integer by hand.
    guess = special.pdtrik(probability, mean)
    k = max(0, math.floor(guess) if math.isfinite(guess) else 0)
    while k > 0 and poisson_cdf(k, mean) > probability:
        k -= 1
    while poisson_cdf(k + 1, mean) <= probability:
        k += 1
    return k


@dataclass(frozen=True)
class LightLossTest:
    """The decision for one window. Rates in clicks per second, summed over detectors.

    ``reference_rate_hz`` is R (light and dark), ``dark_rate_hz`` D (0 when not measured:
    the test then assumes every click is light, which only makes it more cautious).
    """

    reference_rate_hz: float
    dark_rate_hz: float = 0.0
    fade_floor: float = 0.2
    false_alarm_probability: float = 1e-9
    window_s: float = 1.0

    def floor_rate_hz(self) -> float:
        """The lowest mean click rate of a link that is merely faded."""
        dark = min(max(self.dark_rate_hz, 0.0), self.reference_rate_hz)
        return dark + self.fade_floor * (self.reference_rate_hz - dark)

    def threshold_counts(self, span_s: float) -> int:
        """``k_thr`` for a window of ``span_s`` seconds (-1: too short to call dark)."""
        return poisson_lower_threshold(self.floor_rate_hz() * span_s, self.false_alarm_probability)

    def is_dark(self, counts: int, span_s: float) -> bool:
        return counts <= self.threshold_counts(span_s)

    def miss_probability(self, span_s: float) -> float:
        """With the light gone (dark counts only): the probability the window is not
        called dark."""
        k = self.threshold_counts(span_s)
        return 1.0 - poisson_cdf(k, max(self.dark_rate_hz, 0.0) * span_s)

    @functools.cached_property
    def _decision_window_s(self) -> float:
        span = self.window_s
        while span < MAX_WINDOW_S and self.miss_probability(span) > MISS_PROBABILITY:
            span += self.window_s
        return min(span, MAX_WINDOW_S)

    def decision_window_s(self) -> float:
        """The shortest whole multiple of ``window_s`` (up to :data:`MAX_WINDOW_S`) in
        which a cut is missed with probability at most :data:`MISS_PROBABILITY`."""
        return self._decision_window_s

    @property
    def sensitive(self) -> bool:
        """Whether a cut is detected with the stated power within :data:`MAX_WINDOW_S`."""
        return self.miss_probability(self.decision_window_s()) <= MISS_PROBABILITY


class Verdict(enum.Enum):
    LEARNING = "learning"  # no reference rate yet
    LIGHT = "light"
    SUSPECT = "suspect"  # dark windows, not yet confirmed
    GONE = "gone"


@dataclass
class LightWatch:
    """Feeds tag blocks (count, span of tagger time) into :class:`LightLossTest`.

    The reference rate is ``reference_rate_hz`` when given (the detectors' rate read as
    the exchange starts, just after synchronisation: the light is there), else the first
    full window's rate. The first window with light replaces a given reference (the
    tagger's own count is the better measure); later windows with light move it slowly
    (``follow``, the weight of each window) so that a slow legitimate drift moves it but
    a cut does not.
    """

    dark_rate_hz: float = 0.0
    fade_floor: float = 0.2
    false_alarm_probability: float = 1e-9
    window_s: float = 1.0
    confirm_windows: int = 2
    follow: float = 0.02
    reference_rate_hz: float | None = None
    dark_windows: int = 0
    windows_decided: int = 0
    last_window: tuple[int, float] = (0, 0.0)
    _counts: int = 0
    _span_s: float = 0.0
    _test: LightLossTest | None = field(default=None, repr=False)
    _measured: bool = False

    def __post_init__(self) -> None:
        if self.reference_rate_hz is not None and self.reference_rate_hz > 0:
            self._retest()
        else:
            self.reference_rate_hz = None

    def test(self) -> LightLossTest | None:
        return self._test

    def _retest(self) -> None:
        assert self.reference_rate_hz is not None
        self._test = LightLossTest(
            self.reference_rate_hz,
            self.dark_rate_hz,
            self.fade_floor,
            self.false_alarm_probability,
            self.window_s,
        )

    def set_dark_rate(self, dark_rate_hz: float) -> None:
        """A new dark-count floor ``D`` (clicks per second, over the detectors): the
        thresholds and the decision window follow from the next window on; the window
        being filled and the suspicion so far stay. ValueError for a negative or
        non-finite rate (the test keeps its floor)."""
        if not (math.isfinite(dark_rate_hz) and dark_rate_hz >= 0):
            raise ValueError(f"dark rate {dark_rate_hz!r} Hz is not a rate")
        self.dark_rate_hz = float(dark_rate_hz)
        if self._test is not None:
            self._retest()

    def add_block(self, counts: int, start_ps: int, stop_ps: int) -> Verdict:
        """A tag block: ``counts`` tags over tagger time ``start_ps..stop_ps``. A block
        that does not say its span (``stop_ps <= start_ps``) carries no count information
        and is skipped."""
        if stop_ps <= start_ps:
            return self._current()
        return self.add(counts, (stop_ps - start_ps) * 1e-12)

    def _current(self) -> Verdict:
        if self._test is None:
            return Verdict.LEARNING
        return Verdict.SUSPECT if self.dark_windows else Verdict.LIGHT

    def restart_window(self) -> None:
        """Drop the window being filled: what comes next is judged on its own (the lock
        was lost: the clicks before that moment say nothing about the light now)."""
        self._counts, self._span_s = 0, 0.0

    def explain(self) -> str:
        """The alarm text for a confirmed loss (rates, threshold, probability)."""
        test = self._test
        if test is None:
            return "no reference click rate yet"
        counts, span = self.last_window
        return (
            f"click rate {counts / span if span else 0.0:.4g}/s in {self.dark_windows} "
            f"windows of {span:.3g} s in a row, at most {test.threshold_counts(span)} clicks "
            f"each, below the faded-link floor {test.floor_rate_hz():.4g}/s (reference "
            f"{test.reference_rate_hz:.4g}/s, dark {test.dark_rate_hz:.4g}/s, false-alarm "
            f"probability {test.false_alarm_probability:.0e} per window): fiber cut?"
        )

    def add(self, counts: int, span_s: float) -> Verdict:
        """One block of ``counts`` clicks over ``span_s`` seconds of tagger time."""
        if span_s < 0 or counts < 0:
            raise ValueError(f"counts {counts} over {span_s} s: negative")
        self._counts += counts
        self._span_s += span_s
        if self._test is None:
            if self._span_s < self.window_s:
                return Verdict.LEARNING
            self.reference_rate_hz = self._counts / self._span_s
            self._measured = True
            self._retest()
            self._counts, self._span_s = 0, 0.0
            return Verdict.LIGHT
        assert self._test is not None
        if self._span_s < self._test.decision_window_s():
            return self._current()
        counts, span = self._counts, self._span_s
        self._counts, self._span_s = 0, 0.0
        self.windows_decided += 1
        self.last_window = (counts, span)
        if self._test.is_dark(counts, span):
            self.dark_windows += 1
            return Verdict.GONE if self.dark_windows > self.confirm_windows else Verdict.SUSPECT
        self.dark_windows = 0
        assert self.reference_rate_hz is not None
        rate = counts / span
        if not self._measured:
            self._measured = True
            self.reference_rate_hz = rate
            self._retest()
            return Verdict.LIGHT
        self.reference_rate_hz += self.follow * (rate - self.reference_rate_hz)
        if abs(self.reference_rate_hz / self._test.reference_rate_hz - 1.0) > 0.01:
            self._retest()  # thresholds follow the reference in steps of 1 %
        return Verdict.LIGHT
