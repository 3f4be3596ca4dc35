"""One helper for "this queue's Redis Cluster slot is moving, back off".

While a slot moves to another primary, Redis refuses every script of the queues that live in it
(the slot guard, lua/lib/common.lua) and :func:`jobq.storage.calls.map_error` marks the error
``RedisUnavailable(slot=True)``. A node then goes on with its other queues and comes back to the
refused one later. The claims, acks, lease renewals, the reaper and the scheduler each keep one
:class:`SlotBackoff`: per queue, the refusals in a row, and until when the queue is left alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from jobq.backoff import Backoff, worth_a_line

log = logging.getLogger("jobq.worker")


class SlotBackoff:
    """Per queue: refusals in a row and the monotonic time before which the queue is skipped.

    ``what`` names the refused operation in the log lines. The wait after a refusal grows from
    ``base`` to ``cap`` seconds (:class:`jobq.backoff.Backoff`), or is always ``hold`` seconds
    when that is given (the reaper: one lease, so live nodes renew first)."""

    def __init__(
        self,
        what: str,
        *,
        base: float = 0.05,
        cap: float = 2.0,
        hold: float | None = None,
        logger: logging.Logger = log,
        recovered_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.base, self.cap, self.hold = base, cap, hold
        self.log = logger
        self.recovered_level = recovered_level
        self.clock = clock
        #: Queue -> (its backoff, the monotonic time before which it is skipped).
        self.down: dict[str, tuple[Backoff, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.down)

    def waiting(self, queue: str) -> bool:
        """Is ``queue`` still to be left alone after a refusal?"""
        down = self.down.get(queue)
        return down is not None and self.clock() < down[1]

    def refused(self, queue: str, exc: BaseException, note: str = "") -> float:
        """Count a refusal of ``queue``'s slot (logged at the first ones, then sparsely) and
        return the seconds to wait before trying it again."""
        down = self.down.get(queue)
        backoff = down[0] if down is not None else Backoff(self.base, self.cap)
        delay = backoff.next()
        if self.hold is not None:
            delay = self.hold
        self.down[queue] = (backoff, self.clock() + delay)
        if worth_a_line(backoff.attempts):
            self.log.warning(
                "queue %s: %s refused (%d in a row): %s%s", queue, self.what, backoff.attempts, exc, note
            )
        return delay

    def attempts(self, queue: str) -> int:
        """Refusals of ``queue`` in a row (0: none)."""
        down = self.down.get(queue)
        return 0 if down is None else down[0].attempts

    def ok(self, queue: str) -> None:
        """``queue`` answered: forget its refusals (one log line if there were any)."""
        if self.down and self.down.pop(queue, None) is not None:
            self.log.log(self.recovered_level, "queue %s: %s succeeds again", queue, self.what)
