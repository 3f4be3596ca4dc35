"""Reaping expired leases, and retention: what a finished or dead job leaves behind, and when it
is gone."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

import jobq
from tests.integration.conftest import T0
from tests.integration.core_support import check_invariants, read_places

pytestmark = pytest.mark.integration

Q = "reap"


def claim(app: jobq.JobQ, node: str, n: int, lease_ms: int) -> list[str]:
    res = app.run(app.store.claim(Q, node, n, lease_ms, now_ms=app.now_ms()))
    return [j.id for j in res.jobs]


def test_reap_moves_exactly_the_expired_jobs(fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis) -> None:
    retry = [fapp.enqueue("t", queue=Q, max_attempts=3).id for _ in range(10)]
    last = [fapp.enqueue("t", queue=Q, max_attempts=1).id for _ in range(10)]
    later = [fapp.enqueue("t", queue=Q).id for _ in range(10)]
    assert claim(fapp, "n1", 20, 1_000) == retry + last
    clock.advance(0.5)
    assert claim(fapp, "n2", 10, 1_000) == later
    clock.advance(0.5)  # n1's leases end now: not yet expired
    assert fapp.run(
        fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms())
    ) == jobq.storage.calls.ReapResult([], [])
    clock.advance(0.001)
    res = fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms()))
    assert sorted(res.requeued) == sorted(retry)
    assert sorted(res.dead) == sorted(last)
    places = read_places(r, fapp.keys, Q, ["n1", "n2"])
    where = check_invariants(places, retry + last + later)
    assert all(where[i] == "active:n2" for i in later)
    assert all(where[i] == "ready" for i in retry)
    assert all(where[i] == "dead" for i in last)
    for i in retry:
        info = fapp.job(i, Q).info()
        assert (info.state, info.attempts, info.reaped) == (jobq.JobState.READY, 1, 1)
    for i in last:
        info = fapp.job(i, Q).info()
        assert info.state is jobq.JobState.DEAD
        assert info.error is not None and info.error.startswith("lease_expired")
    # Nothing more to reap; a second pass changes nothing.
    assert fapp.run(
        fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms())
    ) == jobq.storage.calls.ReapResult([], [])


def test_exhausted_after_failures_goes_dead_with_its_last_error(
    fapp: jobq.JobQ, clock: jobq.FakeClock
) -> None:
    job = fapp.enqueue("t", queue=Q, max_attempts=2)
    assert claim(fapp, "n1", 1, 1_000) == [job.id]
    res = fapp.run(fapp.store.fail(Q, "n1", job.id, "ValueError: first", delay_ms=0, now_ms=fapp.now_ms()))
    assert res.outcome == "retry"
    assert claim(fapp, "n1", 1, 1_000) == [job.id]
    res = fapp.run(fapp.store.fail(Q, "n1", job.id, "ValueError: second", now_ms=fapp.now_ms()))
    assert res.outcome == "dead"
    info = job.info()
    assert (info.state, info.attempts, info.error) == (jobq.JobState.DEAD, 2, "ValueError: second")


def test_ten_concurrent_reapers_requeue_each_job_exactly_once(
    fapp: jobq.JobQ, clock: jobq.FakeClock, redis_url: str, r: redis.Redis
) -> None:
    ids = [j.id for j in fapp.enqueue_many(jobq.EnqueueRequest("t", queue=Q) for _ in range(1_000))]
    assert sum(len(claim(fapp, "dead-node", 500, 1_000)) for _ in range(2)) == 1_000
    clock.advance(5)
    now = fapp.now_ms()
    seen: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(10)
    errors: list[BaseException] = []

    def reaper() -> None:
        app = jobq.JobQ(redis_url)
        try:
            start.wait()
            while True:
                res = app.run(app.store.reap(Q, node_ttl_ms=60_000, limit=50, now_ms=now))
                assert len(res.requeued) + len(res.dead) <= 50
                with lock:
                    seen.extend(res.requeued + res.dead)
                if not res.requeued and not res.dead:
                    return
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            app.close()

    threads = [threading.Thread(target=reaper) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = Counter(seen)
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}
    where = check_invariants(read_places(r, fapp.keys, Q, ["dead-node"]), ids)
    assert set(where.values()) == {"ready"}
    pipe = r.pipeline(transaction=False)
    for i in ids:
        pipe.hmget(fapp.keys.job(Q, i), "attempts", "reaped")
    assert {(int(a), int(b)) for a, b in pipe.execute()} == {(1, 1)}


def test_silent_node_repair_requeues_active_entries_without_a_lease(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    job = fapp.enqueue("t", queue=Q)
    assert claim(fapp, "n1", 1, 60_000) == [job.id]
    fapp.run(fapp.store.extend(Q, "n1", 60_000, now_ms=fapp.now_ms()))
    r.zrem(fapp.keys.leases(Q), job.id)  # a lost lease entry (I2 broken from outside)
    clock.advance(10)
    res = fapp.run(fapp.store.reap(Q, node_ttl_ms=5_000, now_ms=fapp.now_ms()))
    assert res.requeued == [job.id]
    check_invariants(read_places(r, fapp.keys, Q, ["n1"]), [job.id])
    assert r.zscore(fapp.keys.queue_nodes(Q), "n1") is None
    assert not r.exists(fapp.keys.active(Q, "n1"))


def test_reap_guard_skips_a_second_reaper_within_the_interval(fapp: jobq.JobQ) -> None:
    first = fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, guard_ms=60_000))
    second = fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, guard_ms=60_000))
    assert not first.skipped and second.skipped


# -- retention ----------------------------------------------------------------------------------
def wait_for_keys(r: redis.Redis, expected: set[bytes], timeout: float) -> set[bytes]:
    """Poll the keyspace (Redis expires keys by itself) until it is ``expected`` or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        if r.dbsize() <= len(expected):
            keys = set(r.scan_iter(count=1000))
            if keys == expected:
                return keys
        if time.monotonic() > deadline:
            return set(r.scan_iter(count=1000))
        time.sleep(0.1)


