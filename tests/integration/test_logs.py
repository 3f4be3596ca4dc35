"""Logging: JSON and text lines with the job fields, one handler however often configured, and
secrets redacted from every record (including a real worker's failure line)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from jobq import JobQ, logs
from jobq.worker import Worker, WorkerConfig

pytestmark = [pytest.mark.integration]


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    old_level, old_handlers = root.level, list(root.handlers)
    buf = io.StringIO()
    yield buf
    if logs._handler is not None:
        root.removeHandler(logs._handler)
        logs._handler = None
    root.setLevel(old_level)
    assert root.handlers == old_handlers


def lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_the_job_fields(stream: io.StringIO) -> None:
    logs.configure("json", "info", stream=stream)
    log = logging.getLogger("jobq.test")
    log.debug("not shown at INFO")
    log.warning(
        "job %s failed",
        "j1",
        extra={"job_id": "j1", "task": "send", "queue": "emails", "attempt": 2, "error": "ValueError: x"},
    )
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        log.exception("with traceback")
    first, second = (json.loads(line) for line in lines(stream))
    assert set(first) == {"time", "level", "logger", "message", "job_id", "task", "queue", "attempt", "error"}
    assert first["level"] == "WARNING" and first["logger"] == "jobq.test"
    assert first["message"] == "job j1 failed" and first["attempt"] == 2
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "ERROR" and "RuntimeError: kaput" in second["exc"]


def test_text_lines_carry_the_job_fields(stream: io.StringIO) -> None:
    logs.configure("text", "DEBUG", stream=stream)
    logging.getLogger("jobq.test").info("hello", extra={"job_id": "j2", "queue": "q", "error": "boom"})
    (line,) = lines(stream)
    assert " INFO jobq.test: hello job_id=j2 queue=q error='boom'" in line


def test_configure_replaces_its_handler(stream: io.StringIO) -> None:
    other = io.StringIO()
    logs.configure("text", stream=other)
    logs.configure("json", stream=stream)
    logging.getLogger("jobq.test").warning("once")
    assert other.getvalue() == ""
    assert len(lines(stream)) == 1
    with pytest.raises(ValueError, match="log format"):
        logs.configure("xml")
    with pytest.raises(ValueError, match="log level"):
        logs.configure("json", "loud")


def test_secrets_are_redacted_from_every_record(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_SMTP_PASSWORD", "smtp-Secret-1")
    monkeypatch.setenv("JOBQ_REDIS_URL", "redis://:envRedisPw@db:6379/0")
    logs.configure("json", stream=stream)
    log = logging.getLogger("some.library")  # not a jobq logger: the handler filters everything
    log.warning("connecting to %s", "redis://app:hunter2@redis.internal:6379/0")
    log.warning("headers=%s", {"Authorization": "Bearer tok-abc123", "X-Other": "fine"})
    log.warning("Authorization: Basic dXNlcjpwYXNz")
    log.warning("smtp login with %s failed", "smtp-Secret-1")
    log.warning("password=letmein1 retrying")
    log.warning("redis password envRedisPw leaked?")
    log.warning("job failed", extra={"error": "token in error: Bearer tok-abc123"})
    try:
        raise ConnectionError("cannot reach rediss://u:tracebackPw@h:6380/0")
    except ConnectionError:
        log.exception("failed")
    text = stream.getvalue()
    for secret in (
        "hunter2",
        "tok-abc123",
        "dXNlcjpwYXNz",
        "smtp-Secret-1",
        "letmein1",
        "envRedisPw",
        "tracebackPw",
    ):
        assert secret not in text, secret
    records = [json.loads(line) for line in lines(stream)]
    assert records[0]["message"] == "connecting to redis://app:***@redis.internal:6379/0"
    assert "fine" in records[1]["message"]
    assert len(records) == 8


def test_a_worker_failure_line_has_the_job_fields(redis_url: str, stream: io.StringIO) -> None:
    logs.configure("json", "INFO", stream=stream)
    app = JobQ(redis_url)

    @app.task(name="explodes", queue="logq", max_attempts=1)
    def explodes() -> None:
        raise ValueError("no good")

    job = app.enqueue("explodes")
    asyncio.run(Worker(app, WorkerConfig(queues=[("logq", 1)], burst=True)).run())
    app.close()
    records = [json.loads(line) for line in lines(stream)]
    failures = [rec for rec in records if rec.get("job_id") == job.id]
    assert failures, records
    rec = failures[0]
    assert rec["task"] == "explodes" and rec["queue"] == "logq" and rec["attempt"] == 1
    assert rec["error"] == "ValueError: no good" and rec["level"] == "WARNING"


def test_a_text_line_shows_each_field_once(redis_url: str, stream: io.StringIO) -> None:
    """A worker's failure line names task, queue, attempt and error in its message: the text
    format appends only the fields the message lacks (issue 17: every field was there twice)."""
    logs.configure("text", "INFO", stream=stream)
    app = JobQ(redis_url)

    @app.task(name="explodes", queue="logq", max_attempts=1)
    def explodes() -> None:
        raise ValueError("no good")

    job = app.enqueue("explodes")
    asyncio.run(Worker(app, WorkerConfig(queues=[("logq", 1)], burst=True)).run())
    app.close()
    (line,) = [ln for ln in lines(stream) if job.id in ln and "failed" in ln]
    for name in ("task=", "queue=", "attempt=", "error=", "node="):
        assert line.count(name) == 1, (name, line)
    assert line.count(job.id) == 1, line
    assert "task=explodes" in line and "queue=logq" in line and "ValueError: no good" in line
