"""The producer API: :class:`JobQ`, tasks, enqueueing, and :class:`Job` handles."""

from __future__ import annotations

import functools
import inspect
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from jobq import codec, errors
from jobq.clock import Clock, SystemClock
from jobq.connection import default_url, sync_client
from jobq.keys import Keys, validate_queue, validate_task_name
from jobq.store import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Call,
    JobSpec,
    Limits,
    Store,
    SyncRunner,
    split_batches,
)

if TYPE_CHECKING:
    from jobq.cron import CronEntry

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: Largest time in ms that Lua handles exactly (2^53 - 1).
MAX_TIME_MS = 2**53 - 1
#: Numbers accepted as seconds. ``int``, ``Decimal`` and ``Fraction`` convert to ms exactly (so
#: every ms up to 2^53 - 1 can be given); a ``float`` is rounded to the microsecond first, so
#: ``1.1`` is 1100 ms, not 1101.
Seconds = int | float | Decimal | Fraction
#: Options accepted by every enqueue path (Python, CLI flags, HTTP fields), with the same names.
OPTION_NAMES = (
    "queue",
    "priority",
    "delay",
    "run_at",
    "max_attempts",
    "timeout",
    "deadline",
    "unique_key",
    "retry_backoff",
    "job_id",
)


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
    #: Cancelled before it ran; kept for the retention time.
    CANCELLED = "cancelled"
    #: No such job: never enqueued, or gone after its retention time.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class EnqueueRequest:
    """One job to enqueue: a task name, its arguments, and per-call options (None = the task's
    or the app's default)."""

    task: str
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    delay: Seconds | timedelta | None = None
    run_at: datetime | Seconds | None = None
    max_attempts: int | None = None
    timeout: Seconds | timedelta | None = None
    deadline: datetime | timedelta | Seconds | None = None
    unique_key: str | None = None
    retry_backoff: Seconds | timedelta | None = None
    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 3
    timeout: float | None = None
    retry_backoff: float = 1.0


# -- validation ---------------------------------------------------------------------------------
def _seconds(value: object, name: str, exc: type[errors.InvalidInput]) -> float | Fraction:
    if isinstance(value, timedelta):
        return Fraction(value.days * 86_400 + value.seconds) + Fraction(value.microseconds, 1_000_000)
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, Fraction)):
        raise exc(f"{name}: must be a number of seconds, got {type(value).__name__} {value!r}")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise exc(f"{name}: must be a finite number of seconds, got {value!r}")
        return value
    if isinstance(value, Decimal) and not value.is_finite():
        raise exc(f"{name}: must be a finite number of seconds, got {value!r}")
    return Fraction(value)


def _to_ms(secs: float | Fraction, value: object, name: str, exc: type[errors.InvalidInput]) -> int:
    """Seconds to whole ms, rounding up (never earlier or shorter than asked)."""
    ms = secs * 1000
    if ms > MAX_TIME_MS:
        raise exc(f"{name}: {value!r} is beyond the largest supported time (2^53 - 1 ms)")
    if isinstance(ms, float):
        return math.ceil(round(ms, 3))
    return math.ceil(ms)


