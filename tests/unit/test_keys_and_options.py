"""Key names, name validation, and the conversion of option values (pure Python, no Redis)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction

import pytest

import jobq
from jobq import errors
from jobq.requests import MAX_TIME_MS, seconds_to_ms, timestamp_ms
from jobq.storage.keys import Keys, validate_queue, validate_task_name


def test_every_queue_key_carries_the_hash_tag() -> None:
    k = Keys("jobq")
    q = "emails"
    per_queue = [
        *k.all_queue_keys(q),
        k.job(q, "id1"),
        k.active(q, "n1"),
        k.unique(q, "u"),
        k.cron(q, "c"),
        k.reap_lock(q),
        k.wake(q, "n1"),
    ]
    for key in per_queue:
        assert key.startswith(k.queue_prefix(q)) and "{emails}" in key
    for key in (k.queues, k.nodes, k.node("n1"), k.epoch):
        assert "{" not in key
    assert Keys("app").ready("q") == "app:{q}:ready"


@pytest.mark.parametrize("name", ["", "a b", "a{b", "a}b", "a:b", "a\nb", "a\0b", "é", "q" * 129])
def test_bad_queue_names(name: str) -> None:
    with pytest.raises(errors.InvalidQueueName, match="queue"):
        validate_queue(name)


@pytest.mark.parametrize("name", ["default", "a.b-c_d/e", "q" * 128])
def test_good_queue_names(name: str) -> None:
    assert validate_queue(name) == name


@pytest.mark.parametrize("name", ["", "a b", "a\tb", "a\x07", "x" * 201])
def test_bad_task_names(name: str) -> None:
    with pytest.raises(errors.InvalidTaskName, match="task"):
        validate_task_name(name)


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (0, 0),
        (1.1, 1100),
        (0.0015, 2),  # rounds up: never shorter than asked
        (Decimal("0.001"), 1),
        (Fraction(1, 3), 334),
        (timedelta(milliseconds=250), 250),
        (timedelta(days=1), 86_400_000),
        (Decimal(MAX_TIME_MS) / 1000, MAX_TIME_MS),
    ],
)
def test_seconds_to_ms(value: object, ms: int) -> None:
    assert seconds_to_ms(value, "delay", errors.InvalidDelay) == ms


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, "1", None, True, Decimal("sNaN"), MAX_TIME_MS])
def test_seconds_to_ms_refuses(value: object) -> None:
    with pytest.raises(errors.InvalidDelay, match="delay"):
        seconds_to_ms(value, "delay", errors.InvalidDelay)


def test_timestamps() -> None:
    utc = datetime(2030, 1, 1, 9, 0, 0, 1000, tzinfo=timezone.utc)
    assert timestamp_ms(utc, "run_at", errors.InvalidRunAt) == 1_893_488_400_001
    assert timestamp_ms(-5, "run_at", errors.InvalidRunAt, past_ok=True) == 0
    with pytest.raises(errors.InvalidDeadline, match="deadline"):
        timestamp_ms(-5, "deadline", errors.InvalidDeadline)


def test_invalid_input_is_a_value_error_naming_its_field() -> None:
    e = errors.InvalidPriority("priority: 500 is outside -100..100")
    assert isinstance(e, ValueError) and isinstance(e, jobq.JobqError)
    assert e.field == "priority"


def test_app_settings_are_checked() -> None:
    with pytest.raises(jobq.InvalidInput, match="prefix"):
        jobq.JobQ("redis://127.0.0.1:1/0", prefix="a{b}")
    with pytest.raises(jobq.InvalidInput, match="max_payload"):
        jobq.JobQ("redis://127.0.0.1:1/0", max_payload=0)
    with pytest.raises(jobq.InvalidInput, match="dead_max"):
        jobq.JobQ("redis://127.0.0.1:1/0", dead_max=0)
    with pytest.raises(jobq.InvalidInput, match="max_depth"):
        jobq.JobQ("redis://127.0.0.1:1/0", max_depth={"q": -1})
    with pytest.raises(jobq.InvalidInput, match="result_ttl"):
        jobq.JobQ("redis://127.0.0.1:1/0", result_ttl=-1)
    app = jobq.JobQ("redis://127.0.0.1:1/0")
    with pytest.raises(jobq.InvalidInput, match="priority"):
        app.task(priority=101)(lambda: None)
    with pytest.raises(jobq.InvalidInput, match="max_attempts"):
        app.task(max_attempts=0)(lambda: None)
