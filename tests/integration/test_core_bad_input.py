"""Bad input through the Python API (issue 2 item 5, RELIABILITY B1): every case raises a
``jobq.InvalidInput`` subclass whose message names the field, and the keyspace is identical
before and after (DBSIZE and a DUMP of every key)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobq
from jobq import errors
from tests.integration.core_support import assert_unchanged, snapshot

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
Q = "bad"


@pytest.fixture
def fapp(redis_url: str) -> Iterator[jobq.JobQ]:
    a = jobq.JobQ(redis_url, clock=jobq.FakeClock(T0), max_payload=4096)
    # Some state for a refused enqueue to (wrongly) touch: ready, scheduled, active, unique, dead.
    a.enqueue("t", queue=Q, unique_key="held")
    a.enqueue("t", queue=Q, delay=60, job_id="taken")
    a.enqueue("t", queue=Q, max_attempts=1)
    a.enqueue("t", queue=Q)
    res = a.run(a.store.claim(Q, "n1", 2, 30_000, now_ms=T0))
    a.run(a.store.fail(Q, "n1", res.jobs[1].id, "boom", now_ms=T0))
    yield a
    a.close()


def nested(depth: int) -> list[Any]:
    v: list[Any] = []
    for _ in range(depth):
        v = [v]
    return v


#: Built once: the rejection is what B1 times, not the building of a 10,000-deep list.
DEEP = nested(10_000)

#: (case id, field the message must name, exception class, the call)
Case = tuple[str, str, type[errors.InvalidInput], Callable[[jobq.JobQ], object]]
CASES: list[Case] = [
    ("queue-empty", "queue", errors.InvalidQueueName, lambda a: a.enqueue("t", queue="")),
    ("queue-long", "queue", errors.InvalidQueueName, lambda a: a.enqueue("t", queue="q" * 256)),
    *[
        (f"queue-{c!r}", "queue", errors.InvalidQueueName, lambda a, c=c: a.enqueue("t", queue=f"a{c}b"))
        for c in ["{", "}", ":", "\n", "\0", " ", "\udcff"]
    ],
    ("queue-type", "queue", errors.InvalidQueueName, lambda a: a.enqueue("t", queue=b"q")),  # type: ignore[arg-type]
    ("task-empty", "task", errors.InvalidTaskName, lambda a: a.enqueue("")),
    ("task-control", "task", errors.InvalidTaskName, lambda a: a.enqueue("send\x07mail", queue=Q)),
    ("task-space", "task", errors.InvalidTaskName, lambda a: a.enqueue("send mail", queue=Q)),
    ("task-bytes", "task", errors.InvalidTaskName, lambda a: a.enqueue(b"\xff\xfe", queue=Q)),  # type: ignore[arg-type]
    ("priority-high", "priority", errors.InvalidPriority, lambda a: a.enqueue("t", queue=Q, priority=101)),
    ("priority-low", "priority", errors.InvalidPriority, lambda a: a.enqueue("t", queue=Q, priority=-101)),
    ("priority-float", "priority", errors.InvalidPriority, lambda a: a.enqueue("t", queue=Q, priority=1.5)),  # type: ignore[arg-type]
    ("priority-str", "priority", errors.InvalidPriority, lambda a: a.enqueue("t", queue=Q, priority="5")),  # type: ignore[arg-type]
    ("priority-bool", "priority", errors.InvalidPriority, lambda a: a.enqueue("t", queue=Q, priority=True)),
    ("delay-negative", "delay", errors.InvalidDelay, lambda a: a.enqueue("t", queue=Q, delay=-1)),
    ("delay-30x", "delay", errors.InvalidDelay, lambda a: a.enqueue("t", queue=Q, delay="30x")),  # type: ignore[arg-type]
    ("delay-nan", "delay", errors.InvalidDelay, lambda a: a.enqueue("t", queue=Q, delay=math.nan)),
    ("delay-inf", "delay", errors.InvalidDelay, lambda a: a.enqueue("t", queue=Q, delay=math.inf)),
    ("delay-dec-nan", "delay", errors.InvalidDelay, lambda a: a.enqueue("t", queue=Q, delay=Decimal("NaN"))),
    ("delay-huge", "delay", errors.InvalidDelay, lambda a: a.enqueue("t", queue=Q, delay=1e300)),
    # Within the Python limit but beyond 2^53 ms once added to now: refused by the script.
    (
        "delay-plus-now",
        "delay",
        errors.InvalidDelay,
        lambda a: a.enqueue("t", queue=Q, delay=(2**53 - 10) / 1000),
    ),
    (
        "delay-and-run-at",
        "delay",
        errors.InvalidDelay,
        lambda a: a.enqueue("t", queue=Q, delay=1, run_at=T0 / 1000),
    ),
    (
        "run-at-beyond-2^53",
        "run_at",
        errors.InvalidRunAt,
        lambda a: a.enqueue("t", queue=Q, run_at=2**53 / 1000 + 1),
    ),
    ("run-at-neg-inf", "run_at", errors.InvalidRunAt, lambda a: a.enqueue("t", queue=Q, run_at=-math.inf)),
    ("run-at-str", "run_at", errors.InvalidRunAt, lambda a: a.enqueue("t", queue=Q, run_at="tomorrow")),  # type: ignore[arg-type]
    (
        "deadline-before-run-at",
        "deadline",
        errors.InvalidDeadline,
        lambda a: a.enqueue("t", queue=Q, run_at=T0 / 1000 + 60, deadline=T0 / 1000 + 30),
    ),
    (
        "deadline-before-delay",
        "deadline",
        errors.InvalidDeadline,
        lambda a: a.enqueue("t", queue=Q, delay=60, deadline=timedelta(seconds=30)),
    ),
    # Before the run time as the Redis clock sees it (now): refused by the script, nothing written.
    (
        "deadline-past",
        "deadline",
        errors.InvalidDeadline,
        lambda a: a.enqueue("t", queue=Q, deadline=(T0 - 1) / 1000),
    ),
    (
        "deadline-past-delay",
        "deadline",
        errors.InvalidDeadline,
        lambda a: a.enqueue(
            "t", queue=Q, delay=60, deadline=datetime.fromtimestamp(T0 / 1000 + 30, timezone.utc)
        ),
    ),
    ("deadline-negative", "deadline", errors.InvalidDeadline, lambda a: a.enqueue("t", queue=Q, deadline=-5)),
    (
        "max-attempts-0",
        "max_attempts",
        errors.InvalidMaxAttempts,
        lambda a: a.enqueue("t", queue=Q, max_attempts=0),
    ),
    (
        "max-attempts-neg",
        "max_attempts",
        errors.InvalidMaxAttempts,
        lambda a: a.enqueue("t", queue=Q, max_attempts=-3),
    ),
    (
        "max-attempts-str",
        "max_attempts",
        errors.InvalidMaxAttempts,
        lambda a: a.enqueue("t", queue=Q, max_attempts="3"),
    ),  # type: ignore[arg-type]
    ("timeout-negative", "timeout", errors.InvalidTimeout, lambda a: a.enqueue("t", queue=Q, timeout=-1)),
    (
        "backoff-negative",
        "retry_backoff",
        errors.InvalidRetryBackoff,
        lambda a: a.enqueue("t", queue=Q, retry_backoff=-1),
    ),
    (
        "unique-long",
        "unique_key",
        errors.InvalidUniqueKey,
        lambda a: a.enqueue("t", queue=Q, unique_key="u" * 513),
    ),
    (
        "unique-control",
        "unique_key",
        errors.InvalidUniqueKey,
        lambda a: a.enqueue("t", queue=Q, unique_key="a\nb"),
    ),
    (
        "unique-surrogate",
        "unique_key",
        errors.InvalidUniqueKey,
        lambda a: a.enqueue("t", queue=Q, unique_key="\udcff"),
    ),
    ("unique-empty", "unique_key", errors.InvalidUniqueKey, lambda a: a.enqueue("t", queue=Q, unique_key="")),
    ("id-space", "id", errors.InvalidJobId, lambda a: a.enqueue("t", queue=Q, job_id="a b")),
    ("id-brace", "id", errors.InvalidJobId, lambda a: a.enqueue("t", queue=Q, job_id="{x}")),
    ("id-long", "id", errors.InvalidJobId, lambda a: a.enqueue("t", queue=Q, job_id="x" * 129)),
    ("payload-limit+1", "payload", errors.PayloadTooLarge, lambda a: a.enqueue("t", ["x" * 4096], queue=Q)),
    (
        "payload-100MiB",
        "payload",
        errors.PayloadTooLarge,
        lambda a: a.enqueue("t", [b"\0" * (100 << 20)], queue=Q),
    ),
    ("args-object", "args", errors.EncodeError, lambda a: a.enqueue("t", [object()], queue=Q)),
    ("args-set", "args", errors.EncodeError, lambda a: a.enqueue("t", [{1, 2}], queue=Q)),
    ("args-datetime", "args", errors.EncodeError, lambda a: a.enqueue("t", [datetime.now()], queue=Q)),
    ("args-int-overflow", "args", errors.EncodeError, lambda a: a.enqueue("t", [2**64], queue=Q)),
    ("args-surrogate", "args", errors.EncodeError, lambda a: a.enqueue("t", ["\udcff"], queue=Q)),
    ("args-nesting-10000", "args", errors.EncodeError, lambda a: a.enqueue("t", [DEEP], queue=Q)),
    (
        "args-ext-type",
        "args",
        errors.EncodeError,
        lambda a: a.enqueue("t", [msgpack.ExtType(1, b"x")], queue=Q),
    ),
    ("args-int-map-key", "args", errors.EncodeError, lambda a: a.enqueue("t", [{1: "a"}], queue=Q)),
    ("args-not-a-list", "args", errors.EncodeError, lambda a: a.enqueue("t", "abc", queue=Q)),
    ("kwargs-int-key", "kwargs", errors.EncodeError, lambda a: a.enqueue("t", (), {1: 2}, queue=Q)),  # type: ignore[dict-item]
    ("kwargs-not-a-map", "kwargs", errors.EncodeError, lambda a: a.enqueue("t", (), [1], queue=Q)),  # type: ignore[arg-type]
    (
        "option-unknown",
        "colour",
        errors.InvalidInput,
        lambda a: a.enqueue_many([{"task": "t", "colour": "red"}]),
    ),
    (
        "batch-one-bad",
        "priority",
        errors.InvalidPriority,
        lambda a: a.enqueue_many([{"task": "t", "queue": Q}] * 5 + [{"task": "t", "priority": 500}]),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name_and_writes_nothing(fapp: jobq.JobQ, r: redis.Redis, case: Case) -> None:
    _, fld, exc_type, call = case
    before, size = snapshot(r), r.dbsize()
    with pytest.raises(exc_type) as info:
        call(fapp)
    assert isinstance(info.value, jobq.InvalidInput)
    assert fld in str(info.value)
    assert info.value.field == fld
    assert_unchanged(r, before, size)


def test_a_job_id_collision_is_a_no_op(fapp: jobq.JobQ, r: redis.Redis) -> None:
    before, size = snapshot(r), r.dbsize()
    job = fapp.enqueue("other.task", [1, 2], queue=Q, job_id="taken", priority=9)
    assert job.id == "taken"
    assert_unchanged(r, before, size)


@pytest.mark.parametrize(
    "run_at",
    [T0 / 1000 - 3600, 0, -1, datetime(1960, 1, 1, tzinfo=timezone.utc)],
    ids=["an-hour-ago", "epoch", "before-1970", "datetime-1960"],
)
def test_a_run_time_in_the_past_means_now(fapp: jobq.JobQ, run_at: object) -> None:
    job = fapp.enqueue("t", queue=Q, run_at=run_at)  # type: ignore[arg-type]
    info = job.info()
    assert info.state is jobq.JobState.READY
    assert info.run_at_ms == T0


BAD_OPTIONS: dict[str, st.SearchStrategy[Any]] = {
    "queue": st.one_of(
        st.just(""),
        st.text(min_size=129, max_size=300, alphabet="abc"),
        st.text(min_size=1, max_size=20).filter(
            lambda s: any(c in s for c in "{}: \n\0\t") or not s.isascii()
        ),
    ),
    "priority": st.one_of(st.integers(max_value=-101), st.integers(min_value=101), st.floats(), st.text()),
    "delay": st.one_of(
        st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf), st.text(), st.floats(min_value=1e14)
    ),
    "max_attempts": st.one_of(st.integers(max_value=0), st.integers(min_value=1_000_001), st.floats()),
    "unique_key": st.one_of(
        st.just(""),
        st.text(min_size=513, max_size=600, alphabet="xy"),
        st.text(alphabet="\0\n\x1b", min_size=1),
    ),
    "timeout": st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.text()),
}


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hypothesis_bad_options_are_refused_and_write_nothing(
    fapp: jobq.JobQ, r: redis.Redis, data: st.DataObject
) -> None:
    fld = data.draw(st.sampled_from(sorted(BAD_OPTIONS)))
    value = data.draw(BAD_OPTIONS[fld])
    before, size = snapshot(r), r.dbsize()
    with pytest.raises(jobq.InvalidInput) as info:
        fapp.enqueue("t", [1], **{"queue": Q, fld: value})
    assert fld in str(info.value)
    assert_unchanged(r, before, size)


def test_rejections_are_fast(fapp: jobq.JobQ) -> None:
    """B1: p99 rejection time through the API is at most 5 ms (the 100 MiB payload aside, whose
    cost is building the 100 MiB argument)."""
    times: list[float] = []
    for _ in range(10):
        for case_id, _fld, _exc, call in CASES:
            if "100MiB" in case_id:
                continue
            t0 = time.perf_counter()
            with pytest.raises(jobq.InvalidInput):
                call(fapp)
            times.append(time.perf_counter() - t0)
    times.sort()
    p99 = times[int(len(times) * 0.99)]
    assert p99 <= 0.005, f"p99 {p99 * 1000:.2f} ms"


def test_a_refused_first_enqueue_to_a_new_queue_writes_nothing_at_all(redis_url: str, r: redis.Redis) -> None:
    """Even the queue registry is written only once a job is stored."""
    app = jobq.JobQ(redis_url, clock=jobq.FakeClock(T0))
    try:
        with pytest.raises(errors.InvalidDeadline):
            app.enqueue("t", queue="fresh", deadline=(T0 - 1) / 1000)
        with pytest.raises(errors.InvalidDeadline):
            app.enqueue_many([{"task": "t", "queue": "fresh2", "deadline": (T0 - 1) / 1000}] * 3)
        assert r.dbsize() == 0
        # A batch over two queues where Redis refuses one: the other is stored and registered.
        with pytest.raises(errors.InvalidDeadline):
            app.enqueue_many(
                [{"task": "t", "queue": "ok"}, {"task": "t", "queue": "late", "deadline": (T0 - 1) / 1000}]
            )
        assert r.smembers(app.keys.queues) == {b"ok"}
        assert r.zcard(app.keys.ready("ok")) == 1 and not r.exists(app.keys.ready("late"))
    finally:
        app.close()


def test_a_batch_whose_read_fails_midway_writes_nothing(fapp: jobq.JobQ, r: redis.Redis) -> None:
    """Every key is read before the first write: a foreign key of another type at the third
    job's unique-key name fails the batch (WRONGTYPE) before the first two jobs are stored, so a
    retry of the batch stores them for real instead of finding hashes that never reached ready."""
    r.rpush(f"jobq:{{{Q}}}:unique:foreign", "x")
    before, size = snapshot(r), r.dbsize()
    batch = [
        {"task": "t", "queue": Q, "job_id": "first"},
        {"task": "t", "queue": Q, "job_id": "second", "unique_key": "fresh"},
        {"task": "t", "queue": Q, "job_id": "third", "unique_key": "foreign"},
    ]
    with pytest.raises(errors.ScriptError, match="WRONGTYPE"):
        fapp.enqueue_many(batch)
    assert_unchanged(r, before, size)
    r.delete(f"jobq:{{{Q}}}:unique:foreign")
    jobs = fapp.enqueue_many(batch)
    assert [j.id for j in jobs] == ["first", "second", "third"]
    ready = {m.decode() for m in r.zrange(f"jobq:{{{Q}}}:ready", 0, -1)}
    assert {"first", "second", "third"} <= ready
