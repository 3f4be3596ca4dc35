"""One place where a node records what happened to its jobs: the node's counters (``stats``,
summed up in the line a node logs when it stops), the Prometheus metrics when the node has
them, and the log lines that go with an outcome. The components call one method per outcome and
never look at the metrics themselves."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobq.metrics import Metrics

log = logging.getLogger("jobq.worker")


class Outcomes:
    """The outcome hook of one node. ``metrics`` may be None (then only counters and logs), and
    may be set later (before the node runs)."""

    def __init__(self, metrics: Metrics | None = None, *, dead_max: int = 0) -> None:
        self.metrics = metrics
        self.dead_max = dead_max
        self.stats = {"claimed": 0, "completed": 0, "failed": 0, "stale": 0, "lost": 0, "interrupted": 0}

    def claimed(self, n: int) -> None:
        self.stats["claimed"] += n

    def started(self, queue: str, task: str, wait_s: float) -> None:
        """A job started ``wait_s`` after it became ready (on the Redis clock)."""
        if self.metrics is not None:
            self.metrics.job_started(queue, task, wait_s)

    def completed(self, queue: str, task: str, run_s: float) -> None:
        self.stats["completed"] += 1
        if self.metrics is not None:
            self.metrics.job_completed(queue, task, run_s)

    def failed(self, queue: str, task: str, run_s: float, outcome: str) -> None:
        """A failed attempt Redis recorded: ``outcome`` "retry" or "dead"."""
        self.stats["failed"] += 1
        if self.metrics is not None:
            self.metrics.job_failed(queue, task, run_s, outcome)

    def dead_lettered(self, queue: str, job_id: str, reason: str, where: str) -> None:
        """A script dead-lettered a job that did not run (at ``where``: claim, release)."""
        log.error("queue %s: job %s dead-lettered at %s: %s", queue, job_id, where, reason)
        if self.metrics is not None:
            self.metrics.job_failed(queue, "", 0.0, "dead")

    def stale(self, queue: str, job_id: str, task: str) -> None:
        """Redis refused an ack or fail: another node holds the job now (stale completion)."""
        self.stats["stale"] += 1
        log.warning(
            "job %s (%s, queue %s) finished after this node lost its lease: result discarded "
            "(stale completion)",
            job_id,
            task,
            queue,
        )
        if self.metrics is not None:
            self.metrics.job_stale(queue, task)

    def lost(self, queue: str, task: str, *, started: bool) -> None:
        """A held job is no longer this node's; if it had started, its outcome is stale."""
        self.stats["lost"] += 1
        if started and self.metrics is not None:
            self.metrics.job_stale(queue, task)

    def interrupted(self, queue: str, n: int) -> None:
        """``n`` started jobs released before they finished (shutdown)."""
        if n:
            self.stats["interrupted"] += n
            if self.metrics is not None:
                self.metrics.jobs_interrupted(queue, n)

    def dead_trimmed(self, queue: str, n: int) -> None:
        """A script deleted ``n`` dead letters of ``queue`` because the dead-letter list was over
        its count bound: say so (one line per trim) and count them."""
        if n <= 0:
            return
        log.warning(
            "queue %s: %d dead letter(s) deleted, oldest first: the dead-letter list was over dead_max (%d)",
            queue,
            n,
            self.dead_max,
        )
        if self.metrics is not None:
            self.metrics.dead_trimmed_by_count(queue, n)

    def reaped(self, queue: str, n: int) -> None:
        """The reaper re-queued or dead-lettered ``n`` jobs of expired leases."""
        if self.metrics is not None:
            self.metrics.jobs_reaped(queue, n)

    def trimmed_by_reaper(self, queue: str, n: int) -> None:
        """The reaper's pass deleted ``n`` dead letters over the count bound (it logs its own)."""
        if self.metrics is not None:
            self.metrics.dead_trimmed_by_count(queue, n)
