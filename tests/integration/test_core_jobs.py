"""Job lifecycle on a real redis-server: unique keys, the ownership fence, deadlines, the Job
handle, per-call options and enqueue_many's round trips."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import redis

import jobq
from jobq import codec
from tests.harness.cluster import owner_client
from tests.integration.conftest import T0
from tests.integration.core_support import assert_unchanged, snapshot

pytestmark = pytest.mark.integration

Q = "jobs"


def claim(app: jobq.JobQ, node: str, n: int = 1, lease_ms: int = 10_000) -> list[str]:
    res = app.run(app.store.claim(Q, node, n, lease_ms, now_ms=app.now_ms()))
    return [j.id for j in res.jobs]


def ack(app: jobq.JobQ, node: str, job_id: str, result: object = None) -> int:
    data = b"" if result is None else codec.encode_result(result, 1 << 20)
    return app.run(app.store.ack(Q, node, [(job_id, data)], now_ms=app.now_ms()))[0]


# -- unique keys --------------------------------------------------------------------------------
def test_unique_key_returns_the_existing_job_and_frees_when_it_finishes(fapp: jobq.JobQ) -> None:
    first = fapp.enqueue("t", queue=Q, unique_key="report-42")
    again = fapp.enqueue("t", ("other args",), queue=Q, unique_key="report-42")
    assert again.id == first.id
    assert claim(fapp, "n1") == [first.id]
    # Still running: still held.
    assert fapp.enqueue("t", queue=Q, unique_key="report-42").id == first.id
    assert ack(fapp, "n1", first.id) == 1
    fresh = fapp.enqueue("t", queue=Q, unique_key="report-42")
    assert fresh.id != first.id
    assert fresh.status() is jobq.JobState.READY


def test_unique_key_frees_after_dead_letter_and_cancel(fapp: jobq.JobQ) -> None:
    a = fapp.enqueue("t", queue=Q, unique_key="u", max_attempts=1)
    assert claim(fapp, "n1") == [a.id]
    res = fapp.run(fapp.store.fail(Q, "n1", a.id, "boom", now_ms=fapp.now_ms()))
    assert res.outcome == "dead"
    b = fapp.enqueue("t", queue=Q, unique_key="u")
    assert b.id != a.id
    b.cancel()
    assert b.status() is jobq.JobState.CANCELLED
    c = fapp.enqueue("t", queue=Q, unique_key="u")
    assert c.id not in (a.id, b.id)


def test_unique_key_in_one_batch_and_a_retried_enqueue_with_the_same_id(fapp: jobq.JobQ) -> None:
    jobs = fapp.enqueue_many(
        [
            jobq.EnqueueRequest("t", queue=Q, unique_key="k"),
            jobq.EnqueueRequest("t", queue=Q, unique_key="k"),
            jobq.EnqueueRequest("t", queue=Q, job_id="fixed-id"),
            jobq.EnqueueRequest("t", queue=Q, job_id="fixed-id"),
        ]
    )
    assert jobs[0].id == jobs[1].id
    assert jobs[2].id == jobs[3].id == "fixed-id"
    # A retried enqueue (same client-generated id) is a no-op, not a duplicate.
    assert fapp.enqueue("t", queue=Q, job_id="fixed-id").id == "fixed-id"
    assert fapp.client.zcard(fapp.keys.ready(Q)) == 2


# -- the ownership fence ------------------------------------------------------------------------
def test_ack_or_fail_from_a_node_that_lost_its_lease_changes_nothing(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    job = fapp.enqueue("t", queue=Q)
    assert claim(fapp, "old", lease_ms=1000) == [job.id]
    clock.advance(2)
    reaped = fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms()))
    assert reaped.requeued == [job.id]
    assert claim(fapp, "new") == [job.id]
    before, size = snapshot(r), r.dbsize()
    # The old node comes back: its ack, fail and extend are refused and write nothing.
    assert ack(fapp, "old", job.id, "stale result") == -2
    res = fapp.run(fapp.store.fail(Q, "old", job.id, "late error", now_ms=fapp.now_ms()))
    assert res.outcome == "lease_lost"
    res2 = fapp.run(fapp.store.fail(Q, "old", job.id, "late error", dead=True, now_ms=fapp.now_ms()))
    assert res2.outcome == "lease_lost"
    assert fapp.run(fapp.store.release(Q, "old", [job.id], now_ms=fapp.now_ms())).released == 0
    assert_unchanged(r, before, size)
    # The winner's ack works; the loser's retried ack is still refused, the winner's is a no-op.
    assert ack(fapp, "new", job.id, "winner") == 1
    assert ack(fapp, "old", job.id, "stale result") == -2
    assert ack(fapp, "new", job.id, "winner") == 0
    assert job.result(timeout=1) == "winner"
    assert int(r.hget(job.key, "reaped") or 0) == 1


def test_ack_of_a_job_never_claimed_or_unknown(fapp: jobq.JobQ, r: redis.Redis) -> None:
    job = fapp.enqueue("t", queue=Q)
    before, size = snapshot(r), r.dbsize()
    assert ack(fapp, "n1", job.id) == -2
    assert ack(fapp, "n1", "no-such-job") == -1
    assert_unchanged(r, before, size)


# -- deadlines ----------------------------------------------------------------------------------
def test_a_job_not_started_before_its_deadline_goes_dead_expired_and_never_runs(
    fapp: jobq.JobQ, clock: jobq.FakeClock
) -> None:
    late = fapp.enqueue("t", queue=Q, deadline=timedelta(seconds=5))
    on_time = fapp.enqueue("t", queue=Q, deadline=timedelta(seconds=60))
    absolute = fapp.enqueue("t", queue=Q, deadline=(T0 + 5_000) / 1000)
    clock.advance(6)
    res = fapp.run(fapp.store.claim(Q, "n1", 10, 10_000, now_ms=fapp.now_ms()))
    assert [j.id for j in res.jobs] == [on_time.id]
    assert sorted(res.dead) == sorted([(late.id, "expired"), (absolute.id, "expired")])
    for j in (late, absolute):
        assert j.status() is jobq.JobState.DEAD
        assert j.info().error == "expired"
        with pytest.raises(jobq.JobFailed, match="expired"):
            j.result(timeout=0)
    assert fapp.client.zscore(fapp.keys.dead(Q), late.id) is not None


def test_deadline_exactly_now_still_runs_and_delayed_deadline_counts_from_enqueue(
    fapp: jobq.JobQ, clock: jobq.FakeClock
) -> None:
    edge = fapp.enqueue("t", queue=Q, deadline=timedelta(seconds=5))
    delayed = fapp.enqueue("t", queue=Q, delay=10, deadline=timedelta(seconds=11))
    clock.advance(5)
    assert claim(fapp, "n1") == [edge.id]
    clock.advance(7)  # 12 s after enqueue: the delayed job's deadline (11 s) has passed
    res = fapp.run(fapp.store.claim(Q, "n1", 10, 10_000, now_ms=fapp.now_ms()))
    assert res.jobs == [] and res.dead == [(delayed.id, "expired")]


# -- the Job handle -----------------------------------------------------------------------------
def test_job_status_result_and_cancel(fapp: jobq.JobQ) -> None:
    job = fapp.enqueue("t", queue=Q)
    assert job.status() is jobq.JobState.READY
    with pytest.raises(jobq.ResultTimeout):
        job.result(timeout=0.05)
    assert claim(fapp, "n1") == [job.id]
    assert job.status() is jobq.JobState.ACTIVE
    assert ack(fapp, "n1", job.id, {"sum": 3}) == 1
    assert job.status() is jobq.JobState.DONE
    assert job.result(timeout=1) == {"sum": 3}
    with pytest.raises(jobq.JobNotCancellable, match="finished"):
        job.cancel()
    later = fapp.enqueue("t", queue=Q, delay=60)
    assert later.status() is jobq.JobState.SCHEDULED
    later.cancel()
    assert later.status() is jobq.JobState.CANCELLED
    with pytest.raises(jobq.JobFailed, match="cancelled"):
        later.result(timeout=1)
    ghost = fapp.job("nope", Q)
    assert ghost.status() is jobq.JobState.UNKNOWN
    with pytest.raises(jobq.JobNotFound):
        ghost.cancel()
    with pytest.raises(jobq.JobNotFound):
        ghost.result(timeout=0)


def test_result_waits_for_a_job_finished_by_another_thread(fapp: jobq.JobQ, redis_url: str) -> None:
    job = fapp.enqueue("t", queue=Q)
    assert claim(fapp, "n1") == [job.id]
    worker = jobq.JobQ(redis_url, clock=fapp.clock)
    t = threading.Timer(
        0.2, lambda: worker.run(worker.store.ack(Q, "n1", [(job.id, codec.encode_result(7, 99))]))
    )
    t.start()
    try:
        assert job.result(timeout=10) == 7
    finally:
        t.join()
        worker.close()


# -- per-call options, kept apart from the task's arguments -----------------------------------
def test_task_enqueue_keeps_options_apart_from_task_kwargs(fapp: jobq.JobQ, r: redis.Redis) -> None:
    @fapp.task(queue=Q, priority=1, max_attempts=5)
    def send(to: str, priority: str = "", queue: str = "") -> None: ...

    # Task keyword arguments may even be called "priority" or "queue": only _-prefixed
    # keywords (or .options()) are options.
    j1 = send.enqueue("a@example.com", priority="high", queue="inbox", _priority=9, _delay=0)
    info = j1.info()
    assert (info.queue, info.priority, info.max_attempts) == (Q, 9, 5)
    assert info.args == ["a@example.com"]
    assert info.kwargs == {"priority": "high", "queue": "inbox"}
    j2 = send.options(priority=-3, max_attempts=2, queue="other").enqueue("b", queue="x")
    info2 = j2.info()
    assert (info2.queue, info2.priority, info2.max_attempts, info2.kwargs) == ("other", -3, 2, {"queue": "x"})
    # app.enqueue takes the same option names, for producers that cannot import the task.
    j3 = fapp.enqueue(send.name, ["c"], {"priority": "low"}, priority=4)
    assert (j3.queue, j3.info().priority, j3.info().kwargs) == (Q, 4, {"priority": "low"})
    with pytest.raises(jobq.InvalidInput, match="_prio") as exc:
        send.enqueue("d", _prio=1)
    assert exc.value.field == "_prio"
    with pytest.raises(jobq.InvalidInput, match="colour"):
        send.options(colour="red")


def test_option_names_are_the_same_everywhere() -> None:
    import inspect

    from jobq.app import OPTION_NAMES, PY_OPTION_NAMES, EnqueueRequest, JobQ

    enqueue_kw = [
        p.name for p in inspect.signature(JobQ.enqueue).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    # The Python API has the shared options plus check_args (the producer's own signature check).
    assert PY_OPTION_NAMES == (*OPTION_NAMES, "check_args")
    assert tuple(enqueue_kw) == PY_OPTION_NAMES
    assert tuple(EnqueueRequest.__dataclass_fields__)[3:] == PY_OPTION_NAMES


# -- enqueue_many: one round trip per batch -----------------------------------------------------
def _eval_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def test_enqueue_many_is_one_script_call_per_max_batch_in_one_round_trip(
    fapp: jobq.JobQ, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    fapp.enqueue("warm-up", queue=Q)  # loads the script and registers the queue
    round_trips = 0
    pool = fapp.client.connection_pool
    conn = pool.get_connection()
    conn_cls = type(conn)
    pool.release(conn)
    orig = conn_cls.send_packed_command

    def counting(self: object, *a: object, **k: object) -> None:
        nonlocal round_trips
        round_trips += 1
        orig(self, *a, **k)  # type: ignore[arg-type]

    r.config_resetstat()
    monkeypatch.setattr(conn_cls, "send_packed_command", counting)
    jobs = fapp.enqueue_many(jobq.EnqueueRequest("t", (i,), queue=Q) for i in range(2_500))
    monkeypatch.undo()
    assert len(jobs) == 2_500
    assert _eval_calls(r) == -(-2_500 // jobq.storage.calls.MAX_BATCH)  # 500 jobs per call
    assert round_trips == 1
    # After SCRIPT FLUSH the pipelined EVALSHAs get NOSCRIPT and are sent again: nothing lost.
    r.script_flush()
    more = fapp.enqueue_many(jobq.EnqueueRequest("t", queue=Q) for _ in range(1_500))
    assert len({j.id for j in more}) == 1_500
    assert r.zcard(fapp.keys.ready(Q)) == 4_001
    # A single enqueue to a known queue is exactly one script call (no per-job SADD).
    r.config_resetstat()
    fapp.enqueue("t", queue=Q)
    stats = r.info("commandstats")
    assert _eval_calls(r) == 1
    assert "cmdstat_sadd" not in stats


def test_enqueue_many_validates_everything_first(fapp: jobq.JobQ, r: redis.Redis) -> None:
    before, size = snapshot(r), r.dbsize()
    reqs = [jobq.EnqueueRequest("t", queue=Q) for _ in range(10)]
    reqs.append(jobq.EnqueueRequest("t", queue=Q, priority=1000))
    with pytest.raises(jobq.InvalidInput, match=r"job 10: priority"):
        fapp.enqueue_many(reqs)
    with pytest.raises(jobq.InvalidInput, match="max_attempts"):
        fapp.enqueue_many([{"task": "t", "queue": Q}, {"task": "t", "max_attempts": 0}])
    assert_unchanged(r, before, size)
    assert fapp.enqueue_many([]) == []


def test_a_unique_key_whose_holder_vanished_is_taken_over(fapp: jobq.JobQ, r: redis.Redis) -> None:
    first = fapp.enqueue("t", queue=Q, unique_key="k")
    # The holder's hash disappears behind jobq's back (deleted by hand, evicted, ...).
    r.delete(first.key)
    r.zrem(fapp.keys.ready(Q), first.id)
    second = fapp.enqueue("t", queue=Q, unique_key="k")
    assert second.id != first.id
    assert r.get(fapp.keys.unique(Q, "k")) == second.id.encode()


@pytest.mark.parametrize(
    ("attempt", "jitter", "delay_ms"),
    [(1, 0.0, 1_500), (1, 1.0, 2_500), (3, 0.5, 8_000), (30, 0.5, 3_600_000)],
    ids=["first-low", "first-high", "third", "capped"],
)
def test_fail_backoff_is_exponential_with_jitter_and_capped(
    fapp: jobq.JobQ, attempt: int, jitter: float, delay_ms: int, r: redis.Redis
) -> None:
    job = fapp.enqueue("t", queue=Q, max_attempts=100, retry_backoff=2)
    assert claim(fapp, "n1") == [job.id]
    r.hset(job.key, "attempts", attempt)  # as if this were attempt number `attempt`
    res = fapp.run(fapp.store.fail(Q, "n1", job.id, "boom", jitter=jitter, now_ms=fapp.now_ms()))
    # base 2 s x 2^(attempt-1), times 0.75 + 0.5 x jitter, at most 1 h
    assert (res.outcome, res.run_at_ms) == ("retry", T0 + delay_ms)
    assert job.status() is jobq.JobState.SCHEDULED


# -- cancelling a running job -------------------------------------------------------------------
def test_cancel_running_job_ends_it_and_fences_out_its_attempt(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    job = fapp.enqueue("t", queue=Q, unique_key="only-one")
    other = fapp.enqueue("t", queue=Q)
    assert claim(fapp, "n1", 2) == [job.id, other.id]
    channel = fapp.keys.wake(Q, "n1")  # the node's own wake-up channel
    p = owner_client(r, channel).pubsub(ignore_subscribe_messages=True)  # on a cluster: its shard
    p.ssubscribe(channel)
    job.cancel()
    msg = None
    for _ in range(50):
        msg = msg or p.get_message(timeout=0.1)
    p.close()
    assert msg is not None and msg["data"] == f"cancel {job.id}".encode()  # the node is told at once
    assert job.status() is jobq.JobState.CANCELLED
    h = r.hgetall(fapp.keys.job(Q, job.id))
    assert b"result" not in h and h[b"attempts"] == b"1"
    assert r.zscore(fapp.keys.leases(Q), job.id) is None
    assert [m.decode() for m in r.zrange(fapp.keys.active(Q, "n1"), 0, -1)] == [other.id]
    # Its unique key is free; a second cancel finds it finished.
    assert fapp.enqueue("t", queue=Q, unique_key="only-one").id != job.id
    with pytest.raises(jobq.JobNotCancellable, match="finished"):
        job.cancel()
    # The attempt's ack, fail and release are refused and change nothing (the per-attempt fence).
    before, size = snapshot(r), r.dbsize()
    assert fapp.run(fapp.store.ack(Q, "n1", [(job.id, b"\x01")], now_ms=fapp.now_ms()))[0] == -2
    assert fapp.run(fapp.store.fail(Q, "n1", job.id, "boom", attempt=1, now_ms=fapp.now_ms())).outcome == (
        "lease_lost"
    )
    assert fapp.run(fapp.store.release(Q, "n1", [job.id], attempts=[1], now_ms=fapp.now_ms())).released == 0
    assert_unchanged(r, before, size)
    # No reaper takes it back, however late.
    clock.advance(3600)
    res = fapp.run(fapp.store.reap(Q, node_ttl_ms=1, now_ms=fapp.now_ms()))
    assert job.id not in res.requeued + res.dead
    assert job.status() is jobq.JobState.CANCELLED


def test_lease_renewal_reports_cancelled_jobs_until_the_node_has_heard(fapp: jobq.JobQ) -> None:
    """The fallback of the cancel channel: each renewal's reply names the node's cancelled jobs
    until a later renewal says it heard of them (a lost reply loses none)."""
    a, b = fapp.enqueue("t", queue=Q), fapp.enqueue("t", queue=Q)
    assert claim(fapp, "n1", 2) == [a.id, b.id]
    assert claim(fapp, "n2") == []
    a.cancel()

    def extend(node: str, seen: list[str] | None = None) -> tuple[list[str], list[str]]:
        res = fapp.run(fapp.store.extend(Q, node, 10_000, now_ms=fapp.now_ms(), seen_cancels=seen or []))
        return res.owned, res.cancelled

    assert extend("n1") == ([b.id], [a.id])
    assert extend("n1") == ([b.id], [a.id])  # the first reply may have been lost
    assert extend("n2") == ([], [])  # another node's marks are not its own
    assert extend("n1", [a.id]) == ([b.id], [])
    assert extend("n1") == ([b.id], [])


def test_progress_is_fenced_by_the_attempt_and_shown_by_info(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    job = fapp.enqueue("t", queue=Q)
    assert claim(fapp, "n1") == [job.id]

    def progress(node: str, attempt: int, fraction: float, message: str | None = None) -> int:
        return fapp.run(
            fapp.store.progress(Q, node, job.id, attempt, fraction, message, now_ms=fapp.now_ms())
        )

    assert job.info().progress is None
    assert progress("n1", 1, 0.3, "reading") == 1
    info = job.info()
    assert (info.progress, info.progress_message, info.progress_ms) == (0.3, "reading", fapp.now_ms())
    assert progress("n1", 1, 0.6) == 1  # no message: the old one goes
    assert (job.info().progress, job.info().progress_message) == (0.6, None)
    # Another node, another attempt: refused, nothing written.
    before, size = snapshot(r), r.dbsize()
    assert progress("n2", 1, 0.9) == -2
    assert progress("n1", 2, 0.9) == -2
    assert_unchanged(r, before, size)
    # Finished (here: cancelled while it ran): the last progress stays, later ones are refused.
    job.cancel()
    assert progress("n1", 1, 1.0) == -2
    assert job.info().progress == 0.6
