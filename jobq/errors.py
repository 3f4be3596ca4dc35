"""The one exception tree of jobq, and the error codes the Lua scripts return.

Everything jobq raises derives from :class:`JobqError`, so ``except jobq.JobqError`` catches it
all. Bad input raises a subclass of :class:`InvalidInput` (also a ``ValueError``) whose ``field``
names the offending option; nothing is written to Redis when it is raised.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Negative integers returned by the Lua scripts (see each script's header)."""

    #: No job hash exists for the id.
    JOB_NOT_FOUND = -1
    #: The job is not in the calling node's active list: its lease was reaped or it was never
    #: claimed by this node.
    LEASE_LOST = -2
    #: The job is running (no script returns it since a running job can be cancelled).
    JOB_ACTIVE = -3
    #: The job already finished (cancel refused).
    JOB_FINISHED = -4
    #: The queue is at its ``max_depth`` (enqueue refused; the reply is ``{-5, depth}``).
    QUEUE_FULL = -5


class JobqError(Exception):
    """Base class of every error jobq raises."""


# -- bad input ---------------------------------------------------------------------------------
class InvalidInput(JobqError, ValueError):
    """An argument was refused before anything was written. ``field`` names the option."""

    field: str = "input"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class InvalidQueueName(InvalidInput):
    field = "queue"


class UnknownQueue(InvalidQueueName):
    """A queue name jobq has never seen: nothing was ever enqueued to it, no live node serves it
    and it is not paused (a misspelling, most likely)."""


class InvalidTaskName(InvalidInput):
    field = "task"


class InvalidPriority(InvalidInput):
    field = "priority"


class InvalidDelay(InvalidInput):
    field = "delay"


class InvalidRetryBackoff(InvalidInput):
    field = "retry_backoff"


class InvalidRunAt(InvalidInput):
    field = "run_at"


class InvalidDeadline(InvalidInput):
    field = "deadline"


class InvalidMaxAttempts(InvalidInput):
    field = "max_attempts"


class InvalidTimeout(InvalidInput):
    field = "timeout"


class InvalidUniqueKey(InvalidInput):
    field = "unique_key"


class InvalidJobId(InvalidInput):
    field = "id"


class PayloadTooLarge(InvalidInput):
    field = "payload"


class InvalidArguments(InvalidInput):
    """Arguments that do not fit the task's signature (a missing or unexpected argument),
    checked at enqueue when the producer has the task registered."""

    field = "args"


class EncodeError(InvalidInput):
    """Arguments that msgpack cannot encode (or that are not plain data)."""

    field = "args"


class DecodeError(JobqError):
    """A stored payload or result could not be decoded as jobq's msgpack format."""


# -- Redis side --------------------------------------------------------------------------------
class StoreError(JobqError):
    """A Redis-side problem."""


class RedisUnavailable(StoreError, ConnectionError):
    """Redis could not be reached, or did not answer in time. The operation may or may not have
    taken effect; retrying an enqueue with the same job id is safe.

    ``refused`` is true when the failure is Redis' own, for every client alike: the host
    answered that nothing listens on the port (the server is down or restarting), or the queue's
    Redis Cluster slot is moving or has no primary. False for a timeout or a dropped connection,
    which may be this client's network alone.

    ``slot`` is true when the failure is the queue's Redis Cluster slot's alone (moving to another
    primary, or without one): queues in other slots may still be served.

    ``shard`` is true when the call went to one primary of a Redis Cluster (the one serving the
    queue's slot) and failed there: queues on other primaries may still be served. Every
    ``slot`` error is a ``shard`` error too."""

    def __init__(
        self, message: str, *, refused: bool = False, slot: bool = False, shard: bool = False
    ) -> None:
        super().__init__(message)
        self.refused = refused
        self.slot = slot
        self.shard = shard or slot


class RedisOutOfMemory(StoreError):
    """Redis refused a write because it reached ``maxmemory``; nothing was written."""


class RedisAuthError(StoreError):
    """Redis refused the credentials or the ACL user lacks a permission jobq needs."""


class RedisBusy(StoreError):
    """Redis is running a long script (BUSY)."""


class RedisVersionError(StoreError):
    """The Redis server is older than the minimum jobq supports."""


class NotReplicated(StoreError):
    """Durable mode: the primary took the write but no replica acknowledged it in time, so a
    failover may lose it. Retrying an enqueue with the same job id is safe."""


class ScriptError(StoreError):
    """A Lua script refused its arguments or returned an unexpected reply."""


class QueueFull(StoreError):
    """The queue is at its configured maximum depth; the job was not stored."""

    def __init__(self, queue: str, depth: int, limit: int) -> None:
        super().__init__(f"queue {queue!r} is full ({depth} >= max depth {limit})")
        self.queue = queue
        self.depth = depth
        self.limit = limit


# -- jobs --------------------------------------------------------------------------------------
class JobNotFound(JobqError, LookupError):
    """No job with that id exists (it may have expired after its retention time)."""


class JobNotCancellable(JobqError):
    """The job already finished, so it cannot be cancelled."""


class JobFailed(JobqError):
    """``Job.result()`` on a job that ended in the dead-letter list or was cancelled."""

    def __init__(self, job_id: str, state: str, error: str | None) -> None:
        super().__init__(f"job {job_id} ended {state}: {error or 'no error recorded'}")
        self.job_id = job_id
        self.state = state
        self.error = error


class ResultTimeout(JobqError, TimeoutError):
    """``Job.result(timeout=...)`` gave up before the job finished."""


# -- control flow raised by tasks --------------------------------------------------------------
class Retry(JobqError):
    """Raise from a task to retry it after ``delay`` seconds (counts an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        if delay is not None and (delay != delay or delay < 0):
            raise InvalidDelay(f"delay: must be a non-negative number of seconds, got {delay!r}")
        self.delay = delay
        self.reason = reason


class Fail(JobqError):
    """Raise from a task to send it to the dead-letter list at once, without retrying."""

    def __init__(self, reason: str = "failed") -> None:
        super().__init__(reason)
        self.reason = reason


class JobTimeout(JobqError, TimeoutError):
    """Raised inside a task (or recorded as its error) when it outlives its timeout."""
