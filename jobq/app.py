"""The producer API: :class:`JobQ`, tasks, enqueueing, and :class:`Job` handles."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from jobq import codec, errors, tracing
from jobq.clock import Clock, SystemClock
from jobq.requests import MAX_TIME_MS as MAX_TIME_MS
from jobq.requests import OPTION_NAMES as OPTION_NAMES
from jobq.requests import PY_OPTION_NAMES as PY_OPTION_NAMES
from jobq.requests import EnqueueRequest as EnqueueRequest
from jobq.requests import Seconds as Seconds
from jobq.requests import (
    TaskBase,
    check_options,
    request_from_mapping,
    seconds_to_ms,
    to_spec,
    validate_max_attempts,
    validate_priority,
)
from jobq.storage import reads
from jobq.storage.calls import (
    AsyncClient,
    AsyncRunner,
    Call,
    JobSpec,
    Limits,
    Store,
    SyncRunner,
    split_batches,
)
from jobq.storage.clients import async_client, default_url, sync_client
from jobq.storage.keys import Keys, validate_queue, validate_task_name
from jobq.storage.notify import CompletionListener, Watch
from jobq.storage.notify import retry_after as notify_retry_after

log = logging.getLogger("jobq")

if TYPE_CHECKING:
    from jobq.cron import CronEntry
    from jobq.events import Event

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
#: The result type of a job handle (``Job[int]``: ``job.result()`` is an ``int``).
R_co = TypeVar("R_co", covariant=True)

#: Most Redis commands one app runs at once on one event loop (the async API's pool never holds
#: more connections than this, plus one for completion notices, however many callers wait).
ASYNC_MAX_CONCURRENT = 32
#: How long a caller's "waiting for this job" mark lives, ms; each fallback poll renews it.
WAIT_MARK_MS = 60_000
_RESULT_FIELDS = ("state", "result", "error")


class JobState(str, Enum):
    """Where a job is. Each job is in exactly one of these at any time."""

    #: Waiting in its queue's ready set.
    READY = "ready"
    #: Delayed, or waiting out a retry backoff.
    SCHEDULED = "scheduled"
    #: Claimed by a node and running (or about to).
    ACTIVE = "active"
    #: Finished successfully; kept for the retention time with its result.
    DONE = "done"
    #: In the dead-letter list: attempts exhausted, jobq.Fail, expired deadline, or bad data.
    DEAD = "dead"
    #: Cancelled (before it ran, or while it ran); kept for the retention time.
    CANCELLED = "cancelled"
    #: No such job: never enqueued, or gone after its retention time.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 3
    timeout: float | None = None
    retry_backoff: float = 1.0
    #: Releases of a started job (node shutdowns before it finished) at which it is
    #: dead-lettered with reason ``interrupted``; None = the worker's ``max_interruptions``.
    max_interruptions: int | None = None


# -- the app ------------------------------------------------------------------------------------
class JobQ:
    """A jobq application: the Redis it uses, its tasks, and the producer API.

    Parameters:
        url: the Redis URL (default: ``$JOBQ_REDIS_URL`` or ``redis://127.0.0.1:6379/0``).
        prefix: the first segment of every key (default ``jobq``).
        max_payload: the largest encoded args + kwargs, bytes (default 1 MiB).
        result_ttl: seconds a finished job and its result are kept (default 600).
        result_max: the most finished (done or cancelled) jobs a queue keeps, however young
            (default 100,000; 0 = no count bound): past it, the finished jobs that expire first
            are deleted early, a few hundred per ack call. An int for every queue, or a mapping
            of queue name to bound (queues not named get 100,000). Each kept job costs Redis
            about 0.5 KiB plus its result, so 100,000 is about 50 MiB per queue.
        dead_max: the most jobs the dead-letter list of a queue keeps (default 10,000).
        events_max: the length cap of each queue's lifecycle event stream (default 10,000;
            trimmed with ``XADD MAXLEN ~``, so up to about 100 more), or a mapping of queue name
            to cap (queues not named get 10,000); 0 = the queue writes no events. See
            docs/events.md.
        dead_ttl: seconds a dead-lettered job is kept (default 7 days).
        max_depth: back-pressure: refuse an enqueue when ready + scheduled would exceed it;
            an int for every queue, or a mapping of queue name to limit (0 = no limit).
        clock: a :class:`jobq.clock.FakeClock` for tests; production uses Redis time.
        client: an existing synchronous redis-py client to use instead of ``url``.
        shards: hot queues split over N shards, ``{"hot": 3}``: jobs for ``hot`` go to
            ``hot#0`` .. ``hot#2`` (the shard is chosen by a hash of the job id, or of the unique
            key when one is given), and a worker serving ``hot`` claims from every shard. Each
            shard is its own hash tag, so on Redis Cluster the shards spread over the nodes.
            Priority order holds within a shard; docs/redis.md gives the bound across shards.
        durable: enqueue (and the worker's ack) wait until one replica has the write (``WAIT 1
            durable_timeout``); an enqueue no replica acknowledged raises
            :class:`jobq.errors.NotReplicated`. Not supported on Redis Cluster.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "jobq",
        max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
        result_ttl: float = 600,
        result_max: int | Mapping[str, int] = 100_000,
        dead_max: int = 10_000,
        dead_ttl: float = 7 * 24 * 3600,
        events_max: int | Mapping[str, int] = 10_000,
        max_depth: int | Mapping[str, int] = 0,
        default_queue: str = "default",
        clock: Clock | None = None,
        client: Any = None,
        shards: Mapping[str, int] | None = None,
        durable: bool = False,
        durable_timeout: float = 1.0,
    ) -> None:
        if not prefix or any(c in prefix for c in "{} \t\n"):
            raise errors.InvalidInput(f"prefix: {prefix!r} is not a valid key prefix", "prefix")
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) or max_payload < 1:
            raise errors.InvalidInput("max_payload: must be a positive integer", "max_payload")
        if isinstance(dead_max, bool) or not isinstance(dead_max, int) or dead_max < 1:
            raise errors.InvalidInput(f"dead_max: must be an integer >= 1, got {dead_max!r}", "dead_max")
        caps = result_max.values() if isinstance(result_max, Mapping) else [result_max]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in caps):
            raise errors.InvalidInput("result_max: must be an integer >= 0 (0 = no bound)", "result_max")
        evcaps = events_max.values() if isinstance(events_max, Mapping) else [events_max]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in evcaps):
            raise errors.InvalidInput("events_max: must be an integer >= 0 (0 = no events)", "events_max")
        depths = max_depth.values() if isinstance(max_depth, Mapping) else [max_depth]
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
            raise errors.InvalidInput("max_depth: must be an integer >= 0 (0 = no limit)", "max_depth")
        self.url = url or default_url()
        self.keys = Keys(prefix)
        self.limits = Limits(
            retention_ms=seconds_to_ms(result_ttl, "result_ttl", errors.InvalidInput),
            dead_max=int(dead_max),
            dead_ttl_ms=max(1, seconds_to_ms(dead_ttl, "dead_ttl", errors.InvalidInput)),
            finished_max=100_000 if isinstance(result_max, Mapping) else result_max,
            finished_max_queues=dict(result_max) if isinstance(result_max, Mapping) else {},
            events_max=10_000 if isinstance(events_max, Mapping) else events_max,
            events_max_queues=dict(events_max) if isinstance(events_max, Mapping) else {},
        )
        self.store = Store(self.keys, self.limits)
        self.max_payload = max_payload
        self.max_depth = max_depth
        self.defaults = TaskDefaults(queue=validate_queue(default_queue))
        self.clock: Clock = clock or SystemClock()
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.cron_entries: list[CronEntry] = []
        self._client = client
        self._runner: SyncRunner | None = None
        self._known_queues: set[str] = set()
        #: Queues whose registration failed -> monotonic time before which it is not retried.
        self._register_retry_at: dict[str, float] = {}
        #: Per task name (validated): its defaults, converted once (see :meth:`prepare`).
        self._task_bases: dict[str, TaskBase] = {}
        self.shards: dict[str, int] = {}
        for name, n in (shards or {}).items():
            if "#" in validate_queue(name):
                raise errors.InvalidQueueName(f"shards: {name!r}: a sharded queue's name has no '#'")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
                raise errors.InvalidInput(f"shards: {name!r} must have 1..1024 shards, got {n!r}", "shards")
            self.shards[name] = n
        self.validate_enqueue_queue(self.defaults.queue)
        self._rotation = 0
        if durable:
            from jobq.storage.clients import is_cluster_url

            if is_cluster_url(self.url):
                raise errors.InvalidInput("durable: not supported on Redis Cluster", "durable")
            self.store.wait_replicas = 1
            self.store.wait_timeout_ms = max(
                1, seconds_to_ms(durable_timeout, "durable_timeout", errors.InvalidInput)
            )
        #: Called as ``hook(queue, task, n)`` after jobs were accepted (metrics subscribe here).
        self.on_enqueued: list[Callable[[str, str, int], None]] = []
        #: The async API's client, runner and completion listener, one per event loop.
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        #: The event loop thread that the sync ``job.result()`` waits on (started on first use).
        self._bridge: _Bridge | None = None
        self._bridge_lock = threading.Lock()

    # -- connection -----------------------------------------------------------------------------
    def bind(self, *, url: str | None = None, prefix: str | None = None) -> None:
        """Point this app at another Redis ``url`` and/or key ``prefix`` (what ``jobq worker
        --redis-url/--prefix`` do to the app of ``-A``), keeping everything else: its tasks,
        limits, shards and durable mode (``durable=True`` still waits for a replica)."""
        if prefix is not None and prefix != self.keys.prefix:
            if not prefix or any(c in prefix for c in "{} \t\n"):
                raise errors.InvalidInput(f"prefix: {prefix!r} is not a valid key prefix", "prefix")
            self.keys = Keys(prefix)
            self.store = self.store.with_keys(self.keys)
            self._known_queues.clear()
        if url is not None and url != self.url:
            if self.store.wait_replicas:
                from jobq.storage.clients import is_cluster_url

                if is_cluster_url(url):
                    raise errors.InvalidInput("durable: not supported on Redis Cluster", "durable")
            self.close()
            self.url = url

    @property
    def client(self) -> Any:
        """The synchronous redis-py client (created on first use)."""
        if self._client is None:
            self._client = sync_client(self.url)
        return self._client

    @property
    def runner(self) -> SyncRunner:
        if self._runner is None:
            self._runner = SyncRunner(self.client)
        return self._runner

    def run(self, call: Call[T]) -> T:
        """Run one script call (see :mod:`jobq.storage.calls`)."""
        return self.runner.run(call)

    def close(self) -> None:
        """Close the synchronous client and the thread ``job.result()`` waits on. The async
        API's connections belong to their event loops: ``await app.aclose()`` on each."""
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            bridge.close(self)
        self._loops = {}
        if self._client is not None:
            self._client.close()
            self._client = None
            self._runner = None

    def __enter__(self) -> JobQ:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- asyncio --------------------------------------------------------------------------------
    def _aio(self) -> _LoopState:
        """The running event loop's client, runner and completion listener (created on first
        use, without I/O: the client connects on its first command)."""
        loop = asyncio.get_running_loop()
        st = self._loops.get(loop)
        if st is None:
            # Loops closed without ``aclose()`` (each ``asyncio.run`` is a new loop): drop their
            # state, whose connections died with them.
            for old in [lp for lp in list(self._loops) if lp.is_closed()]:
                self._loops.pop(old, None)
            client = async_client(self.url)
            st = _LoopState(
                client,
                AsyncRunner(client),
                CompletionListener(self.url),
                asyncio.Semaphore(ASYNC_MAX_CONCURRENT),
            )
            self._loops[loop] = st
        return st

    @property
    def aclient(self) -> AsyncClient:
        """The asyncio redis-py client of the running event loop (one pool per loop), made from
        the app's ``url`` (a ``client=`` given to :class:`JobQ` serves the sync calls only)."""
        return self._aio().client

    async def arun(self, call: Call[T]) -> T:
        """:meth:`run` from an event loop."""
        st = self._aio()
        async with st.slots:
            return await st.runner.run(call)

    async def aclose(self) -> None:
        """Close the running event loop's connections (the async API's pool and the completion
        listener); the app stays usable, and reconnects on its next call."""
        st = self._loops.pop(asyncio.get_running_loop(), None)
        if st is not None:
            await st.listener.aclose()
            await st.client.aclose()

    # -- lifecycle events (jobq/events.py, docs/events.md) --------------------------------------
    def events(
        self,
        queues: Sequence[str] | None = None,
        *,
        since: str | None = None,
        last: int | None = None,
        follow: bool = False,
    ) -> AsyncIterator[Event]:
        """The lifecycle events of ``queues`` (default: every queue known when it starts),
        oldest first, as an async iterator: ``async for ev in app.events(["emails"],
        follow=True)``. ``since``: a stream entry id (an event's ``id``), a position
        (``queue=<id>,...``), ``"0"`` (everything kept) or ``"$"`` (only new ones); ``last``:
        start with the newest ``last`` events. Default: everything kept, or with ``follow`` only
        new events. ``follow``: wait for more, never ending. See docs/events.md."""
        from jobq.events import EventReader

        return EventReader(self, queues, since=since, last=last, follow=follow).__aiter__()

    def iter_events(
        self,
        queues: Sequence[str] | None = None,
        *,
        since: str | None = None,
        last: int | None = None,
        follow: bool = False,
    ) -> Iterator[Event]:
        """:meth:`events` as a synchronous iterator."""
        from jobq.events import EventReader

        return iter(EventReader(self, queues, since=since, last=last, follow=follow))

    async def __aenter__(self) -> JobQ:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _sync_bridge(self) -> _Bridge:
        with self._bridge_lock:
            if self._bridge is None or not self._bridge.usable():
                self._bridge = _Bridge()
            return self._bridge

    def now_ms(self) -> int | None:
        return self.clock.redis_now_ms()

    def queue_shards(self, queue: str) -> list[str]:
        """The physical queues a logical queue is stored in (one unless it is sharded)."""
        n = self.shards.get(queue, 1)
        return [queue] if n == 1 else [f"{queue}#{i}" for i in range(n)]

    def shard_for(self, queue: str, key: str) -> str:
        """The shard of ``queue`` a job goes to: a hash of its job id (or unique key), so a
        retried enqueue with the same id lands on the same shard and stays a no-op."""
        n = self.shards.get(queue, 1)
        return queue if n == 1 else f"{queue}#{zlib.crc32(key.encode('utf-8', 'surrogatepass')) % n}"

    def rotate_shards(self, queues: list[str]) -> list[str]:
        """``queues`` with each run of one queue's shards rotated one step further per call, so a
        busy worker's claim rounds start at each shard in turn instead of draining shard 0 first."""
        if not self.shards:
            return queues
        self._rotation += 1
        out: list[str] = []
        i = 0
        while i < len(queues):
            base = queues[i].partition("#")[0]
            j = i + 1
            while j < len(queues) and queues[j].partition("#")[0] == base:
                j += 1
            k = self._rotation % (j - i)
            out += queues[i + k : j] + queues[i : i + k]
            i = j
        return out

    def validate_enqueue_queue(self, name: object) -> str:
        """A queue a job may be enqueued to: a valid name whose ``#N`` suffix, if any, names a
        shard of this app (``#`` is reserved for shards: ``hot#1`` on an app that does not
        shard ``hot`` would be a queue no worker serving ``hot`` claims from)."""
        queue = validate_queue(name)
        base, sep, index = queue.partition("#")
        if sep:
            n = self.shards.get(base)
            if n is None:
                raise errors.InvalidQueueName(
                    f"queue: {queue!r}: '#' is reserved for the shards of a sharded queue, and "
                    f"this app does not shard {base!r} (JobQ(shards={{{base!r}: N}}) does)"
                )
            if int(index) >= n:
                raise errors.InvalidQueueName(f"queue: {queue!r}: {base!r} has shards #0..#{n - 1}")
        return queue

    def depth_limit(self, queue: str) -> int:
        """The max depth of ``queue`` (of each shard, for a sharded queue)."""
        if type(self.max_depth) is int:
            return self.max_depth
        if isinstance(self.max_depth, Mapping):
            return int(self.max_depth.get(queue.partition("#")[0], 0))
        return int(self.max_depth)

    # -- tasks ----------------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
        timeout: Seconds | timedelta | None = None,
        retry_backoff: Seconds | timedelta = 1.0,
        check_args: bool = True,
        max_interruptions: int | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
        timeout: Seconds | timedelta | None = None,
        retry_backoff: Seconds | timedelta = 1.0,
        check_args: bool = True,
        max_interruptions: int | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a ``def`` or ``async def`` function as a task.

        ``@app.task`` or ``@app.task(queue="emails", priority=5, max_attempts=5, timeout=30,
        retry_backoff=2)``. The task's name defaults to ``module.qualname``.

        ``check_args`` (default on): an enqueue through this app checks the arguments against
        the function's signature and raises :class:`jobq.errors.InvalidArguments` (nothing
        stored) for a missing or unexpected one, as calling it would; turn it off for a task
        whose producer-side signature differs from the worker's. One call can skip it with
        ``_check_args=False`` (or ``options(check_args=False)``).

        ``max_interruptions``: a started job released unfinished by this many node shutdowns
        is dead-lettered with reason ``interrupted`` (default: the worker's, 5; 0 = never).
        """
        if max_interruptions is not None and (
            isinstance(max_interruptions, bool)
            or not isinstance(max_interruptions, int)
            or max_interruptions < 0
        ):
            raise errors.InvalidInput(
                f"max_interruptions: must be an integer >= 0, got {max_interruptions!r}", "max_interruptions"
            )

        def register(f: Callable[P, R]) -> Task[P, R]:
            defaults = TaskDefaults(
                queue=self.validate_enqueue_queue(queue or self.defaults.queue),
                priority=validate_priority(priority),
                max_attempts=validate_max_attempts(max_attempts),
                timeout=None
                if timeout is None
                else seconds_to_ms(timeout, "timeout", errors.InvalidTimeout) / 1000,
                retry_backoff=seconds_to_ms(retry_backoff, "retry_backoff", errors.InvalidRetryBackoff)
                / 1000,
                max_interruptions=max_interruptions,
            )
            task_name = validate_task_name(name or f"{f.__module__}.{f.__qualname__}")
            t: Task[P, R] = Task(self, task_name, f, defaults, check_args=check_args)
            self.tasks[task_name] = t
            return t

        if fn is not None:
            return register(fn)
        return register

    def find_task(self, name: str) -> Task[Any, Any] | None:
        """The task registered as ``name``, or else the one task whose name ends in ``.name``
        or ``:name`` (``send_email`` finds ``tasks.send_email``); None if there is none. Raises
        :class:`jobq.errors.InvalidTaskName` when the short name fits several tasks."""
        t = self.tasks.get(name)
        if t is not None:
            return t
        fits = sorted(n for n in self.tasks if n.endswith((f".{name}", f":{name}")))
        if len(fits) > 1:
            raise errors.InvalidTaskName(f"task: {name!r} is ambiguous: it could be {', '.join(fits)}")
        return self.tasks[fits[0]] if fits else None

    def periodic(
        self,
        schedule: str,
        *,
        name: str | None = None,
        queue: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        tz: str | None = None,
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a task and run it on a cron schedule (``"*/5 * * * *"``), enqueued exactly
        once per tick across all worker nodes. The fields are read in UTC, or with ``tz`` in
        that IANA time zone (``tz="Europe/Berlin"``), daylight-saving changes handled as cron
        does (see :mod:`jobq.cron`)."""
        from jobq.cron import CronEntry, CronSchedule

        sched = CronSchedule.parse(schedule, tz=tz)

        def register(f: Callable[P, R]) -> Task[P, R]:
            check = _ArgCheck.of(f) if task_options.get("check_args", True) else None
            if check is not None:  # before registering: a refused entry leaves nothing behind
                check.check(tuple(args), dict(kwargs or {}))
            t = self.task(name=name, queue=queue, **task_options)(f)
            self.cron_entries.append(CronEntry(t.name, sched, tuple(args), dict(kwargs or {})))
            return t

        return register

    # -- enqueue --------------------------------------------------------------------------------
    def _defaults_for(self, task: str) -> TaskDefaults:
        t = self.tasks.get(task)
        return t.defaults if t is not None else self.defaults

    def prepare(self, req: EnqueueRequest) -> tuple[str, JobSpec]:
        """Validate one request completely and turn it into ``(queue, JobSpec)``; raises an
        :class:`jobq.errors.InvalidInput` naming the field. Writes nothing.

        The task's defaults are validated and converted once per task name (kept in
        ``_task_bases``); :func:`jobq.requests.to_spec` does the rest."""
        name = req.task
        if type(name) is not str:
            validate_task_name(name)
        t = self.tasks.get(name)
        d = t.defaults if t is not None else self.defaults
        base = self._task_bases.get(name)
        if base is None or base.source is not d:
            validate_task_name(name)
            base = TaskBase.of(d)
            if len(self._task_bases) >= 4096:  # bounded, whatever names producers send
                self._task_bases.clear()
            self._task_bases[name] = base
        if t is not None and req.check_args:
            t.check_arguments(req.args, req.kwargs)
        queue, spec = to_spec(req, name, base, self.validate_enqueue_queue, self.max_payload)
        if queue in self.shards:
            queue = self.shard_for(queue, spec.unique_key or spec.id)
        return queue, spec

    def _register_queue(self, queue: str) -> None:
        """Add ``queue`` to the ``jobq:queues`` registry, best effort. It runs after the job is
        stored, so it never raises: on a Redis Cluster the registry lives in one slot, maybe on
        a primary that is down while the queue's own is up, and a stored job must not look
        refused (a caller retrying without a job id would enqueue it twice). A failed
        registration is tried again at the next enqueue to the queue (at most every 5 s), and
        every worker serving the queue registers it at each heartbeat."""
        if queue in self._known_queues:
            return
        now = time.monotonic()
        if self._register_retry_at.get(queue, 0.0) > now:
            return
        try:
            reads.register_queue(self.client, self.keys, queue)
        except Exception as exc:
            from jobq.storage.calls import map_error

            if len(self._register_retry_at) >= 4096:
                self._register_retry_at.clear()
            self._register_retry_at[queue] = now + 5.0
            log.warning(
                "queue %s: its job is stored, but the queue registry (%s) was not updated: %s; "
                "tried again later",
                queue,
                self.keys.queues,
                map_error(exc, "register queue", queue),
            )
            return
        self._register_retry_at.pop(queue, None)
        self._known_queues.add(queue)

    def enqueue(
        self,
        task: str | Task[Any, Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: Seconds | timedelta | None = None,
        run_at: datetime | Seconds | None = None,
        max_attempts: int | None = None,
        timeout: Seconds | timedelta | None = None,
        deadline: datetime | timedelta | Seconds | None = None,
        unique_key: str | None = None,
        retry_backoff: Seconds | timedelta | None = None,
        job_id: str | None = None,
        check_args: bool = True,
    ) -> Job[Any]:
        """Enqueue one job of ``task`` (a name, so producers need not import the task).

        ``delay`` is seconds (or a timedelta) from now on the Redis clock; ``run_at`` an absolute
        datetime or epoch seconds (past = now). ``deadline``: a datetime/epoch seconds, or a
        timedelta from now; a job not started by then is never run and is dead-lettered with
        reason ``expired``. ``unique_key``: while a job holding it exists and is unfinished,
        enqueueing with the same key returns that job instead. ``check_args=False`` skips the
        check of the arguments against a registered task's signature. Raises
        :class:`jobq.errors.InvalidInput` (nothing written), :class:`jobq.errors.QueueFull`,
        :class:`jobq.errors.RedisUnavailable`, :class:`jobq.errors.RedisOutOfMemory`.
        """
        req = EnqueueRequest(
            task.name if isinstance(task, Task) else task,
            args,
            {} if kwargs is None else kwargs,
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
            timeout=timeout,
            deadline=deadline,
            unique_key=unique_key,
            retry_backoff=retry_backoff,
            job_id=job_id,
            check_args=check_args,
        )
        return self.enqueue_request(req)

    def enqueue_request(self, req: EnqueueRequest) -> Job[Any]:
        return self.enqueue_request_state(req)[0]

    def enqueue_request_state(self, req: EnqueueRequest) -> tuple[Job[Any], str | None]:
        """:meth:`enqueue_request`, and the state the job was stored in when the request alone
        tells it (a new id: no ``unique_key``, no caller-given ``job_id``): ``"ready"`` or
        ``"scheduled"``, without another round trip; ``None`` when an existing job's handle may
        have been returned (ask ``job.status()``)."""
        if tracing.AVAILABLE and tracing.in_trace():
            with tracing.SendSpan() as span:
                q, spec = self.prepare(req)
                spec = replace(spec, trace=span.describe((q,), 1, spec.id))
                return self._store_one(req, q, spec)
        q, spec = self.prepare(req)
        return self._store_one(req, q, spec)

    def _store_one(self, req: EnqueueRequest, q: str, spec: JobSpec) -> tuple[Job[Any], str | None]:
        now = self.now_ms()
        ids = self.run(self.store.enqueue(q, [spec], now_ms=now, max_depth=self.depth_limit(q)))
        # Registered after the job is stored, so a refused enqueue writes nothing at all.
        if q not in self._known_queues:
            self._register_queue(q)
        if self.on_enqueued:
            self._notify_enqueued([(q, spec.task)])
        return Job(self, ids[0], q), _stored_state(req, spec, ids[0], now)

    def enqueue_each(
        self, requests: Sequence[EnqueueRequest]
    ) -> list[tuple[Job[Any], str | None] | Exception]:
        """Enqueue independent requests in one round trip, each with its own outcome: for each
        request, what :meth:`enqueue_request_state` would return, or the exception it would raise.
        (The HTTP API sends the single-job POSTs that arrive while a round trip is out this way.)

        Each queue's jobs go in one script call (pipelined with the other queues' calls). A
        call is all-or-nothing: when Redis refuses it (``max_depth``, a deadline already past),
        nothing of it was stored, and its jobs are sent again one per call, so a request is
        refused only for its own reason. An error that leaves the outcome unknown (Redis
        unavailable) is every one of that call's requests' error, as it would be alone."""
        out: list[tuple[Job[Any], str | None] | Exception | None] = [None] * len(requests)
        by_queue: dict[str, list[tuple[int, JobSpec]]] = {}
        for i, req in enumerate(requests):
            try:
                q, spec = self.prepare(req)
            except Exception as exc:
                out[i] = exc
                continue
            by_queue.setdefault(q, []).append((i, spec))
        now = self.now_ms()
        calls: list[Call[list[str]]] = []
        slots: list[list[tuple[int, JobSpec]]] = []
        for q, items in by_queue.items():
            for chunk in split_batches(items, lambda it: len(it[1].payload)):
                calls.append(
                    self.store.enqueue(q, [s for _, s in chunk], now_ms=now, max_depth=self.depth_limit(q))
                )
                slots.append(chunk)
        results: list[Any]
        try:
            results = self.runner.run_batch(calls) if calls else []
        except Exception as exc:
            results = [exc] * len(calls)
        stored: list[tuple[str, str]] = []
        for call, chunk, res in zip(calls, slots, results, strict=True):
            q = call.queue
            if isinstance(res, (errors.InvalidInput, errors.QueueFull)) and len(chunk) > 1:
                # Refused whole, nothing stored: each job on its own call for its own answer.
                singles = [
                    self.store.enqueue(q, [s], now_ms=now, max_depth=self.depth_limit(q)) for _, s in chunk
                ]
                try:
                    again: list[Any] = self.runner.run_batch(singles)
                except Exception as exc:
                    again = [exc] * len(singles)
                pairs = [([item], r) for item, r in zip(chunk, again, strict=True)]
            else:
                pairs = [(chunk, res)]
            for items, r in pairs:
                if isinstance(r, Exception):
                    for i, _ in items:
                        out[i] = r
                    continue
                if q not in self._known_queues:
                    self._register_queue(q)
                for (i, spec), job_id in zip(items, r, strict=True):
                    out[i] = (Job(self, job_id, q), _stored_state(requests[i], spec, job_id, now))
                    stored.append((q, spec.task))
        if self.on_enqueued and stored:
            self._notify_enqueued(stored)
        return [o if o is not None else errors.JobqError("not enqueued") for o in out]

    async def aenqueue(
        self,
        task: str | Task[Any, Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: Seconds | timedelta | None = None,
        run_at: datetime | Seconds | None = None,
        max_attempts: int | None = None,
        timeout: Seconds | timedelta | None = None,
        deadline: datetime | timedelta | Seconds | None = None,
        unique_key: str | None = None,
        retry_backoff: Seconds | timedelta | None = None,
        job_id: str | None = None,
        check_args: bool = True,
    ) -> Job[Any]:
        """:meth:`enqueue` from an event loop: the same options, checks and errors, without
        blocking the loop (``await app.aenqueue("tasks.send", ["a@example.com"])``)."""
        req = EnqueueRequest(
            task.name if isinstance(task, Task) else task,
            args,
            {} if kwargs is None else kwargs,
            queue=queue,
            priority=priority,
            delay=delay,
            run_at=run_at,
            max_attempts=max_attempts,
            timeout=timeout,
            deadline=deadline,
            unique_key=unique_key,
            retry_backoff=retry_backoff,
            job_id=job_id,
            check_args=check_args,
        )
        return await self.aenqueue_request(req)

    async def aenqueue_request(self, req: EnqueueRequest) -> Job[Any]:
        return (await self.aenqueue_request_state(req))[0]

    async def aenqueue_request_state(self, req: EnqueueRequest) -> tuple[Job[Any], str | None]:
        """:meth:`enqueue_request_state` from an event loop."""
        if tracing.AVAILABLE and tracing.in_trace():
            with tracing.SendSpan() as span:
                q, spec = self.prepare(req)
                spec = replace(spec, trace=span.describe((q,), 1, spec.id))
                return await self._astore_one(req, q, spec)
        q, spec = self.prepare(req)
        return await self._astore_one(req, q, spec)

    async def _astore_one(self, req: EnqueueRequest, q: str, spec: JobSpec) -> tuple[Job[Any], str | None]:
        now = self.now_ms()
        ids = await self.arun(self.store.enqueue(q, [spec], now_ms=now, max_depth=self.depth_limit(q)))
        if q not in self._known_queues:
            await self._aregister_queue(q)
        if self.on_enqueued:
            self._notify_enqueued([(q, spec.task)])
        return Job(self, ids[0], q), _stored_state(req, spec, ids[0], now)

    async def _aregister_queue(self, queue: str) -> None:
        st = self._aio()
        try:
            async with st.slots:
                await reads.register_queue_async(st.client, self.keys, queue)
        except Exception as exc:
            from jobq.storage.calls import map_error

            raise map_error(exc, "register queue", queue) from None
        self._known_queues.add(queue)

    def enqueue_many(self, requests: Iterable[EnqueueRequest | Mapping[str, Any]]) -> list[Job[Any]]:
        """Enqueue many jobs: every request is validated first (one bad request raises and
        writes nothing), then each queue's jobs go in script calls of up to 500 jobs (and 2 MiB
        of payloads), pipelined into one round trip (with ``durable=True``, one ``WAIT`` after the last call
        covers them all). Mappings take the keys of :class:`EnqueueRequest`.

        Each script call is all-or-nothing, the batch as a whole is not: what only Redis can
        check (a deadline already past on the Redis clock, ``max_depth``) refuses the calls it
        applies to while the others are stored; the first such error is raised after all ran."""
        if tracing.AVAILABLE and tracing.in_trace():
            with tracing.SendSpan() as span:
                return self._enqueue_many(requests, span)
        return self._enqueue_many(requests, None)

    def _enqueue_many(
        self, requests: Iterable[EnqueueRequest | Mapping[str, Any]], span: tracing.SendSpan | None
    ) -> list[Job[Any]]:
        plan = self._plan_many(requests, span)
        if plan is None:
            return []
        results = self.runner.run_batch(plan.calls)
        # Queues are registered once something is stored in them, so a refused batch writes nothing.
        for call, res in zip(plan.calls, results, strict=True):
            if not isinstance(res, BaseException) and call.queue not in self._known_queues:
                self._register_queue(call.queue)
        return self._finish_many(plan, results)

    async def aenqueue_many(self, requests: Iterable[EnqueueRequest | Mapping[str, Any]]) -> list[Job[Any]]:
        """:meth:`enqueue_many` from an event loop: validated first, then one pipelined round
        trip, with the same all-or-nothing rule per script call."""
        if tracing.AVAILABLE and tracing.in_trace():
            with tracing.SendSpan() as span:
                return await self._aenqueue_many(requests, span)
        return await self._aenqueue_many(requests, None)

    async def _aenqueue_many(
        self, requests: Iterable[EnqueueRequest | Mapping[str, Any]], span: tracing.SendSpan | None
    ) -> list[Job[Any]]:
        plan = self._plan_many(requests, span)
        if plan is None:
            return []
        st = self._aio()
        async with st.slots:
            results = await st.runner.run_batch(plan.calls)
        for call, res in zip(plan.calls, results, strict=True):
            if not isinstance(res, BaseException) and call.queue not in self._known_queues:
                await self._aregister_queue(call.queue)
        return self._finish_many(plan, results)

    def _plan_many(
        self, requests: Iterable[EnqueueRequest | Mapping[str, Any]], span: tracing.SendSpan | None = None
    ) -> _ManyPlan | None:
        """Validate every request and group them into script calls (no I/O); None if empty.
        With a ``send`` span (the caller runs in a trace), each job carries its context."""
        prepared: list[tuple[str, JobSpec]] = []
        for i, r in enumerate(requests):
            req = r if isinstance(r, EnqueueRequest) else request_from_mapping(r, index=i)
            try:
                prepared.append(self.prepare(req))
            except errors.InvalidInput as exc:
                if len(prepared) or i:
                    raise type(exc)(f"job {i}: {exc}", exc.field) from None
                raise
        if not prepared:
            return None
        if span is not None:
            carrier = span.describe(
                [q for q, _ in prepared], len(prepared), prepared[0][1].id if len(prepared) == 1 else None
            )
            prepared = [(q, replace(spec, trace=carrier)) for q, spec in prepared]
        by_queue: dict[str, list[tuple[int, JobSpec]]] = {}
        for i, (q, spec) in enumerate(prepared):
            by_queue.setdefault(q, []).append((i, spec))
        calls: list[Call[list[str]]] = []
        slots: list[list[int]] = []
        now = self.now_ms()
        for q, items in by_queue.items():
            for chunk in split_batches(items, lambda it: len(it[1].payload)):
                calls.append(
                    self.store.enqueue(q, [s for _, s in chunk], now_ms=now, max_depth=self.depth_limit(q))
                )
                slots.append([i for i, _ in chunk])
        return _ManyPlan(prepared, calls, slots)

    def _finish_many(self, plan: _ManyPlan, results: list[Any]) -> list[Job[Any]]:
        first_error = next((res for res in results if isinstance(res, BaseException)), None)
        if first_error is not None:
            raise first_error
        prepared = plan.prepared
        jobs: list[Job[Any] | None] = [None] * len(prepared)
        for idxs, ids in zip(plan.slots, results, strict=True):
            for i, job_id in zip(idxs, ids, strict=True):
                jobs[i] = Job(self, job_id, prepared[i][0])
        if self.on_enqueued:
            self._notify_enqueued([(q, spec.task) for q, spec in prepared])
        return [j for j in jobs if j is not None]

    def _notify_enqueued(self, items: list[tuple[str, str]]) -> None:
        if not self.on_enqueued:
            return
        counts: dict[tuple[str, str], int] = {}
        for item in items:
            counts[item] = counts.get(item, 0) + 1
        for hook in self.on_enqueued:
            for (q, task), n in counts.items():
                hook(q, task, n)

    # -- reading --------------------------------------------------------------------------------
    def job(self, job_id: str, queue: str | None = None) -> Job[Any]:
        """A handle on an existing job. Without ``queue``, every known queue is searched."""
        if queue is not None:
            return Job(self, job_id, validate_queue(queue))
        found = self.find_job_queue(job_id)
        if found is None:
            raise errors.JobNotFound(f"no job {job_id!r} in any queue")
        return Job(self, job_id, found)

    def find_job_queue(self, job_id: str) -> str | None:
        return reads.job_queue(self.client, self.keys, job_id, reads.queues(self.client, self.keys))


def _stored_state(req: EnqueueRequest, spec: JobSpec, stored_id: str, now: int | None) -> str | None:
    """The state a job was stored in when the request alone tells it (a new id: no
    ``unique_key``, no caller-given ``job_id``), else None."""
    if spec.unique_key or req.job_id is not None or stored_id != spec.id:
        return None
    # The script's rule (lua/enqueue.lua): an explicit run_at wins, a past one is now.
    later: bool | None
    if spec.run_at_ms is not None:
        later = None if now is None else spec.run_at_ms > now
    else:
        later = spec.delay_ms is not None and spec.delay_ms > 0
    if later is None:
        return None
    return "scheduled" if later else "ready"


# -- tasks --------------------------------------------------------------------------------------
#: A check of a task's argument values at enqueue: ``validate(args, kwargs)`` raises.
Validator = Callable[[Sequence[Any], Mapping[str, Any]], None]


class Task(Generic[P, R]):
    """A registered task. Call it to run it here; ``enqueue`` it to run it on a worker."""

    def __init__(
        self, app: JobQ, name: str, fn: Callable[P, R], defaults: TaskDefaults, *, check_args: bool = True
    ) -> None:
        self.app = app
        self.name = name
        self.fn = fn
        self.defaults = defaults
        self.is_async = inspect.iscoroutinefunction(fn)
        #: Checks enqueued arguments against ``fn``'s signature (None: not checked).
        self.arg_check = _ArgCheck.of(fn, name) if check_args else None
        #: Checks the argument values at enqueue, after the signature (the built-in tasks set
        #: one); raises :class:`jobq.errors.InvalidInput`. Skipped with the signature check.
        self.validate_args: Validator | None = None
        functools.update_wrapper(self, fn)

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`jobq.errors.InvalidArguments` if ``args``/``kwargs`` do not fit the
        task (its signature, then its validator); used by every enqueue path."""
        if self.arg_check is None:
            return
        self.arg_check.check(args, kwargs)
        if self.validate_args is not None:
            self.validate_args(args, kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<jobq.Task {self.name} queue={self.defaults.queue}>"

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: Seconds | timedelta | None = None,
        run_at: datetime | Seconds | None = None,
        max_attempts: int | None = None,
        timeout: Seconds | timedelta | None = None,
        deadline: datetime | timedelta | Seconds | None = None,
        unique_key: str | None = None,
        retry_backoff: Seconds | timedelta | None = None,
        job_id: str | None = None,
        check_args: bool | None = None,
        **other: Any,
    ) -> BoundTask[P, R]:
        """Per-call options kept apart from the task's own arguments:
        ``send.options(priority=5, delay=30).enqueue("a@example.com", subject="hi")``. The
        bound task's ``enqueue`` keeps the task's signature for type checkers. An unknown
        option raises :class:`jobq.errors.InvalidInput`."""
        opts = {
            "queue": queue,
            "priority": priority,
            "delay": delay,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "timeout": timeout,
            "deadline": deadline,
            "unique_key": unique_key,
            "retry_backoff": retry_backoff,
            "job_id": job_id,
            "check_args": check_args,
        }
        check_options(other)
        return BoundTask(self, {k: v for k, v in opts.items() if v is not None})

    def request(self, *args: Any, **kwargs: Any) -> EnqueueRequest:
        """An :class:`EnqueueRequest` for :meth:`JobQ.enqueue_many`; ``_``-prefixed keyword
        arguments are options (``_queue``, ``_priority``, ``_delay``, ...)."""
        for k in kwargs:
            if k[:1] == "_" and k[:2] != "__":
                return self.options().request(*args, **kwargs)
        return EnqueueRequest(self.name, args, kwargs)  # no option: nothing to sort out

    # The self-typed overloads give an ``async def`` task's job the coroutine's result type.
    @overload
    def enqueue(self: Task[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...
    @overload
    def enqueue(self: Task[P, T], *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...
    def enqueue(self, *args: Any, **kwargs: Any) -> Job[Any]:
        """Enqueue a run of this task. Options go in ``_``-prefixed keywords (``_priority=5``,
        ``_delay=30``) or through :meth:`options` (which type checkers follow); every other
        argument goes to the task."""
        return self.app.enqueue_request(self.request(*args, **kwargs))

    @overload
    async def aenqueue(
        self: Task[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> Job[T]: ...
    @overload
    async def aenqueue(self: Task[P, T], *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...
    async def aenqueue(self, *args: Any, **kwargs: Any) -> Job[Any]:
        """:meth:`enqueue` from an event loop: ``job = await send.aenqueue("a@example.com")``."""
        return await self.app.aenqueue_request(self.request(*args, **kwargs))


_POK = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KWO = inspect.Parameter.KEYWORD_ONLY


class _ArgCheck:
    """Would ``fn(*args, **kwargs)`` bind? A quick check for the usual signatures (no
    positional-only parameters), ``inspect.Signature.bind`` for the rest and for the message."""

    __slots__ = ("name", "names", "positional", "required", "sig", "simple", "var_kw", "var_pos")

    def __init__(self, sig: inspect.Signature, name: str) -> None:
        params = list(sig.parameters.values())
        self.sig = sig
        self.name = name
        self.simple = all(p.kind != inspect.Parameter.POSITIONAL_ONLY for p in params)
        self.positional = [p.name for p in params if p.kind == _POK]
        self.names = frozenset(p.name for p in params if p.kind in (_POK, _KWO))
        self.required = [p.name for p in params if p.kind in (_POK, _KWO) and p.default is p.empty]
        self.var_pos = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
        self.var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    @classmethod
    def of(cls, fn: Callable[..., Any], name: str | None = None) -> _ArgCheck | None:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # no signature to check against (some builtins)
            return None
        return cls(sig, name or str(getattr(fn, "__qualname__", repr(fn))))

    def _binds(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        n = len(args)
        if n > len(self.positional) and not self.var_pos:
            return False
        taken = self.positional[:n]
        for k in kwargs:
            if k in taken or (k not in self.names and not self.var_kw):
                return False
        return all(r in kwargs or r in taken for r in self.required)

    def check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise :class:`jobq.errors.InvalidArguments` if the call would not bind."""
        if self.simple and isinstance(kwargs, Mapping) and self._binds(args, kwargs):
            return
        try:
            self.sig.bind(*args, **kwargs)
        except TypeError as exc:
            bare = self.sig.replace(
                parameters=[p.replace(annotation=p.empty) for p in self.sig.parameters.values()],
                return_annotation=inspect.Signature.empty,
            )
            raise errors.InvalidArguments(
                f"args: {exc} (task {self.name}{bare}; to skip this check: --no-check-args on the "
                "command line, _check_args=False on one enqueue or check_args=False on the task)"
            ) from None


@dataclass(frozen=True, slots=True)
class BoundTask(Generic[P, R]):
    """A task with per-call options bound, from :meth:`Task.options`."""

    task: Task[P, R]
    opts: dict[str, Any]

    def request(self, *args: Any, **kwargs: Any) -> EnqueueRequest:
        opts = dict(self.opts)
        task_kwargs = {}
        for k, v in kwargs.items():
            if k.startswith("_") and not k.startswith("__"):
                if k[1:] not in PY_OPTION_NAMES:
                    raise errors.InvalidInput(
                        f"{k}: unknown option (options are _{', _'.join(PY_OPTION_NAMES)})", k
                    )
                opts[k[1:]] = v
            else:
                task_kwargs[k] = v
        opts = {k: v for k, v in opts.items() if v is not None}
        return EnqueueRequest(self.task.name, args, task_kwargs, **opts)

    @overload
    def enqueue(self: BoundTask[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...
    @overload
    def enqueue(self: BoundTask[P, T], *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...
    def enqueue(self, *args: Any, **kwargs: Any) -> Job[Any]:
        return self.task.app.enqueue_request(self.request(*args, **kwargs))

    @overload
    async def aenqueue(
        self: BoundTask[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> Job[T]: ...
    @overload
    async def aenqueue(self: BoundTask[P, T], *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...
    async def aenqueue(self, *args: Any, **kwargs: Any) -> Job[Any]:
        return await self.task.app.aenqueue_request(self.request(*args, **kwargs))


# -- job handles ----------------------------------------------------------------------------------
_INFO_FIELDS = (
    "task",
    "state",
    "priority",
    "attempts",
    "max_attempts",
    "timeout_ms",
    "enqueued_ms",
    "run_at_ms",
    "started_ms",
    "finished_ms",
    "deadline_ms",
    "node",
    "error",
    "unique",
    "reaped",
    "interrupted",
    "progress",
    "progress_msg",
    "progress_ms",
)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A snapshot of one job, for status displays (``jobq status``, ``GET /jobs/{id}``)."""

    id: str
    queue: str
    state: JobState
    task: str | None = None
    priority: int | None = None
    attempts: int = 0
    max_attempts: int | None = None
    timeout_ms: int | None = None
    enqueued_ms: int | None = None
    run_at_ms: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    deadline_ms: int | None = None
    node: str | None = None
    error: str | None = None
    unique_key: str | None = None
    reaped: int = 0
    #: Times a node shutdown released this job unfinished after it started.
    interrupted: int = 0
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    has_result: bool = False
    #: How far the task said it got (``jobq.current_job().progress``): 0..1, a message, when.
    progress: float | None = None
    progress_message: str | None = None
    progress_ms: int | None = None
    #: The decoded result of a done job (None without one, or when it cannot be decoded;
    #: ``has_result`` tells them apart). Shown masked, like the arguments.
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            out[f] = v.value if isinstance(v, Enum) else v
        return out


def _int_or_none(v: bytes | None) -> int | None:
    return None if v is None else int(v)


def _s(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "replace")


_INFO_READ = (*_INFO_FIELDS, "payload", "result")


def _info_from(job_id: str, queue: str, raw: Sequence[Any], with_args: bool) -> JobInfo:
    v = dict(zip(_INFO_READ, raw, strict=True))
    if v["state"] is None:
        return JobInfo(job_id, queue, JobState.UNKNOWN)
    args = kwargs = None
    if with_args and v["payload"] is not None:
        try:
            args, kwargs = codec.decode_payload(v["payload"])
        except errors.DecodeError:
            args, kwargs = None, None
    result = None
    if v["result"] is not None:
        try:
            result = codec.decode(v["result"])
        except errors.DecodeError:
            result = None
    return JobInfo(
        id=job_id,
        queue=queue,
        state=JobState(v["state"].decode()),
        task=_s(v["task"]),
        priority=_int_or_none(v["priority"]),
        attempts=_int_or_none(v["attempts"]) or 0,
        max_attempts=_int_or_none(v["max_attempts"]),
        timeout_ms=_int_or_none(v["timeout_ms"]),
        enqueued_ms=_int_or_none(v["enqueued_ms"]),
        # A job ready at once stores no run_at_ms: it was due at its enqueue.
        run_at_ms=_int_or_none(v["run_at_ms"] or v["enqueued_ms"]),
        started_ms=_int_or_none(v["started_ms"]),
        finished_ms=_int_or_none(v["finished_ms"]),
        deadline_ms=_int_or_none(v["deadline_ms"]),
        node=_s(v["node"]),
        error=_s(v["error"]),
        unique_key=_s(v["unique"]),
        reaped=_int_or_none(v["reaped"]) or 0,
        interrupted=_int_or_none(v["interrupted"]) or 0,
        args=args,
        kwargs=kwargs,
        has_result=v["result"] is not None,
        result=result,
        progress=None if v["progress"] is None else float(v["progress"]),
        progress_message=_s(v["progress_msg"]),
        progress_ms=_int_or_none(v["progress_ms"]),
    )


class _Pending:
    """The job has not finished (yet): the state it is in."""

    __slots__ = ("state",)

    def __init__(self, state: str) -> None:
        self.state = state


def _outcome(job: Job[Any], raw: Sequence[Any]) -> Any:
    """The result of a finished job from its (state, result, error) fields; raises
    :class:`jobq.errors.JobFailed` or :class:`jobq.errors.JobNotFound`; a :class:`_Pending`
    while it has not finished."""
    state, result, error = raw
    if state is None:
        raise errors.JobNotFound(f"job {job.id} not found in queue {job.queue!r}")
    st = state.decode()
    if st == JobState.DONE.value:
        return None if result is None else codec.decode(result)
    if st in (JobState.DEAD.value, JobState.CANCELLED.value):
        raise errors.JobFailed(job.id, st, None if error is None else error.decode("utf-8", "replace"))
    return _Pending(st)


class Job(Generic[R_co]):
    """A handle on one job: its id and queue. ``Job[R]``: its task returns ``R``, which
    :meth:`result` gives back."""

    __slots__ = ("app", "id", "queue")

    def __init__(self, app: JobQ, job_id: str, queue: str) -> None:
        self.app = app
        self.id = job_id
        self.queue = queue

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, queue={self.queue!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and (self.id, self.queue) == (other.id, other.queue)

    def __hash__(self) -> int:
        return hash((self.id, self.queue))

    @property
    def key(self) -> str:
        return self.app.keys.job(self.queue, self.id)

    def status(self) -> JobState:
        """Where the job is now (``UNKNOWN`` once it is gone after its retention time)."""
        (state,) = reads.job_fields(self.app.client, self.app.keys, self.queue, self.id, ("state",))
        return JobState.UNKNOWN if state is None else JobState(state.decode())

    async def astatus(self) -> JobState:
        """:meth:`status` from an event loop."""
        (state,) = await self._afields(("state",))
        return JobState.UNKNOWN if state is None else JobState(state.decode())

    def info(self, *, with_args: bool = True) -> JobInfo:
        """Everything stored about the job, its result included."""
        raw = reads.job_fields(self.app.client, self.app.keys, self.queue, self.id, _INFO_READ)
        return _info_from(self.id, self.queue, raw, with_args)

    async def ainfo(self, *, with_args: bool = True) -> JobInfo:
        """:meth:`info` from an event loop."""
        return _info_from(self.id, self.queue, await self._afields(_INFO_READ), with_args)

    async def _afields(self, fields: Sequence[str]) -> list[Any]:
        st = self.app._aio()
        try:
            async with st.slots:
                return await reads.job_fields_async(st.client, self.app.keys, self.queue, self.id, fields)
        except Exception as exc:
            from jobq.storage.calls import map_error

            raise map_error(exc, "read job", self.queue) from None

    def result(self, timeout: float | None = None, *, poll_interval: float = 0.5) -> R_co:
        """Wait for the job to finish and return its result.

        The wait is woken by the job's completion notice (pub/sub, one shared connection per
        app), and reads the job again every ``poll_interval`` seconds as a fallback, so a
        finish that sends no notice (a lease reaped into the dead letters, a cancel) is seen
        too. Raises :class:`jobq.errors.JobFailed` if it ended dead or cancelled,
        :class:`jobq.errors.JobNotFound` if it does not exist (or its retention ran out), and
        :class:`jobq.errors.ResultTimeout` after ``timeout`` seconds. In an event loop, use
        :meth:`aresult`: this call blocks its thread.
        """
        _check_wait_args(timeout, poll_interval)
        app = self.app
        bridge = app._bridge
        if bridge is not None and timeout != 0 and bridge.usable():
            st = app._loops.get(bridge.loop)
            if st is not None and st.listener.subscribed(app.keys.done(self.queue)):
                # Already listening to this queue: the wait's own read answers a finished job.
                return cast(R_co, bridge.call(self._await(timeout, poll_interval, known_pending=True)))
        started = time.monotonic()
        raw = reads.job_fields(app.client, app.keys, self.queue, self.id, _RESULT_FIELDS)
        out = _outcome(self, raw)
        if not isinstance(out, _Pending):
            return cast(R_co, out)
        if timeout is not None and timeout <= 0:
            raise errors.ResultTimeout(f"job {self.id} still {out.state} after {timeout} s")
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        return cast(R_co, app._sync_bridge().call(self._await(left, poll_interval, known_pending=True)))

    async def aresult(self, timeout: float | None = None, *, poll_interval: float = 0.5) -> R_co:
        """:meth:`result` from an event loop: ``value = await job.aresult(timeout=10)``."""
        _check_wait_args(timeout, poll_interval)
        return cast(R_co, await self._await(timeout, poll_interval, known_pending=False))

    async def _await(self, timeout: float | None, poll_interval: float, *, known_pending: bool) -> Any:
        app = self.app
        st = app._aio()
        channel = app.keys.done(self.queue)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not known_pending and not st.listener.subscribed(channel):
            # Not subscribed yet: a finished job needs no subscription, so look first.
            out = _outcome(self, await self._afields(_RESULT_FIELDS))
            if not isinstance(out, _Pending):
                return out
            known_pending = True
            if timeout is not None and timeout <= 0:
                raise errors.ResultTimeout(f"job {self.id} still {out.state} after {timeout} s")
        ttl_ms = max(WAIT_MARK_MS, int(poll_interval * 4000))
        w: Watch | None = None
        try:
            while True:
                if w is None:
                    # Subscribed (confirmed) before the mark and the read below: a finish after
                    # the read is announced to this connection.
                    w = await st.listener.watch(channel, self.id)
                try:
                    async with st.slots:
                        raw = await reads.wait_mark_and_fields_async(
                            st.client, app.keys, self.queue, self.id, _RESULT_FIELDS, ttl_ms
                        )
                except Exception as exc:
                    from jobq.storage.calls import map_error

                    raise map_error(exc, "read job", self.queue) from None
                out = _outcome(self, raw)
                if not isinstance(out, _Pending):
                    return out
                pause = poll_interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise errors.ResultTimeout(f"job {self.id} still {out.state} after {timeout} s")
                    pause = min(pause, left)
                if w is None:
                    # No notice connection: poll, and try for one again soon.
                    await asyncio.sleep(min(pause, notify_retry_after()))
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(w.event.wait(), pause)
                if w.event.is_set():
                    notice = w.notice
                    st.listener.unwatch(channel, self.id, w)
                    w = None
                    if notice is not None and notice[:1] == b"d":
                        # Done, its small result inline: in hand without another read.
                        return None if len(notice) == 1 else codec.decode(notice[1:])
                    # Announced without the result (read it), or the listener's connection
                    # failed (watch again).
        finally:
            if w is not None:
                st.listener.unwatch(channel, self.id, w)

    def cancel(self) -> None:
        """Cancel the job: it ends ``cancelled`` at once (not retried, no result stored). A job
        that has not started never runs; a running one is taken from its node, which is told at
        once (pub/sub; its next lease renewal if it misses that): an ``async def`` task is
        cancelled at its next ``await``, a plain ``def`` task sees ``jobq.current_job().cancelled``
        and its cancellation callbacks, and whatever it returns or raises is discarded. Raises
        :class:`jobq.errors.JobNotFound` or :class:`jobq.errors.JobNotCancellable` (finished)."""
        self._cancelled(self.app.run(self.app.store.cancel(self.queue, self.id, now_ms=self.app.now_ms())))

    async def acancel(self) -> None:
        """:meth:`cancel` from an event loop."""
        call = self.app.store.cancel(self.queue, self.id, now_ms=self.app.now_ms())
        self._cancelled(await self.app.arun(call))

    def _cancelled(self, code: int) -> None:
        if code == errors.ErrorCode.JOB_NOT_FOUND:
            raise errors.JobNotFound(f"job {self.id} not found in queue {self.queue!r}")
        if code == errors.ErrorCode.JOB_FINISHED:
            raise errors.JobNotCancellable(f"job {self.id} has already finished")


def _check_wait_args(timeout: object, poll_interval: object) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout
    ):
        raise errors.InvalidInput(f"timeout: must be a number of seconds or None, got {timeout!r}", "timeout")
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, (int, float))
        or not 0.001 <= poll_interval <= 3600
    ):
        raise errors.InvalidInput(
            f"poll_interval: must be 0.001..3600 seconds, got {poll_interval!r}", "poll_interval"
        )


# -- plumbing -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _ManyPlan:
    """Validated requests of one ``enqueue_many``, grouped into script calls."""

    prepared: list[tuple[str, JobSpec]]
    calls: list[Call[list[str]]]
    #: Per call, the indexes in ``prepared`` of its jobs.
    slots: list[list[int]]


@dataclass(slots=True)
class _LoopState:
    """The async API's connections on one event loop."""

    client: AsyncClient
    runner: AsyncRunner
    listener: CompletionListener
    #: Bounds the commands in flight (and so the pool's connections) on this loop.
    slots: asyncio.Semaphore


class _Bridge:
    """An event loop on a daemon thread, on which the synchronous ``job.result()`` waits: every
    waiting thread of the process shares its one completion listener and bounded pool."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="jobq-results", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def usable(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive() and not self.loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # interrupted (KeyboardInterrupt): stop waiting on the loop too
            raise

    def close(self, app: JobQ) -> None:
        if not self.usable():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(app.aclose(), self.loop).result(timeout=2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(2)
        if not self.thread.is_alive():
            self.loop.close()
