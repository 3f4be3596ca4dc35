"""A worker node: the shell that wires its components and owns start and shutdown.

One process is one node. Its components, one file each under ``jobq/worker/``:

- :mod:`~jobq.worker.fetcher` claims up to the number of free slots per script call, plus a few
  jobs ahead (the prefetch buffer); when nothing is runnable it arms the node's wake-up tokens
  and waits on the :mod:`~jobq.worker.wakeups` (a wake-up for this node, the next scheduled run
  time, or the poll interval, whichever comes first; docs/workers.md, "Wake-ups");
- :mod:`~jobq.worker.executor` runs ``async def`` tasks on the event loop and plain ``def`` tasks
  in a thread pool, at most ``concurrency`` at once, each under its timeout;
- :mod:`~jobq.worker.acker` finishes completed jobs in batches, records failures, releases;
- :mod:`~jobq.worker.held` is the table of the jobs the node holds, at the bottom: it imports no
  other worker module, and tells the fetcher about freed room through a callback wired here;
- the **heartbeat** (its own thread and connection, :mod:`jobq.worker.heartbeat`) renews leases;
- the **reaper** and **scheduler** passes (:mod:`jobq.worker.reaper`, :mod:`jobq.worker.scheduler`)
  run in the node's maintenance loop.

Only this module wires components to each other; each takes a narrow context (keys, script
calls and clock; the runner and flags in :class:`~jobq.worker.context.NodeState`; the held-jobs
table; callbacks) rather than the whole app where it can.

Shutdown (SIGTERM/SIGINT): stop claiming, hand buffered jobs back at once (their attempt is not
counted: they never started), let running jobs finish within ``grace``, release the rest back to
ready, exit 0. A second signal releases at once. A released job that had started keeps its
attempt and counts an interruption; at ``max_interruptions`` (the task's, else the node's) it is
dead-lettered with reason ``interrupted`` instead, so a job longer than the grace cannot re-run
at every deploy forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobq.app import JobQ
from jobq.backoff import Backoff
from jobq.errors import JobqError, RedisBusy, RedisUnavailable
from jobq.storage import checks, clients
from jobq.storage.calls import MAX_BATCH, MAX_EXTEND, AsyncRunner, SyncRunner
from jobq.storage.keys import validate_node, validate_queue
from jobq.worker import loop as jobq_loop
from jobq.worker.acker import Acker
from jobq.worker.context import NodeState
from jobq.worker.executor import Executor
from jobq.worker.fetcher import Fetcher
from jobq.worker.heartbeat import BeatResult, Heartbeat
from jobq.worker.held import HeldJobs
from jobq.worker.maintenance import Maintenance
from jobq.worker.outcomes import Outcomes
from jobq.worker.reaper import recover_inherited
from jobq.worker.wakeups import Wakeups

if TYPE_CHECKING:
    from jobq.metrics import Metrics
    from jobq.worker.held import Held

log = logging.getLogger("jobq.worker")

#: Most jobs run at once per node: with a full prefetch buffer (at most the concurrency) a node
#: then holds at most MAX_EXTEND jobs of a queue, the leases one heartbeat call renews.
MAX_CONCURRENCY = MAX_EXTEND // 2


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
    #: token armed and heard, 10 poll intervals, at most 10 s (jobq.worker.wakeups).
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
        #: Every outcome is recorded here: counters, metrics, the lines that go with them.
        self.outcomes = Outcomes(metrics, dead_max=app.store.limits.dead_max)
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
        # The components, wired here and nowhere else.
        self.state = NodeState()
        self.wakeups = Wakeups(
            app,
            self.state,
            self.url,
            self.node,
            self.queues,
            cfg.poll_interval,
            burst=cfg.burst,
            on_cancel=lambda _queue, job_id: self.executor.cancel_id(job_id),
        )
        self.held = HeldJobs(on_room=self.wakeups.poke)
        self.acker = Acker(
            app,
            self.state,
            self.held,
            node=self.node,
            url=self.url,
            tasks=app.tasks,
            max_interruptions=cfg.max_interruptions,
            hard_stopped=lambda: self._hard_stop is not None and self._hard_stop.is_set(),
            outcomes=self.outcomes,
        )
        self.executor = Executor(
            self.state,
            self.held,
            self.acker,
            node=self.node,
            tasks=app.tasks,
            max_payload=app.max_payload,
            concurrency=cfg.concurrency,
            max_zombies=cfg.max_zombies,
            request_stop=lambda: self._request_stop(True),
            outcomes=self.outcomes,
        )
        self.fetcher = Fetcher(
            app,
            self.state,
            self.held,
            self.wakeups,
            node=self.node,
            queues=self.queues,
            weights=self.weights,
            weighted=cfg.weighted,
            rotate=app.rotate_shards,
            take=self.executor.take,
            release_buffered=self.acker.release_buffered,
            concurrency=cfg.concurrency,
            prefetch=cfg.prefetch,
            lease_ms=self.lease_ms,
            lease=cfg.lease,
            poll_interval=cfg.poll_interval,
            burst=cfg.burst,
            outcomes=self.outcomes,
        )
        self.wakeups.can_claim = self.fetcher.can_claim
        self.wakeups.spawn = self.acker.spawn  # shutdown waits for these side calls too
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._hard_stop: asyncio.Event | None = None
        self.heartbeat: Heartbeat | None = None
        self.client: Any = None
        self._bg: list[asyncio.Task[Any]] = []

    # -- what others read -----------------------------------------------------------------------
    @property
    def metrics(self) -> Metrics | None:
        return self.outcomes.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        """Set before :meth:`run` (the command line attaches its metrics to a built node)."""
        self.outcomes.metrics = metrics

    @property
    def stats(self) -> dict[str, int]:
        """The node's counters: claimed, completed, failed, stale, lost, interrupted."""
        return self.outcomes.stats

    @property
    def running(self) -> dict[str, Held]:
        """The jobs this node holds (running, buffered, or waiting for their ack), by id."""
        return self.held.jobs

    @property
    def busy(self) -> int:
        """Concurrency slots in use (jobs running; not those waiting for their ack)."""
        return self.held.busy

    @property
    def runner(self) -> AsyncRunner | None:
        return self.state.runner

    @property
    def last_ok(self) -> float:
        return self.state.last_ok

    @property
    def pubsub_connected(self) -> bool:
        return self.wakeups.connected

    def zombie_threads(self) -> int:
        """Pool threads still running a task whose job was given up (safe from any thread)."""
        return self.executor.zombie_threads()

    def health(self) -> tuple[bool, str]:
        """Healthy = a recent successful round trip through a script (not a bare PING)."""
        age = time.monotonic() - self.state.last_ok
        limit = max(3 * self.config.poll_interval, self.config.lease)
        if age > limit:
            return False, f"no successful Redis round trip for {age:.1f} s"
        if self.state.fenced:
            return False, "fenced: lease renewals failing"
        return True, f"ok (last round trip {age:.2f} s ago)"

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
        self.state.stopping = True
        self.acker.release_buffered()  # others may run the buffered jobs while this node drains
        self.wakeups.stop()  # no more wake-ups: publishers skip this node, and its tokens go

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
                self.held.busy,
            )
        self._request_stop(True)

    # -- main -----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until stopped; then shut down cleanly (see the module docstring)."""
        self._loop = asyncio.get_running_loop()
        self.executor.job_context = contextvars.copy_context()
        self.acker.bind()
        self._stop_event = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self.client = clients.async_client(self.url, retry_refused=False)
        self.state.runner = AsyncRunner(self.client)
        sync_client = clients.sync_client(self.url)
        self.heartbeat = Heartbeat(
            self.app,
            SyncRunner(sync_client),
            self.node,
            self.queues,
            self.lease_ms,
            known=self.held.known,
            fences=self.held.fences,
            on_beat=self._beat_from_thread,
            on_fence=self._fence_from_thread,
            on_queue_fence=lambda *a: self._call_soon(self.executor.fence_queue, *a),
            on_epoch_change=None if self.metrics is None else self.metrics.redis_epoch_changed,
            info=lambda: {
                "concurrency": self.config.concurrency,
                "inflight": len(self.held),
                "busy": self.held.busy,
            },
        )
        log.info(
            "node %s: queues %s, concurrency %d, lease %.1f s, event loop %s, redis %s",
            self.node,
            ",".join(self.queues),
            self.config.concurrency,
            self.config.lease,
            jobq_loop.running_loop_kind(),
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
                self.executor.pool.shutdown(wait=False)
        if not ready:
            return
        self.eviction_policy_ok = await checks.check_eviction_policy(self.client)
        if self.metrics is not None:
            self.metrics.set_eviction_policy_ok(self.eviction_policy_ok)
            self.metrics.pubsub_from(lambda: self.wakeups.connected)
            self.metrics.zombies_from(self.zombie_threads)
        try:  # before the heartbeat, which would release them with their attempt uncounted
            await recover_inherited(self.app, self.state.runner, self.node, self.queues)
        except JobqError as exc:
            log.warning("could not recover jobs left by an earlier run of this node: %s", exc)
        self.heartbeat.start()
        self._bg = [asyncio.create_task(self.acker.run(), name="jobq-acker")]
        if not self.config.burst:
            self._bg.append(asyncio.create_task(self.wakeups.listen(), name="jobq-pubsub"))
        if self.config.maintenance:
            maintenance = Maintenance(
                self.app,
                self.state.runner,
                self.state,
                self.outcomes,
                self.queues,
                lease=self.config.lease,
                node_ttl_ms=self.node_ttl_ms,
                reap_interval=self.reap_interval,
                schedule_interval=self.config.schedule_interval,
                poke=self.wakeups.poke,
                all_armed=self.wakeups.all_armed,
            )
            self._bg.append(asyncio.create_task(maintenance.run(), name="jobq-maintenance"))
        try:
            await self.fetcher.run()
            await self._drain()
        finally:
            await self._shutdown(sync_client)

    async def _probe(self) -> bool:
        """Wait until Redis answers a script call. A wrong password, a missing permission or an
        old Redis is fatal (raised); an unreachable or busy Redis is retried until it answers
        or the node is stopped (then returns False)."""
        assert self.state.runner is not None and self._stop_event is not None
        backoff = Backoff(0.1, 2.0)
        warned = False
        while not self._stop_event.is_set():
            try:
                await probe_any_queue(self.state.runner, self.app, self.queues)
                self.state.last_ok = time.monotonic()
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

    # -- heartbeat callbacks (called on the heartbeat thread) ------------------------------------
    def _beat_from_thread(self, beat: BeatResult) -> None:
        if self._loop is not None and (beat.lost or beat.unknown or beat.cancelled):
            self._loop.call_soon_threadsafe(self._on_beat, beat)

    def _on_beat(self, beat: BeatResult) -> None:
        for ids in beat.cancelled.values():  # the cancel notice's fallback
            for job_id in ids:
                self.executor.cancel_id(job_id)
        for ids in beat.lost.values():
            for job_id in ids:
                run = self.held.get(job_id)
                if run is None or run.finishing:
                    continue
                if beat.fences.get(job_id, run.job.fence) != run.job.fence:
                    continue  # a newer claim's run replaced the one judged lost
                self.executor.lose(run, "this node lost its lease")
        for q, ids in beat.unknown.items():
            log.warning("queue %s: releasing %d claimed job(s) this node never saw", q, len(ids))
            self.acker.release_unknown_soon(q, sorted(ids))

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(fn, *args)

    def _fence_from_thread(self, fenced: bool, redis_down: bool) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set_fenced, fenced, redis_down)

    def _set_fenced(self, fenced: bool, redis_down: bool = False) -> None:
        self.state.fenced = fenced
        if fenced:
            self.executor.fence(redis_down)
        self.wakeups.poke()

    # -- maintenance ----------------------------------------------------------------------------
    # -- shutdown -------------------------------------------------------------------------------
    async def _drain(self) -> None:
        """Wait up to ``grace`` for running jobs (a second signal cuts it short)."""
        assert self._hard_stop is not None
        tasks = [r.task for r in self.held.values() if r.task is not None and not r.task.done()]
        if not tasks or (self.config.burst and not self.state.stopping):
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
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

    async def _shutdown(self, sync_client: Any) -> None:
        for t in self._bg:
            if t.get_name() != "jobq-acker":
                t.cancel()
        if self.acker.side_tasks:  # buffered jobs being handed back: let those calls end first
            await asyncio.wait(set(self.acker.side_tasks), timeout=2)
        # Finish what completed, then hand back everything else this node still holds.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.acker.flush(), timeout=5)
        released = interrupted = 0
        for q in self.queues:
            # The jobs known here name their attempt (a started one counts an interruption);
            # then whatever else the active list holds (claims never heard of: not started).
            held = self.held.of_queue(q)
            for i in range(0, len(held), MAX_BATCH):
                try:
                    res = await self.acker.release(q, held[i : i + MAX_BATCH])
                    released += res.released
                    interrupted += res.interrupted
                except Exception as exc:
                    log.error("queue %s: release failed (%s); the reaper will recover the jobs", q, exc)
            try:
                released += (await self.acker.release(q, None)).released
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
        self.executor.pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            await self.client.aclose()
        await self.acker.close()
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


async def probe_any_queue(runner: AsyncRunner, app: JobQ, queues: list[str]) -> None:
    """One script call, on the first of ``queues`` that answers: on a Redis Cluster with a
    primary down, the queues of the other primaries are served (RELIABILITY F19)."""
    first: RedisUnavailable | None = None
    for q in queues:
        try:
            await runner.run(app.store.promote(q, limit=1, now_ms=app.now_ms()))
            return
        except RedisUnavailable as exc:
            if not exc.shard:
                raise
            first = first or exc
    assert first is not None
    raise first


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

    jobq_loop.run(main())  # uvloop, or asyncio's with timers to the microsecond (jobq/worker/loop.py)
    return worker
