"""Retention is bounded by count as well as by time (issue 16, item 7): a queue keeps at most
``result_max`` finished jobs (done or cancelled), like BullMQ's ``removeOnComplete: N``. Past it,
the finished jobs that expire first are deleted at once, a bounded number per ack call."""

from __future__ import annotations

import pytest
import redis

import jobq
from jobq.storage.calls import MAX_BATCH, JobSpec
from tests.integration.conftest import T0

pytestmark = pytest.mark.integration

Q = "capped"


@pytest.fixture
def capped(redis_url: str, clock: jobq.FakeClock) -> jobq.JobQ:
    return jobq.JobQ(redis_url, clock=clock, result_max={Q: 5})


def run_all(app: jobq.JobQ, queue: str, n: int, prefix: str) -> list[str]:
    """Enqueue n jobs, then claim and ack them, 3 per call, 1 ms apart (oldest first)."""
    ids = [f"{prefix}{i}" for i in range(n)]
    for s in range(0, n, MAX_BATCH):
        specs = [JobSpec(i, "t", b"\x90") for i in ids[s : s + MAX_BATCH]]
        app.run(app.store.enqueue(queue, specs, now_ms=app.now_ms()))
    done = 0
    while done < n:
        jobs = app.run(app.store.claim(queue, "n1", min(3, n - done), 30_000, now_ms=app.now_ms())).jobs
        assert jobs
        assert isinstance(app.clock, jobq.FakeClock)
        app.clock.advance(0.001)
        codes = app.run(app.store.ack(queue, "n1", [(j.id, b"\x01") for j in jobs], now_ms=app.now_ms()))
        assert set(codes) == {1}
        done += len(jobs)
    return ids


def test_a_queue_keeps_at_most_result_max_finished_jobs(capped: jobq.JobQ, r: redis.Redis) -> None:
    ids = run_all(capped, Q, 12, "a")
    # The newest 5 are kept, with their results; the older ones are gone with their hashes.
    kept: list[bytes] = r.zrange(capped.keys.finished(Q), 0, -1)  # type: ignore[assignment]
    assert sorted(m.decode() for m in kept) == sorted(ids[-5:])
    for i in ids[-5:]:
        assert capped.job(i, Q).status() is jobq.JobState.DONE
        assert r.hget(capped.keys.job(Q, i), "result") == b"\x01"
    for i in ids[:-5]:
        assert not r.exists(capped.keys.job(Q, i))
    # A queue without an override keeps the default bound (100,000): nothing trimmed there.
    other = run_all(capped, "free", 12, "b")
    assert r.zcard(capped.keys.finished("free")) == 12
    assert all(r.exists(capped.keys.job("free", i)) for i in other)


def test_cancelled_jobs_count_too(capped: jobq.JobQ, r: redis.Redis) -> None:
    for i in range(8):
        capped.enqueue("t", queue=Q, job_id=f"c{i}").cancel()
    run_all(capped, Q, 1, "d")
    assert r.zcard(capped.keys.finished(Q)) == 5
    assert sum(bool(r.exists(capped.keys.job(Q, f"c{i}"))) for i in range(8)) == 4  # + d0


def test_a_lowered_bound_is_reached_in_bounded_passes(
    redis_url: str, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    unbounded = jobq.JobQ(redis_url, clock=clock, result_max=0)
    run_all(unbounded, Q, 600, "old")
    assert r.zcard(unbounded.keys.finished(Q)) == 600
    unbounded.close()
    app = jobq.JobQ(redis_url, clock=clock, result_max=10)
    # Each ack of one job deletes at most 1 + 100 of the backlog, then the bound holds.
    sizes = []
    for i in range(7):
        run_all(app, Q, 1, f"new{i}-")
        sizes.append(r.zcard(app.keys.finished(Q)))
    assert sizes == [500, 400, 300, 200, 100, 10, 10]
    assert r.zcard(app.keys.ready(Q)) == 0
    assert len([k for k in r.scan_iter(match=f"jobq:{{{Q}}}:job:*")]) == 10
    app.close()


def test_the_bound_spares_a_newer_job_reusing_an_id(capped: jobq.JobQ, r: redis.Redis) -> None:
    run_all(capped, Q, 1, "x")
    r.delete(capped.keys.job(Q, "x0"))  # x0's retention ran out; its index entry is still there
    capped.enqueue("t", [7], queue=Q, job_id="x0", priority=-1)  # a new job takes the id
    run_all(capped, Q, 5, "y")  # 6 entries: the oldest (x0's old one) is trimmed
    assert r.zscore(capped.keys.finished(Q), "x0") is None
    jobs = capped.run(capped.store.claim(Q, "n2", 10, 30_000, now_ms=capped.now_ms())).jobs
    assert [(j.id, jobq.codec.decode_payload(j.payload)) for j in jobs] == [("x0", ([7], {}))]


def test_memory_is_bounded_by_the_cap(redis_url: str, clock: jobq.FakeClock, r: redis.Redis) -> None:
    """The figure the docs give: a kept finished job (small payload and result) costs about
    0.5 KiB, so the default bound of 100,000 is about 50 MiB per queue; and what 5,000 finished
    jobs leave behind under a bound of 1,000 is what 1,000 cost. Events off: their stream has
    its own bound (events_max; tests/integration/test_core_memory.py measures an event)."""
    app = jobq.JobQ(redis_url, clock=clock, result_max=1_000, events_max=0)
    before = int(r.info("memory")["used_memory"])
    run_all(app, Q, 5_000, "m")
    assert r.zcard(app.keys.finished(Q)) == 1_000
    per_kept = (int(r.info("memory")["used_memory"]) - before) / 1_000
    print(f"\nRedis memory per kept finished job: {per_kept:.0f} bytes")
    assert per_kept < 1024
    app.close()


def test_result_max_is_validated(redis_url: str) -> None:
    for bad in (-1, 1.5, True, {"q": -3}):
        with pytest.raises(jobq.errors.InvalidInput, match="result_max"):
            jobq.JobQ(redis_url, result_max=bad)  # type: ignore[arg-type]
    assert T0  # the fake clock's start (unused here)
