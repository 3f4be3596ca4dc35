"""The worker's prefetch buffer (claimed, not yet started jobs) against a real redis-server: a
buffered job stays leased while it waits, a stop hands it back at once without counting an
attempt, one that waits too long goes back to ready, and one whose lease is lost never starts."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis

from jobq import JobQ, JobState
from jobq.worker import Worker, WorkerConfig
from jobq.worker import fetcher as fetcher_mod
from tests.integration.test_worker import Background, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def bg() -> Iterator[list[Background]]:
    started: list[Background] = []
    yield started
    for b in started:
        if b.thread.is_alive():
            b.stop(graceful=False)
            b.thread.join(10)


@pytest.fixture
def started(app: JobQ, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Registers ``nap(tag, seconds)``; returns the tags in the order their jobs started. The
    buffer is sized for 10 s of work, so a one-slot node buffers one job once a job has run."""
    monkeypatch.setattr(fetcher_mod, "PREFETCH_HORIZON", 10.0)
    order: list[str] = []

    @app.task(name="nap", max_attempts=3)
    async def nap(tag: str, seconds: float) -> None:
        order.append(tag)
        await asyncio.sleep(seconds)

    return order


def one_slot_node(app: JobQ, bg: list[Background], **cfg: float) -> Background:
    b = Background(app, concurrency=1, lease=cfg.pop("lease", 30.0), **cfg)
    bg.append(b)
    return b


def buffered_ids(b: Background) -> list[str]:
    return [run.job.id for run in list(b.worker.held.buffer)]


def test_a_buffered_job_stays_leased_while_it_waits(
    app: JobQ, r: redis.Redis, bg: list[Background], started: list[str]
) -> None:
    first = app.enqueue("nap", ("first", 0.0))
    slow = app.enqueue("nap", ("slow", 1.5))  # 2.5 leases
    waiting = app.enqueue("nap", ("waiting", 0.0))
    b = one_slot_node(app, bg, lease=0.6)
    # The slow job leaves the buffer a moment before its coroutine first runs: wait for both.
    wait_for(
        lambda: buffered_ids(b) == [waiting.id] and started == ["first", "slow"],
        10,
        "the job buffered behind the slow one, which has started",
    )
    wait_for(lambda: waiting.status() is JobState.DONE, 10, "the buffered job to run")
    b.stop()
    b.join()
    assert started == ["first", "slow", "waiting"]
    for job in (first, slow, waiting):
        info = job.info()
        assert info.state is JobState.DONE and info.attempts == 1  # never reaped
    assert b.worker.stats["lost"] == 0 and b.worker.stats["completed"] == 3


def test_a_stop_hands_buffered_jobs_back_at_once_without_counting_an_attempt(
    app: JobQ, r: redis.Redis, bg: list[Background], started: list[str]
) -> None:
    app.enqueue("nap", ("first", 0.0))
    slow = app.enqueue("nap", ("slow", 2.0))
    waiting = app.enqueue("nap", ("waiting", 0.0))
    b = one_slot_node(app, bg, grace=10.0)
    wait_for(lambda: buffered_ids(b) == [waiting.id], 10, "the job buffered behind the slow one")
    b.stop()
    ready = app.keys.ready("default")
    wait_for(lambda: r.zscore(ready, waiting.id) is not None, 1.0, "the buffered job back in ready")
    info = waiting.info()
    assert info.state is JobState.READY and info.attempts == 0
    assert slow.status() is JobState.ACTIVE  # still running in its grace period
    b.join()
    assert slow.status() is JobState.DONE
    assert started == ["first", "slow"]  # the buffered job never started here
    assert r.zcard(app.keys.active("default", b.worker.node)) == 0


