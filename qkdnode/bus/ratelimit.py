"""Per-client token buckets (a flood from one client cannot starve the others)."""

from __future__ import annotations

import threading
import time


class TokenBuckets:
    """``rate_per_s`` tokens per second per key, bursts up to ``burst`` tokens.

    :meth:`take` returns 1 (serve), 0 (refuse with an error reply) or -1 (drop silently:
    the client keeps flooding after being refused, answering would only feed the flood).
    Idle buckets are forgotten so that memory stays bounded. Thread-safe: the control
    socket (event loop) and the monitor endpoint (its own thread) share one instance.
    """

    def __init__(self, rate_per_s: float, burst: float | None = None, max_keys: int = 10_000):
        self.rate = float(rate_per_s)
        self.burst = float(burst if burst is not None else max(1.0, rate_per_s))
        self.max_keys = max_keys
        self._buckets: dict[bytes, list[float]] = {}
        self.refused = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def take(self, key: bytes, now: float | None = None) -> int:
        with self._lock:
            return self._take(key, time.monotonic() if now is None else now)

    def _take(self, key: bytes, t: float) -> int:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(t)
            bucket = [self.burst, t]
            self._buckets[key] = bucket
        tokens = min(self.burst, bucket[0] + (t - bucket[1]) * self.rate)
        bucket[1] = t
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 1
        # keep counting debt (bounded) so a persistent flooder is dropped, not answered
        bucket[0] = max(tokens - 1.0, -self.burst)
        if tokens > -0.1 * self.burst:
            self.refused += 1
            return 0
        self.dropped += 1
        return -1

    def _evict(self, now: float) -> None:
        full_after = self.burst / self.rate
        stale = [k for k, (_, t) in self._buckets.items() if now - t > full_after]
        for k in stale:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
