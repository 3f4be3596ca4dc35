"""The one door to time for jobq's Python side.

Shared time (leases, schedules, deadlines, cron ticks) is the Redis server clock: scripts call
``TIME`` unless they are handed an explicit ``now_ms``. :class:`SystemClock` hands them none, so
production runs on one clock whatever the skew between machines. :class:`FakeClock` hands them its
own time, so tests (and users' tests) can drive leases, backoff and cron without sleeping. Local
waits (poll intervals, backoff sleeps, self-fencing) use ``monotonic()``.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def redis_now_ms(self) -> int | None:
        """The ``now_ms`` to pass to scripts: ``None`` means "use the Redis server clock"."""
        ...

    def monotonic(self) -> float:
        """Seconds on a local monotonic clock, for waits and timeouts."""
        ...


class SystemClock:
    """Production clock: shared time from Redis, local waits from ``time.monotonic``."""

    def redis_now_ms(self) -> int | None:
        return None

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock tests move by hand. ``now_ms`` is passed to every script call."""

    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self._lock = threading.Lock()
        self._now_ms = now_ms
        self._mono = 0.0

    def redis_now_ms(self) -> int | None:
        with self._lock:
            return self._now_ms

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        with self._lock:
            self._now_ms += round(seconds * 1000)
            self._mono += seconds

    def set_ms(self, now_ms: int) -> None:
        with self._lock:
            self._mono += max(0, now_ms - self._now_ms) / 1000
            self._now_ms = now_ms
