"""jobq.requests: one path from a request to a job spec, for Python, CLI and HTTP input alike
(pure Python, no Redis)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from jobq import JobQ, errors, requests
from jobq.requests import EnqueueRequest, TaskBase


def _app() -> JobQ:
    app = JobQ("redis://127.0.0.1:1/0", default_queue="q")  # never connected

    @app.task(name="t", queue="tq", priority=3, max_attempts=5, timeout=2.5, retry_backoff=0.5)
    def t(x: int = 0) -> None: ...

    return app


def test_a_request_without_options_takes_the_tasks_defaults() -> None:
    queue, spec = _app().prepare(EnqueueRequest("t", (1,)))
    assert queue == "tq"
    assert (spec.task, spec.priority, spec.max_attempts, spec.timeout_ms, spec.backoff_ms) == (
        "t",
        3,
        5,
        2500,
        500,
    )
    assert (spec.delay_ms, spec.run_at_ms, spec.deadline, spec.unique_key) == (None, None, "", "")


def test_options_equal_to_the_defaults_give_the_same_job() -> None:
    app = _app()
    _, plain = app.prepare(EnqueueRequest("t", (1,), job_id="a"))
    queue, explicit = app.prepare(
        EnqueueRequest(
            "t", (1,), queue="tq", priority=3, max_attempts=5, timeout=2.5, retry_backoff=0.5, job_id="a"
        )
    )
    assert queue == "tq" and explicit == plain


def test_changed_task_defaults_are_converted_again() -> None:
    app = _app()
    app.prepare(EnqueueRequest("t"))
    task = app.tasks["t"]
    task.defaults = dataclasses.replace(task.defaults, priority=9)
    assert app.prepare(EnqueueRequest("t"))[1].priority == 9


def test_an_unregistered_task_takes_the_apps_defaults() -> None:
    queue, spec = _app().prepare(EnqueueRequest("other"))
    assert (queue, spec.priority, spec.max_attempts, spec.timeout_ms, spec.backoff_ms) == ("q", 0, 3, 0, 1000)


@pytest.mark.parametrize(
    ("req", "exc"),
    [
        (EnqueueRequest(["t"]), errors.InvalidTaskName),  # type: ignore[arg-type]
        (EnqueueRequest("bad name"), errors.InvalidTaskName),
        (EnqueueRequest("t", args="x"), errors.EncodeError),  # type: ignore[arg-type]
        (EnqueueRequest("t", kwargs={1: 2}, check_args=False), errors.EncodeError),  # type: ignore[dict-item]
        (EnqueueRequest("t", priority=101), errors.InvalidPriority),
        (EnqueueRequest("t", delay=1, run_at=2), errors.InvalidDelay),
        (EnqueueRequest("t", retry_backoff=-1), errors.InvalidRetryBackoff),
        (EnqueueRequest("t", delay=10, deadline=timedelta(seconds=5)), errors.InvalidDeadline),
    ],
    ids=["name-not-str", "name", "args", "kwargs", "priority", "delay-and-run_at", "backoff", "deadline"],
)
def test_bad_requests_name_the_field(req: EnqueueRequest, exc: type[errors.InvalidInput]) -> None:
    with pytest.raises(exc):
        _app().prepare(req)


def test_json_durations_and_times_parse_with_their_own_errors() -> None:
    req = requests.request_from_json(
        {"task": "t", "delay": "30s", "retry_backoff": "250ms", "scheduled_at": None, "deadline": 1e9}
    )
    assert (req.delay, req.retry_backoff, req.deadline) == (30.0, 0.25, 1e9)
    with pytest.raises(errors.InvalidRetryBackoff) as info:
        requests.request_from_json({"task": "t", "retry_backoff": "soon"})
    assert info.value.field == "retry_backoff"
    with pytest.raises(errors.InvalidRunAt):
        requests.request_from_json({"task": "t", "run_at": "tomorrow"})
    with pytest.raises(errors.InvalidInput, match="job 3: 'colour': unknown field"):
        requests.request_from_json({"task": "t", "colour": "red"}, index=3)


def test_task_base_converts_seconds_to_ms_once() -> None:
    d = _app().tasks["t"].defaults
    assert TaskBase.of(d) == TaskBase(d, "tq", 3, 5, 2500, 500)