def test_a_buffered_job_that_waits_too_long_goes_back_to_ready(
    app: JobQ, r: redis.Redis, bg: list[Background], started: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetcher_mod, "PREFETCH_MAX_WAIT", 0.3)
    app.enqueue("nap", ("first", 0.0))
    slow = app.enqueue("nap", ("slow", 1.5))
    waiting = app.enqueue("nap", ("waiting", 0.0))
    b = one_slot_node(app, bg)
    wait_for(lambda: buffered_ids(b) == [waiting.id], 10, "the job buffered behind the slow one")
    ready = app.keys.ready("default")
    t0 = time.monotonic()
    wait_for(lambda: r.zscore(ready, waiting.id) is not None, 5, "the buffered job back in ready")
    assert time.monotonic() - t0 < 1.2
    assert waiting.info().attempts == 0 and slow.status() is JobState.ACTIVE
    # The node stops prefetching (its run-time estimate was wrong): the job stays in ready, free
    # for any node, until this one has a free slot.
    time.sleep(0.4)
    assert r.zscore(ready, waiting.id) is not None and buffered_ids(b) == []
    wait_for(lambda: waiting.status() is JobState.DONE, 10, "the job to run once the slot is free")
    b.stop()
    b.join()
    assert waiting.info().attempts == 1
    assert started == ["first", "slow", "waiting"]


def test_a_buffered_job_whose_lease_is_lost_never_starts_here(
    app: JobQ, r: redis.Redis, bg: list[Background], started: list[str]
) -> None:
    app.enqueue("nap", ("first", 0.0))
    app.enqueue("nap", ("slow", 1.5))
    waiting = app.enqueue("nap", ("waiting", 0.0))
    b = one_slot_node(app, bg, lease=0.6, maintenance=False)
    wait_for(lambda: buffered_ids(b) == [waiting.id], 10, "the job buffered behind the slow one")
    # What a reaper does to an expired lease (the job then belongs to whoever claims it next).
    r.zrem(app.keys.active("default", b.worker.node), waiting.id)
    r.zrem(app.keys.leases("default"), waiting.id)
    wait_for(lambda: b.worker.stats["lost"] == 1, 5, "the heartbeat to find the lease lost")
    assert buffered_ids(b) == [] and waiting.id not in b.worker.running
    wait_for(lambda: b.worker.stats["completed"] == 2, 5, "the slow job to end")
    time.sleep(0.1)
    b.stop()
    b.join()
    assert started == ["first", "slow"]


def test_a_job_started_from_the_buffer_does_not_inherit_the_context_of_the_job_before(
    app: JobQ, started: list[str]
) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    @app.task(name="mark")
    async def mark(tag: str) -> None:
        seen.append(var.get())
        var.set(tag)
        await asyncio.sleep(0.02)

    app.enqueue("nap", ("first", 0.0))  # the node learns the run time, then buffers
    app.enqueue_many([{"task": "mark", "args": [str(i)]} for i in range(6)])
    w = Worker(app, WorkerConfig(burst=True, concurrency=1))
    asyncio.run(w.run())
    assert w.stats["completed"] == 7
    assert seen == ["unset"] * 6


def test_a_buffered_job_whose_deadline_passes_never_starts(
    app: JobQ, r: redis.Redis, bg: list[Background], started: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's deadline holds even while it waits in the buffer: when a slot frees after the
    deadline, the job is handed back, and the next claim dead-letters it as expired."""
    monkeypatch.setattr(fetcher_mod, "PREFETCH_MAX_WAIT", 30.0)  # the slot frees first
    app.enqueue("nap", ("first", 0.0))
    slow = app.enqueue("nap", ("slow", 1.0))
    late = app.enqueue("nap", ("late", 0.0), deadline=timedelta(seconds=0.6))  # start within 0.6 s
    after = app.enqueue("nap", ("after", 0.0))
    b = one_slot_node(app, bg)
    wait_for(lambda: late.id in buffered_ids(b), 10, "the deadline job buffered behind the slow one")
    wait_for(lambda: after.status() is JobState.DONE, 10, "the jobs behind it to run")
    assert slow.status() is JobState.DONE
    # Released (on the node's non-retrying connection), then dead-lettered by the next claim.
    wait_for(lambda: late.status() in (JobState.DEAD, JobState.DONE), 10, "the late job to end")
    info = late.info()
    assert info.state is JobState.DEAD and info.error == "expired"
    assert "late" not in started
    b.stop()
    b.join()
