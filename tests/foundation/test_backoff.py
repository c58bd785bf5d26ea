from __future__ import annotations

import pytest

from qkdnode.backoff import Backoff


def test_delays_double_up_to_the_cap_and_reset() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next() == 0.5


def test_nonsense_bounds_are_refused() -> None:
    for first, cap in ((0.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="first_s"):
            Backoff(first, cap)