def test_100000_finished_jobs_leave_no_keys_after_their_retention(redis_url: str, r: redis.Redis) -> None:
    app = jobq.JobQ(redis_url, result_ttl=3.0)
    try:
        for _ in range(100):
            app.enqueue_many(jobq.EnqueueRequest("t", queue=Q) for _ in range(1_000))
        done = 0
        while True:
            res = app.run(app.store.claim(Q, "n1", jobq.storage.calls.MAX_BATCH, 60_000))
            if not res.jobs:
                break
            codes = app.run(app.store.ack(Q, "n1", [(j.id, b"\x01") for j in res.jobs]))
            assert set(codes) == {1}
            done += len(codes)
            # Each finished job is kept, with its result, for the retention time.
            assert 0 < r.pttl(app.keys.job(Q, res.jobs[-1].id)) <= 3_000
        assert done == 100_000
        assert r.dbsize() > 1_000
        # Only the permanent bookkeeping keys stay: the queue registry, its FIFO counter and its
        # event stream (capped by length).
        permanent = {app.keys.queues.encode(), app.keys.seq(Q).encode(), app.keys.events(Q).encode()}
        assert wait_for_keys(r, permanent, timeout=20) == permanent
    finally:
        app.close()


def test_retention_zero_deletes_at_once_and_dead_letters_are_bounded(redis_url: str, r: redis.Redis) -> None:
    app = jobq.JobQ(redis_url, result_ttl=0, dead_max=5)
    try:
        jobs = app.enqueue_many(jobq.EnqueueRequest("t", queue=Q, max_attempts=1) for _ in range(10))
        res = app.run(app.store.claim(Q, "n1", 10, 60_000))
        assert app.run(app.store.ack(Q, "n1", [(res.jobs[0].id, b"")])) == [1]
        assert not r.exists(app.keys.job(Q, jobs[0].id))
        for j in res.jobs[1:]:
            assert app.run(app.store.fail(Q, "n1", j.id, "boom")).outcome == "dead"
        dead = [m.decode() for m in r.zrange(app.keys.dead(Q), 0, -1)]
        assert len(dead) == 5
        # The trimmed dead jobs' hashes are gone too.
        assert sum(r.exists(app.keys.job(Q, j.id)) for j in jobs) == 5
        permanent = {
            app.keys.queues.encode(),
            app.keys.seq(Q).encode(),
            app.keys.dead(Q).encode(),
            app.keys.events(Q).encode(),
        }
        # The ack's call id, kept a minute so a re-sent ack is told apart (it expires).
        acked = app.keys.acked(Q, "n1").encode()
        assert 0 < r.pttl(acked) <= 60_000
        assert set(r.scan_iter()) == permanent | {acked} | {app.keys.job(Q, i).encode() for i in dead}
    finally:
        app.close()


def test_dead_letters_expire_by_age_even_when_nothing_new_dies(redis_url: str, r: redis.Redis) -> None:
    clock = jobq.FakeClock(T0)
    app = jobq.JobQ(redis_url, clock=clock, dead_ttl=60)
    try:
        jobs = app.enqueue_many(jobq.EnqueueRequest("t", queue=Q, max_attempts=1) for _ in range(3))
        res = app.run(app.store.claim(Q, "n1", 3, 60_000, now_ms=app.now_ms()))
        for j in res.jobs:
            app.run(app.store.fail(Q, "n1", j.id, "boom", now_ms=app.now_ms()))
        # A dead job's hash carries the age bound as a TTL (a backstop; I5)...
        assert all(0 < r.pttl(app.keys.job(Q, j.id)) <= 60_000 for j in jobs)
        # ... and retrying it makes it permanent again.
        app.run(app.store.retry_dead(Q, [jobs[0].id], now_ms=app.now_ms()))
        assert r.pttl(app.keys.job(Q, jobs[0].id)) == -1
        clock.advance(61)
        app.run(app.store.reap(Q, node_ttl_ms=60_000, now_ms=app.now_ms()))
        assert r.zcard(app.keys.dead(Q)) == 0
        assert [r.exists(app.keys.job(Q, j.id)) for j in jobs] == [1, 0, 0]
    finally:
        app.close()
