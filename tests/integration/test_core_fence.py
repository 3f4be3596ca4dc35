"""The per-attempt fence, interruptions and what scripts report, on a real redis-server (issue 16,
items 1, 2, 4 and 5): every completion (ack, fail, release) names the attempt the claim returned,
and Redis refuses any other attempt's, even one of the same node; a released job that started
keeps its attempt and counts an interruption; a repeated completion of one attempt is answered
"already done by this attempt"; dead letters trimmed by count are reported."""

from __future__ import annotations

import dataclasses

import pytest
import redis

import jobq
from jobq import codec
from jobq.worker import Worker, WorkerConfig
from jobq.worker.heartbeat import BeatResult, Heartbeat
from tests.integration.conftest import T0
from tests.integration.core_support import assert_unchanged, snapshot

pytestmark = pytest.mark.integration

Q = "fence"
LEASE_MS = 1_000


def claim_one(app: jobq.JobQ, node: str) -> jobq.storage.calls.ClaimedJob:
    res = app.run(app.store.claim(Q, node, 1, LEASE_MS, now_ms=app.now_ms()))
    assert len(res.jobs) == 1
    return res.jobs[0]


# -- 1. the fence is per attempt ------------------------------------------------------------------
def test_a_reaped_attempt_cannot_complete_a_job_its_node_claimed_again(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    """The issue's sequence: node A claims X (attempt 1), is paused past its lease, X is reaped
    back to the head of ready, A claims it again (attempt 2); attempt 1's queued fail(dead) and
    ack are refused as stale and change nothing, attempt 2's ack finishes the job."""
    job = fapp.enqueue("t", queue=Q, max_attempts=5)
    first = claim_one(fapp, "a")
    assert first.attempts == 1
    clock.advance(2 * LEASE_MS / 1000)
    assert fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms())).requeued == [job.id]
    second = claim_one(fapp, "a")
    assert second.id == job.id and second.attempts == 2
    before, size = snapshot(r), r.dbsize()
    stale = fapp.run(
        fapp.store.fail(Q, "a", job.id, "attempt 1 failed", dead=True, attempt=1, now_ms=fapp.now_ms())
    )
    assert stale.outcome == "lease_lost" and not stale.repeated
    old_result = codec.encode_result("attempt 1", 1 << 20)
    assert fapp.run(fapp.store.ack(Q, "a", [(job.id, old_result)], attempts=[1], now_ms=fapp.now_ms())) == [
        -2
    ]
    assert fapp.run(fapp.store.release(Q, "a", [job.id], attempts=[1], now_ms=fapp.now_ms())).released == 0
    assert_unchanged(r, before, size)
    new_result = codec.encode_result("attempt 2", 1 << 20)
    assert fapp.run(fapp.store.ack(Q, "a", [(job.id, new_result)], attempts=[2], now_ms=fapp.now_ms())) == [1]
    assert job.result(timeout=1) == "attempt 2"
    info = job.info()
    assert info.state is jobq.JobState.DONE and info.attempts == 2 and info.reaped == 1
    # The stale attempt, again: still refused, the winner's result stands.
    assert fapp.run(fapp.store.ack(Q, "a", [(job.id, old_result)], attempts=[1], now_ms=fapp.now_ms())) == [
        -2
    ]
    assert job.result(timeout=1) == "attempt 2"


def test_a_batch_ack_refuses_only_the_stale_attempts(fapp: jobq.JobQ, clock: jobq.FakeClock) -> None:
    jobs = [fapp.enqueue("t", queue=Q) for _ in range(3)]
    res = fapp.run(fapp.store.claim(Q, "a", 3, LEASE_MS, now_ms=fapp.now_ms()))
    assert [j.attempts for j in res.jobs] == [1, 1, 1]
    codes = fapp.run(
        fapp.store.ack(Q, "a", [(j.id, b"") for j in jobs], attempts=[1, 2, None], now_ms=fapp.now_ms())
    )
    assert codes == [1, -2, 1]  # None: whichever attempt this node holds


def reaped_and_claimed_again(
    app: jobq.JobQ, clock: jobq.FakeClock, node: str
) -> jobq.storage.calls.ClaimedJob:
    """``node``'s claim of the head job expires, the job is reaped and ``node`` claims it again."""
    clock.advance(2 * LEASE_MS / 1000)
    assert len(app.run(app.store.reap(Q, node_ttl_ms=60_000, now_ms=app.now_ms())).requeued) == 1
    return claim_one(app, node)


