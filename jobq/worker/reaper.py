"""The reaper: puts the jobs of dead or silent nodes back to work.

Every node runs it; the ``reap`` script is atomic, so many reapers at once re-queue each expired
job exactly once. A once-per-interval guard key spares Redis the duplicate passes. After this node
loses and regains its connection to Redis it waits one lease before reaping, so live nodes that
were cut off too get the chance to renew their leases first. A queue whose Redis Cluster slot
refused the reap (moving to another primary) is skipped, and waits one lease after its last
refusal, for the same reason: no node could renew its leases while the slot moved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jobq.errors import RedisUnavailable
from jobq.storage import reads
from jobq.storage.calls import MAX_REAP, AsyncRunner
from jobq.worker.context import Context
from jobq.worker.slots import SlotBackoff

log = logging.getLogger("jobq.reaper")


@dataclass
class ReapReport:
    """What one pass did, per physical queue."""

    requeued: dict[str, list[str]] = field(default_factory=dict)
    dead: dict[str, list[str]] = field(default_factory=dict)
    #: Dead letters deleted because a queue's dead-letter list was over ``dead_max``.
    trimmed: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(map(len, self.requeued.values())) + sum(map(len, self.dead.values()))


class Reaper:
    """Reaps expired leases of a set of queues. ``run_once()`` is one pass."""

    def __init__(
        self,
        app: Context,
        runner: AsyncRunner,
        queues: list[str],
        *,
        node_ttl_ms: int,
        interval: float,
        limit: int = MAX_REAP,
        hold: float = 0.0,
    ) -> None:
        self.app = app
        self.runner = runner
        self.queues = queues
        self.node_ttl_ms = node_ttl_ms
        self.interval = interval
        self.limit = limit
        #: Seconds a queue is not reaped after its cluster slot refused a reap (one lease).
        self.hold = hold
        #: Queues whose slot refused a reap, each left alone for ``hold`` seconds.
        self.slots = SlotBackoff("reap", hold=hold, logger=log, recovered_level=logging.INFO)

    async def run_once(self, *, guard: bool = True) -> ReapReport:
        """Reap every queue until no expired lease is left (bounded batches)."""
        report = ReapReport()
        guard_ms = max(1, int(self.interval * 1000 * 0.9)) if guard else 0
        for q in self.queues:
            if self.slots and self.slots.waiting(q):
                continue
            first = True
            while True:
                try:
                    res = await self.runner.run(
                        self.app.store.reap(
                            q,
                            node_ttl_ms=self.node_ttl_ms,
                            limit=self.limit,
                            guard_ms=guard_ms if first else 0,
                            now_ms=self.app.now_ms(),
                        )
                    )
                except RedisUnavailable as exc:
                    if not exc.slot or len(self.queues) == 1:
                        raise
                    self.slots.refused(q, exc, "; the others go on")
                    break
                self.slots.ok(q)
                first = False
                if res.skipped:
                    break
                if res.dead_trimmed:
                    report.trimmed[q] = report.trimmed.get(q, 0) + res.dead_trimmed
                    log.warning(
                        "queue %s: %d dead letter(s) deleted, oldest first: the dead-letter list was "
                        "over dead_max (%d)",
                        q,
                        res.dead_trimmed,
                        self.app.store.limits.dead_max,
                    )
                if res.requeued:
                    report.requeued.setdefault(q, []).extend(res.requeued)
                    log.warning(
                        "queue %s: re-queued %d job(s) whose node stopped renewing its lease",
                        q,
                        len(res.requeued),
                    )
                if res.dead:
                    report.dead.setdefault(q, []).extend(res.dead)
                    log.error(
                        "queue %s: dead-lettered %d job(s) whose lease expired on their last attempt: %s",
                        q,
                        len(res.dead),
                        ", ".join(res.dead[:10]),
                    )
                if len(res.requeued) + len(res.dead) < self.limit:
                    break
        return report


async def recover_inherited(app: Context, runner: AsyncRunner, node: str, queues: list[str]) -> int:
    """At start-up: jobs already in this node's active sets were claimed by an earlier process
    with the same node id that died before finishing them (a crash, then a restart under a fixed
    ``--node-id``). Handle them as a reaped lease would: the attempt stays counted, the job is
    retried at once, or dead-lettered with reason ``lease_expired`` when no attempt is left.
    (Releasing them instead would uncount the attempt, and a task that crashes its node would
    run forever: RELIABILITY F11.) The fail names no attempt: it is whichever this node holds.
    Returns the number of jobs recovered."""
    recovered = 0
    for q in queues:
        for job_id in await reads.active_ids_async(runner.client, app.keys, q, node, 1000):
            res = await runner.run(
                app.store.fail(
                    q,
                    node,
                    job_id,
                    "lease_expired: its node restarted before the attempt finished",
                    delay_ms=0,
                    count_reap=True,  # a retry counts like a reap: every re-run is visible
                    now_ms=app.now_ms(),
                )
            )
            if res.outcome in ("retry", "dead"):
                recovered += 1
                log.warning(
                    "queue %s: job %s left by an earlier run of this node: %s", q, job_id, res.outcome
                )
    return recovered
