"""The executor: runs claimed jobs in the node's concurrency slots. ``async def`` tasks run on
the event loop, plain ``def`` tasks in a thread pool, each under its timeout; jobs claimed ahead
of a free slot wait in the prefetch buffer (the held-jobs table) and start in the same loop turn
a slot frees up. It also takes jobs away that are no longer this node's (lost, fenced)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ctypes
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from jobq import _fault_injection as faults
from jobq import codec, tracing
from jobq.current import CurrentJob, reset_current, set_current
from jobq.errors import DecodeError, EncodeError, Fail, JobTimeout, Retry
from jobq.storage.calls import ClaimedJob
from jobq.worker.context import NodeState
from jobq.worker.held import Held, HeldJobs
from jobq.worker.outcomes import Outcomes

if TYPE_CHECKING:
    from jobq.app import Task

log = logging.getLogger("jobq.worker")

#: ``asyncio.timeout`` (Python 3.11+): an async task's timeout without a task of its own.
_TIMEOUT_CM: Callable[[float], Any] | None = getattr(asyncio, "timeout", None)

#: A buffered job is started only if its deadline is at least this far ahead (ms, Redis clock).
DEADLINE_MARGIN_MS = 5


class Finisher(Protocol):
    """Where the executor sends what it is done with (:class:`jobq.worker.acker.Acker`)."""

    def queue_ack(self, run: Held, encoded: bytes) -> None: ...

    async def fail(
        self,
        run: Held,
        error: str,
        *,
        delay: float | None = None,
        dead: bool = False,
        trace: str | None = None,
    ) -> None: ...

    def release_soon(self, queue: str, runs: list[Held]) -> None: ...

    def release_buffered(self) -> None: ...

    async def progress(self, run: Held, fraction: float, message: str | None) -> None: ...


class UnknownTask(Exception):
    pass


#: Where the frames that call a task live (the worker, the thread pool, the event loop): left
#: out of the top of a task's traceback, which then starts at the task's own code.
_CALLERS = tuple(
    os.path.dirname(m.__file__ or "") + os.sep for m in (sys.modules[__name__], concurrent.futures, asyncio)
)


def _trace(exc: BaseException) -> str:
    """The traceback of a task's exception, as Python prints it but from the task's own frame
    on, for the job's last error (``jobq status``, ``GET /jobs/{id}``, the dashboard's job page)."""
    te = traceback.TracebackException.from_exception(exc)
    frames = list(te.stack)
    first = 0
    while first < len(frames) - 1 and frames[first].filename.startswith(_CALLERS):
        first += 1
    te.stack = traceback.StackSummary.from_list(frames[first:])
    return "".join(te.format()).rstrip()


class SyncCall:
    """Runs a plain function in the pool and lets the loop interrupt it on timeout.

    The interrupt is an asynchronous exception, so it must never land outside the task (in the
    pool's own code, where it would kill the pool thread): it is only sent while the task runs,
    under a lock the thread takes to mark the task done, and one that arrives as the task returns
    is absorbed here."""

    __slots__ = ("abandoned", "args", "current", "done", "fn", "kwargs", "lock", "thread_id", "trace")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        current: CurrentJob | None = None,
        trace: Any = None,
    ) -> None:
        self.fn = fn
        self.current = current
        #: The OpenTelemetry context of the attempt's ``process`` span (jobq.tracing), made
        #: current in the thread so the task's own spans are its children; None = no tracing.
        self.trace = trace
        self.args = args
        self.kwargs = kwargs
        self.thread_id: int | None = None
        self.done = False
        #: The loop stopped waiting for it: if it has not started yet, it never will.
        self.abandoned = False
        self.lock = threading.Lock()

    def __call__(self) -> Any:
        with self.lock:
            if self.abandoned:
                self.done = True
                raise JobTimeout("gave up before the task started")
            self.thread_id = threading.get_ident()
        finished = False
        result: Any = None
        # The pool thread does not run in the job's context: jobq.current_job() is set here.
        token = None if self.current is None else set_current(self.current)
        trace_token = None if self.trace is None else tracing.attach(self.trace)
        try:
            try:
                result = self.fn(*self.args, **self.kwargs)
                finished = True
            finally:
                with self.lock:
                    self.done = True
                if token is not None:
                    reset_current(token)
                if trace_token is not None:
                    tracing.detach(trace_token)
        except JobTimeout:
            self.done = True  # it may have landed while the thread was marking itself done
            if not finished:
                raise
        return result

    def interrupt(self) -> bool:
        """Raise JobTimeout in the thread at its next bytecode. A thread blocked in a system
        call notices only when the call returns (the documented caveat)."""
        with self.lock:
            if self.thread_id is None or self.done:
                return False
            n = ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.thread_id), ctypes.py_object(JobTimeout)
            )
            return bool(n == 1)

    def give_up(self) -> None:
        with self.lock:
            self.abandoned = True


class ProgressTo:
    """A running job's progress writer (what ``jobq.current_job().progress`` calls).

    It finds the job's entry in the held table by its claim and holds no reference to the entry
    itself: the entry holds the CurrentJob, which holds this writer, and that cycle kept every
    finished job's objects (entry, task, context, CurrentJob...) alive until the cyclic garbage
    collector ran, which cost a drain of short jobs ~10 us of worker CPU per job. One object, not
    a closure (a function, its cells and their tuple), for the same reason. An entry no longer in
    the table, or replaced by a newer claim of the same id, was finishing or lost: the write is
    skipped, as :meth:`Finisher.progress` skips it for such an entry."""

    __slots__ = ("finisher", "held", "job")

    def __init__(self, held: HeldJobs, finisher: Finisher, job: ClaimedJob) -> None:
        self.held = held
        self.finisher = finisher
        self.job = job

    async def __call__(self, fraction: float, message: str | None) -> None:
        run = self.held.get(self.job.id)
        if run is not None and run.job is self.job:
            await self.finisher.progress(run, fraction, message)


class Executor:
    """Starts, runs and stops the node's jobs. ``tasks`` is the app's task registry."""

    def __init__(
        self,
        state: NodeState,
        held: HeldJobs,
        finisher: Finisher,
        *,
        node: str,
        tasks: Mapping[str, Task[Any, Any]],
        max_payload: int,
        concurrency: int,
        max_zombies: int,
        request_stop: Callable[[], None],
        outcomes: Outcomes,
    ) -> None:
        self.state = state
        self.held = held
        self.finisher = finisher
        self.node = node
        self.tasks = tasks
        self.max_payload = max_payload
        self.concurrency = concurrency
        self.max_zombies = max_zombies
        self.request_stop = request_stop
        self.outcomes = outcomes
        #: Each job runs in a fresh copy of this context (the node sets it when it starts).
        self.job_context = contextvars.Context()
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="jobq-task")
        self._sync_calls: set[SyncCall] = set()
        if tracing.AVAILABLE:
            tracing.worker_tracing()  # imports the API now, not on the loop at the first job

    # -- starting -------------------------------------------------------------------------------
    def take(self, jobs: list[ClaimedJob], now_ms: int) -> None:
        """Claimed jobs: start them in free slots, buffer the rest (the prefetch buffer)."""
        held = self.held
        now = time.monotonic()
        for job in jobs:
            old = held.get(job.id)
            if old is not None and not old.finishing:
                # Claimed again while an earlier attempt still runs (or waits) here: that
                # attempt's lease was reaped, so it is lost even if the heartbeat has not noticed.
                self.lose(old, "claimed again after its lease was reaped")
            run = held.add(job, now, now_ms)
            if held.busy < self.concurrency and not held.buffer:
                self._start(run, now)
            else:
                held.push_buffered(run)
        self.outcomes.claimed(len(jobs))
        if self.state.stopping and held.buffer:
            self.finisher.release_buffered()  # claimed while the stop came: hand back what cannot start

    def _start(self, run: Held, now: float) -> None:
        job = run.job
        # Ready -> started on the Redis clock: at the claim, plus the time in the buffer.
        self.outcomes.started(job.queue, job.task, (run.now_ms - job.ready_ms) / 1000 + (now - run.started))
        self.held.take_slot(run, now)
        # Each job runs in a fresh copy of the node's context (the task copies it), never in a
        # copy of the job's whose end started it: a ContextVar set by one job must not leak.
        run.task = self.job_context.run(asyncio.create_task, self._execute(run))

    @staticmethod
    def deadline_passed(run: Held, now: float) -> bool:
        """Whether a buffered job's deadline may have passed: the Redis clock at its claim plus
        the local time since, with a margin. Such a job is released instead of started, and the
        next claim (the Redis clock decides) dead-letters it as ``expired``, or runs it if its
        deadline is in fact still ahead."""
        deadline = run.job.deadline_ms
        if deadline <= 0:
            return False
        return run.now_ms + (now - run.started) * 1000 + DEADLINE_MARGIN_MS >= deadline

    def _slot_done(self, run: Held) -> None:
        now = time.monotonic()
        if not self.held.free_slot(run, now):
            return
        while not self.state.stopping and not self.state.fenced:
            # The next job starts in this loop turn, not after a claim round trip.
            nxt = self.held.pop_buffered()
            if nxt is None:
                break
            if self.deadline_passed(nxt, now):
                self.finisher.release_soon(nxt.job.queue, [nxt])
                continue
            self._start(nxt, now)
            break
        self.held.check_room()  # the fetcher may wait for room (not for work)

    # -- running --------------------------------------------------------------------------------
    async def _execute(self, run: Held) -> None:
        job = run.job
        if faults.ACTIVE:
            faults.crash_point("mid_execute")
        run.current = CurrentJob(
            job.id,
            job.queue,
            job.task,
            job.attempts,
            writer=ProgressTo(self.held, self.finisher, job),
            loop=asyncio.get_running_loop(),
        )
        set_current(run.current)  # this task runs in its own context copy: nothing to reset
        # The attempt's span (jobq[otel] with a tracer provider set); current in this task's
        # context, so an async task's own spans are its children.
        span = self._process_span(run) if tracing.AVAILABLE and tracing.worker_tracing() else None
        try:
            result = await self._invoke(run, span)
        except asyncio.CancelledError:
            # Lost lease or hard shutdown: nothing to ack; release or the reaper takes it back.
            self._slot_done(run)
            if span is not None:  # stopped from outside: not the task's error
                span.end(self._gone(run) or ("interrupted" if self.state.stopping else "lost"))
            raise
        except Retry as exc:
            await self._fail(run, f"Retry: {exc.reason}", delay=exc.delay, span=span, exc=exc)
        except Fail as exc:
            await self._fail(run, f"Fail: {exc.reason}", dead=True, span=span, exc=exc)
        except DecodeError as exc:
            await self._fail(run, f"decode_error: {exc}", dead=True, span=span, exc=exc)
        except (JobTimeout, asyncio.TimeoutError, TimeoutError) as exc:
            await self._fail(run, f"timeout: ran longer than {job.timeout_ms / 1000:g} s", span=span, exc=exc)
        except UnknownTask as exc:
            await self._fail(run, str(exc), span=span, exc=exc)
        except Exception as exc:
            await self._fail(run, f"{type(exc).__name__}: {exc}", span=span, exc=exc, trace=_trace(exc))
        else:
            try:
                encoded = b"" if result is None else codec.encode_result(result, self.max_payload)
            except EncodeError as exc:
                log.warning("job %s (%s, queue %s): result not stored: %s", job.id, job.task, job.queue, exc)
                encoded = b""
            self._slot_done(run)
            self.finisher.queue_ack(run, encoded)
            if span is not None:
                span.end(self._gone(run) or "done")

    async def _fail(
        self,
        run: Held,
        error: str,
        *,
        delay: float | None = None,
        dead: bool = False,
        span: tracing.ProcessSpan | None = None,
        exc: BaseException | None = None,
        trace: str | None = None,
    ) -> None:
        self._slot_done(run)
        try:
            await self.finisher.fail(run, error, delay=delay, dead=dead, trace=trace)
        finally:  # (ended even if a stop cancels the fail call)
            if span is not None:
                # What the failure asks of fail.lua: dead-lettered at the last attempt or when
                # the task said so (Fail, an undecodable payload), else retried.
                job = run.job
                outcome = "dead" if dead or job.attempts >= job.max_attempts else "retry"
                span.end(self._gone(run) or outcome, exc)

    def _process_span(self, run: Held) -> tracing.ProcessSpan:
        job = run.job
        return tracing.ProcessSpan(
            queue=job.queue,
            job_id=job.id,
            task=job.task,
            attempt=job.attempts,
            node=self.node,
            carrier=job.trace,
        )

    @staticmethod
    def _gone(run: Held) -> str | None:
        """The outcome of an attempt taken from this node while it ran (its own is discarded)."""
        if run.cancelled:
            return "cancelled"
        return "lost" if run.lost else None

    async def _invoke(self, run: Held, span: tracing.ProcessSpan | None = None) -> Any:
        job = run.job
        task = self.tasks.get(job.task)
        if task is None:
            raise UnknownTask(f"unknown task {job.task!r}: not registered on node {self.node}")
        args, kwargs = codec.decode_payload(job.payload)
        timeout = job.timeout_ms / 1000 if job.timeout_ms > 0 else None
        if task.is_async:
            coro = task.fn(*args, **kwargs)
            if timeout is None:
                return await coro
            if _TIMEOUT_CM is not None:
                # In this task, as wait_for does from Python 3.12 on: 3.11's wait_for wraps the
                # coroutine in a task of its own, one more loop turn before the job starts.
                async with _TIMEOUT_CM(timeout):
                    return await coro
            return await asyncio.wait_for(coro, timeout)  # pragma: no cover - Python 3.10
        call = SyncCall(task.fn, args, kwargs, run.current, None if span is None else span.context)
        if len(self._sync_calls) >= self.concurrency:
            # Drop given-up calls whose threads have returned since (a new set, not a change in
            # place: a metrics scrape may be reading the old one on its own thread).
            self._sync_calls = {c for c in self._sync_calls if not c.done}
        self._sync_calls.add(call)
        fut = asyncio.get_running_loop().run_in_executor(self.pool, call)
        try:
            if timeout is None:
                return await fut
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                if call.thread_id is not None and not call.done:
                    if not call.interrupt():
                        log.warning("job %s: could not interrupt its thread after timeout", job.id)
                    run.zombie = True
                    fut.add_done_callback(lambda _: self._zombie_done(run))
                    asyncio.get_running_loop().call_soon(self._check_zombies)
                raise JobTimeout() from None
        finally:
            # Given up (timeout, lost lease, shutdown): never start it if it is still queued in
            # the pool; if its thread is still running, it is a zombie until it returns.
            call.give_up()
            if call.done:
                self._sync_calls.discard(call)

    def _check_zombies(self) -> None:
        limit, n = self.max_zombies, self.zombie_threads()
        if limit and n >= limit and not self.state.stopping:
            log.error("%d zombie thread(s) (--max-zombies %d): draining this node to exit", n, limit)
            self.request_stop()

    def _zombie_done(self, run: Held) -> None:
        run.zombie = False
        self._slot_done(run)

    def zombie_threads(self) -> int:
        """Pool threads still running a task whose job was given up (timed out or released).

        Reads only (a copy of the set), so the metrics scrape may call it from its own thread."""
        return sum(
            1 for c in list(self._sync_calls) if c.abandoned and not c.done and c.thread_id is not None
        )

    # -- taking jobs away -----------------------------------------------------------------------
    def lose(self, run: Held, why: str) -> None:
        """The job is no longer ours: count it, never ack it, stop it if it is async."""
        if run.lost:
            return
        run.lost = True
        self.outcomes.lost(run.job.queue, run.job.task, started=run.task is not None)
        if run.task is None:  # claimed ahead, never started: nothing ran, nothing to discard
            self.held.unbuffer(run)
            self.held.forget(run)
            log.warning(
                "job %s (%s, queue %s): %s before it started; not run here",
                run.job.id,
                run.job.task,
                run.job.queue,
                why,
            )
            return
        log.error(
            "job %s (%s, queue %s): %s; it will not be acked here (stale completion)",
            run.job.id,
            run.job.task,
            run.job.queue,
            why,
        )
        task = self.tasks.get(run.job.task)
        if run.task is not None and task is not None and task.is_async:
            run.task.cancel()  # a sync one runs on in its thread; its outcome is discarded
            self.held.forget(run)

    def cancel_id(self, job_id: str) -> None:
        """This node's job ``job_id`` was cancelled while it ran (the cancel notice or a lease
        renewal said so): :meth:`cancel` it if it is still held here."""
        if (run := self.held.get(job_id)) is not None:
            self.cancel(run)

    def cancel(self, run: Held) -> None:
        """The job was cancelled while this node held it (cancel.lua has already ended it as
        ``cancelled`` and taken it from this node): never ack it; stop an async task at its next
        await; tell a sync task through ``jobq.current_job()`` (its thread runs on and keeps its
        slot until it returns; what it returns is discarded)."""
        if run.cancelled:
            return
        run.cancelled = True
        job = run.job
        if run.finishing:  # its ack or fail is on its way: Redis refuses it (the acker counts)
            return
        if not run.lost:
            run.lost = True  # the acker discards its outcome; the heartbeat no longer counts it
            self.outcomes.cancelled(job.queue, job.task)
        if run.task is None:  # claimed ahead, never started
            self.held.unbuffer(run)
            self.held.forget(run)
            log.info("job %s (%s, queue %s): cancelled before it started here", job.id, job.task, job.queue)
            return
        log.info("job %s (%s, queue %s): cancelled while it runs; stopping it", job.id, job.task, job.queue)
        if run.current is not None:
            run.current.cancel()
        task = self.tasks.get(job.task)
        if task is not None and task.is_async:
            run.task.cancel()
            self.held.forget(run)

    def fence_queue(self, queue: str, fenced: bool, redis_down: bool) -> None:
        """Only ``queue`` is fenced (its Redis Cluster shard fails its renewals while the other
        queues renew), or unfenced: no claims from it meanwhile, and its held jobs are handled
        as a node-wide fence handles all of them."""
        if fenced:
            self.state.fenced_queues.add(queue)
            self.fence(redis_down, queue)
        else:
            self.state.fenced_queues.discard(queue)

    def fence(self, redis_down: bool, queue: str | None = None) -> None:
        """The node fenced itself (lease renewals failing), or only ``queue``: take back what
        must not go on."""
        for run in list(self.held.buffer):  # never start a job whose lease may run out
            if queue is None or run.job.queue == queue:
                self.lose(run, "fenced: lease renewals failing")
        # Others may take our jobs once the leases run out: stop side effects now, unless Redis
        # itself is down (refused, loading): nobody can take them then, and the reaper grace
        # after the outage lets this node renew first. A job that goes on (a sync job always: a
        # thread cannot be stopped) is flagged, and its outcome counts only if Redis still says
        # the job is ours (ack and fail check ownership), so an outage of Redis costs no re-run,
        # and a partition's winner is never overwritten.
        for run in self.held.values():
            if run.finishing or run.lost or (queue is not None and run.job.queue != queue):
                continue
            task = self.tasks.get(run.job.task)
            if task is not None and task.is_async and not redis_down:
                self.lose(run, "fenced: lease renewals failing")
            elif not run.fenced:
                run.fenced = True
                log.warning(
                    "job %s (%s, queue %s): fenced while it runs; its outcome is kept only if "
                    "Redis still says the job is this node's",
                    run.job.id,
                    run.job.task,
                    run.job.queue,
                )
