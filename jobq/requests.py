"""Enqueue requests: what one job to enqueue is (:class:`EnqueueRequest`), and every rule that
checks and converts its fields, for the Python API, the CLI and the HTTP API alike.

Text from the CLI and JSON from HTTP or NDJSON become a request through
:func:`request_from_json` (times as ISO 8601, durations as ``"30s"``), which goes through
:func:`request_from_mapping` (field names), as Python mappings do. :meth:`jobq.JobQ.prepare`
then resolves the task's defaults and calls :func:`to_spec`, which validates each option and
the arguments and builds the :class:`jobq.storage.calls.JobSpec` the enqueue script takes. Names are
checked by the rules in :mod:`jobq.storage.keys` (re-exported here), payloads encoded by
:mod:`jobq.codec`. Nothing here does I/O.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol

from jobq import codec, errors
from jobq.cron import parse_duration
from jobq.storage.calls import MAX_PRIORITY, MIN_PRIORITY, JobSpec
from jobq.storage.keys import validate_node as validate_node
from jobq.storage.keys import validate_queue as validate_queue
from jobq.storage.keys import validate_task_name as validate_task_name

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
    #: Check ``args``/``kwargs`` against the task's signature when the task is registered here
    #: (and its own ``check_args`` is on); False skips the check for this call.
    check_args: bool = True


# -- fields -------------------------------------------------------------------------------------
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


#: Ids a new job may take: letters, digits and ``. _ - :``, starting with a letter, a digit or
#: ``_`` (no ``/``, ``%``, ``?``, ``#``: an id is a path segment of ``GET /jobs/{id}`` and a key
#: name's last segment). Generated ids are 24 hex digits.
_NEW_JOB_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:\-]{0,127}")


def validate_new_job_id(value: object) -> str:
    """The id of a job being enqueued (stricter than :func:`validate_job_id`, which looks jobs
    up and so still reaches one stored before the rule)."""
    validate_job_id(value)
    assert isinstance(value, str)
    if not _NEW_JOB_ID_RE.fullmatch(value):
        raise errors.InvalidJobId(
            f"id: {value!r} is not a valid job id (1-128 characters of A-Z a-z 0-9 . _ - :, "
            "starting with a letter, a digit or _)"
        )
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


def parse_time(value: Any, name: str, exc: type[errors.InvalidInput]) -> datetime | float:
    """An absolute time: ISO 8601 text (naive = UTC; ``Z`` accepted) or epoch seconds."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise exc(
                f"{name}: {value!r} is not an ISO 8601 time (e.g. 2030-01-01T12:00:00Z)", name
            ) from None
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise exc(f"{name}: must be an ISO 8601 time or epoch seconds, got {value!r}", name)
    return float(value)


