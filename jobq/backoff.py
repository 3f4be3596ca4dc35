"""Waits between retries of a Redis call: exponential, with full jitter.

When Redis restarts, every node's loops (claims, acks, pub/sub, the start-up probe) fail at the
same moment and retry. A wait drawn uniformly from ``[0, min(cap, base * 2**n)]`` (full jitter)
spreads their reconnects over the whole window; a wait of ``base * 2**n`` give or take 20 % bunches
them around the same instants (RELIABILITY S4: at most half of the connections back in the first
500 ms after Redis is).
"""

from __future__ import annotations

import random


class Backoff:
    """``wait = b.next()`` after each failure, ``b.reset()`` after a success."""

    __slots__ = ("_rng", "attempts", "base", "cap")

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The wait before the next try, in seconds."""
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempts, 30))
        self.attempts += 1
        return self._rng.uniform(0.0, ceiling)

    @property
    def at_cap(self) -> bool:
        """The window has grown to ``cap``: the failures are not a blip."""
        return self.base * 2.0 ** min(self.attempts, 30) >= self.cap

    def reset(self) -> None:
        self.attempts = 0


def worth_a_line(failures: int) -> bool:
    """Whether the ``failures``-th failure in a row gets a log line: the first, then every
    tenth, so a long outage shows in the log without flooding it."""
    return failures == 1 or failures % 10 == 0
