"""Regressions of issue 6's producer and Redis-side speedups, on a real redis-server: a retry
backoff of 0 is kept, an idle node is woken for every job, the job hash
still carries every field its readers use, integers cross ARGV in canonical form, and the direct
EVALSHA path survives SCRIPT FLUSH."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import jobq
from jobq.storage.scripts import ScriptName, source
from tests.integration.conftest import T0

pytestmark = pytest.mark.integration

Q = "perf"


def claim(app: jobq.JobQ, node: str = "n1", n: int = 1) -> list[jobq.storage.calls.ClaimedJob]:
    return app.run(app.store.claim(Q, node, n, 10_000, now_ms=app.now_ms())).jobs


# -- retry_backoff=0 ----------------------------------------------------------------------------------
def test_retry_backoff_zero_retries_at_once(fapp: jobq.JobQ, r: redis.Redis) -> None:
    """Was: a backoff of 0 was not stored, so fail fell back to its 1 s default."""

    @fapp.task(name="nobackoff", queue=Q, max_attempts=3, retry_backoff=0)
    def nobackoff() -> None: ...

    job = nobackoff.enqueue()
    assert r.hget(job.key, "backoff_ms") == b"0"
    assert [j.id for j in claim(fapp)] == [job.id]
    res = fapp.run(fapp.store.fail(Q, "n1", job.id, "boom", jitter=1.0, now_ms=fapp.now_ms()))
    assert (res.outcome, res.run_at_ms) == ("retry", T0)  # straight back to ready, no wait
    assert job.status() is jobq.JobState.READY
    assert [j.attempts for j in claim(fapp)] == [2]


def test_retry_backoff_per_call_zero_and_default(fapp: jobq.JobQ, r: redis.Redis) -> None:
    zero = fapp.enqueue("t", queue=Q, retry_backoff=0)
    default = fapp.enqueue("t", queue=Q)
    other = fapp.enqueue("t", queue=Q, retry_backoff=2.5)
    assert r.hget(zero.key, "backoff_ms") == b"0"
    assert r.hget(default.key, "backoff_ms") is None  # fail's default base, 1000 ms
    assert r.hget(other.key, "backoff_ms") == b"2500"
    for j in claim(fapp, n=3):
        fapp.run(fapp.store.fail(Q, "n1", j.id, "boom", jitter=0.5, now_ms=fapp.now_ms()))
    sched = dict(r.zrange(fapp.keys.scheduled(Q), 0, -1, withscores=True))
    assert sched == {default.id.encode(): T0 + 1000, other.id.encode(): T0 + 2500}
    assert r.zrange(fapp.keys.ready(Q), 0, -1) == [zero.id.encode()]


# -- wake-ups (the token protocol itself: test_core_wakeups.py) -------------------------------------
def test_idle_worker_is_woken_for_every_job_with_a_long_poll_interval(redis_url: str) -> None:
    """Wake-ups reach a waiting node every time: a node with a
    60 s poll interval (so only announcements and freed slots can start work) runs a job that
    holds its single slot while a second job is enqueued, then picks up a third after idling."""
    import asyncio
    import threading

    from jobq.worker import Worker, WorkerConfig

    app = jobq.JobQ(redis_url)
    started = {name: threading.Event() for name in ("a", "b", "c")}
    release_a = threading.Event()

    @app.task(name="step", queue=Q)
    def step(name: str) -> None:
        started[name].set()
        if name == "a":
            release_a.wait(30)

    worker = Worker(app, WorkerConfig(queues=[(Q, 1)], concurrency=1, poll_interval=60.0))
    thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    thread.start()
    try:
        time.sleep(0.3)  # idle: its first claim found nothing, it waits
        step.enqueue("a")  # ready was empty: announced
        assert started["a"].wait(10)
        step.enqueue("b")  # ready empty again (a was claimed): announced, the node is full
        time.sleep(0.2)
        assert not started["b"].is_set()
        release_a.set()  # the freed slot claims b
        assert started["b"].wait(10)
        time.sleep(0.3)  # idle again
        t0 = time.monotonic()
        step.enqueue("c")
        assert started["c"].wait(10)
        assert time.monotonic() - t0 < 10  # far below the 60 s poll interval
    finally:
        release_a.set()
        worker.stop(graceful=False)
        thread.join(10)
        app.close()


# -- the job hash keeps what its readers use ---------------------------------------------------------
def test_hash_fields_of_a_ready_job_and_a_claimed_one(fapp: jobq.JobQ, r: redis.Redis) -> None:
    job = fapp.enqueue("t", queue=Q, priority=5)
    h = {k.decode(): v.decode() for k, v in r.hgetall(job.key).items() if k != b"payload"}
    assert h == {
        "task": "t",
        "priority": "5",
        "max_attempts": "3",
        "timeout_ms": "0",
        "enqueued_ms": str(T0),
        "state": "ready",
    }  # attempts (0), run_at_ms and ready_ms (= enqueued_ms) are derived by the readers
    info = job.info()
    assert (info.enqueued_ms, info.run_at_ms, info.attempts) == (T0, T0, 0)
    score = r.zscore(fapp.keys.ready(Q), job.id)
    [c] = claim(fapp)
    assert (c.attempts, c.ready_ms) == (1, T0)
    assert r.hmget(job.key, "attempts", "state", "node", "started_ms", "score") == [
        b"1",
        b"active",
        b"n1",
        str(T0).encode(),
        str(int(score or 0)).encode(),
    ]


def test_released_job_goes_back_to_its_old_place(fapp: jobq.JobQ, r: redis.Redis) -> None:
    """release reads the ready score claim stored: the job returns ahead of later ones."""
    first = fapp.enqueue("t", queue=Q)
    assert [c.id for c in claim(fapp)] == [first.id]
    later = fapp.enqueue("t", queue=Q)
    assert fapp.run(fapp.store.release(Q, "n1", now_ms=fapp.now_ms())).released == 1
    assert r.zrange(fapp.keys.ready(Q), 0, -1) == [first.id.encode(), later.id.encode()]
    [again] = claim(fapp)
    assert (again.id, again.attempts) == (first.id, 1)  # the released attempt did not count


# -- canonical integers ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["007", "-0", "00"])
def test_non_canonical_integers_are_refused(fapp: jobq.JobQ, r: redis.Redis, bad: str) -> None:
    call = fapp.store.enqueue(Q, [jobq.storage.calls.JobSpec("j1", "t", b"\x92\x90\x80")], now_ms=T0)
    call.args[9] = bad  # the job's priority
    with pytest.raises(jobq.errors.InvalidPriority):
        fapp.run(call)
    assert r.dbsize() == 0


# -- direct EVALSHA ----------------------------------------------------------------------------------
def test_calls_survive_script_flush(fapp: jobq.JobQ, r: redis.Redis) -> None:
    fapp.enqueue("t", queue=Q)
    r.script_flush()
    job = fapp.enqueue("t", queue=Q)  # NOSCRIPT: loaded again, then run once
    assert r.zcard(fapp.keys.ready(Q)) == 2
    sha = fapp.runner.sha(ScriptName.ENQUEUE)
    if isinstance(r, redis.cluster.RedisCluster):
        # On a cluster the script is loaded (by EVAL) on the queue's own primary only: SCRIPT
        # LOAD would go to every primary, and fail while one is down (RELIABILITY F19).
        node = r.get_node_from_key(fapp.keys.ready(Q))
        assert r.execute_command("SCRIPT EXISTS", sha, target_nodes=node) == [True]
    else:
        assert r.script_exists(sha) == [True]
    assert job.status() is jobq.JobState.READY


def test_noscript_after_reload_falls_back_to_eval(fapp: jobq.JobQ, r: redis.Redis, monkeypatch) -> None:
    """A SCRIPT FLUSH between the reload and the retry: the call runs once, by EVAL."""
    runner = fapp.runner
    real_load = runner._load

    def load_then_flush(name: ScriptName) -> None:
        real_load(name)
        r.script_flush()

    monkeypatch.setattr(runner, "_load", load_then_flush)
    r.script_flush()
    job = fapp.enqueue("t", queue=Q)
    assert r.zrange(fapp.keys.ready(Q), 0, -1) == [job.id.encode()]
    assert source(ScriptName.ENQUEUE)  # the EVAL sent the shipped file's text


# -- the producer's fast paths ------------------------------------------------------------------------
def test_plain_request_prepares_like_the_general_path(fapp: jobq.JobQ) -> None:
    """A request with no per-call option takes the cached fast path; the spec matches the one
    the general path builds from the same task defaults."""

    @fapp.task(name="opts", queue=Q, priority=7, max_attempts=9, timeout=2.5, retry_backoff=0)
    def opts(a: int, b: str = "") -> None: ...

    q1, fast = fapp.prepare(opts.request(1, b="x"))
    q2, slow = fapp.prepare(opts.request(1, b="x", _job_id="explicit"))
    assert q1 == q2 == Q
    assert (fast.task, fast.payload, fast.priority, fast.max_attempts, fast.timeout_ms, fast.backoff_ms) == (
        slow.task,
        slow.payload,
        slow.priority,
        slow.max_attempts,
        slow.timeout_ms,
        slow.backoff_ms,
    )
    assert (fast.delay_ms, fast.run_at_ms, fast.deadline, fast.unique_key) == (None, None, "", "")
    # Unknown task names are validated on the fast path too (once per name).
    with pytest.raises(jobq.errors.InvalidTaskName):
        fapp.prepare(jobq.EnqueueRequest("bad name"))
    with pytest.raises(jobq.errors.EncodeError):
        fapp.prepare(jobq.EnqueueRequest("t", kwargs={1: "x"}))  # type: ignore[dict-item]
    with pytest.raises(jobq.errors.EncodeError):
        fapp.prepare(jobq.EnqueueRequest("t", args=[{1: "int key"}]))  # nested: round trip check


def test_enqueue_many_durable_waits_once_and_says_when_no_replica_acked(
    redis_url: str, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    app = jobq.JobQ(redis_url, clock=clock, durable=True, durable_timeout=0.05)
    r.config_resetstat()
    with pytest.raises(jobq.errors.NotReplicated):
        app.enqueue_many([{"task": "t", "queue": Q} for _ in range(1_500)])
    assert r.zcard(app.keys.ready(Q)) == 1_500  # written to the primary, as the error says
    assert int(r.info("commandstats")["cmdstat_wait"]["calls"]) == 1  # one WAIT for both calls
    app.close()


# -- the sync runner keeps its connections ------------------------------------------------------------
def _client_ids(r: redis.Redis) -> set[int]:
    me = r.client_id()
    return {int(c["id"]) for c in r.client_list() if int(c["id"]) != me}


#: The kept connections are the standalone path; a cluster client keeps one pool per node and
#: routes each call itself (the cluster run of this suite skips these tests).
standalone_only = pytest.mark.skipif(
    os.environ.get("JOBQ_TEST_REDIS") == "cluster", reason="kept connections: standalone Redis only"
)


@pytest.fixture
def conn_app(redis_url: str) -> Iterator[tuple[jobq.JobQ, Any]]:
    """A JobQ without a fake clock and one task; one job enqueued (the queue registered, the
    script loaded, the runner's first connection taken)."""
    app = jobq.JobQ(redis_url)

    @app.task(name="conn", queue=Q)
    def conn(i: int) -> None: ...

    conn.enqueue(0)
    yield app, conn
    app.close()


@standalone_only
def test_single_calls_reuse_one_connection_and_recover_a_killed_one(
    conn_app: tuple[jobq.JobQ, Any], r: redis.Redis
) -> None:
    """Single calls keep their connection between calls (no pool checkout per call), and one the
    server closed meanwhile is replaced before use: the call after a CLIENT KILL succeeds."""
    _, task = conn_app
    before = _client_ids(r)
    ids = [task.enqueue(i).id for i in range(1, 50)]
    assert _client_ids(r) == before  # the same connection, every call
    for cid in before:
        r.client_kill_filter(_id=cid)
    # A non-retrying client would see the closed socket on its first send without the check.
    after_kill = task.enqueue(99).id
    assert r.zcard(f"jobq:{{{Q}}}:ready") == 51
    assert len({*ids, after_kill}) == 50


@standalone_only
def test_threads_share_the_runner_without_sharing_a_connection(
    conn_app: tuple[jobq.JobQ, Any], r: redis.Redis
) -> None:
    import threading

    app, task = conn_app
    errs: list[BaseException] = []

    def produce(k: int) -> None:
        try:
            for i in range(200):
                task.enqueue(k * 1000 + i)
        except BaseException as exc:  # pragma: no cover - reported below
            errs.append(exc)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errs == []
    assert r.zcard(f"jobq:{{{Q}}}:ready") == 1 + 8 * 200
    assert len(app.runner._idle) <= 8 + 1  # at most one connection per thread at once


@standalone_only
def test_a_forked_child_opens_its_own_connection(conn_app: tuple[jobq.JobQ, Any], r: redis.Redis) -> None:
    app, task = conn_app
    parent_conn = app.runner._idle[-1]
    pid = os.fork()
    if pid == 0:  # the child: a new connection, never the parent's socket
        code = 1
        try:
            task.enqueue(1)
            code = 0 if app.runner._idle and app.runner._idle[-1] is not parent_conn else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    task.enqueue(2)  # the parent's connection still works: the child never read from it
    assert app.runner._idle[-1] is parent_conn
    assert r.zcard(f"jobq:{{{Q}}}:ready") == 3
