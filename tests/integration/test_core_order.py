"""Priority and FIFO order (RELIABILITY B4): higher priority first, FIFO within a priority, exact
integer scores at the boundaries."""

from __future__ import annotations

import random
from collections.abc import Iterator
from decimal import Decimal

import pytest
import redis

import jobq
from jobq.app import MAX_TIME_MS
from jobq.storage.calls import MAX_PRIORITY, MIN_PRIORITY

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
Q = "order"


@pytest.fixture
def fapp(redis_url: str) -> Iterator[jobq.JobQ]:
    """An app on a frozen clock: every job below is enqueued in the same millisecond."""
    a = jobq.JobQ(redis_url, clock=jobq.FakeClock(T0))
    yield a
    a.close()


def claim_all(app: jobq.JobQ, node: str = "n1") -> list[str]:
    out: list[str] = []
    while True:
        res = app.run(app.store.claim(Q, node, jobq.storage.calls.MAX_BATCH, 30_000, now_ms=app.now_ms()))
        if not res.jobs:
            return out
        out += [j.id for j in res.jobs]


def test_10000_random_jobs_claim_by_priority_then_fifo(fapp: jobq.JobQ) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    reqs = [
        jobq.EnqueueRequest(
            "t",
            queue=Q,
            priority=rng.choice([MIN_PRIORITY, MAX_PRIORITY, 0, rng.randint(MIN_PRIORITY, MAX_PRIORITY)]),
        )
        for _ in range(10_000)
    ]
    jobs = fapp.enqueue_many(reqs)
    assert len({j.id for j in jobs}) == 10_000
    # The expected order: priority descending; ties keep enqueue order (a stable sort).
    expected = [jobs[i].id for i in sorted(range(10_000), key=lambda i: -(reqs[i].priority or 0))]
    assert claim_all(fapp) == expected, f"seed={seed}"


def test_fifo_holds_across_separate_enqueues_in_one_ms(fapp: jobq.JobQ) -> None:
    ids = [fapp.enqueue("t", queue=Q, priority=7).id for _ in range(300)]
    low = fapp.enqueue("t", queue=Q, priority=6).id
    ids_after = [fapp.enqueue("t", queue=Q, priority=7).id for _ in range(5)]
    assert claim_all(fapp) == [*ids, *ids_after, low]


def test_boundary_priorities_have_exact_scores(fapp: jobq.JobQ, r: redis.Redis) -> None:
    top = fapp.enqueue("t", queue=Q, priority=MAX_PRIORITY)
    bottom = fapp.enqueue("t", queue=Q, priority=MIN_PRIORITY)
    seq = int(r.get(fapp.keys.seq(Q)) or 0)
    span = 2**44
    # Scores are exact integers below 2^53 (Redis stores doubles).
    assert r.zscore(fapp.keys.ready(Q), top.id) == (100 - MAX_PRIORITY) * span + seq - 1
    assert r.zscore(fapp.keys.ready(Q), bottom.id) == (100 - MIN_PRIORITY) * span + seq
    assert (100 - MIN_PRIORITY) * span + 2**44 < 2**53
    assert claim_all(fapp) == [top.id, bottom.id]
    for bad in (MAX_PRIORITY + 1, MIN_PRIORITY - 1):
        with pytest.raises(jobq.InvalidInput, match="priority"):
            fapp.enqueue("t", queue=Q, priority=bad)


def test_run_at_at_the_exact_integer_limit(fapp: jobq.JobQ, r: redis.Redis) -> None:
    # A float cannot hold this many seconds to the ms; Decimal (or int, Fraction) is exact.
    job = fapp.enqueue("t", queue=Q, run_at=Decimal(MAX_TIME_MS) / 1000)
    assert job.status() is jobq.JobState.SCHEDULED
    assert r.zscore(fapp.keys.scheduled(Q), job.id) == float(MAX_TIME_MS)
    assert int(r.hget(job.key, "run_at_ms") or 0) == MAX_TIME_MS
    with pytest.raises(jobq.InvalidInput, match="run_at"):
        fapp.enqueue("t", queue=Q, run_at=Decimal(MAX_TIME_MS + 1) / 1000)
    with pytest.raises(jobq.InvalidInput, match="delay"):
        fapp.enqueue("t", queue=Q, delay=Decimal(MAX_TIME_MS + 1) / 1000)


def test_promoted_jobs_queue_behind_ready_jobs_of_their_priority(fapp: jobq.JobQ) -> None:
    clock = fapp.clock
    assert isinstance(clock, jobq.FakeClock)
    delayed = [fapp.enqueue("t", queue=Q, priority=1, delay=5).id for _ in range(3)]
    ready = [fapp.enqueue("t", queue=Q, priority=1).id for _ in range(3)]
    high = fapp.enqueue("t", queue=Q, priority=2, delay=5).id
    clock.advance(5)
    # Due jobs are promoted in run-at order (then id order for the same ms), behind the jobs
    # already ready at their priority; a higher priority still goes first.
    assert claim_all(fapp) == [high, *ready, *sorted(delayed)]


def test_released_and_reaped_jobs_keep_their_place(fapp: jobq.JobQ) -> None:
    clock = fapp.clock
    assert isinstance(clock, jobq.FakeClock)
    ids = [fapp.enqueue("t", queue=Q).id for _ in range(6)]
    res = fapp.run(fapp.store.claim(Q, "n1", 2, 1000, now_ms=fapp.now_ms()))
    assert [j.id for j in res.jobs] == ids[:2]
    fapp.run(fapp.store.release(Q, "n1", [ids[1]], now_ms=fapp.now_ms()))
    clock.advance(2)
    reaped = fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms()))
    assert reaped.requeued == [ids[0]]
    assert claim_all(fapp, "n2") == ids
