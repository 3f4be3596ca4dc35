"""The acker: finishes jobs in Redis. Completed jobs are acked in batches (every job that
completes while an ack is in flight rides the next call, so a busy node pays far less than one
round trip per job); failures are recorded one by one; jobs the node gives back are released.

Every completion names its attempt (the attempt number the claim returned): Redis refuses an
ack, fail or release of any other attempt of the job, even one this node claimed again after its
lease was reaped, and the acker counts the refusal as a stale completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from jobq import _fault_injection as faults
from jobq.backoff import Backoff
from jobq.errors import ErrorCode, JobqError, RedisBusy, RedisUnavailable
from jobq.storage import clients
from jobq.storage import errors as storage_errors
from jobq.storage.calls import MAX_BATCH, AsyncRunner, ReleaseResult, split_batches
from jobq.worker.context import Context, NodeState
from jobq.worker.held import Held, HeldJobs
from jobq.worker.outcomes import Outcomes
from jobq.worker.slots import SlotBackoff

if TYPE_CHECKING:
    from jobq.app import Task

log = logging.getLogger("jobq.worker")


#: Most characters of a job's stored last error (what the fail script is given; storage cuts
#: the text at 4,000 too): the one-line error, then as much of the traceback's end as fits.
MAX_STORED_ERROR = 4000


def stored_error(error: str, trace: str | None) -> str:
    """The last error kept on a job: ``error`` (one line, what the log shows), then a blank line
    and the traceback, cut from its start to fit (the frames nearest the raise are kept)."""
    if not trace:
        return error
    room = MAX_STORED_ERROR - len(error) - 2
    if room < 200:  # a very long message: the message is what matters
        return error
    if len(trace) > room:
        trace = "…" + trace[-(room - 1) :]
    return f"{error}\n\n{trace}"


class Acker:
    """Acks, fails and releases for one node. ``run()`` is the batching loop (a task of its
    own); the rest is called by the executor, the fetcher and the node."""

    def __init__(
        self,
        ctx: Context,
        state: NodeState,
        held: HeldJobs,
        *,
        node: str,
        url: str,
        tasks: Mapping[str, Task[Any, Any]],
        max_interruptions: int,
        hard_stopped: Callable[[], bool],
        outcomes: Outcomes,
    ) -> None:
        self.ctx = ctx
        self.state = state
        self.held = held
        self.node = node
        self.url = url
        self.tasks = tasks
        self.max_interruptions = max_interruptions
        self.hard_stopped = hard_stopped
        self.outcomes = outcomes
        self._acks: dict[str, list[tuple[Held, bytes]]] = {}
        #: Acks of queues whose Redis Cluster slot is moving, waiting for their retry (so the
        #: acks of the other queues are not held up behind them); each queue's backoff below.
        self._acks_later: dict[str, list[tuple[Held, bytes]]] = {}
        self._ack_slots = SlotBackoff("ack", logger=log)
        self._ack_event = asyncio.Event()
        self._ack_lock = asyncio.Lock()
        #: Releases of named jobs go through a client that never re-sends (see :meth:`release`).
        self.once_runner: AsyncRunner | None = None
        #: Releases running on their own (buffered jobs handed back, unknown claims).
        self.side_tasks: set[asyncio.Future[Any]] = set()

    def bind(self) -> None:
        """A fresh wake-up event for the event loop the node runs on (called at its start)."""
        self._ack_event = asyncio.Event()

    @property
    def runner(self) -> AsyncRunner:
        assert self.state.runner is not None
        return self.state.runner

    # -- acks -----------------------------------------------------------------------------------
    def queue_ack(self, run: Held, encoded: bytes) -> None:
        if run.lost:
            self.discard(run)
            return
        run.finishing = True
        self._acks.setdefault(run.job.queue, []).append((run, encoded))
        self._ack_event.set()

    async def run(self) -> None:
        while True:
            await self._ack_event.wait()
            self._ack_event.clear()
            await self.flush()

    async def flush(self) -> None:
        # One flush at a time: shutdown's flush waits for the acker's batch in flight, so a
        # completed job is never released (and run again) while its ack is on the wire.
        async with self._ack_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        if self.state.stopping:
            self._undefer_acks()  # at shutdown every ack is retried in place
        while self._acks:
            batches, self._acks = self._acks, {}
            for q in [q for q in batches if q in self._acks_later and not self.state.stopping]:
                self._acks_later[q].extend(batches.pop(q))  # its retry is already due later
            await asyncio.gather(
                *(
                    self._ack_batch(q, batch)
                    for q, items in batches.items()
                    for batch in split_batches(items, lambda it: len(it[1]))
                )
            )

    async def _ack_batch(self, queue: str, items: list[tuple[Held, bytes]]) -> None:
        call = self.ctx.store.ack(
            queue,
            self.node,
            [(r.job.id, enc) for r, enc in items],
            attempts=[r.job.fence for r, _ in items],
            now_ms=self.ctx.now_ms(),
        )
        backoff = Backoff(0.05, 2.0)
        if faults.ACTIVE:
            faults.crash_point("before_ack")
        if faults.HOLD:
            await faults.hold_point("before_ack")
        while True:
            try:
                codes = await self.runner.run(call)
                if faults.ACTIVE:
                    faults.crash_point("after_ack_sent")
                break
            except (RedisUnavailable, RedisBusy) as exc:
                if isinstance(exc, RedisUnavailable) and exc.shard and not self.state.stopping:
                    self._defer_acks(queue, items, exc)
                    return
                # Retrying is safe: a repeated ack of an attempt that finished returns 0.
                log.warning("ack of %d job(s) failed: %s; retrying", len(items), exc)
                await asyncio.sleep(backoff.next())
                if self.hard_stopped() and backoff.at_cap:
                    return
            except JobqError as exc:
                # Not a connection problem: the jobs are left to their leases (the heartbeat
                # releases them once they are unknown here); they run again, never get lost.
                log.error("ack of %d job(s) refused: %s", len(items), exc)
                for run, _ in items:
                    self.held.forget(run)
                return
        self.state.last_ok = time.monotonic()
        self._ack_slots.ok(queue)
        now = time.monotonic()
        for (run, _), code in zip(items, codes, strict=True):
            self.held.forget(run)
            if code >= 0:
                self.outcomes.completed(queue, run.job.task, now - run.started)
            elif code == ErrorCode.LEASE_LOST:
                self.stale(run)
            else:
                log.warning("job %s vanished before its ack (deleted by an operator?)", run.job.id)

    def _defer_acks(self, queue: str, items: list[tuple[Held, bytes]], exc: RedisUnavailable) -> None:
        """Only ``queue``'s cluster slot refused the ack (it is moving to another primary): try
        these again after a backoff of the queue's own, and let the other queues' acks go on."""
        delay = self._ack_slots.refused(queue, exc, "; retrying")
        waiting = self._acks_later.setdefault(queue, [])
        if not waiting:
            asyncio.get_running_loop().call_later(delay, self._undefer_acks, queue)
        waiting.extend(items)

    def _undefer_acks(self, queue: str | None = None) -> None:
        """Put deferred acks (of ``queue``, or all) back in line for the acker."""
        for q in [queue] if queue is not None else list(self._acks_later):
            items = self._acks_later.pop(q, None)
            if items:
                self._acks.setdefault(q, []).extend(items)
                self._ack_event.set()

    # -- failures -------------------------------------------------------------------------------
    async def fail(
        self,
        run: Held,
        error: str,
        *,
        delay: float | None = None,
        dead: bool = False,
        trace: str | None = None,
    ) -> None:
        """Record a failed attempt (its slot is already free). ``error`` is one line (logged);
        ``trace``, the task's traceback, is kept after it on the job (see :func:`stored_error`)."""
        job = run.job
        run_s = time.monotonic() - run.started
        if run.lost:
            self.discard(run)
            return
        run.finishing = True
        log.warning(
            "job %s failed: task=%s queue=%s attempt=%d/%d error=%s",
            job.id,
            job.task,
            job.queue,
            job.attempts,
            job.max_attempts,
            error,
            extra={
                "job_id": job.id,
                "task": job.task,
                "queue": job.queue,
                "attempt": job.attempts,
                "error": error,
                "node": self.node,
            },
        )
        call = self.ctx.store.fail(
            job.queue,
            self.node,
            job.id,
            stored_error(error, trace),
            dead=dead,
            delay_ms=None if delay is None else round(delay * 1000),
            attempt=job.fence,
            now_ms=self.ctx.now_ms(),
        )
        for attempt in range(5):
            try:
                res = await self.runner.run(call)
                break
            except (RedisUnavailable, RedisBusy) as exc:
                log.warning("fail of job %s not recorded yet: %s", job.id, exc)
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
            except JobqError as exc:
                log.error("fail of job %s refused: %s; its lease will run out", job.id, exc)
                self.held.forget(run)
                return
        else:
            # The lease will expire and the reaper applies the retry policy instead.
            self.held.forget(run)
            return
        self.held.forget(run)
        if res.repeated:
            log.info(
                "job %s: the failure of attempt %d was already recorded (a repeated call)",
                job.id,
                job.attempts,
            )
        self.outcomes.dead_trimmed(job.queue, res.dead_trimmed)
        if res.outcome == "lease_lost":
            self.stale(run)
            return
        self.outcomes.failed(job.queue, job.task, run_s, res.outcome)

    async def progress(self, run: Held, fraction: float, message: str | None) -> None:
        """Store a running job's progress (jobq.current_job().progress); never raises."""
        if run.lost or run.finishing:
            return
        job = run.job
        call = self.ctx.store.progress(
            job.queue, self.node, job.id, job.fence, fraction, message, now_ms=self.ctx.now_ms()
        )
        try:
            await self.runner.run(call)
        except JobqError as exc:
            log.warning("job %s: progress not recorded: %s", job.id, exc)

    def stale(self, run: Held) -> None:
        """Redis refused the ack or fail: another node holds the job now (stale completion), or
        it was cancelled while its ack or fail was on its way."""
        self.held.forget(run)
        if run.cancelled:
            self.outcomes.cancelled(run.job.queue, run.job.task)
            return
        self.outcomes.stale(run.job.queue, run.job.id, run.job.task)

    def discard(self, run: Held) -> None:
        """A job known lost or cancelled (and counted) finished here: drop its outcome."""
        self.held.forget(run)
        why = "it was cancelled" if run.cancelled else "its lease was lost"
        log.info("job %s (%s): finished after %s; outcome discarded", run.job.id, run.job.task, why)

    # -- releases -------------------------------------------------------------------------------
    def release_buffered(self) -> None:
        """Hand every buffered job back to ready now (release: its attempt is not counted)."""
        for q, runs in self.held.drain_buffer().items():
            self.release_soon(q, runs)

    def release_soon(self, queue: str, runs: list[Held]) -> None:
        """Release unstarted jobs of ``queue`` in a side task (their attempts are not counted)."""
        self.spawn(self._release_runs(queue, runs))

    def release_unknown_soon(self, queue: str, ids: list[str]) -> None:
        """Release claims of ``queue`` this node never saw, in a side task."""
        self.spawn(self._release_unknown(queue, ids))

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` beside the fetcher; the node's shutdown waits for these side tasks."""
        t = asyncio.ensure_future(coro)
        self.side_tasks.add(t)
        t.add_done_callback(self.side_tasks.discard)

    async def _release_runs(self, queue: str, runs: list[Held]) -> None:
        for i in range(0, len(runs), MAX_BATCH):
            part = runs[i : i + MAX_BATCH]
            try:
                await self.release(queue, part)
            except Exception as exc:
                # Still in the active list and known here, so still leased: the release at exit,
                # or the reaper, takes them back.
                log.warning("queue %s: could not release %d unstarted job(s): %s", queue, len(part), exc)
                continue
            for run in part:
                self.held.forget(run)

    async def _release_unknown(self, queue: str, ids: list[str]) -> None:
        try:
            await self.release(queue, ids)  # never started here: attempt given back
        except JobqError as exc:
            # They stay in the active list, leased; the heartbeat finds them again two beats on.
            log.warning("queue %s: releasing %d unknown job(s) failed: %s", queue, len(ids), exc)

    def _max_interruptions(self, run: Held) -> int:
        """The release limit for one held job: 0 if it never started (its attempt is given back),
        else the interruptions at which it is dead-lettered (the task's, else the node's)."""
        if run.task is None:
            return 0
        task = self.tasks.get(run.job.task)
        limit = task.defaults.max_interruptions if task is not None else None
        if limit is None:
            limit = self.max_interruptions
        return limit if limit > 0 else 1_000_000

    async def release(self, queue: str, held: list[Held] | list[str] | None) -> ReleaseResult:
        """Release jobs this node holds: ``held`` runs (each names its attempt; a started one
        counts an interruption), ids of claimed jobs the node never saw, or ``None`` = every job
        in the node's active list (as never started)."""
        runner = self.runner
        ids: list[str] | None = None
        attempts: list[int | None] | None = None
        limits: list[int] | None = None
        if held is not None:
            if not held:
                return ReleaseResult(0)  # an empty list must not mean "everything held"
            runs = [r for r in held if isinstance(r, Held)]
            if runs:
                ids = [r.job.id for r in runs]
                attempts = [r.job.fence for r in runs]
                limits = [self._max_interruptions(r) for r in runs]
            else:
                ids = [r for r in held if isinstance(r, str)]
            # Never re-sent after a connection error: a release whose reply was lost may have
            # run, and this node may have claimed the job again since; a blind re-send would
            # hand that new claim back while it runs (F8: jobs ran twice, no reap). What is left
            # unreleased, the heartbeat finds again, or the reaper takes back.
            if self.once_runner is None:
                once = storage_errors.no_retry_async()
                self.once_runner = AsyncRunner(clients.async_client(self.url, retry=once))
            runner = self.once_runner
        released = interrupted = trimmed = 0
        dead: list[tuple[str, str]] = []
        while True:
            call = self.ctx.store.release(
                queue,
                self.node,
                ids,
                attempts=attempts,
                max_interruptions=limits,
                now_ms=self.ctx.now_ms(),
            )
            res = await runner.run(call)
            released += res.released
            interrupted += res.interrupted
            trimmed += res.dead_trimmed
            dead += res.dead
            self._count_release(queue, res)
            if ids is not None or res.released + len(res.dead) < MAX_BATCH:
                return ReleaseResult(released, interrupted, dead, trimmed)

    def _count_release(self, queue: str, res: ReleaseResult) -> None:
        """Count and log what one release call did besides giving jobs back."""
        self.outcomes.interrupted(queue, res.interrupted)
        for job_id, reason in res.dead:
            self.outcomes.dead_lettered(queue, job_id, reason, "release")
        self.outcomes.dead_trimmed(queue, res.dead_trimmed)

    async def close(self) -> None:
        if self.once_runner is not None:
            with contextlib.suppress(Exception):
                await self.once_runner.client.aclose()
