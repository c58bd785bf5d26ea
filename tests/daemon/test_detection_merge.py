"""The receiver's merge of detection chunks into one slot-ordered block."""

from __future__ import annotations

import numpy as np

from qkdnode.tracking import merge_sorted as _merge_sorted


def test_chunks_in_time_order_are_kept_as_they_are() -> None:
    s = [np.array([1, 2, 2, 5], np.int64), np.array([5, 9], np.int64)]
    c = [np.array([0, 1, 2, 3], np.int8), np.array([1, 0], np.int8)]
    slots, chans = _merge_sorted(s, c)
    assert slots.tolist() == [1, 2, 2, 5, 5, 9]
    assert chans.tolist() == [0, 1, 2, 3, 1, 0]


def test_chunks_out_of_order_are_sorted_stably() -> None:
    s = [np.array([7, 8], np.int64), np.array([3, 7, 10], np.int64)]
    c = [np.array([0, 1], np.int8), np.array([2, 3, 1], np.int8)]
    slots, chans = _merge_sorted(s, c)
    assert slots.tolist() == [3, 7, 7, 8, 10]
    assert chans.tolist() == [2, 0, 3, 1, 1]  # equal slots keep their arrival order
