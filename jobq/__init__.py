"""jobq: a Redis-native distributed job queue.

>>> import jobq
>>> app = jobq.JobQ("redis://127.0.0.1:6379/0")
>>> @app.task(queue="emails", max_attempts=5)
... def send_email(to: str) -> None: ...
>>> job = send_email.enqueue("a@example.com", _priority=5)
"""

from __future__ import annotations

from jobq.app import EnqueueRequest, Job, JobInfo, JobQ, JobState, Task
from jobq.clock import FakeClock, SystemClock
from jobq.errors import (
    DecodeError,
    EncodeError,
    Fail,
    InvalidArguments,
    InvalidDeadline,
    InvalidDelay,
    InvalidInput,
    InvalidJobId,
    InvalidMaxAttempts,
    InvalidPriority,
    InvalidQueueName,
    InvalidRetryBackoff,
    InvalidRunAt,
    InvalidTaskName,
    InvalidTimeout,
    InvalidUniqueKey,
    JobFailed,
    JobNotCancellable,
    JobNotFound,
    JobqError,
    JobTimeout,
    LeaseLost,
    NotReplicated,
    PayloadTooLarge,
    QueueFull,
    RedisAuthError,
    RedisBusy,
    RedisOutOfMemory,
    RedisUnavailable,
    RedisVersionError,
    ResultTimeout,
    Retry,
    ScriptError,
    StoreError,
    UnknownQueue,
)


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jobq")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "DecodeError",
    "EncodeError",
    "EnqueueRequest",
    "Fail",
    "FakeClock",
    "InvalidArguments",
    "InvalidDeadline",
    "InvalidDelay",
    "InvalidInput",
    "InvalidJobId",
    "InvalidMaxAttempts",
    "InvalidPriority",
    "InvalidQueueName",
    "InvalidRetryBackoff",
    "InvalidRunAt",
    "InvalidTaskName",
    "InvalidTimeout",
    "InvalidUniqueKey",
    "Job",
    "JobFailed",
    "JobInfo",
    "JobNotCancellable",
    "JobNotFound",
    "JobQ",
    "JobState",
    "JobTimeout",
    "JobqError",
    "LeaseLost",
    "NotReplicated",
    "PayloadTooLarge",
    "QueueFull",
    "RedisAuthError",
    "RedisBusy",
    "RedisOutOfMemory",
    "RedisUnavailable",
    "RedisVersionError",
    "ResultTimeout",
    "Retry",
    "ScriptError",
    "StoreError",
    "SystemClock",
    "Task",
    "UnknownQueue",
    "__version__",
]
