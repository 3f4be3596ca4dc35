"""The scheduler: promotes due scheduled jobs and fires cron entries.

Every node runs it. Promotion is atomic per batch and announces the jobs it made runnable, so
idle nodes wake up; claim also promotes, so this loop matters most when no node is claiming.
Cron ticks are computed from the Redis clock (the ``now_ms`` the promote script returns), and the
enqueue script records the last tick per entry, so each tick is enqueued exactly once however many
nodes run and whatever their clocks say.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jobq.app import EnqueueRequest, JobQ
from jobq.cron import CronEntry
from jobq.errors import RedisUnavailable
from jobq.storage import reads
from jobq.storage.calls import AsyncRunner, map_error
from jobq.worker.slots import SlotBackoff

log = logging.getLogger("jobq.scheduler")

#: A tick older than this when first seen is skipped (a node starting long after it).
CRON_WINDOW_MS = 60_000


#: Due jobs one promote call moves: small enough that a call stays well under 10 ms even with a
#: million jobs due at once (S3 measured 1,000 per call going over 10 ms under load).
PROMOTE_BATCH = 200


@dataclass
class ScheduleReport:
    promoted: int = 0
    #: Earliest scheduled run time over the queues, ms of the Redis clock.
    next_due_ms: int | None = None
    now_ms: int | None = None
    #: (entry name, tick ms, job id) of cron jobs this pass enqueued.
    fired: list[tuple[str, int, str]] = field(default_factory=list)


class Scheduler:
    def __init__(self, app: JobQ, runner: AsyncRunner, queues: list[str], cron: list[CronEntry]) -> None:
        self.app = app
        self.runner = runner
        self.queues = queues
        self.cron = cron
        #: Promotions refused in a row, per queue whose cluster slot is moving (for the log).
        self.slots = SlotBackoff("promote", logger=log, recovered_level=logging.INFO)
        #: Cron queues this scheduler put in the queue registry.
        self._registered: set[str] = set()

    async def run_once(self) -> ScheduleReport:
        report = ScheduleReport()
        for q in self.queues:
            while True:
                try:
                    res = await self.runner.run(
                        self.app.store.promote(q, limit=PROMOTE_BATCH, now_ms=self.app.now_ms())
                    )
                except RedisUnavailable as exc:
                    if not exc.shard or len(self.queues) == 1:
                        raise
                    # Only this queue's cluster shard failed (its slot moving, its primary down):
                    # promote the others.
                    self.slots.refused(q, exc)
                    break
                self.slots.ok(q)
                report.promoted += res.promoted
                report.now_ms = res.now_ms
                if res.next_due_ms is not None and (
                    report.next_due_ms is None or res.next_due_ms < report.next_due_ms
                ):
                    report.next_due_ms = res.next_due_ms
                if res.promoted < PROMOTE_BATCH:
                    break
        if self.cron:
            now = report.now_ms if report.now_ms is not None else self.app.now_ms()
            if now is None:
                now = await self._redis_now()
            await self.fire_cron(now, report)
        return report

    async def _redis_now(self) -> int:
        return await reads.server_time_ms_async(self.runner.client)

    async def fire_cron(self, now_ms: int, report: ScheduleReport | None = None) -> ScheduleReport:
        """Enqueue every entry whose latest tick (<= now_ms) has not fired yet."""
        report = report or ScheduleReport(now_ms=now_ms)
        for entry in self.cron:
            tick = entry.schedule.prev_tick(now_ms)
            if tick is None or now_ms - tick > CRON_WINDOW_MS:
                continue
            req = EnqueueRequest(entry.task, entry.args, entry.kwargs)
            queue, spec = self.app.prepare(req)
            for shard in self.app.queue_shards(queue)[:1]:
                ids = await self.runner.run(
                    self.app.store.enqueue(
                        shard,
                        [spec],
                        now_ms=self.app.now_ms(),
                        cron_name=entry.key_name,
                        cron_tick_ms=tick,
                    )
                )
                if ids:
                    if shard not in self._registered:
                        # In the queue registry like any enqueue's queue, so a queue fed only by
                        # cron shows in `jobq stats` and `jobq jobs list`.
                        # Best effort: the tick is stored (a Redis Cluster keeps the registry
                        # in another slot); tried again at the next tick otherwise.
                        try:
                            await reads.register_queue_async(self.runner.client, self.app.keys, shard)
                            self._registered.add(shard)
                        except Exception as exc:
                            log.warning(
                                "queue %s: the queue registry was not updated: %s",
                                shard,
                                map_error(exc, "register queue", shard),
                            )
                    report.fired.append((entry.key_name, tick, ids[0]))
                    log.info("cron %s: enqueued tick %d as job %s", entry.key_name, tick, ids[0])
        return report