def seconds_to_ms(value: object, name: str, exc: type[errors.InvalidInput]) -> int:
    """A non-negative duration in seconds (or a timedelta) as integer ms."""
    secs = _seconds(value, name, exc)
    if secs < 0:
        raise exc(f"{name}: must not be negative, got {value!r}")
    return _to_ms(secs, value, name, exc)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def timestamp_ms(value: object, name: str, exc: type[errors.InvalidInput], *, past_ok: bool = False) -> int:
    """An absolute time (an aware datetime, a naive one in local time, or epoch seconds) as
    integer ms. With ``past_ok`` a time before 1970 becomes 0 (a run time in the past = now)."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.astimezone()
        secs = _seconds(aware - _EPOCH, name, exc)
    else:
        secs = _seconds(value, name, exc)
    if secs < 0:
        if past_ok:
            return 0
        raise exc(f"{name}: must not be before 1970, got {value!r}")
    return _to_ms(secs, value, name, exc)


def validate_priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidPriority(f"priority: must be an integer, got {value!r}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise errors.InvalidPriority(
            f"priority: {value} is outside {MIN_PRIORITY}..{MAX_PRIORITY} (higher runs first)"
        )
    return value


def validate_max_attempts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.InvalidMaxAttempts(f"max_attempts: must be an integer >= 1, got {value!r}")
    if value > 1_000_000:
        raise errors.InvalidMaxAttempts(f"max_attempts: {value} is over 1000000")
    return value


def validate_job_id(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        raise errors.InvalidJobId(f"id: must be a string of 1-128 characters, got {value!r}")
    if any(c.isspace() or not c.isprintable() or c in "{}" for c in value):
        raise errors.InvalidJobId(f"id: {value!r} contains whitespace, braces or control characters")
    return value


def validate_unique_key(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise errors.InvalidUniqueKey(f"unique_key: must be a non-empty string, got {value!r}")
    if len(value.encode("utf-8", "surrogatepass")) > 512:
        raise errors.InvalidUniqueKey("unique_key: longer than 512 bytes")
    if any(not c.isprintable() for c in value):
        raise errors.InvalidUniqueKey(f"unique_key: {value!r} contains control characters")
    return value


def new_job_id() -> str:
    """A random, client-generated job id: a retried enqueue with the same id is a no-op."""
    return os.urandom(12).hex()


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
        dead_max / dead_ttl: the dead-letter list's bounds (default 10,000 jobs, 7 days).
        max_depth: back-pressure: refuse an enqueue when ready + scheduled would exceed it;
            an int for every queue, or a mapping of queue name to limit (0 = no limit).
        clock: a :class:`jobq.clock.FakeClock` for tests; production uses Redis time.
        client: an existing synchronous redis-py client to use instead of ``url``.
        shards: hot queues split over N shards, ``{"hot": 3}``: jobs for ``hot`` go to
            ``hot#0`` .. ``hot#2`` (the shard is chosen by a hash of the job id, or of the unique
            key when one is given), and a worker serving ``hot`` claims from every shard. Each
            shard is its own hash tag, so on Redis Cluster the shards spread over the nodes.
            Priority order holds within a shard; see the README for the bound across shards.
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
        #: Per task name: (its defaults, queue, priority, max_attempts, timeout_ms, backoff_ms) for
        #: requests with no per-call option (see :meth:`prepare`); the name was validated.
        self._plain: dict[str, tuple[TaskDefaults, str, int, int, int, int]] = {}
        self.shards: dict[str, int] = {}
        for name, n in (shards or {}).items():
            if "#" in validate_queue(name):
                raise errors.InvalidQueueName(f"shards: {name!r}: a sharded queue's name has no '#'")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
                raise errors.InvalidInput(f"shards: {name!r} must have 1..1024 shards, got {n!r}", "shards")
            self.shards[name] = n
        self._rotation = 0
        if durable:
            from jobq.connection import is_cluster_url

            if is_cluster_url(self.url):
                raise errors.InvalidInput("durable: not supported on Redis Cluster", "durable")
            self.store.wait_replicas = 1
            self.store.wait_timeout_ms = max(
                1, seconds_to_ms(durable_timeout, "durable_timeout", errors.InvalidInput)
            )
        #: Called as ``hook(queue, task, n)`` after jobs were accepted (metrics subscribe here).
        self.on_enqueued: list[Callable[[str, str, int], None]] = []

    # -- connection -----------------------------------------------------------------------------
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
        """Run one script call (see :mod:`jobq.store`)."""
        return self.runner.run(call)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._runner = None

    def __enter__(self) -> JobQ:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a ``def`` or ``async def`` function as a task.

        ``@app.task`` or ``@app.task(queue="emails", priority=5, max_attempts=5, timeout=30,
        retry_backoff=2)``. The task's name defaults to ``module.qualname``.
        """

        def register(f: Callable[P, R]) -> Task[P, R]:
            defaults = TaskDefaults(
                queue=validate_queue(queue or self.defaults.queue),
                priority=validate_priority(priority),
                max_attempts=validate_max_attempts(max_attempts),
                timeout=None
                if timeout is None
                else seconds_to_ms(timeout, "timeout", errors.InvalidTimeout) / 1000,
                retry_backoff=seconds_to_ms(retry_backoff, "retry_backoff", errors.InvalidRetryBackoff)
                / 1000,
            )
            task_name = validate_task_name(name or f"{f.__module__}.{f.__qualname__}")
            t: Task[P, R] = Task(self, task_name, f, defaults)
            self.tasks[task_name] = t
            return t

        if fn is not None:
            return register(fn)
        return register

    def periodic(
        self,
        schedule: str,
        *,
        name: str | None = None,
        queue: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a task and run it on a cron schedule (``"*/5 * * * *"``, UTC), enqueued
        exactly once per tick across all worker nodes."""
        from jobq.cron import CronEntry, CronSchedule

        sched = CronSchedule.parse(schedule)

        def register(f: Callable[P, R]) -> Task[P, R]:
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
        :class:`jobq.errors.InvalidInput` naming the field. Writes nothing."""
        if (
            req.queue is None
            and req.priority is None
            and req.delay is None
            and req.run_at is None
            and req.max_attempts is None
            and req.timeout is None
            and req.deadline is None
            and req.unique_key is None
            and req.retry_backoff is None
            and req.job_id is None
            and type(req.task) is str
        ):
            return self._prepare_plain(req)
        task = validate_task_name(req.task)
        d = self._defaults_for(task)
        queue = d.queue if req.queue is None else validate_queue(req.queue)
        priority = d.priority if req.priority is None else validate_priority(req.priority)
        max_attempts = d.max_attempts if req.max_attempts is None else validate_max_attempts(req.max_attempts)
        if req.timeout is not None:
            timeout_ms = seconds_to_ms(req.timeout, "timeout", errors.InvalidTimeout)
        else:
            timeout_ms = 0 if d.timeout is None else round(d.timeout * 1000)
        backoff_ms = round(d.retry_backoff * 1000)
        if req.retry_backoff is not None:
            backoff_ms = seconds_to_ms(req.retry_backoff, "retry_backoff", errors.InvalidRetryBackoff)
        if req.delay is not None and req.run_at is not None:
            raise errors.InvalidDelay("delay: give either delay or run_at, not both")
        delay_ms = None
        run_at_ms = None
        if req.delay is not None:
            delay_ms = seconds_to_ms(req.delay, "delay", errors.InvalidDelay)
        if req.run_at is not None:
            run_at_ms = timestamp_ms(req.run_at, "run_at", errors.InvalidRunAt, past_ok=True)
        deadline = ""
        if req.deadline is not None:
            if isinstance(req.deadline, timedelta):
                rel = seconds_to_ms(req.deadline, "deadline", errors.InvalidDeadline)
                if delay_ms is not None and rel < delay_ms:
                    raise errors.InvalidDeadline("deadline: is before the run time (delay)")
                deadline = f"+{rel}"
            else:
                abs_ms = timestamp_ms(req.deadline, "deadline", errors.InvalidDeadline)
                if run_at_ms is not None and abs_ms < run_at_ms:
                    raise errors.InvalidDeadline("deadline: is before run_at")
                deadline = str(abs_ms)
        unique_key = "" if req.unique_key is None else validate_unique_key(req.unique_key)
        job_id = new_job_id() if req.job_id is None else validate_job_id(req.job_id)
        if not isinstance(req.args, (list, tuple)):
            raise errors.EncodeError(f"args: must be a list, got {type(req.args).__name__}")
        if not isinstance(req.kwargs, Mapping) or not all(isinstance(k, str) for k in req.kwargs):
            raise errors.EncodeError("kwargs: must be a mapping with string keys", "kwargs")
        payload = codec.encode_payload(req.args, dict(req.kwargs), self.max_payload)
        if queue in self.shards:
            queue = self.shard_for(queue, unique_key or job_id)
        return queue, JobSpec(
            id=job_id,
            task=task,
            payload=payload,
            priority=priority,
            delay_ms=delay_ms,
            run_at_ms=run_at_ms,
            max_attempts=max_attempts,
            timeout_ms=timeout_ms,
            backoff_ms=backoff_ms,
            deadline=deadline,
            unique_key=unique_key,
        )

    def _prepare_plain(self, req: EnqueueRequest) -> tuple[str, JobSpec]:
        """:meth:`prepare` of the common case, a request with no per-call option: the task's
        defaults, already validated and converted once per task name."""
        name = req.task
        t = self.tasks.get(name)
        d = t.defaults if t is not None else self.defaults
        entry = self._plain.get(name)
        if entry is None or entry[0] is not d:
            validate_task_name(name)
            timeout_ms = 0 if d.timeout is None else round(d.timeout * 1000)
            entry = (d, d.queue, d.priority, d.max_attempts, timeout_ms, round(d.retry_backoff * 1000))
            if len(self._plain) >= 4096:  # bounded, whatever names producers send
                self._plain.clear()
            self._plain[name] = entry
        _, queue, priority, max_attempts, timeout_ms, backoff_ms = entry
        args, kwargs = req.args, req.kwargs
        if not isinstance(args, (list, tuple)):
            raise errors.EncodeError(f"args: must be a list, got {type(args).__name__}")
        if type(kwargs) is not dict:
            if not isinstance(kwargs, Mapping):
                raise errors.EncodeError("kwargs: must be a mapping with string keys", "kwargs")
            kwargs = dict(kwargs)
        if kwargs and not all(isinstance(k, str) for k in kwargs):
            raise errors.EncodeError("kwargs: must be a mapping with string keys", "kwargs")
        payload = codec.encode_payload(args, kwargs, self.max_payload)
        job_id = new_job_id()
        if queue in self.shards:
            queue = self.shard_for(queue, job_id)
        return queue, JobSpec(
            id=job_id,
            task=name,
            payload=payload,
            priority=priority,
            max_attempts=max_attempts,
            timeout_ms=timeout_ms,
            backoff_ms=backoff_ms,
        )

    def _register_queue(self, queue: str) -> None:
        if queue not in self._known_queues:
            try:
                self.client.sadd(self.keys.queues, queue)
            except Exception as exc:
                from jobq.store import map_error

                raise map_error(exc, "register queue", queue) from None
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
    ) -> Job:
        """Enqueue one job of ``task`` (a name, so producers need not import the task).

        ``delay`` is seconds (or a timedelta) from now on the Redis clock; ``run_at`` an absolute
        datetime or epoch seconds (past = now). ``deadline``: a datetime/epoch seconds, or a
        timedelta from now; a job not started by then is never run and is dead-lettered with
        reason ``expired``. ``unique_key``: while a job holding it exists and is unfinished,
        enqueueing with the same key returns that job instead. Raises
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
        )
        return self.enqueue_request(req)

    def enqueue_request(self, req: EnqueueRequest) -> Job:
        q, spec = self.prepare(req)
        ids = self.run(self.store.enqueue(q, [spec], now_ms=self.now_ms(), max_depth=self.depth_limit(q)))
        # Registered after the job is stored, so a refused enqueue writes nothing at all.
        if q not in self._known_queues:
            self._register_queue(q)
        if self.on_enqueued:
            self._notify_enqueued([(q, spec.task)])
        return Job(self, ids[0], q)

    def enqueue_many(self, requests: Iterable[EnqueueRequest | Mapping[str, Any]]) -> list[Job]:
        """Enqueue many jobs: every request is validated first (one bad request raises and
        writes nothing), then each queue's jobs go in script calls of up to 500 jobs (and 2 MiB
        of payloads), pipelined into one round trip (with ``durable=True``, one ``WAIT`` after the last call
        covers them all). Mappings take the keys of :class:`EnqueueRequest`.

        Each script call is all-or-nothing, the batch as a whole is not: what only Redis can
        check (a deadline already past on the Redis clock, ``max_depth``) refuses the calls it
        applies to while the others are stored; the first such error is raised after all ran."""
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
            return []
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
        results = self.runner.run_batch(calls)
        # Queues are registered once something is stored in them, so a refused batch writes nothing.
        for call, res in zip(calls, results, strict=True):
            if not isinstance(res, BaseException) and call.queue not in self._known_queues:
                self._register_queue(call.queue)
        first_error = next((res for res in results if isinstance(res, BaseException)), None)
        if first_error is not None:
            raise first_error
        jobs: list[Job | None] = [None] * len(prepared)
        for idxs, ids in zip(slots, results, strict=True):
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
    def job(self, job_id: str, queue: str | None = None) -> Job:
        """A handle on an existing job. Without ``queue``, every known queue is searched."""
        if queue is not None:
            return Job(self, job_id, validate_queue(queue))
        found = self.find_job_queue(job_id)
        if found is None:
            raise errors.JobNotFound(f"no job {job_id!r} in any queue")
        return Job(self, job_id, found)

    def find_job_queue(self, job_id: str) -> str | None:
        queues = sorted(q.decode() for q in self.client.smembers(self.keys.queues))
        found: str | None = None
        if not queues:
            return None
        pipe = self.client.pipeline(transaction=False)
        for q in queues:
            pipe.exists(self.keys.job(q, job_id))
        for q, hit in zip(queues, pipe.execute(), strict=True):
            if hit:
                found = q
                break
        return found


def request_from_mapping(data: Mapping[str, Any], index: int | None = None) -> EnqueueRequest:
    """Build a request from a JSON-like mapping (NDJSON lines, HTTP bodies), refusing unknown
    fields by name."""
    where = "" if index is None else f"job {index}: "
    if not isinstance(data, Mapping):
        raise errors.InvalidInput(f"{where}must be an object", "job")
    allowed = {"task", "args", "kwargs", *OPTION_NAMES}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise errors.InvalidInput(f"{where}{unknown[0]!r}: unknown field", str(unknown[0]))
    if "task" not in data:
        raise errors.InvalidTaskName(f"{where}task: missing")
    args = data.get("args", ())
    if args is None:
        args = ()
    if not isinstance(args, (list, tuple)):
        raise errors.EncodeError(f"{where}args: must be a list")
    kwargs = data.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise errors.EncodeError(f"{where}kwargs: must be an object", "kwargs")
    opts = {k: data[k] for k in OPTION_NAMES if k in data and data[k] is not None}
    return EnqueueRequest(data["task"], tuple(args), kwargs, **opts)


# -- tasks --------------------------------------------------------------------------------------
class Task(Generic[P, R]):
    """A registered task. Call it to run it here; ``enqueue`` it to run it on a worker."""

    def __init__(self, app: JobQ, name: str, fn: Callable[P, R], defaults: TaskDefaults) -> None:
        self.app = app
        self.name = name
        self.fn = fn
        self.defaults = defaults
        self.is_async = inspect.iscoroutinefunction(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<jobq.Task {self.name} queue={self.defaults.queue}>"

    def options(self, **options: Any) -> BoundTask:
        """Per-call options kept apart from the task's own arguments:
        ``send.options(priority=5, delay=30).enqueue("a@example.com", subject="hi")``."""
        return BoundTask(self, _check_options(options))

    def request(self, *args: Any, **kwargs: Any) -> EnqueueRequest:
        """An :class:`EnqueueRequest` for :meth:`JobQ.enqueue_many`; ``_``-prefixed keyword
        arguments are options (``_queue``, ``_priority``, ``_delay``, ...)."""
        for k in kwargs:
            if k[:1] == "_" and k[:2] != "__":
                return self.options().request(*args, **kwargs)
        return EnqueueRequest(self.name, args, kwargs)  # no option: nothing to sort out

    def enqueue(self, *args: Any, **kwargs: Any) -> Job:
        """Enqueue a run of this task. Options go in ``_``-prefixed keywords (``_priority=5``,
        ``_delay=30``) or through :meth:`options`; every other argument goes to the task."""
        return self.app.enqueue_request(self.request(*args, **kwargs))


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    for k in options:
        if k not in OPTION_NAMES:
            raise errors.InvalidInput(f"{k}: unknown option (options are {', '.join(OPTION_NAMES)})", k)
    return dict(options)


@dataclass(frozen=True, slots=True)
class BoundTask:
    """A task with per-call options bound, from :meth:`Task.options`."""

    task: Task[Any, Any]
    opts: dict[str, Any]

    def request(self, *args: Any, **kwargs: Any) -> EnqueueRequest:
        opts = dict(self.opts)
        task_kwargs = {}
        for k, v in kwargs.items():
            if k.startswith("_") and not k.startswith("__"):
                if k[1:] not in OPTION_NAMES:
                    raise errors.InvalidInput(
                        f"{k}: unknown option (options are _{', _'.join(OPTION_NAMES)})", k
                    )
                opts[k[1:]] = v
            else:
                task_kwargs[k] = v
        opts = {k: v for k, v in opts.items() if v is not None}
        return EnqueueRequest(self.task.name, args, task_kwargs, **opts)

    def enqueue(self, *args: Any, **kwargs: Any) -> Job:
        return self.task.app.enqueue_request(self.request(*args, **kwargs))


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
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    has_result: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            out[f] = v.value if isinstance(v, Enum) else v
        return out


def _int_or_none(v: bytes | None) -> int | None:
    return None if v is None else int(v)


class Job:
    """A handle on one job: its id and queue."""

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
        state = self.app.client.hget(self.key, "state")
        return JobState.UNKNOWN if state is None else JobState(state.decode())

    def info(self, *, with_args: bool = True) -> JobInfo:
        """Everything stored about the job."""
        fields = (*_INFO_FIELDS, "payload", "result")
        raw = self.app.client.hmget(self.key, fields)
        v = dict(zip(fields, raw, strict=True))
        if v["state"] is None:
            return JobInfo(self.id, self.queue, JobState.UNKNOWN)
        args = kwargs = None
        if with_args and v["payload"] is not None:
            try:
                args, kwargs = codec.decode_payload(v["payload"])
            except errors.DecodeError:
                args, kwargs = None, None

        def s(b: bytes | None) -> str | None:
            return None if b is None else b.decode("utf-8", "replace")

        return JobInfo(
            id=self.id,
            queue=self.queue,
            state=JobState(v["state"].decode()),
            task=s(v["task"]),
            priority=_int_or_none(v["priority"]),
            attempts=_int_or_none(v["attempts"]) or 0,
            max_attempts=_int_or_none(v["max_attempts"]),
            timeout_ms=_int_or_none(v["timeout_ms"]),
            enqueued_ms=_int_or_none(v["enqueued_ms"]),
            run_at_ms=_int_or_none(v["run_at_ms"]),
            started_ms=_int_or_none(v["started_ms"]),
            finished_ms=_int_or_none(v["finished_ms"]),
            deadline_ms=_int_or_none(v["deadline_ms"]),
            node=s(v["node"]),
            error=s(v["error"]),
            unique_key=s(v["unique"]),
            reaped=_int_or_none(v["reaped"]) or 0,
            args=args,
            kwargs=kwargs,
            has_result=v["result"] is not None,
        )

    def result(self, timeout: float | None = None, *, poll_interval: float = 0.2) -> Any:
        """Wait for the job to finish and return its result.

        Raises :class:`jobq.errors.JobFailed` if it ended dead or cancelled,
        :class:`jobq.errors.JobNotFound` if it does not exist (or its retention ran out), and
        :class:`jobq.errors.ResultTimeout` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = 0.005
        while True:
            state, result, error = self.app.client.hmget(self.key, ("state", "result", "error"))
            if state is None:
                raise errors.JobNotFound(f"job {self.id} not found in queue {self.queue!r}")
            st = state.decode()
            if st == JobState.DONE.value:
                return None if result is None else codec.decode(result)
            if st in (JobState.DEAD.value, JobState.CANCELLED.value):
                raise errors.JobFailed(
                    self.id, st, None if error is None else error.decode("utf-8", "replace")
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.ResultTimeout(f"job {self.id} still {st} after {timeout} s")
            pause = min(wait, poll_interval)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            wait *= 2

    def cancel(self) -> None:
        """Cancel the job if it has not started. Raises :class:`jobq.errors.JobNotFound` or
        :class:`jobq.errors.JobNotCancellable` (running or finished)."""
        code = self.app.run(self.app.store.cancel(self.queue, self.id, now_ms=self.app.now_ms()))
        if code == -1:
            raise errors.JobNotFound(f"job {self.id} not found in queue {self.queue!r}")
        if code == -3:
            raise errors.JobNotCancellable(f"job {self.id} is running and cannot be cancelled")
        if code == -4:
            raise errors.JobNotCancellable(f"job {self.id} has already finished")
