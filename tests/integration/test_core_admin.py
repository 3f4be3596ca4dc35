"""promote, retry_dead, purge and pause on a real redis-server."""

from __future__ import annotations

import pytest
import redis

import jobq
from tests.integration.conftest import T0
from tests.integration.core_support import check_invariants, read_places

pytestmark = pytest.mark.integration

Q = "admin"


def test_promote_moves_only_due_jobs_and_reports_the_next(fapp: jobq.JobQ, clock: jobq.FakeClock) -> None:
    soon = [fapp.enqueue("t", queue=Q, delay=10).id for _ in range(3)]
    later = fapp.enqueue("t", queue=Q, delay=60).id
    res = fapp.run(fapp.store.promote(Q, now_ms=fapp.now_ms()))
    assert (res.promoted, res.next_due_ms, res.now_ms) == (0, T0 + 10_000, T0)
    clock.advance(10)
    res = fapp.run(fapp.store.promote(Q, limit=2, now_ms=fapp.now_ms()))
    assert (res.promoted, res.next_due_ms) == (2, T0 + 10_000)
    res = fapp.run(fapp.store.promote(Q, now_ms=fapp.now_ms()))
    assert (res.promoted, res.next_due_ms) == (1, T0 + 60_000)
    assert [fapp.job(i, Q).status() for i in soon] == [jobq.JobState.READY] * 3
    assert fapp.job(later, Q).status() is jobq.JobState.SCHEDULED


def test_retry_dead_resets_attempts_and_takes_the_unique_key_back(fapp: jobq.JobQ, r: redis.Redis) -> None:
    job = fapp.enqueue("t", queue=Q, max_attempts=1, unique_key="once")
    fapp.run(fapp.store.claim(Q, "n1", 1, 1000, now_ms=fapp.now_ms()))
    assert fapp.run(fapp.store.fail(Q, "n1", job.id, "boom", now_ms=fapp.now_ms())).outcome == "dead"
    assert not r.exists(fapp.keys.unique(Q, "once"))
    assert fapp.run(fapp.store.retry_dead(Q, [job.id], now_ms=fapp.now_ms())) == 1
    info = job.info()
    assert (info.state, info.attempts, info.error) == (jobq.JobState.READY, 0, "boom")
    assert r.get(fapp.keys.unique(Q, "once")) == job.id.encode()
    assert fapp.enqueue("t", queue=Q, unique_key="once").id == job.id
    # Retrying an id that is not dead does nothing.
    assert fapp.run(fapp.store.retry_dead(Q, [job.id, "ghost"], now_ms=fapp.now_ms())) == 0
    check_invariants(read_places(r, fapp.keys, Q, ["n1"]), [job.id])


def test_purge_deletes_waiting_jobs_and_their_unique_keys_but_never_running_ones(
    fapp: jobq.JobQ, r: redis.Redis
) -> None:
    running = fapp.enqueue("t", queue=Q, priority=5)
    waiting = [fapp.enqueue("t", queue=Q, unique_key=f"u{i}").id for i in range(5)]
    fapp.run(fapp.store.claim(Q, "n1", 1, 60_000, now_ms=fapp.now_ms()))
    assert running.status() is jobq.JobState.ACTIVE
    total = 0
    while n := fapp.run(fapp.store.purge(Q, "ready", limit=2)):
        total += n
    assert total == 5
    assert not any(r.exists(fapp.keys.job(Q, i)) for i in waiting)
    assert not any(r.exists(fapp.keys.unique(Q, f"u{i}")) for i in range(5))
    assert running.status() is jobq.JobState.ACTIVE
    check_invariants(read_places(r, fapp.keys, Q, ["n1"]), [running.id])
    with pytest.raises(jobq.InvalidInput, match="state"):
        fapp.store.purge(Q, "active")


def test_a_paused_queue_claims_nothing_and_keeps_its_order(fapp: jobq.JobQ, r: redis.Redis) -> None:
    ids = [fapp.enqueue("t", queue=Q).id for _ in range(3)]
    r.set(fapp.keys.paused(Q), 1)
    res = fapp.run(fapp.store.claim(Q, "n1", 10, 1000, now_ms=fapp.now_ms()))
    assert res.jobs == [] and res.dead == []
    r.delete(fapp.keys.paused(Q))
    res = fapp.run(fapp.store.claim(Q, "n1", 10, 1000, now_ms=fapp.now_ms()))
    assert [j.id for j in res.jobs] == ids


def test_max_depth_refuses_the_whole_batch(redis_url: str, r: redis.Redis) -> None:
    app = jobq.JobQ(redis_url, max_depth={Q: 3})
    try:
        app.enqueue_many(jobq.EnqueueRequest("t", queue=Q) for _ in range(2))
        size = r.dbsize()
        with pytest.raises(jobq.QueueFull, match="max depth 3"):
            app.enqueue_many(jobq.EnqueueRequest("t", queue=Q) for _ in range(2))
        assert r.dbsize() == size
        app.enqueue("t", queue=Q)
        app.enqueue_many(jobq.EnqueueRequest("t", queue="other") for _ in range(5))  # no limit there
    finally:
        app.close()


def test_claim_dead_letters_corrupt_entries_instead_of_running_them(fapp: jobq.JobQ, r: redis.Redis) -> None:
    """B2 at the script level: an id in ready whose job hash is missing, or whose job key holds
    another type, is dead-lettered with the reason; the good job behind them is claimed."""
    good = fapp.enqueue("t", queue=Q, priority=-1)
    r.zadd(fapp.keys.ready(Q), {"ghost": 1, "wrong": 2})
    r.set(fapp.keys.job(Q, "wrong"), "not a hash")
    res = fapp.run(fapp.store.claim(Q, "n1", 10, 1000, now_ms=fapp.now_ms()))
    assert [j.id for j in res.jobs] == [good.id]
    assert sorted(res.dead) == [("ghost", "missing_job"), ("wrong", "wrong_type")]
    assert r.get(fapp.keys.job(Q, "wrong")) == b"not a hash"  # never overwritten
    assert fapp.job("ghost", Q).info().error == "missing_job"
    check_invariants(read_places(r, fapp.keys, Q, ["n1"]), [good.id, "ghost", "wrong"])
