"""Unit tests for broker/buffer.py's SeqWindow: which sequence numbers of one actor incarnation were seen."""

from __future__ import annotations

import random

from broker.buffer import SeqWindow


def test_seq_window_in_order_compacts():
    window = SeqWindow()
    assert [window.add(s) for s in range(5)] == [True] * 5
    assert window.below == 5
    assert window.above == set()


def test_seq_window_out_of_order():
    window = SeqWindow()
    assert window.add(3) is True
    assert window.add(1) is True
    assert (window.below, window.above) == (0, {1, 3})
    assert window.add(0) is True
    assert (window.below, window.above) == (2, {3})
    assert window.add(2) is True
    assert (window.below, window.above) == (4, set())
    assert window.add(10) is True
    assert (window.below, window.above) == (4, {10})


def test_seq_window_duplicates_below_watermark():
    window = SeqWindow()
    for s in (0, 1, 2):
        window.add(s)
    assert [window.add(s) for s in (0, 1, 2)] == [False, False, False]
    assert (window.below, window.above) == (3, set())


def test_seq_window_duplicates_above_watermark():
    window = SeqWindow()
    assert window.add(7) is True
    assert window.add(7) is False
    assert window.add(5) is True
    assert window.add(5) is False
    assert (window.below, window.above) == (0, {5, 7})
    # filling the gap moves the watermark past them; they stay duplicates
    assert [window.add(s) for s in range(5)] == [True] * 5
    assert (window.below, window.above) == (6, {7})
    assert window.add(5) is False and window.add(7) is False
    assert window.add(6) is True
    assert (window.below, window.above) == (8, set())
    assert window.add(7) is False


def test_seq_window_random_matches_a_set():
    rng = random.Random(7)
    window, seen = SeqWindow(), set()
    for _ in range(3000):
        seq = rng.randrange(400)
        assert window.add(seq) is (seq not in seen)
        seen.add(seq)
        assert window.below == next(i for i in range(402) if i not in seen)
        assert window.above == {s for s in seen if s > window.below}


def test_seq_window_stays_bounded_past_a_hole_that_never_fills():
    window = SeqWindow()
    window.add(0)
    for seq in range(2, 3 * SeqWindow.MAX_ABOVE):  # seq 1 was rejected: it never arrives
        assert window.add(seq)
    assert len(window.above) <= SeqWindow.MAX_ABOVE and window.below > 1
    assert not window.add(1) and not window.add(3 * SeqWindow.MAX_ABOVE - 1)  # both count as seen
    assert window.add(3 * SeqWindow.MAX_ABOVE)
