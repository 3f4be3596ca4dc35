"""Full-jitter retry waits (jobq/backoff.py): the window doubles up to the cap, and the waits
spread over the whole window, so nodes that failed together do not retry together."""

from __future__ import annotations

import random

import pytest

from jobq.backoff import Backoff


def test_the_window_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(0.1, 2.0, random.Random(1))
    windows = []
    for _ in range(7):
        windows.append(min(b.cap, b.base * 2**b.attempts))
        assert 0.0 <= b.next() <= windows[-1]
    assert windows == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0] and b.at_cap
    b.reset()
    assert b.attempts == 0 and not b.at_cap and b.next() <= 0.1


def test_waits_spread_over_the_whole_window() -> None:
    # 1,000 nodes that failed at the same moment, each on its fifth try (window 1.6 s): their
    # retries fill the window evenly, about a third of them in its first 500 ms (a +-20 % jitter
    # around 1.6 s puts none there, and all within 0.64 s of each other).
    rng = random.Random(7)
    waits = []
    for _ in range(1000):
        b = Backoff(0.1, 5.0, rng)
        for _ in range(4):
            b.next()
        waits.append(b.next())
    assert max(waits) <= 1.6
    early = sum(w <= 0.5 for w in waits) / len(waits)
    assert 0.25 <= early <= 0.38, early
    assert max(waits) - min(waits) > 1.5


def test_a_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(2.0, 1.0)
