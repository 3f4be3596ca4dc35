"""A worker node: claims jobs, runs them, acks them, and keeps its leases alive.

One process is one node. Inside it:

- the **fetcher** claims up to the number of free slots per script call, in strict queue order or
  by weight, plus a few jobs ahead (the *prefetch buffer*, see below); when nothing is runnable it
  waits for a pub/sub announcement, the next scheduled run time, or the poll interval, whichever
  comes first (pub/sub is only a hint);
- the **executor** runs ``async def`` tasks on the event loop and plain ``def`` tasks in a thread
  pool, at most ``concurrency`` at once, each under its timeout;
- the **acker** finishes completed jobs in batches: every job that completes while an ack is in
  flight rides the next call, so a busy node pays far less than one round trip per job;
- the **heartbeat** (its own thread and connection, :mod:`jobq.worker.heartbeat`) renews leases;
- the **reaper** and **scheduler** loops (:mod:`jobq.worker.reaper`, :mod:`jobq.worker.scheduler`).

Prefetch: a slot that frees up starts its next job from a small local buffer of claimed, not yet
started jobs in the same loop turn, instead of waiting for a claim round trip; the fetcher refills
the buffer when it falls below half. Buffered jobs are in the node's active list, leased and
renewed by the heartbeat like running ones. The buffer holds only as many jobs as the node expects
to start within :data:`PREFETCH_HORIZON` seconds (from its recent run times; at most
``concurrency``, none while that is unknown), and a job left in it for :data:`PREFETCH_MAX_WAIT`
seconds goes back to ready, so a buffered job waits milliseconds, not the run time of a slow job,
and other nodes can still take the work. A job's timeout starts when it starts. A deadline is
checked by the claim, so a buffered job may start up to its buffer wait after its deadline.

Shutdown (SIGTERM/SIGINT): stop claiming, hand buffered jobs back at once (their attempt is not
counted: they never started), let running jobs finish within ``grace``, release the rest back to
ready, exit 0. A second signal releases at once. A released job that had started keeps its
attempt and counts an interruption; at ``max_interruptions`` (the task's, else the node's) it is
dead-lettered with reason ``interrupted`` instead, so a job longer than the grace cannot re-run
at every deploy forever.

Every completion names its attempt (the attempt number the claim returned): Redis refuses an
ack, fail or release of any other attempt of the job, even one this node claimed again after
its lease was reaped, and the worker counts the refusal as a stale completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobq import _fault_injection as faults
from jobq import codec
from jobq.app import JobQ
from jobq.backoff import Backoff, worth_a_line
from jobq.errors import (
    DecodeError,
    EncodeError,
    ErrorCode,
    Fail,
    JobqError,
    JobTimeout,
    RedisBusy,
    RedisUnavailable,
    Retry,
)
from jobq.storage import checks, clients
from jobq.storage.calls import (
    MAX_BATCH,
    MAX_EXTEND,
    AsyncRunner,
    ClaimedJob,
    ReleaseResult,
    SyncRunner,
    split_batches,
)
from jobq.storage.keys import validate_node, validate_queue
from jobq.storage.wakeups import WakeSubscriber
from jobq.worker import loop as jobq_loop
from jobq.worker.heartbeat import BeatResult, Heartbeat
from jobq.worker.reaper import Reaper, recover_inherited
from jobq.worker.scheduler import Scheduler
from jobq.worker.slots import SlotBackoff

if TYPE_CHECKING:
    from jobq.metrics import Metrics

log = logging.getLogger("jobq.worker")

#: Most jobs run at once per node: with a full prefetch buffer (at most the concurrency) a node
#: then holds at most MAX_EXTEND jobs of a queue, the leases one heartbeat call renews.
MAX_CONCURRENCY = MAX_EXTEND // 2

#: Seconds of pub/sub silence before the subscription is probed with a PING (and given up on when
#: the PONG does not come within as long again).
#: Seconds of work a node claims ahead of its free slots: the prefetch buffer holds at most the
#: jobs it expects to start within this time (concurrency x horizon / mean run time).
PREFETCH_HORIZON = 0.02
#: A buffered job is started only if its deadline is at least this far ahead (ms, Redis clock).
DEADLINE_MARGIN_MS = 5
#: Seconds a claimed job may wait in the prefetch buffer before it goes back to ready (release:
#: attempt not counted, old place in the ready order).
PREFETCH_MAX_WAIT = 0.5
#: An idle node whose wake-up token is armed in every queue hears each new job, so it looks at
#: its queues on its own only as a backstop: every this many poll intervals, at most every
#: ARMED_POLL_MAX seconds (or the poll interval, if that is longer). Idle cost (S5).
ARMED_POLL_FACTOR = 10
#: Seconds between a claim that started jobs and the arm call that follows it: sent at once, the
#: call's Python work held the GIL the new jobs' threads were waiting for (+0.4 ms pickup p50).
ARM_DELAY = 0.002
ARMED_POLL_MAX = 10.0
#: Weight of the newest run time in the node's moving mean.
_RUN_TIME_ALPHA = 0.1


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class WorkerConfig:
    """How a node runs. Durations are seconds."""

    #: (logical queue, weight) in priority order; weights are used only if ``weighted``.
    queues: list[tuple[str, int]] = field(default_factory=lambda: [("default", 1)])
    weighted: bool = False
    concurrency: int = 20
    lease: float = 30.0
    grace: float = 30.0
    node_id: str | None = None
    #: Exit once there is nothing left to run (tests, batch jobs).
    burst: bool = False
    #: Longest idle wait between looks at the queues while wake-ups are down; with every wake-up
    #: token armed and heard, ARMED_POLL_FACTOR poll intervals (at most ARMED_POLL_MAX s).
    poll_interval: float = 1.0
    #: Reaper pass interval (default: lease / 6, at most 5 s).
    reap_interval: float | None = None
    #: Scheduler (promote + cron) pass interval.
    schedule_interval: float = 1.0
    #: A node silent this long is dead for the reaper's node cleanup (default: 2 leases).
    node_ttl: float | None = None
    #: Run the reaper and scheduler loops on this node.
    maintenance: bool = True
    #: Drain and exit (0) once this many zombie threads (timed-out sync tasks whose threads
    #: still run, holding their slots) pile up, so a supervisor can restart the node; 0 = never.
    max_zombies: int = 0
    #: Most jobs claimed ahead of free slots (the prefetch buffer; see the module docstring).
    #: None: up to ``concurrency``, sized from recent run times; 0: claim for free slots only.
    prefetch: int | None = None
    #: A started job released this many times (shutdowns before it finished) is dead-lettered
    #: with reason ``interrupted``; a task's own ``max_interruptions`` wins. 0 = never.
    max_interruptions: int = 5


def default_node_id() -> str:
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:64]
    return f"{host or 'node'}-{os.getpid()}-{os.urandom(2).hex()}"


@dataclass(slots=True)
class _Running:
    """One claimed job on this node."""

    job: ClaimedJob
    #: monotonic time it was claimed, then the time it started.
    started: float
    #: The Redis clock when it was claimed (ms).
    now_ms: int = 0
    task: asyncio.Task[None] | None = None
    #: Claimed ahead of a free slot and not started yet (in the prefetch buffer).
    buffered: bool = False
    #: The heartbeat found the job no longer ours: never ack it.
    lost: bool = False
    #: An ack or fail for it is on its way: the heartbeat must not call it lost.
    finishing: bool = False
    #: Its concurrency slot was given back.
    freed: bool = False
    #: The node fenced itself while this sync job ran (a thread cannot be stopped): its ack or
    #: fail is still sent, and Redis accepts it only if the job is still this node's.
    fenced: bool = False
    #: A sync job given up (timeout) whose thread still runs: it keeps its slot until it returns,
    #: so the node never runs more threads than its concurrency nor claims work it cannot start.
    zombie: bool = False


class _SyncCall:
    """Runs a plain function in the pool and lets the loop interrupt it on timeout.

    The interrupt is an asynchronous exception, so it must never land outside the task (in the
    pool's own code, where it would kill the pool thread): it is only sent while the task runs,
    under a lock the thread takes to mark the task done, and one that arrives as the task returns
    is absorbed here."""

    __slots__ = ("abandoned", "args", "done", "fn", "kwargs", "lock", "thread_id")

    def __init__(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> None:
        self.fn = fn
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
        try:
            try:
                result = self.fn(*self.args, **self.kwargs)
                finished = True
            finally:
                with self.lock:
                    self.done = True
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


class Worker:
    """A worker node for ``app``. ``await worker.run()`` until stopped (or drained in burst)."""

    def __init__(
        self,
        app: JobQ,
        config: WorkerConfig | None = None,
        *,
        metrics: Metrics | None = None,
        url: str | None = None,
    ) -> None:
        self.app = app
        self.config = cfg = config or WorkerConfig()
        if not 1 <= cfg.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be 1..{MAX_CONCURRENCY}")
        if cfg.lease <= 0 or cfg.grace < 0 or cfg.poll_interval <= 0:
            raise ValueError("lease and poll interval must be > 0, grace >= 0")
        self.node = validate_node(cfg.node_id or default_node_id())
        self.url = url or app.url
        self.metrics = metrics
        self.lease_ms = max(1, round(cfg.lease * 1000))
        self.reap_interval = cfg.reap_interval or min(5.0, cfg.lease / 6)
        self.node_ttl_ms = round((cfg.node_ttl or 2 * cfg.lease) * 1000)
        self.queues: list[str] = []
        self.weights: dict[str, int] = {}
        for logical, weight in cfg.queues:
            for q in app.queue_shards(validate_queue(logical)):
                if q not in self.weights:
                    self.queues.append(q)
                    self.weights[q] = max(1, weight)
        if not self.queues:
            raise ValueError("no queues to serve")
        self.running: dict[str, _Running] = {}
        self._busy = 0
        self._stopping = False
        self._released = False
        self._fenced = False
        #: The fetcher was poked (work announced, room freed, stop) since it last looked.
        self._woken = False
        #: The future the fetcher waits on, if it waits.
        self._waiter: asyncio.Future[None] | None = None
        #: Claimed jobs not started yet, oldest first (see the module docstring).
        self._buffer: deque[_Running] = deque()
        #: Most jobs the buffer may hold (WorkerConfig.prefetch, at most concurrency and 1,000).
        self._prefetch_max = min(
            cfg.concurrency, 1000, cfg.concurrency if cfg.prefetch is None else max(0, cfg.prefetch)
        )
        #: Moving mean of a job's run time on this node (s); None until a job has run.
        self._run_time: float | None = None
        #: The fetcher waits for room: poke it once fewer than this many jobs are held.
        self._claim_below = 0
        self._acks: dict[str, list[tuple[_Running, bytes]]] = {}
        #: Acks of queues whose Redis Cluster slot is moving, waiting for their retry (so the
        #: acks of the other queues are not held up behind them); each queue's backoff below.
        self._acks_later: dict[str, list[tuple[_Running, bytes]]] = {}
        self._ack_slots = SlotBackoff("ack", logger=log)
        self._ack_event: asyncio.Event | None = None
        self._ack_lock = asyncio.Lock()
        self._next_due_ms: int | None = None
        self._last_now_ms: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._job_context = contextvars.Context()
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="jobq-task")
        self._stop_event: asyncio.Event | None = None
        self._hard_stop: asyncio.Event | None = None
        self._reap_not_before = 0.0
        self._promoted_at = 0.0
        #: Queues whose Redis Cluster slot refused the last claim (moving, or without a primary),
        #: each left alone for a backoff of its own.
        self._claim_slots = SlotBackoff("claim", logger=log)
        self._claim_more = False
        self.last_ok = time.monotonic()
        #: The node's wake-up subscriptions (not in burst mode), and the queues whose wake-up
        #: token is armed (jobq.storage.wakeups): one new job there wakes this node.
        self._wakes: WakeSubscriber | None = None
        self._armed: set[str] = set()
        #: Wake-ups and subscription changes so far (an arm call in flight checks it).
        self._wake_events = 0
        self.stats = {"claimed": 0, "completed": 0, "failed": 0, "stale": 0, "lost": 0, "interrupted": 0}
        self.heartbeat: Heartbeat | None = None
        self.client: Any = None
        self.runner: AsyncRunner | None = None
        #: Releases of named jobs go through a client that never re-sends (see :meth:`_release`).
        self._once_runner: AsyncRunner | None = None
        self._bg: list[asyncio.Task[Any]] = []
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._sync_calls: set[_SyncCall] = set()

    # -- public control -------------------------------------------------------------------------
    def stop(self, *, graceful: bool = True) -> None:
        """Ask the node to stop (thread-safe). ``graceful=False`` releases running jobs now."""
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._request_stop, graceful)

    def _request_stop(self, graceful: bool) -> None:
        assert self._stop_event is not None and self._hard_stop is not None
        if self._stop_event.is_set() or not graceful:
            self._hard_stop.set()
        self._stop_event.set()
        self._stopping = True
        self._drop_buffer()  # others may run the buffered jobs while this node drains
        self._stop_wakes()
        self._poke()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        assert self._stop_event is not None
        if self._stop_event.is_set():
            log.warning("second %s: releasing running jobs now", signal.Signals(sig).name)
        else:
            log.warning(
                "%s: no more claims; waiting up to %g s for %d running job(s)",
                signal.Signals(sig).name,
                self.config.grace,
                self._busy,
            )
        self._request_stop(True)

    @property
    def pubsub_connected(self) -> bool:
        """Every queue's wake-up channel is subscribed."""
        return self._wakes is not None and self._wakes.all_live

    @property
    def busy(self) -> int:
        """Concurrency slots in use (jobs running; not those waiting for their ack)."""
        return self._busy

    def health(self) -> tuple[bool, str]:
        """Healthy = a recent successful round trip through a script (not a bare PING)."""
        age = time.monotonic() - self.last_ok
        limit = max(3 * self.config.poll_interval, self.config.lease)
        if age > limit:
            return False, f"no successful Redis round trip for {age:.1f} s"
        if self._fenced:
            return False, "fenced: lease renewals failing"
        return True, f"ok (last round trip {age:.2f} s ago)"

    # -- main -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until stopped; then shut down cleanly (see the module docstring)."""
        self._loop = asyncio.get_running_loop()
        self._job_context = contextvars.copy_context()
        self._ack_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self.client = clients.async_client(self.url, retry_refused=False)
        self.runner = AsyncRunner(self.client)
        sync_client = clients.sync_client(self.url)
        self.heartbeat = Heartbeat(
            self.app,
            SyncRunner(sync_client),
            self.node,
            self.queues,
            self.lease_ms,
            known=self._known_snapshot,
            on_beat=self._beat_from_thread,
            on_fence=self._fence_from_thread,
            on_epoch_change=None if self.metrics is None else self.metrics.redis_epoch_changed,
            info=lambda: {
                "concurrency": self.config.concurrency,
                "inflight": len(self.running),
                "busy": self._busy,
            },
        )
        log.info(
            "node %s: queues %s, concurrency %d, lease %.1f s, redis %s",
            self.node,
            ",".join(self.queues),
            self.config.concurrency,
            self.config.lease,
            clients.redact_url(self.url),
        )
        ready = False
        try:
            ready = await self._probe()
        finally:
            if not ready:  # a fatal error, or stopped before Redis answered: nothing was claimed
                with contextlib.suppress(Exception):
                    await self.client.aclose()
                sync_client.close()
                self._pool.shutdown(wait=False)
        if not ready:
            return
        self.eviction_policy_ok = await checks.check_eviction_policy(self.client)
        if self.metrics is not None:
            self.metrics.set_eviction_policy_ok(self.eviction_policy_ok)
            self.metrics.pubsub_from(lambda: self.pubsub_connected)
            self.metrics.zombies_from(self.zombie_threads)
        try:  # before the heartbeat, which would release them with their attempt uncounted
            await recover_inherited(self.app, self.runner, self.node, self.queues)
        except JobqError as exc:
            log.warning("could not recover jobs left by an earlier run of this node: %s", exc)
        self.heartbeat.start()
        self._bg = [asyncio.create_task(self._acker(), name="jobq-acker")]
        if not self.config.burst:
            self._wakes = WakeSubscriber(
                self.url, self.app.keys, self.node, self.queues, on_wake=self._on_wake, on_live=self._on_live
            )
            self._bg.append(asyncio.create_task(self._wakes.run(), name="jobq-pubsub"))
        if self.config.maintenance:
            self._bg.append(asyncio.create_task(self._maintain(), name="jobq-maintenance"))
        try:
            await self._fetch_loop()
            await self._drain()
        finally:
            await self._shutdown(sync_client)

    async def _probe(self) -> bool:
        """Wait until Redis answers a script call. A wrong password, a missing permission or an
        old Redis is fatal (raised); an unreachable or busy Redis is retried until it answers
        or the node is stopped (then returns False)."""
        assert self.runner is not None and self._stop_event is not None
        backoff = Backoff(0.1, 2.0)
        warned = False
        while not self._stop_event.is_set():
            try:
                q = self.queues[0]
                await self.runner.run(self.app.store.promote(q, limit=1, now_ms=self.app.now_ms()))
                self.last_ok = time.monotonic()
                if warned:
                    log.warning("Redis answers now")
                return True
            except (RedisUnavailable, RedisBusy) as exc:
                if not warned:
                    log.warning("Redis is not reachable yet (%s); retrying", exc)
                    warned = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), backoff.next())
        return False

    # -- fetcher --------------------------------------------------------------------------------
    def _poke(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _queue_order(self) -> list[str]:
        if not self.config.weighted or len(self.queues) == 1:
            return self.queues
        # Weighted: a random order where a queue's chance of going first is its weight share.
        left = list(self.queues)
        order = []
        while left:
            pick = random.choices(left, weights=[self.weights[q] for q in left])[0]
            order.append(pick)
            left.remove(pick)
        return order

    def _prefetch_target(self) -> int:
        """How many claimed jobs to keep ready for slots that free up (see the module docstring)."""
        mean = self._run_time
        if mean is None or self._prefetch_max == 0:
            return 0
        return min(self._prefetch_max, int(self.config.concurrency * PREFETCH_HORIZON / max(mean, 1e-6)))

    def _claim_size(self) -> tuple[int, int]:
        """(jobs to claim now, 0 = none; the number of held jobs below which to claim): free
        slots plus the buffer's room, once the buffer is below half its target."""
        target = self._prefetch_target()
        held = self._busy + len(self._buffer)
        below = self.config.concurrency + (target + 1) // 2
        if held >= below:
            return 0, below
        return min(MAX_BATCH, self.config.concurrency + target - held), below

    async def _fetch_loop(self) -> None:
        assert self.runner is not None
        backoff = Backoff(0.05, 2.0)
        errors = 0
        cfg = self.config
        rearmed = False
        while not self._stopping:
            if self._fenced:
                self._woken = False
                await self._wait(self._buffer_timeout(cfg.poll_interval))
                self._expire_buffer()  # claimed while the fence came: never started late
                continue
            free, below = self._claim_size()
            if free <= 0:
                # Every slot busy and the buffer full enough: a slot freeing up pokes us once the
                # buffer runs low (or the oldest buffered job has waited too long).
                self._woken = False
                await self._wait(self._buffer_timeout(cfg.poll_interval), room_below=below)
                self._expire_buffer()
                continue
            try:
                got = await self._claim(free)
                backoff.reset()
                if errors:
                    log.warning("claims succeed again after %d failure(s)", errors)
            except (RedisUnavailable, RedisBusy) as exc:
                errors += 1
                if worth_a_line(errors):
                    log.warning("claim failed (%d in a row): %s; retrying", errors, exc)
                self._reap_not_before = time.monotonic() + cfg.lease
                await self._wait(backoff.next())
                continue
            except JobqError as exc:
                # Not a connection problem (permissions revoked, a script error): keep trying,
                # but with one traceback, then a line every few tries.
                errors += 1
                if errors == 1:
                    log.exception("claim failed")
                elif errors % 20 == 0:
                    log.error("claim still failing (%d tries): %s", errors, exc)
                await self._wait(backoff.next())
                continue
            errors = 0
            if got >= free or self._claim_more:
                # Let completions of this loop turn land, so the next claim takes them together.
                await asyncio.sleep(0)
                continue
            # A short claim: every queue is empty. Wait for an announcement (S5: one claim per
            # node per wake-up, not two).
            # Burst: done when nothing runs, no ack or fail is still on its way (a Retry(0) puts
            # its job straight back to ready), and nothing is due.
            if cfg.burst and self._busy == 0 and not self.running and self._nothing_due():
                return
            if got:
                rearmed = False
                if self._wakes is not None:
                    # The jobs just started need the GIL first: arm a moment later (a job
                    # enqueued meanwhile wakes another node, or the arm call finds it).
                    await asyncio.sleep(ARM_DELAY)
            if await self._arm():
                if not rearmed:
                    rearmed = True  # work came in before the token was armed: claim it
                    continue
                # Work the claims do not get (a queue whose slot is moving): poll for it.
            else:
                rearmed = False
            await self._idle_wait()

    def _nothing_due(self) -> bool:
        if self._next_due_ms is None or self._last_now_ms is None:
            return True
        # Burst mode waits for due-now jobs only; future scheduled ones are left for later.
        return self._next_due_ms > self._last_now_ms

    def _idle_base(self) -> float:
        """The longest idle wait: the poll interval, longer while every token is armed."""
        timeout = self.config.poll_interval
        if self._all_armed():
            timeout = max(timeout, min(timeout * ARMED_POLL_FACTOR, ARMED_POLL_MAX))
        return timeout

    def _idle_timeout(self) -> float:
        timeout = self._idle_base()
        if self._next_due_ms is not None and self._last_now_ms is not None:
            until_due = (self._next_due_ms - self._last_now_ms) / 1000
            timeout = min(timeout, max(0.001, until_due))
        if self.config.burst:
            timeout = min(timeout, 0.05)
        return timeout

    async def _wait(self, timeout: float, *, room_below: int = 0) -> bool:
        """Until poked, or ``timeout`` seconds; a poke since the last wait returns at once.
        ``room_below``: also wake once fewer jobs than this are held (slots freed up); else a
        freed slot does not wake the fetcher (it waits for work, not for room). False = the
        time ran out."""
        if not self._woken:
            loop = asyncio.get_running_loop()
            self._waiter = fut = loop.create_future()
            timer = loop.call_later(timeout, _wake_up, fut)
            self._claim_below = room_below
            try:
                await fut
            finally:
                timer.cancel()
                self._waiter = None
                self._claim_below = 0
        woken, self._woken = self._woken, False
        return woken

    def _buffer_timeout(self, timeout: float) -> float:
        """``timeout``, cut short to when the oldest buffered job has waited its limit."""
        if self._buffer:
            timeout = min(timeout, self._buffer[0].started + PREFETCH_MAX_WAIT - time.monotonic())
        return max(0.001, timeout)

    def _expire_buffer(self) -> None:
        """Hand back buffered jobs that waited :data:`PREFETCH_MAX_WAIT` (the running jobs are
        slower than the run times the buffer was sized for): no more prefetch until jobs end."""
        buf = self._buffer
        if not buf or buf[0].started + PREFETCH_MAX_WAIT > time.monotonic():
            return
        log.info("%d prefetched job(s) waited %g s for a slot: releasing them", len(buf), PREFETCH_MAX_WAIT)
        self._run_time = max(self._run_time or 0.0, 2 * PREFETCH_HORIZON * self.config.concurrency)
        self._drop_buffer()

    def _drop_buffer(self) -> None:
        """Hand every buffered job back to ready now (release: its attempt is not counted)."""
        by_queue: dict[str, list[_Running]] = {}
        while self._buffer:
            run = self._buffer.popleft()
            run.buffered = False
            by_queue.setdefault(run.job.queue, []).append(run)
        for q, runs in by_queue.items():
            self._release_soon(q, runs)

    def _release_soon(self, queue: str, runs: list[_Running]) -> None:
        """Release unstarted jobs of ``queue`` in a side task (their attempts are not counted)."""
        t = asyncio.ensure_future(self._release_runs(queue, runs))
        self._side_tasks.add(t)
        t.add_done_callback(self._side_tasks.discard)

    @staticmethod
    def _deadline_passed(run: _Running, now: float) -> bool:
        """Whether a buffered job's deadline may have passed: the Redis clock at its claim plus
        the local time since, with a margin. Such a job is released instead of started, and the
        next claim (the Redis clock decides) dead-letters it as ``expired``, or runs it if its
        deadline is in fact still ahead."""
        deadline = run.job.deadline_ms
        if deadline <= 0:
            return False
        return run.now_ms + (now - run.started) * 1000 + DEADLINE_MARGIN_MS >= deadline

    async def _release_runs(self, queue: str, runs: list[_Running]) -> None:
        for i in range(0, len(runs), MAX_BATCH):
            part = runs[i : i + MAX_BATCH]
            try:
                await self._release(queue, part)
            except Exception as exc:
                # Still in the active list and known here, so still leased: the release at exit,
                # or the reaper, takes them back.
                log.warning("queue %s: could not release %d unstarted job(s): %s", queue, len(part), exc)
                continue
            for run in part:
                self._forget(run)

    async def _claim(self, free: int) -> int:
        assert self.runner is not None
        got = 0
        visited = 0
        self._claim_more = False
        next_due: int | None = None
        slot_errors: list[RedisUnavailable] = []
        for q in self.app.rotate_shards(self._queue_order()):
            want = free - got
            if want <= 0:
                break
            if self._claim_slots and self._claim_slots.waiting(q):
                continue
            visited += 1
            try:
                res = await self.runner.run(
                    self.app.store.claim(q, self.node, want, self.lease_ms, now_ms=self.app.now_ms())
                )
            except RedisUnavailable as exc:
                if not exc.slot:
                    raise  # Redis itself: every queue fails alike
                # Only this queue's cluster slot (moving to another primary): serve the others,
                # and try this one again after a backoff of its own.
                self._claim_slots.refused(q, exc)
                slot_errors.append(exc)
                continue
            self._claim_slots.ok(q)
            self.last_ok = time.monotonic()
            self._last_now_ms = res.now_ms
            if res.next_due_ms is not None and (next_due is None or res.next_due_ms < next_due):
                next_due = res.next_due_ms
            for job_id, reason in res.dead:
                log.error("queue %s: job %s dead-lettered at claim: %s", q, job_id, reason)
                if self.metrics is not None:
                    self.metrics.job_failed(q, "", 0.0, "dead")
            self._dead_trimmed(q, res.dead_trimmed)
            if res.jobs:
                if faults.ACTIVE:
                    faults.crash_point("after_claim")
                self._take(res.jobs, res.now_ms)
            got += len(res.jobs)
            if res.dead and len(res.jobs) + len(res.dead) >= want:
                self._claim_more = True  # dead-lettered entries filled the batch: look again
        if slot_errors and len(slot_errors) == visited:
            raise slot_errors[-1]  # no queue answered: back off as for any claim failure
        if visited == len(self.queues) and not slot_errors:
            self._promoted_at = time.monotonic()  # claim promoted every queue's due jobs
        self._next_due_ms = next_due
        return got

    # -- executor -------------------------------------------------------------------------------
    def _forget(self, run: _Running) -> None:
        if self.running.get(run.job.id) is run:
            del self.running[run.job.id]

    def _take(self, jobs: list[ClaimedJob], now_ms: int) -> None:
        """Claimed jobs: start them in free slots, buffer the rest (the prefetch buffer)."""
        running, buffer, concurrency = self.running, self._buffer, self.config.concurrency
        now = time.monotonic()
        for job in jobs:
            old = running.get(job.id)
            if old is not None and not old.finishing:
                # Claimed again while an earlier attempt still runs (or waits) here: that
                # attempt's lease was reaped, so it is lost even if the heartbeat has not noticed.
                self._lose(old, "claimed again after its lease was reaped")
            run = _Running(job, now, now_ms)
            running[job.id] = run
            if self._busy < concurrency and not buffer:
                self._start(run, now)
            else:
                run.buffered = True
                buffer.append(run)
        self.stats["claimed"] += len(jobs)
        if self._stopping and buffer:
            self._drop_buffer()  # claimed while the stop came: hand back what cannot start

    def _start(self, run: _Running, now: float) -> None:
        job = run.job
        if self.metrics is not None:
            # Ready -> started on the Redis clock: at the claim, plus the time in the buffer.
            wait = (run.now_ms - job.ready_ms) / 1000 + (now - run.started)
            self.metrics.job_started(job.queue, job.task, wait)
        run.started = now
        self._busy += 1
        # Each job runs in a fresh copy of the node's context (the task copies it), never in a
        # copy of the job's whose end started it: a ContextVar set by one job must not leak.
        run.task = self._job_context.run(asyncio.create_task, self._execute(run))

    async def _execute(self, run: _Running) -> None:
        job = run.job
        if faults.ACTIVE:
            faults.crash_point("mid_execute")
        try:
            result = await self._invoke(run)
        except asyncio.CancelledError:
            # Lost lease or hard shutdown: nothing to ack; release or the reaper takes it back.
            self._slot_done(run)
            raise
        except Retry as exc:
            await self._fail(run, f"Retry: {exc.reason}", delay=exc.delay)
        except Fail as exc:
            await self._fail(run, f"Fail: {exc.reason}", dead=True)
        except DecodeError as exc:
            await self._fail(run, f"decode_error: {exc}", dead=True)
        except (JobTimeout, asyncio.TimeoutError, TimeoutError):
            await self._fail(run, f"timeout: ran longer than {job.timeout_ms / 1000:g} s")
        except _UnknownTask as exc:
            await self._fail(run, str(exc))
        except Exception as exc:
            await self._fail(run, f"{type(exc).__name__}: {exc}")
        else:
            try:
                encoded = b"" if result is None else codec.encode_result(result, self.app.max_payload)
            except EncodeError as exc:
                log.warning("job %s (%s, queue %s): result not stored: %s", job.id, job.task, job.queue, exc)
                encoded = b""
            self._slot_done(run)
            self._queue_ack(run, encoded)

    async def _invoke(self, run: _Running) -> Any:
        job = run.job
        task = self.app.tasks.get(job.task)
        if task is None:
            raise _UnknownTask(f"unknown task {job.task!r}: not registered on node {self.node}")
        args, kwargs = codec.decode_payload(job.payload)
        timeout = job.timeout_ms / 1000 if job.timeout_ms > 0 else None
        if task.is_async:
            coro = task.fn(*args, **kwargs)
            if timeout is None:
                return await coro
            return await asyncio.wait_for(coro, timeout)
        call = _SyncCall(task.fn, args, kwargs)
        if len(self._sync_calls) >= self.config.concurrency:
            # Drop given-up calls whose threads have returned since (a new set, not a change in
            # place: a metrics scrape may be reading the old one on its own thread).
            self._sync_calls = {c for c in self._sync_calls if not c.done}
        self._sync_calls.add(call)
        fut = asyncio.get_running_loop().run_in_executor(self._pool, call)
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
        limit, n = self.config.max_zombies, self.zombie_threads()
        if limit and n >= limit and not self._stopping:
            log.error("%d zombie thread(s) (--max-zombies %d): draining this node to exit", n, limit)
            self._request_stop(True)

    def _zombie_done(self, run: _Running) -> None:
        run.zombie = False
        self._slot_done(run)

    def _slot_done(self, run: _Running) -> None:
        if run.task is not None and not run.freed and not run.zombie:
            run.freed = True
            self._busy -= 1
            now = time.monotonic()
            mean = self._run_time
            took = now - run.started
            self._run_time = took if mean is None else mean + (took - mean) * _RUN_TIME_ALPHA
            buffer = self._buffer
            while buffer and not self._stopping and not self._fenced:
                # The next job starts in this loop turn, not after a claim round trip.
                nxt = buffer.popleft()
                nxt.buffered = False
                if self._deadline_passed(nxt, now):
                    self._release_soon(nxt.job.queue, [nxt])
                    continue
                self._start(nxt, now)
                break
            if self._busy + len(buffer) < self._claim_below:
                self._poke()  # the fetcher waits for room (not for work) and the buffer ran low

    async def _fail(
        self, run: _Running, error: str, *, delay: float | None = None, dead: bool = False
    ) -> None:
        assert self.runner is not None
        job = run.job
        self._slot_done(run)
        run_s = time.monotonic() - run.started
        if run.lost:
            self._discard(run)
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
        call = self.app.store.fail(
            job.queue,
            self.node,
            job.id,
            error,
            dead=dead,
            delay_ms=None if delay is None else round(delay * 1000),
            attempt=job.attempts,
            now_ms=self.app.now_ms(),
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
                self._forget(run)
                return
        else:
            # The lease will expire and the reaper applies the retry policy instead.
            self._forget(run)
            return
        self._forget(run)
        if res.repeated:
            log.info(
                "job %s: the failure of attempt %d was already recorded (a repeated call)",
                job.id,
                job.attempts,
            )
        self._dead_trimmed(job.queue, res.dead_trimmed)
        if res.outcome == "lease_lost":
            self._stale(run)
            return
        self.stats["failed"] += 1
        if self.metrics is not None:
            self.metrics.job_failed(job.queue, job.task, run_s, res.outcome)

    def _dead_trimmed(self, queue: str, n: int) -> None:
        """A script deleted ``n`` dead letters of ``queue`` because the dead-letter list was over
        its count bound: say so (one line per trim) and count them."""
        if n <= 0:
            return
        log.warning(
            "queue %s: %d dead letter(s) deleted, oldest first: the dead-letter list was over dead_max (%d)",
            queue,
            n,
            self.app.store.limits.dead_max,
        )
        if self.metrics is not None:
            self.metrics.dead_trimmed_by_count(queue, n)

    def _stale(self, run: _Running) -> None:
        """Redis refused the ack or fail: another node holds the job now (stale completion)."""
        self.stats["stale"] += 1
        self._forget(run)
        log.warning(
            "job %s (%s, queue %s) finished after this node lost its lease: result discarded "
            "(stale completion)",
            run.job.id,
            run.job.task,
            run.job.queue,
        )
        if self.metrics is not None:
            self.metrics.job_stale(run.job.queue, run.job.task)

    def _discard(self, run: _Running) -> None:
        """A job known lost (and counted) finished here: drop its outcome, tell nobody."""
        self._forget(run)
        log.info(
            "job %s (%s): finished after its lease was lost; outcome discarded", run.job.id, run.job.task
        )

    # -- acker ----------------------------------------------------------------------------------
    def _queue_ack(self, run: _Running, encoded: bytes) -> None:
        assert self._ack_event is not None
        if run.lost:
            self._discard(run)
            return
        run.finishing = True
        self._acks.setdefault(run.job.queue, []).append((run, encoded))
        self._ack_event.set()

    async def _acker(self) -> None:
        assert self._ack_event is not None
        while True:
            await self._ack_event.wait()
            self._ack_event.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        # One flush at a time: shutdown's flush waits for the acker's batch in flight, so a
        # completed job is never released (and run again) while its ack is on the wire.
        async with self._ack_lock:
            await self._flush_acks_locked()

    async def _flush_acks_locked(self) -> None:
        if self._stopping:
            self._undefer_acks()  # at shutdown every ack is retried in place
        while self._acks:
            batches, self._acks = self._acks, {}
            for q in [q for q in batches if q in self._acks_later and not self._stopping]:
                self._acks_later[q].extend(batches.pop(q))  # its retry is already due later
            await asyncio.gather(
                *(
                    self._ack_batch(q, batch)
                    for q, items in batches.items()
                    for batch in split_batches(items, lambda it: len(it[1]))
                )
            )

    async def _ack_batch(self, queue: str, items: list[tuple[_Running, bytes]]) -> None:
        assert self.runner is not None
        call = self.app.store.ack(
            queue,
            self.node,
            [(r.job.id, enc) for r, enc in items],
            attempts=[r.job.attempts for r, _ in items],
            now_ms=self.app.now_ms(),
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
                if isinstance(exc, RedisUnavailable) and exc.slot and not self._stopping:
                    self._defer_acks(queue, items, exc)
                    return
                # Retrying is safe: a repeated ack of an attempt that finished returns 0.
                log.warning("ack of %d job(s) failed: %s; retrying", len(items), exc)
                await asyncio.sleep(backoff.next())
                if self._hard_stop is not None and self._hard_stop.is_set() and backoff.at_cap:
                    return
            except JobqError as exc:
                # Not a connection problem: the jobs are left to their leases (the heartbeat
                # releases them once they are unknown here); they run again, never get lost.
                log.error("ack of %d job(s) refused: %s", len(items), exc)
                for run, _ in items:
                    self._forget(run)
                return
        self.last_ok = time.monotonic()
        self._ack_slots.ok(queue)
        m = self.metrics
        now = time.monotonic()
        for (run, _), code in zip(items, codes, strict=True):
            self._forget(run)
            if code >= 0:
                self.stats["completed"] += 1
                if m is not None:
                    m.job_completed(queue, run.job.task, now - run.started)
            elif code == ErrorCode.LEASE_LOST:
                self._stale(run)
            else:
                log.warning("job %s vanished before its ack (deleted by an operator?)", run.job.id)

    def _defer_acks(self, queue: str, items: list[tuple[_Running, bytes]], exc: RedisUnavailable) -> None:
        """Only ``queue``'s cluster slot refused the ack (it is moving to another primary): try
        these again after a backoff of the queue's own, and let the other queues' acks go on."""
        delay = self._ack_slots.refused(queue, exc, "; retrying")
        waiting = self._acks_later.setdefault(queue, [])
        if not waiting:
            asyncio.get_running_loop().call_later(delay, self._undefer_acks, queue)
        waiting.extend(items)

    def _undefer_acks(self, queue: str | None = None) -> None:
        """Put deferred acks (of ``queue``, or all) back in line for the acker."""
        assert self._ack_event is not None
        for q in [queue] if queue is not None else list(self._acks_later):
            items = self._acks_later.pop(q, None)
            if items:
                self._acks.setdefault(q, []).extend(items)
                self._ack_event.set()

    # -- heartbeat callbacks (called on the heartbeat thread) ------------------------------------
    def _known_snapshot(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for run in list(self.running.values()):
            # A job whose ack or fail is on its way is still ours (and must stay leased) until
            # Redis confirms; only a lost one is not.
            if not run.lost:
                out.setdefault(run.job.queue, set()).add(run.job.id)
        return out

    def _beat_from_thread(self, beat: BeatResult) -> None:
        if self._loop is not None and (beat.lost or beat.unknown):
            self._loop.call_soon_threadsafe(self._on_beat, beat)

    def _on_beat(self, beat: BeatResult) -> None:
        for ids in beat.lost.values():
            for job_id in ids:
                run = self.running.get(job_id)
                if run is not None and not run.finishing:
                    self._lose(run, "this node lost its lease")
        for q, ids in beat.unknown.items():
            log.warning("queue %s: releasing %d claimed job(s) this node never saw", q, len(ids))
            t = asyncio.ensure_future(self._release_unknown(q, sorted(ids)))
            self._side_tasks.add(t)
            t.add_done_callback(self._side_tasks.discard)

    async def _release_unknown(self, queue: str, ids: list[str]) -> None:
        try:
            await self._release(queue, ids)  # never started here: attempt given back
        except JobqError as exc:
            # They stay in the active list, leased; the heartbeat finds them again two beats on.
            log.warning("queue %s: releasing %d unknown job(s) failed: %s", queue, len(ids), exc)

    def _lose(self, run: _Running, why: str) -> None:
        """The job is no longer ours: count it, never ack it, stop it if it is async."""
        if run.lost:
            return
        run.lost = True
        self.stats["lost"] += 1
        if run.task is None:  # claimed ahead, never started: nothing ran, nothing to discard
            if run.buffered:
                run.buffered = False
                self._buffer.remove(run)
            self._forget(run)
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
        if self.metrics is not None:
            self.metrics.job_stale(run.job.queue, run.job.task)
        task = self.app.tasks.get(run.job.task)
        if run.task is not None and task is not None and task.is_async:
            run.task.cancel()  # a sync one runs on in its thread; its outcome is discarded
            self._forget(run)

    def _fence_from_thread(self, fenced: bool, redis_down: bool) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set_fenced, fenced, redis_down)

    def _set_fenced(self, fenced: bool, redis_down: bool = False) -> None:
        self._fenced = fenced
        if fenced:
            for run in list(self._buffer):  # never start a job whose lease may run out
                self._lose(run, "fenced: lease renewals failing")
            # Others may take our jobs once the leases run out: stop side effects now, unless
            # Redis itself is down (refused, loading): nobody can take them then, and the reaper
            # grace after the outage lets this node renew first. A job that goes on (a sync job
            # always: a thread cannot be stopped) is flagged, and its outcome counts only if Redis
            # still says the job is ours (ack and fail check ownership), so an outage of Redis
            # costs no re-run, and a partition's winner is never overwritten.
            for run in list(self.running.values()):
                if run.finishing or run.lost:
                    continue
                task = self.app.tasks.get(run.job.task)
                if task is not None and task.is_async and not redis_down:
                    self._lose(run, "fenced: lease renewals failing")
                elif not run.fenced:
                    run.fenced = True
                    log.warning(
                        "job %s (%s, queue %s): fenced while it runs; its outcome is kept only if "
                        "Redis still says the job is this node's",
                        run.job.id,
                        run.job.task,
                        run.job.queue,
                    )
        self._poke()

    def _max_interruptions(self, run: _Running) -> int:
        """The release limit for one held job: 0 if it never started (its attempt is given back),
        else the interruptions at which it is dead-lettered (the task's, else the node's)."""
        if run.task is None:
            return 0
        task = self.app.tasks.get(run.job.task)
        limit = task.defaults.max_interruptions if task is not None else None
        if limit is None:
            limit = self.config.max_interruptions
        return limit if limit > 0 else 1_000_000

    async def _release(self, queue: str, held: list[_Running] | list[str] | None) -> ReleaseResult:
        """Release jobs this node holds: ``held`` runs (each names its attempt; a started one
        counts an interruption), ids of claimed jobs the node never saw, or ``None`` = every job
        in the node's active list (as never started)."""
        assert self.runner is not None
        runner = self.runner
        ids: list[str] | None = None
        attempts: list[int | None] | None = None
        limits: list[int] | None = None
        if held is not None:
            if not held:
                return ReleaseResult(0)  # an empty list must not mean "everything held"
            runs = [r for r in held if isinstance(r, _Running)]
            if runs:
                ids = [r.job.id for r in runs]
                attempts = [r.job.attempts for r in runs]
                limits = [self._max_interruptions(r) for r in runs]
            else:
                ids = [r for r in held if isinstance(r, str)]
            # Never re-sent after a connection error: a release whose reply was lost may have
            # run, and this node may have claimed the job again since; a blind re-send would
            # hand that new claim back while it runs (F8: jobs ran twice, no reap). What is left
            # unreleased, the heartbeat finds again, or the reaper takes back.
            if self._once_runner is None:
                import redis.asyncio.retry
                import redis.backoff

                once = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
                self._once_runner = AsyncRunner(clients.async_client(self.url, retry=once))
            runner = self._once_runner
        released = interrupted = trimmed = 0
        dead: list[tuple[str, str]] = []
        while True:
            call = self.app.store.release(
                queue,
                self.node,
                ids,
                attempts=attempts,
                max_interruptions=limits,
                now_ms=self.app.now_ms(),
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
        if res.interrupted:
            self.stats["interrupted"] += res.interrupted
            if self.metrics is not None:
                self.metrics.jobs_interrupted(queue, res.interrupted)
        for job_id, reason in res.dead:
            log.error("queue %s: job %s dead-lettered at release: %s", queue, job_id, reason)
            if self.metrics is not None:
                self.metrics.job_failed(queue, "", 0.0, "dead")
        self._dead_trimmed(queue, res.dead_trimmed)

    # -- maintenance ----------------------------------------------------------------------------
    async def _maintain(self) -> None:
        assert self.runner is not None
        reaper = Reaper(
            self.app,
            self.runner,
            self.queues,
            node_ttl_ms=self.node_ttl_ms,
            interval=self.reap_interval,
            hold=self.config.lease,
        )
        scheduler = Scheduler(self.app, self.runner, self.queues, self.app.cron_entries)
        next_reap = time.monotonic() + random.uniform(0, self.reap_interval)
        next_schedule = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                if now >= next_schedule:
                    next_schedule = now + self.config.schedule_interval
                    # An idle node's claims promote due jobs already: skip the extra round trips
                    # unless cron needs the pass (or the node is too busy to claim). An armed
                    # idle node claims when the earliest scheduled job it saw comes due, and an
                    # earlier one enqueued later wakes an armed node: no pass either.
                    if self.app.cron_entries or (
                        now - self._promoted_at > self.config.schedule_interval and not self._all_armed()
                    ):
                        await scheduler.run_once()
                if now >= next_reap:
                    next_reap = now + self.reap_interval * random.uniform(0.9, 1.1)
                    if now >= self._reap_not_before:
                        report = await reaper.run_once()
                        if report.requeued:
                            self._poke()  # the reap announces too; don't wait for pub/sub
                        if self.metrics is not None:
                            for q, ids in report.requeued.items():
                                self.metrics.jobs_reaped(q, len(ids))
                            for q, ids in report.dead.items():
                                self.metrics.jobs_reaped(q, len(ids))
                            for q, n in report.trimmed.items():
                                self.metrics.dead_trimmed_by_count(q, n)
            except (RedisUnavailable, RedisBusy) as exc:
                log.warning("maintenance pass failed: %s", exc)
                # After a reconnect, let live nodes renew before reaping anything.
                self._reap_not_before = time.monotonic() + self.config.lease
            except Exception:
                log.exception("maintenance pass failed")
            await asyncio.sleep(max(0.01, min(next_reap, next_schedule) - time.monotonic()))

    # -- wake-ups -------------------------------------------------------------------------------
    async def _arm(self) -> bool:
        """After a short claim: arm the wake-up token of each subscribed queue not armed yet
        (lua/idle.lua). True = work arrived in one of them meanwhile: claim again."""
        wakes = self._wakes
        if wakes is None or self._stopping or self._fenced or self.runner is None:
            return False
        for q in self.queues:
            if q in self._armed or not wakes.live(q):
                continue
            events = self._wake_events
            try:
                res = await self.runner.run(
                    self.app.store.idle(q, self.node, "arm", now_ms=self.app.now_ms())
                )
            except JobqError:
                return False  # the idle poll looks again
            if res == 1:
                return True
            # A wake-up (or a subscription change) that came while the call was on its way may
            # have taken the token already: then it is not armed (the next short claim arms).
            if self._wake_events == events:
                self._armed.add(q)
        return False

    async def _idle_wait(self) -> None:
        """Wait for a wake-up (or the poll interval, or the next due time). With every token
        armed, the backstop when the time runs out is to arm again (a token may have gone with
        a message lost in a dropped connection), and to claim only if work is waiting."""
        while True:
            armed = self._all_armed()
            timeout = self._idle_timeout()
            poked = await self._wait(self._buffer_timeout(timeout))
            self._expire_buffer()
            # Cut short by the next due time: the earliest scheduled job this node saw is due.
            if poked or not armed or timeout < self._idle_base() or self._stopping or self._buffer:
                return
            self._armed.clear()
            if await self._arm() or not self._all_armed():
                return

    def _all_armed(self) -> bool:
        """Every queue's token is armed and heard: any new job wakes this node."""
        wakes = self._wakes
        return wakes is not None and len(self._armed) == len(self.queues) and wakes.all_live

    def _on_wake(self, queue: str) -> None:
        """This node's token of ``queue`` was popped for new work: claim, or hand the wake-up on
        to the next idle node when no slot is free."""
        self._wake_events += 1
        self._armed.discard(queue)
        if self._stopping or self._fenced or self._claim_size()[0] <= 0:
            self._side_task(self._pass(queue))
        else:
            self._poke()

    def _on_live(self, queue: str, live: bool) -> None:
        # Up: whatever was published while the channel was down reached nobody: look, and arm.
        # Down: look once, then wait no longer than the poll interval.
        self._wake_events += 1
        self._armed.discard(queue)
        self._poke()

    async def _pass(self, queue: str) -> None:
        assert self.runner is not None
        try:
            await self.runner.run(self.app.store.idle(queue, self.node, "pass", now_ms=self.app.now_ms()))
        except JobqError as exc:
            log.warning("queue %s: could not hand a wake-up on (%s)", queue, exc)

    def _stop_wakes(self) -> None:
        """A stopping node hears no more wake-ups (publishers skip its tokens) and drops its
        tokens, so new jobs wake the nodes that stay."""
        for t in self._bg:
            if t.get_name() == "jobq-pubsub":
                t.cancel()
        armed, self._armed = self._armed, set()
        if self.runner is not None:
            for q in armed:
                self._side_task(self._leave(q))

    async def _leave(self, queue: str) -> None:
        assert self.runner is not None
        with contextlib.suppress(JobqError):
            await self.runner.run(self.app.store.idle(queue, self.node, "leave", now_ms=self.app.now_ms()))

    def _side_task(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._side_tasks.add(t)
        t.add_done_callback(self._side_tasks.discard)

    # -- shutdown -------------------------------------------------------------------------------
    async def _drain(self) -> None:
        """Wait up to ``grace`` for running jobs (a second signal cuts it short)."""
        assert self._hard_stop is not None
        tasks = [r.task for r in self.running.values() if r.task is not None and not r.task.done()]
        if not tasks or (self.config.burst and not self._stopping):
            await self._settle(tasks)
            return
        hard: asyncio.Future[Any] = asyncio.create_task(self._hard_stop.wait())
        done_all: asyncio.Future[Any] = asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait([hard, done_all], timeout=self.config.grace, return_when=asyncio.FIRST_COMPLETED)
        hard.cancel()
        for t in tasks:
            if not t.done():
                t.cancel()
        if not done_all.done():
            await asyncio.wait([done_all], timeout=1.0)

    async def _settle(self, tasks: list[asyncio.Task[None]]) -> None:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self, sync_client: Any) -> None:
        for t in self._bg:
            if t.get_name() != "jobq-acker":
                t.cancel()
        if self._side_tasks:  # buffered jobs being handed back: let those calls end first
            await asyncio.wait(set(self._side_tasks), timeout=2)
        # Finish what completed, then hand back everything else this node still holds.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_acks(), timeout=5)
        released = interrupted = 0
        for q in self.queues:
            # The jobs known here name their attempt (a started one counts an interruption);
            # then whatever else the active list holds (claims never heard of: not started).
            held = [r for r in list(self.running.values()) if r.job.queue == q and not r.lost]
            for i in range(0, len(held), MAX_BATCH):
                try:
                    res = await self._release(q, held[i : i + MAX_BATCH])
                    released += res.released
                    interrupted += res.interrupted
                except Exception as exc:
                    log.error("queue %s: release failed (%s); the reaper will recover the jobs", q, exc)
            try:
                released += (await self._release(q, None)).released
            except Exception as exc:
                log.error("queue %s: release failed (%s); the reaper will recover the jobs", q, exc)
        if released:
            log.warning(
                "released %d unfinished job(s) back to ready (%d interrupted mid-run)", released, interrupted
            )
        # redis-py's asyncio client can swallow a cancel that lands inside a command (the task
        # then loops on): cancel again until every background task has ended.
        pending = set(self._bg)
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        await asyncio.gather(*self._bg, return_exceptions=True)
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat.deregister()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            await self.client.aclose()
        if self._once_runner is not None:
            with contextlib.suppress(Exception):
                await self._once_runner.client.aclose()
        with contextlib.suppress(Exception):
            sync_client.close()
        log.info(
            "node %s stopped: %d claimed, %d completed, %d failed, %d stale",
            self.node,
            self.stats["claimed"],
            self.stats["completed"],
            self.stats["failed"],
            self.stats["stale"],
        )

    def zombie_threads(self) -> int:
        """Pool threads still running a task whose job was given up (timed out or released).

        Reads only (a copy of the set), so the metrics scrape may call it from its own thread."""
        return sum(
            1 for c in list(self._sync_calls) if c.abandoned and not c.done and c.thread_id is not None
        )


class _UnknownTask(Exception):
    pass


def run_worker(
    app: JobQ,
    config: WorkerConfig,
    *,
    metrics: Metrics | None = None,
    url: str | None = None,
    on_start: Callable[[Worker], None] | None = None,
) -> Worker:
    """Run a node in this thread until it stops; installs SIGTERM/SIGINT handlers."""
    worker = Worker(app, config, metrics=metrics, url=url)

    async def main() -> None:
        worker.install_signal_handlers()
        if on_start is not None:
            on_start(worker)
        await worker.run()

    jobq_loop.run(main())  # timers to the microsecond (jobq/worker/loop.py)
    return worker
