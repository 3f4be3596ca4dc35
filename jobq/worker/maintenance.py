"""A node's maintenance loop: the scheduler's pass (due jobs and cron) and the reaper's (expired
leases), each on its own interval, on the node's event loop. Built by the node, which hands it
the runner and two callbacks of its wake-ups; it reports what the reaper did to the outcomes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from jobq.app import JobQ
from jobq.errors import RedisBusy, RedisUnavailable
from jobq.storage.calls import AsyncRunner
from jobq.worker.context import NodeState
from jobq.worker.outcomes import Outcomes
from jobq.worker.reaper import Reaper
from jobq.worker.scheduler import Scheduler

log = logging.getLogger("jobq.worker")


class Maintenance:
    """``run()`` until cancelled. ``poke()``: look for work now (the reaper put some back);
    ``all_armed()``: every queue's wake-up token is armed (an armed idle node needs no
    promotion pass: it claims when the earliest scheduled job it saw comes due)."""

    def __init__(
        self,
        app: JobQ,
        runner: AsyncRunner,
        state: NodeState,
        outcomes: Outcomes,
        queues: list[str],
        *,
        lease: float,
        node_ttl_ms: int,
        reap_interval: float,
        schedule_interval: float,
        poke: Callable[[], None],
        all_armed: Callable[[], bool],
    ) -> None:
        self.app = app
        self.state = state
        self.outcomes = outcomes
        self.lease = lease
        self.reap_interval = reap_interval
        self.schedule_interval = schedule_interval
        self.poke = poke
        self.all_armed = all_armed
        self.reaper = Reaper(app, runner, queues, node_ttl_ms=node_ttl_ms, interval=reap_interval, hold=lease)
        self.scheduler = Scheduler(app, runner, queues, app.cron_entries)

    async def run(self) -> None:
        next_reap = time.monotonic() + random.uniform(0, self.reap_interval)
        next_schedule = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                if now >= next_schedule:
                    next_schedule = now + self.schedule_interval
                    # An idle node's claims promote due jobs already: skip the extra round trips
                    # unless cron needs the pass (or the node is too busy to claim).
                    # An armed idle node claims when the earliest scheduled job it saw comes due,
                    # and an earlier one enqueued later wakes an armed node: no pass either.
                    if self.app.cron_entries or (
                        now - self.state.promoted_at > self.schedule_interval and not self.all_armed()
                    ):
                        await self.scheduler.run_once()
                if now >= next_reap:
                    next_reap = now + self.reap_interval * random.uniform(0.9, 1.1)
                    if now >= self.state.reap_not_before:
                        await self._reap()
            except (RedisUnavailable, RedisBusy) as exc:
                log.warning("maintenance pass failed: %s", exc)
                # After a reconnect, let live nodes renew before reaping anything.
                self.state.reap_not_before = time.monotonic() + self.lease
            except Exception:
                log.exception("maintenance pass failed")
            await asyncio.sleep(max(0.01, min(next_reap, next_schedule) - time.monotonic()))

    async def _reap(self) -> None:
        report = await self.reaper.run_once()
        if report.requeued:
            self.poke()  # the reap announces too; don't wait for pub/sub
        for q, ids in report.requeued.items():
            self.outcomes.reaped(q, len(ids))
        for q, ids in report.dead.items():
            self.outcomes.reaped(q, len(ids))
        for q, n in report.trimmed.items():
            self.outcomes.trimmed_by_reaper(q, n)