def test_a_claim_from_before_a_dead_retry_cannot_complete_the_job_claimed_again(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    """Node A's attempt 1 is reaped while A is paused; the job goes dead on node B; an operator
    retries it (attempts back to 0) and A claims it again: attempt 1 once more, but another
    claim. Attempt 1's queued completions from before the retry name the old claim's fence
    token and are refused; the new claim's token finishes the job."""
    job = fapp.enqueue("t", queue=Q, max_attempts=2)
    first = claim_one(fapp, "a")
    assert (first.attempts, first.token) == (1, 1)
    assert not r.hexists(fapp.keys.job(Q, job.id), "base")  # never retried from dead: no field
    second = reaped_and_claimed_again(fapp, clock, "b")
    assert (second.attempts, second.token) == (2, 2)
    died = fapp.run(fapp.store.fail(Q, "b", job.id, "boom", attempt=second.fence, now_ms=fapp.now_ms()))
    assert died.outcome == "dead"
    assert fapp.run(fapp.store.retry_dead(Q, [job.id], now_ms=fapp.now_ms())) == 1
    again = claim_one(fapp, "a")
    assert again.attempts == 1 and again.token == 3 and again.fence == 3  # tasks still see attempt 1
    assert r.hget(fapp.keys.job(Q, job.id), "base") == b"2"
    before, size = snapshot(r), r.dbsize()
    now = fapp.now_ms()
    stale = fapp.run(fapp.store.fail(Q, "a", job.id, "old run", dead=True, attempt=first.fence, now_ms=now))
    assert stale.outcome == "lease_lost" and not stale.repeated
    old = codec.encode_result("before the retry", 1 << 20)
    assert fapp.run(fapp.store.ack(Q, "a", [(job.id, old)], attempts=[first.fence], now_ms=now)) == [-2]
    assert fapp.run(fapp.store.release(Q, "a", [job.id], attempts=[first.fence], now_ms=now)).released == 0
    assert fapp.run(fapp.store.progress(Q, "a", job.id, first.fence, 0.5, now_ms=now)) == -2
    assert_unchanged(r, before, size)
    assert fapp.run(fapp.store.progress(Q, "a", job.id, again.fence, 0.5, now_ms=now)) == 1
    new = codec.encode_result("after the retry", 1 << 20)
    assert fapp.run(fapp.store.ack(Q, "a", [(job.id, new)], attempts=[again.fence], now_ms=now)) == [1]
    assert job.result(timeout=1) == "after the retry"
    info = job.info()
    assert info.state is jobq.JobState.DONE and info.attempts == 1
    assert r.hget(fapp.keys.job(Q, job.id), "finished_by") == b"a:3"
    # The new claim's ack again: a repeat, not a stale completion; the old one's: still refused.
    assert fapp.run(fapp.store.ack(Q, "a", [(job.id, new)], attempts=[again.fence], now_ms=now)) == [0]
    assert fapp.run(fapp.store.ack(Q, "a", [(job.id, old)], attempts=[first.fence], now_ms=now)) == [-2]


def test_extend_returns_the_fence_token_of_the_claim_that_holds_each_id(
    fapp: jobq.JobQ, clock: jobq.FakeClock
) -> None:
    """A node's renewal names, with each id it owns, the claim that holds it: a run of an older
    claim of the same id (here attempt 1, reaped and claimed again by the same node) can tell
    that the lease is not its own."""
    job = fapp.enqueue("t", queue=Q, max_attempts=5)
    other = fapp.enqueue("t", queue=Q, priority=-1)
    first = claim_one(fapp, "a")
    assert first.id == job.id
    res = fapp.run(fapp.store.extend(Q, "a", LEASE_MS, now_ms=fapp.now_ms()))
    assert res.owned_tokens() == {job.id: 1}
    second = reaped_and_claimed_again(fapp, clock, "a")
    assert second.id == job.id and second.fence == 2
    assert claim_one(fapp, "a").id == other.id
    res = fapp.run(fapp.store.extend(Q, "a", LEASE_MS, now_ms=fapp.now_ms()))
    assert res.owned_tokens() == {job.id: 2, other.id: 1}


def test_the_heartbeat_reports_a_held_run_of_an_older_claim_as_lost(
    fapp: jobq.JobQ, clock: jobq.FakeClock
) -> None:
    """The node holds a run of attempt 1 while Redis holds the job for this node's attempt 2 (a
    claim whose reply the node never saw): the id is owned, but not by the run held, so the
    heartbeat reports that run lost, as it does a run whose id is not owned at all; a run of
    the claim Redis holds is not lost."""
    job = fapp.enqueue("t", queue=Q, max_attempts=5)
    first = claim_one(fapp, "a")
    assert reaped_and_claimed_again(fapp, clock, "a").fence == first.fence + 1
    held = {job.id: first.fence}
    # The app's own runner: a plain client on standalone, a cluster client on the cluster leg.
    hb = Heartbeat(
        fapp,
        fapp.runner,
        "a",
        [Q],
        LEASE_MS,
        known=lambda: {Q: set(held)},
        fences=lambda: dict(held),
        on_beat=lambda _: None,
        on_fence=lambda *_: None,
        info=lambda: {"concurrency": 1, "inflight": 1, "busy": 1},
    )
    beat = hb.beat()
    assert beat is not None
    assert beat.lost == {Q: {job.id}} and beat.fences == {job.id: first.fence}
    assert beat.unknown == {}
    held[job.id] = first.fence + 1  # the run of the claim Redis holds
    beat = hb.beat()
    assert beat is not None and beat.lost == {} and beat.unknown == {}


def test_a_beat_judged_on_an_older_claim_does_not_lose_the_run_that_replaced_it(fapp: jobq.JobQ) -> None:
    """The heartbeat judged a run of claim 1 lost; before the loop acts on it, the node's newer
    claim of the job (claim 2) replaced that run: the newer run is not the one lost."""
    job = fapp.enqueue("t", queue=Q, max_attempts=5)
    w = Worker(fapp, WorkerConfig(queues=[(Q, 1)], node_id="a"))
    newer = claim_one(fapp, "a")
    run = w.held.add(dataclasses.replace(newer, attempts=2, token=2), 0.0, fapp.now_ms())
    w._on_beat(BeatResult(fapp.now_ms(), {Q: {job.id}}, {}, {}, {job.id: 1}))
    assert not run.lost and w.held.get(job.id) is run
    w._on_beat(BeatResult(fapp.now_ms(), {Q: {job.id}}, {}, {}, {job.id: 2}))
    assert run.lost


# -- 2. releasing a started job counts an interruption ---------------------------------------------
def test_a_started_job_released_keeps_its_attempt_and_dies_at_max_interruptions(fapp: jobq.JobQ) -> None:
    job = fapp.enqueue("t", queue=Q, max_attempts=3)
    for n in range(1, 5):
        run = claim_one(fapp, "a")
        assert run.attempts == n  # every run is counted: interruptions do not hand attempts back
        res = fapp.run(
            fapp.store.release(Q, "a", [job.id], attempts=[n], max_interruptions=[5], now_ms=fapp.now_ms())
        )
        assert (res.released, res.interrupted, res.dead) == (1, 1, [])
        info = job.info()
        assert info.state is jobq.JobState.READY and info.attempts == n and info.interrupted == n
    claim_one(fapp, "a")
    res = fapp.run(
        fapp.store.release(Q, "a", [job.id], attempts=[5], max_interruptions=[5], now_ms=fapp.now_ms())
    )
    assert res.released == 0 and len(res.dead) == 1 and res.dead[0][0] == job.id
    assert res.dead[0][1].startswith("interrupted")
    info = job.info()
    assert info.state is jobq.JobState.DEAD and info.interrupted == 5
    assert info.error is not None and info.error.startswith("interrupted")


def test_a_never_started_job_released_gives_its_attempt_back(fapp: jobq.JobQ) -> None:
    job = fapp.enqueue("t", queue=Q)
    for _ in range(6):
        run = claim_one(fapp, "a")
        assert run.attempts == 1
        res = fapp.run(fapp.store.release(Q, "a", [job.id], attempts=[1], now_ms=fapp.now_ms()))
        assert (res.released, res.interrupted) == (1, 0)
    info = job.info()
    assert info.state is jobq.JobState.READY and info.attempts == 0 and info.interrupted == 0


# -- 4. a repeated completion of one attempt is not a new event ------------------------------------
def test_a_repeated_fail_of_one_attempt_is_answered_as_a_repeat(fapp: jobq.JobQ) -> None:
    job = fapp.enqueue("t", queue=Q, max_attempts=3)
    claim_one(fapp, "a")
    call = fapp.store.fail(Q, "a", job.id, "boom", delay_ms=5_000, attempt=1, now_ms=fapp.now_ms())
    first = fapp.run(call)
    assert first.outcome == "retry" and not first.repeated
    again = fapp.run(call)  # the same call re-sent after its reply was lost
    assert again.outcome == "retry" and again.repeated and again.run_at_ms == first.run_at_ms
    # A re-sent dead-letter fail likewise.
    other = fapp.enqueue("t", queue=Q)
    claim_one(fapp, "a")
    dead = fapp.store.fail(Q, "a", other.id, "fatal", dead=True, attempt=1, now_ms=fapp.now_ms())
    assert fapp.run(dead).outcome == "dead"
    res = fapp.run(dead)
    assert res.outcome == "dead" and res.repeated


def test_a_repeated_ack_with_retention_zero_is_answered_already_done(redis_url: str, r: redis.Redis) -> None:
    app = jobq.JobQ(redis_url, clock=jobq.FakeClock(T0), result_ttl=0)
    try:
        job = app.enqueue("t", queue=Q)
        claim_one(app, "a")
        call = app.store.ack(Q, "a", [(job.id, b"")], attempts=[1], now_ms=app.now_ms())
        assert app.run(call) == [1]
        assert not r.exists(job.key)
        assert app.run(call) == [0]  # the same call again: not "no such job"
        # A new call about the same (deleted) job is not a repeat.
        assert app.run(app.store.ack(Q, "a", [(job.id, b"")], attempts=[1], now_ms=app.now_ms())) == [-1]
    finally:
        app.close()


# -- 5. nothing disappears silently ---------------------------------------------------------------
def test_scripts_report_dead_letters_trimmed_by_count(redis_url: str) -> None:
    app = jobq.JobQ(redis_url, clock=jobq.FakeClock(T0), dead_max=2)
    try:
        jobs = [app.enqueue("t", queue=Q, max_attempts=1) for _ in range(4)]
        trimmed = []
        for j in jobs:
            claim_one(app, "a")
            res = app.run(app.store.fail(Q, "a", j.id, "boom", attempt=1, now_ms=app.now_ms()))
            assert res.outcome == "dead"
            trimmed.append(res.dead_trimmed)
        assert trimmed == [0, 0, 1, 1]
        # At claim (a job past its deadline) and at release (an id without a job hash).
        late = app.enqueue("t", queue=Q, deadline=app.now_ms() / 1000 + 1)
        app.clock.advance(2)  # type: ignore[attr-defined]
        res = app.run(app.store.claim(Q, "a", 1, LEASE_MS, now_ms=app.now_ms()))
        assert res.dead == [(late.id, "expired")] and res.dead_trimmed == 1
        gone = app.enqueue("t", queue=Q)
        claim_one(app, "a")
        app.client.hdel(gone.key, "priority")  # a hash reap cannot requeue either
        rel = app.run(app.store.release(Q, "a", [gone.id], now_ms=app.now_ms()))
        assert rel.released == 0 and rel.dead == [(gone.id, "missing_job")] and rel.dead_trimmed == 1
    finally:
        app.close()


def test_release_dead_letters_a_job_without_priority_as_reap_does(fapp: jobq.JobQ, r: redis.Redis) -> None:
    job = fapp.enqueue("t", queue=Q)
    claim_one(fapp, "a")
    r.hdel(job.key, "priority")
    res = fapp.run(fapp.store.release(Q, "a", None, now_ms=fapp.now_ms()))
    assert res.released == 0 and res.dead == [(job.id, "missing_job")]
    assert r.zscore(fapp.keys.dead(Q), job.id) is not None
    assert r.zcard(fapp.keys.active(Q, "a")) == 0 and r.zcard(fapp.keys.leases(Q)) == 0
    assert job.status() is jobq.JobState.DEAD


def test_the_reaper_logs_and_reports_dead_letters_trimmed_by_count(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """dead_max lowered below the list's size: the next reap deletes the oldest, reports how many
    and logs one line for the pass; the worker counts them in jobq_dead_trimmed_total."""
    import asyncio

    from jobq.metrics import Metrics
    from jobq.storage.calls import AsyncRunner
    from jobq.storage.clients import async_client
    from jobq.worker.reaper import Reaper

    big = jobq.JobQ(redis_url, dead_max=10)
    small = jobq.JobQ(redis_url, dead_max=1)
    try:
        for i in range(3):
            j = big.enqueue("t", queue=Q, max_attempts=1, job_id=f"d{i}")
            big.run(big.store.claim(Q, "a", 1, LEASE_MS))
            assert big.run(big.store.fail(Q, "a", j.id, "boom", attempt=1)).outcome == "dead"

        async def reap() -> dict[str, int]:
            client = async_client(redis_url)
            try:
                reaper = Reaper(small, AsyncRunner(client), [Q], node_ttl_ms=60_000, interval=1.0)
                return (await reaper.run_once(guard=False)).trimmed
            finally:
                await client.aclose()

        with caplog.at_level("WARNING", logger="jobq.reaper"):
            assert asyncio.run(reap()) == {Q: 2}
        lines = [x.getMessage() for x in caplog.records if "dead letter(s) deleted" in x.getMessage()]
        assert len(lines) == 1 and "2 dead letter(s)" in lines[0] and "dead_max (1)" in lines[0]
        assert [m.decode() for m in small.client.zrange(small.keys.dead(Q), 0, -1)] == ["d2"]
        m = Metrics(small, collect_queues=False)
        m.dead_trimmed_by_count(Q, 2)
        assert f'jobq_dead_trimmed_total{{queue="{Q}"}} 2.0' in m.exposition().decode()
    finally:
        big.close()
        small.close()
