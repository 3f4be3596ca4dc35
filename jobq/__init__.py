"""jobq: a Redis-native distributed job queue.

>>> import jobq
>>> app = jobq.JobQ("redis://127.0.0.1:6379/0")
>>> @app.task(queue="emails", max_attempts=5)
... def send_email(to: str) -> None: ...
>>> job = send_email.enqueue("a@example.com", _priority=5)
"""

from __future__ import annotations

from importlib import metadata as _metadata

from jobq.app import EnqueueRequest, Job, JobInfo, JobQ, JobState, Task
from jobq.clock import FakeClock, SystemClock
from jobq.current import CurrentJob, current_job
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

try:
    #: The installed version: ``version`` in pyproject.toml is its one source (``jobq --version``
    #: and the documentation read the same).
    __version__ = _metadata.version("jobq")
except _metadata.PackageNotFoundError:  # pragma: no cover - imported from a tree never installed
    __version__ = "0+unknown"

__all__ = [
    "CurrentJob",
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
    "current_job",
]
