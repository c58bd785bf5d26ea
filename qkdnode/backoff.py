"""Doubling retry delays, for every loop that retries (reconnects, fault recovery,
the transmitter's supervisor): one rule instead of a hand-written one per loop."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays ``first_s, 2 first_s, 4 first_s, ...`` capped at ``max_s`` (seconds);
    :meth:`reset` after a success starts again from ``first_s``."""

    first_s: float
    max_s: float
    current_s: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(
                f"backoff needs 0 < first_s <= max_s, got {self.first_s}, {self.max_s}"
            )
        self.current_s = self.first_s

    def next(self) -> float:
        """The delay to wait now; the next one doubles (up to ``max_s``)."""
        delay = self.current_s
        self.current_s = min(self.current_s * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.current_s = self.first_s