def parse_seconds(value: Any, name: str, exc: type[errors.InvalidInput]) -> float:
    """A duration: a number of seconds or text like ``"30s"``, ``"250ms"``, ``"5m"``."""
    if isinstance(value, str):
        try:
            return parse_duration(value, name)
        except errors.InvalidInput as e:
            raise exc(str(e), name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise exc(f"{name}: must be a number of seconds or a duration like '30s', got {value!r}", name)
    return float(value)


# -- requests from mappings and JSON -----------------------------------------------------------
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


def request_from_json(data: Any, index: int | None = None) -> EnqueueRequest:
    """An :class:`EnqueueRequest` from a decoded JSON object (an HTTP body or an NDJSON
    line). Field names are those of ``JobQ.enqueue`` (``scheduled_at`` is accepted for
    ``run_at``); times are ISO 8601 or epoch seconds, durations seconds or ``"30s"``. Raises
    :class:`jobq.errors.InvalidInput` naming the field."""
    where = "" if index is None else f"job {index}: "
    if not isinstance(data, Mapping):
        raise errors.InvalidInput(f"{where}must be a JSON object", "body")
    d = dict(data)
    if "scheduled_at" in d:
        if d.get("run_at") is not None:
            raise errors.InvalidRunAt(f"{where}run_at: give run_at or scheduled_at, not both")
        d["run_at"] = d.pop("scheduled_at")
    try:
        for name, exc in (("delay", errors.InvalidDelay), ("timeout", errors.InvalidTimeout)):
            if d.get(name) is not None:
                d[name] = parse_seconds(d[name], name, exc)
        if d.get("retry_backoff") is not None:
            d["retry_backoff"] = parse_seconds(
                d["retry_backoff"], "retry_backoff", errors.InvalidRetryBackoff
            )
        if d.get("run_at") is not None:
            d["run_at"] = parse_time(d["run_at"], "run_at", errors.InvalidRunAt)
        if d.get("deadline") is not None:
            d["deadline"] = parse_time(d["deadline"], "deadline", errors.InvalidDeadline)
    except errors.InvalidInput as exc:
        raise type(exc)(f"{where}{exc}", exc.field) from None
    return request_from_mapping(d, index=index)


#: Per-call options of the Python API only (not HTTP fields or NDJSON keys).
PY_OPTION_NAMES = (*OPTION_NAMES, "check_args")


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    for k in options:
        if k not in PY_OPTION_NAMES:
            raise errors.InvalidInput(f"{k}: unknown option (options are {', '.join(PY_OPTION_NAMES)})", k)
    return dict(options)


# -- a request to a job spec --------------------------------------------------------------------
class Defaults(Protocol):
    """A task's (or an app's) defaults, as :class:`jobq.app.TaskDefaults` holds them."""

    @property
    def queue(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def retry_backoff(self) -> float: ...


@dataclass(frozen=True, slots=True)
class TaskBase:
    """A task's defaults, validated and converted once per task name: what every field of a
    request that leaves it unset takes."""

    #: The defaults object these came from (an app compares it by identity to spot a change).
    source: object
    queue: str
    priority: int
    max_attempts: int
    timeout_ms: int
    backoff_ms: int

    @classmethod
    def of(cls, defaults: Defaults) -> TaskBase:
        timeout_ms = 0 if defaults.timeout is None else round(defaults.timeout * 1000)
        return cls(
            defaults,
            defaults.queue,
            defaults.priority,
            defaults.max_attempts,
            timeout_ms,
            round(defaults.retry_backoff * 1000),
        )


def encode_arguments(args: object, kwargs: object, max_payload: int) -> bytes:
    """``args`` (a list or tuple) and ``kwargs`` (a mapping with string keys) as the job's
    payload; raises :class:`jobq.errors.EncodeError` or :class:`jobq.errors.PayloadTooLarge`."""
    if not isinstance(args, (list, tuple)):
        raise errors.EncodeError(f"args: must be a list, got {type(args).__name__}")
    if type(kwargs) is not dict:
        if not isinstance(kwargs, Mapping):
            raise errors.EncodeError("kwargs: must be a mapping with string keys", "kwargs")
        kwargs = dict(kwargs)
    if kwargs and not all(isinstance(k, str) for k in kwargs):
        raise errors.EncodeError("kwargs: must be a mapping with string keys", "kwargs")
    return codec.encode_payload(args, kwargs, max_payload)


def to_spec(
    req: EnqueueRequest, task: str, base: TaskBase, enqueue_queue: Callable[[object], str], max_payload: int
) -> tuple[str, JobSpec]:
    """Validate the options of ``req`` and its arguments, and build the job: each option the
    request leaves unset takes ``base``'s value. ``task`` is the request's task name, already
    validated; ``enqueue_queue`` checks an explicit queue name (the app's shard rules). Returns
    the logical queue (before sharding) and the spec; raises an
    :class:`jobq.errors.InvalidInput` naming the field."""
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
    ):  # the common case, every option from the task: nothing to check but the arguments
        return base.queue, JobSpec(
            new_job_id(),
            task,
            encode_arguments(req.args, req.kwargs, max_payload),
            base.priority,
            max_attempts=base.max_attempts,
            timeout_ms=base.timeout_ms,
            backoff_ms=base.backoff_ms,
        )
    queue = base.queue if req.queue is None else enqueue_queue(req.queue)
    priority = base.priority if req.priority is None else validate_priority(req.priority)
    max_attempts = base.max_attempts if req.max_attempts is None else validate_max_attempts(req.max_attempts)
    timeout_ms = base.timeout_ms
    if req.timeout is not None:
        timeout_ms = seconds_to_ms(req.timeout, "timeout", errors.InvalidTimeout)
    backoff_ms = base.backoff_ms
    if req.retry_backoff is not None:
        backoff_ms = seconds_to_ms(req.retry_backoff, "retry_backoff", errors.InvalidRetryBackoff)
    delay_ms = None
    run_at_ms = None
    if req.delay is not None:
        if req.run_at is not None:
            raise errors.InvalidDelay("delay: give either delay or run_at, not both")
        delay_ms = seconds_to_ms(req.delay, "delay", errors.InvalidDelay)
    elif req.run_at is not None:
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
    job_id = new_job_id() if req.job_id is None else validate_new_job_id(req.job_id)
    payload = encode_arguments(req.args, req.kwargs, max_payload)
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
