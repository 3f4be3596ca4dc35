"""The worker node in-process, against a real redis-server: executor, retries, timeouts, queue
order, lost leases, the heartbeat thread, graceful and hard stops, pub/sub fallback."""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis

import jobq
from jobq import JobQ, JobState
from jobq.metrics import Metrics
from jobq.worker import Worker, WorkerConfig

pytestmark = pytest.mark.integration


def burst(app: JobQ, **cfg: Any) -> Worker:
    """Run one node in burst mode until nothing runnable is left."""
    cfg.setdefault("queues", [("default", 1)])
    w = Worker(app, WorkerConfig(burst=True, **cfg))
    asyncio.run(w.run())
    return w


class Background:
    """A node running on its own thread (and loop) until ``stop()``."""

    def __init__(self, app: JobQ, metrics: Metrics | None = None, **cfg: Any) -> None:
        cfg.setdefault("queues", [("default", 1)])
        self.worker = Worker(app, WorkerConfig(**cfg), metrics=metrics)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while self.worker._loop is None or self.worker._stop_event is None:
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.005)

    def _run(self) -> None:
        try:
            asyncio.run(self.worker.run())
        except BaseException as exc:  # pragma: no cover - reported by join()
            self.error = exc

    def stop(self, graceful: bool = True) -> None:
        self.worker.stop(graceful=graceful)

    def join(self, timeout: float = 30) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error


def wait_for(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def bg() -> Iterator[list[Background]]:
    """Background nodes started by a test are stopped at its end even if it fails."""
    started: list[Background] = []
    yield started
    for b in started:
        if b.thread.is_alive():
            b.stop(graceful=False)
            b.thread.join(10)


# -- executor ---------------------------------------------------------------------------------


def test_sync_and_async_tasks_run_and_store_results(app: JobQ, r: redis.Redis) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def amul(a: int, b: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"product": a * b}

    jobs = [add.enqueue(i, 1) for i in range(30)] + [amul.enqueue(i, 2) for i in range(30)]
    w = burst(app, concurrency=8)

    assert [j.result(timeout=0) for j in jobs[:30]] == [i + 1 for i in range(30)]
    assert [j.result(timeout=0) for j in jobs[30:]] == [{"product": i * 2} for i in range(30)]
    assert w.stats["completed"] == 60 and w.stats["failed"] == 0
    info = jobs[0].info()
    assert info.state is JobState.DONE and info.attempts == 1
    # Nothing left running or leased.
    assert r.zcard(app.keys.ready("default")) == 0
    assert r.zcard(app.keys.leases("default")) == 0
    assert r.zcard(app.keys.active("default", w.node)) == 0


def test_finished_jobs_leave_no_cyclic_garbage(app: JobQ) -> None:
    """Was: a job's held-table entry and its CurrentJob referred to each other (the progress
    writer closed over the entry), so every finished job stayed in memory until the cyclic
    garbage collector ran; its passes cost a drain of short jobs ~10 us of worker CPU per job.
    A job that succeeds must be freed by reference counting alone."""

    @app.task
    def sync_job(i: int) -> int:
        jobq.current_job().progress(0.5)  # a plain def task's progress write (waits for it)
        return i

    @app.task
    async def async_job(i: int) -> int:
        await jobq.current_job().aprogress(0.5)
        return i

    jobs = [sync_job.enqueue(i) for i in range(20)] + [async_job.enqueue(i) for i in range(20)]
    gc.collect()
    gc.disable()
    try:
        w = burst(app, concurrency=4)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert w.stats["completed"] == 40 and w.stats["failed"] == 0
    assert [j.result(timeout=0) for j in jobs] == list(range(20)) * 2
    assert jobs[0].info().progress is not None  # the writes happened
    per_job = {k: n for k, n in kinds.items() if k in {"Held", "CurrentJob", "ClaimedJob", "Task"}}
    assert per_job == {}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_at_most_concurrency_jobs_run_at_once(app: JobQ, kind: str) -> None:
    lock = threading.Lock()
    now = [0]
    peak = [0]

    def enter() -> None:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])

    def leave() -> None:
        with lock:
            now[0] -= 1

    if kind == "sync":

        @app.task(name="busy")
        def busy_sync() -> None:
            enter()
            time.sleep(0.03)
            leave()
    else:

        @app.task(name="busy")
        async def busy_async() -> None:
            enter()
            await asyncio.sleep(0.03)
            leave()

    app.enqueue_many([{"task": "busy"} for _ in range(40)])
    w = burst(app, concurrency=4)
    assert w.stats["completed"] == 40
    assert peak[0] == 4  # the limit is reached and never exceeded


def test_retry_and_fail_from_a_task(app: JobQ) -> None:
    @app.task(max_attempts=5)
    def again() -> None:
        raise jobq.Retry(delay=30)

    @app.task(max_attempts=5)
    def give_up() -> None:
        raise jobq.Fail("card declined")

    j1, j2 = again.enqueue(), give_up.enqueue()
    burst(app)

    i1 = j1.info()
    assert i1.state is JobState.SCHEDULED and i1.attempts == 1
    assert i1.run_at_ms is not None and i1.started_ms is not None
    assert 29_000 <= i1.run_at_ms - i1.started_ms <= 31_000  # the delay the task asked for
    assert "Retry" in (i1.error or "")
    i2 = j2.info()
    assert i2.state is JobState.DEAD and i2.attempts == 1  # no retries despite max_attempts=5
    assert "card declined" in (i2.error or "")


def test_burst_waits_for_an_immediate_retry(app: JobQ, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobq.storage.calls import AsyncRunner
    from jobq.storage.scripts import ScriptName

    # A slow fail call: the node must not decide it is done while the fail is on its way.
    real_run = AsyncRunner.run

    async def slow_fail(self: AsyncRunner, call: Any) -> Any:
        if call.script is ScriptName.FAIL:
            await asyncio.sleep(0.3)
        return await real_run(self, call)

    monkeypatch.setattr(AsyncRunner, "run", slow_fail)
    tries: list[int] = []

    @app.task(max_attempts=3)
    async def twice() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise jobq.Retry(delay=0)
        return "second time"

    job = twice.enqueue()
    burst(app)
    assert job.result(timeout=0) == "second time" and job.info().attempts == 2


def test_unknown_task_fails_clearly_and_follows_the_retry_policy(app: JobQ) -> None:
    retried = app.enqueue("billing.nosuch", (1,), max_attempts=2, retry_backoff=60)
    dead = app.enqueue("billing.nosuch", (2,), max_attempts=1)
    w = burst(app)

    i = retried.info()
    assert i.state is JobState.SCHEDULED and i.attempts == 1
    assert "unknown task 'billing.nosuch'" in (i.error or "")
    d = dead.info()
    assert d.state is JobState.DEAD and "unknown task 'billing.nosuch'" in (d.error or "")
    assert w.stats["failed"] == 2


def test_sync_and_async_jobs_that_overrun_their_timeout_are_failed_and_retried(
    app: JobQ, r: redis.Redis
) -> None:
    interrupted: list[str] = []

    @app.task(timeout=0.3, max_attempts=3, retry_backoff=0.01)
    def slow_sync(key: str) -> str:
        if r.incr(key) == 1:
            try:
                for _ in range(1000):  # 10 s unless interrupted
                    time.sleep(0.01)
            except jobq.JobTimeout:
                interrupted.append("sync")
                raise
        return "sync ok"

    @app.task(timeout=0.3, max_attempts=3, retry_backoff=0.01)
    async def slow_async(key: str) -> str:
        if r.incr(key) == 1:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                interrupted.append("async")
                raise
        return "async ok"

    js, ja = slow_sync.enqueue("t:sync"), slow_async.enqueue("t:async")
    t0 = time.monotonic()
    failed = burst(app).stats["failed"]
    assert time.monotonic() - t0 < 5  # neither ran its 10 s
    # The async one was cancelled; the sync one gets JobTimeout raised in its thread.
    wait_for(lambda: sorted(interrupted) == ["async", "sync"], 5, "both interrupted")
    # The retry runs (and now finishes in time); the node may have run it already.
    for _ in range(100):  # burst exits while a retry is still backing off: run it again
        if js.status() is JobState.DONE and ja.status() is JobState.DONE:
            break
        time.sleep(0.02)
        failed += burst(app).stats["failed"]
    assert js.result(timeout=0) == "sync ok" and ja.result(timeout=0) == "async ok"
    for job in (js, ja):
        info = job.info()
        assert info.attempts == 2 and "timeout: ran longer than 0.3 s" in (info.error or "")
    assert failed == 2


def test_a_timed_out_sync_job_keeps_its_slot_until_its_thread_returns(app: JobQ) -> None:
    # One slot; a job stuck in a system call holds its thread past its timeout. The job is failed
    # at its timeout, but the node claims nothing more until the thread is free: it never runs
    # more threads than its concurrency, nor claims work it could not start.
    spans: list[tuple[float, float]] = []

    @app.task(timeout=0.2, max_attempts=1)
    def stuck() -> None:
        t0 = time.monotonic()
        try:
            time.sleep(0.6)  # not interruptible: a zombie until it returns...
        finally:  # ...where the JobTimeout sent at its timeout is raised
            spans.append((t0, time.monotonic()))

    first, second = stuck.enqueue(), stuck.enqueue()
    w = burst(app, concurrency=1)
    assert len(spans) == 2 and spans[1][0] >= spans[0][1]  # never both at once
    for job in (first, second):
        info = job.info()
        assert info.state is JobState.DEAD and "timeout" in (info.error or "")
    assert w.stats["failed"] == 2 and w.zombie_threads() == 0


# -- queues -----------------------------------------------------------------------------------


def test_strict_queue_order(app: JobQ) -> None:
    order: list[str] = []

    @app.task
    def note(q: str) -> None:
        order.append(q)

    for _ in range(5):
        app.enqueue(note, ("low",), queue="low")
    for _ in range(5):
        app.enqueue(note, ("high",), queue="high")
    burst(app, queues=[("high", 1), ("low", 1)], concurrency=1)
    assert order == ["high"] * 5 + ["low"] * 5


def test_bad_configuration_is_refused(app: JobQ) -> None:
    with pytest.raises(jobq.InvalidInput, match="queue"):
        Worker(app, WorkerConfig(queues=[("bad{name}", 1)]))
    with pytest.raises(ValueError, match="concurrency"):
        Worker(app, WorkerConfig(concurrency=0))
    with pytest.raises(ValueError, match="lease"):
        Worker(app, WorkerConfig(lease=0))


def test_weighted_queue_order_follows_weights(app: JobQ) -> None:
    w = Worker(app, WorkerConfig(queues=[("critical", 6), ("default", 3), ("low", 1)], weighted=True))
    first = collections.Counter(w.fetcher.queue_order()[0] for _ in range(5000))
    assert abs(first["critical"] / 5000 - 0.6) < 0.05
    assert abs(first["default"] / 5000 - 0.3) < 0.05
    assert abs(first["low"] / 5000 - 0.1) < 0.05
    assert sorted(w.fetcher.queue_order()) == ["critical", "default", "low"]


# -- leases -----------------------------------------------------------------------------------


def test_a_job_whose_lease_was_lost_is_never_acked_by_its_old_node(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    started = threading.Event()
    runs: list[int] = []

    @app.task
    async def long(n: int) -> str:
        runs.append(n)
        started.set()
        await asyncio.sleep(0.6 if len(runs) == 1 else 0)
        return "ok"

    job = long.enqueue(1)
    b = Background(app, lease=0.6, maintenance=False)
    bg.append(b)
    assert started.wait(10)
    # Another node's reaper decides the lease expired (time moved past it). The node itself is
    # alive (a node TTL longer than the jump): a reaper that took it for dead would also drop
    # its wake-up token, and the node would look for the job only at its idle backstop.
    now = r.time()
    far = int(now[0]) * 1000 + 60_000
    res = app.run(app.store.reap("default", node_ttl_ms=120_000, limit=100, guard_ms=0, now_ms=far))
    assert res.requeued == [job.id]
    # The old node notices at its next beat, gives the attempt up, and runs the job again.
    wait_for(lambda: job.status() is JobState.DONE, 10, "second run")
    b.stop()
    b.join()
    assert b.worker.stats["lost"] == 1 and b.worker.stats["stale"] == 0  # cancelled, not acked
    assert b.worker.stats["completed"] == 1
    info = job.info()
    assert info.attempts == 2 and info.reaped == 1 and len(runs) == 2


def test_heartbeat_keeps_leases_while_a_task_blocks_the_event_loop(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    @app.task
    async def blocker() -> None:
        time.sleep(1.5)  # blocks the loop for 2.5 leases

    @app.task
    async def patient() -> None:
        await asyncio.sleep(1.6)

    jobs = [patient.enqueue(), blocker.enqueue()]
    b = Background(app, lease=0.6, maintenance=False)
    bg.append(b)
    wait_for(lambda: r.zcard(app.keys.leases("default")) == 2, 5, "claims")
    reaped: list[str] = []
    deadline = time.monotonic() + 1.4
    while time.monotonic() < deadline:  # a reaper on Redis time throughout
        res = app.run(app.store.reap("default", node_ttl_ms=1_200, limit=100, guard_ms=0))
        reaped += res.requeued + res.dead
        time.sleep(0.05)
    assert reaped == []
    wait_for(lambda: all(j.status() is JobState.DONE for j in jobs), 10, "jobs done")
    b.stop()
    b.join()
    assert b.worker.stats["lost"] == 0


# -- shutdown ---------------------------------------------------------------------------------


def test_graceful_stop_finishes_running_jobs_within_grace(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    @app.task
    def work(n: int) -> int:
        r.incr(f"ran:{n}")
        time.sleep(0.3)
        return n

    jobs = [work.enqueue(n) for n in range(10)]
    b = Background(app, concurrency=4, grace=10)
    bg.append(b)
    wait_for(lambda: len(r.keys("ran:*")) >= 4, 5, "4 running")
    b.stop()
    b.join()
    states = collections.Counter(j.status() for j in jobs)
    done = [j for j in jobs if j.status() is JobState.DONE]
    assert len(done) >= 4 and states[JobState.DONE] + states[JobState.READY] == 10
    for j in jobs:  # nothing ran twice, nothing left claimed
        info = j.info()
        assert int(r.get(f"ran:{info.args[0]}") or 0) == (1 if info.state is JobState.DONE else 0)  # type: ignore[index]
        assert info.attempts == (1 if info.state is JobState.DONE else 0)
    assert r.zcard(app.keys.active("default", b.worker.node)) == 0
    assert r.zcard(app.keys.leases("default")) == 0


def test_jobs_still_running_after_grace_are_released_keeping_their_attempt(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    """They started: each keeps its attempt and counts one interruption (a re-run is visible on
    the job and in jobq_jobs_interrupted_total)."""

    @app.task
    async def forever() -> None:
        await asyncio.sleep(60)

    jobs = [forever.enqueue() for _ in range(3)]
    metrics = Metrics(app, collect_queues=False)
    b = Background(app, metrics=metrics, grace=0.2)
    bg.append(b)
    wait_for(lambda: r.zcard(app.keys.leases("default")) == 3, 5, "claims")
    t0 = time.monotonic()
    b.stop()
    b.join()
    assert time.monotonic() - t0 < 3
    for j in jobs:
        info = j.info()
        assert info.state is JobState.READY and info.attempts == 1 and info.interrupted == 1
    assert r.zcard(app.keys.ready("default")) == 3
    assert 'jobq_jobs_interrupted_total{queue="default"} 3.0' in metrics.exposition().decode()
    assert r.zcard(app.keys.active("default", b.worker.node)) == 0


def test_a_second_stop_releases_at_once(app: JobQ, r: redis.Redis, bg: list[Background]) -> None:
    @app.task
    async def forever() -> None:
        await asyncio.sleep(60)

    jobs = [forever.enqueue() for _ in range(2)]
    b = Background(app, grace=60)
    bg.append(b)
    wait_for(lambda: r.zcard(app.keys.leases("default")) == 2, 5, "claims")
    t0 = time.monotonic()
    b.stop()
    time.sleep(0.2)
    assert b.thread.is_alive()  # still inside its 60 s grace
    b.stop()
    b.join()
    assert time.monotonic() - t0 < 3
    assert [j.info().state for j in jobs] == [JobState.READY, JobState.READY]


# -- wakeups ----------------------------------------------------------------------------------


def test_jobs_are_picked_up_when_pubsub_is_down(app: JobQ, r: redis.Redis, bg: list[Background]) -> None:
    @app.task
    def ping() -> str:
        return "pong"

    b = Background(app, poll_interval=0.3)
    bg.append(b)
    wait_for(lambda: b.worker.pubsub_connected, 5, "pub/sub")
    # Idle and subscribed: a new job is announced and starts well inside the poll interval.
    t0 = time.monotonic()
    assert ping.enqueue().result(timeout=5, poll_interval=0.005) == "pong"
    assert time.monotonic() - t0 < 0.25
    # Cut the subscription: jobs still start within the poll interval, and it comes back.
    r.client_kill_filter(_type="pubsub")
    assert ping.enqueue().result(timeout=5) == "pong"
    wait_for(lambda: b.worker.pubsub_connected, 5, "pub/sub reconnect")
    b.stop()
    b.join()


def test_an_idle_node_starts_a_delayed_job_when_it_comes_due(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    started: list[int] = []

    @app.task
    def later() -> None:
        sec, usec = r.time()
        started.append(int(sec) * 1000 + int(usec) // 1000)

    # A long poll interval: only the next-due time the claim reports can wake it in time.
    b = Background(app, poll_interval=30)
    bg.append(b)
    wait_for(lambda: b.worker.pubsub_connected, 5, "pub/sub")
    job = later.enqueue(_delay=0.5)
    run_at = job.info().run_at_ms
    assert run_at is not None
    wait_for(lambda: job.status() is JobState.DONE, 5, "the delayed job")
    assert run_at <= started[0] <= run_at + 250  # never early; late by a claim at most
    b.stop()
    b.join()


def test_a_node_waits_for_an_unreachable_redis_and_stops_cleanly(
    app: JobQ, bg: list[Background], caplog: pytest.LogCaptureFixture
) -> None:
    from tests.harness.redis_server import free_port

    dead = JobQ(f"redis://127.0.0.1:{free_port()}/0")
    b = Background(dead)
    bg.append(b)
    wait_for(lambda: "not reachable yet" in caplog.text, 10, "the retry warning")
    b.stop()
    b.join(10)
    assert b.worker.stats["claimed"] == 0


def test_expired_jobs_filling_a_claim_do_not_delay_the_next_job(
    redis_url: str, r: redis.Redis, bg: list[Background]
) -> None:
    clock = jobq.FakeClock()
    app = JobQ(redis_url, clock=clock)

    @app.task
    def work() -> str:
        return "ran"

    # Due in 5 s; three of them expire 0.5 s after that, the last one never.
    expired = [app.enqueue(work, delay=5, deadline=timedelta(seconds=5.5)) for _ in range(3)]
    job = app.enqueue(work, delay=5)
    b = Background(app, concurrency=3, poll_interval=30, maintenance=False)
    bg.append(b)
    wait_for(lambda: b.worker.pubsub_connected, 5, "pub/sub")
    time.sleep(0.1)  # let the node settle into its (30 s) idle wait
    clock.advance(10)
    r.execute_command("SPUBLISH", app.keys.wake("default", b.worker.node), "r")
    # Its claim of 3 pops expired jobs (dead-lettered) among them: a batch filled that way is
    # not a sign of an empty queue, so the node must look again at once, not after 30 s.
    assert job.result(timeout=5, poll_interval=0.01) == "ran"
    assert [j.status() for j in expired] == [JobState.DEAD] * 3
    b.stop()
    b.join()
    app.close()


def test_a_silent_pubsub_connection_is_detected_and_replaced(
    redis_url: str,
    redis_server: Any,
    bg: list[Background],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jobq.storage import wakeups
    from tests.harness.chaos_proxy import ChaosProxy

    # A partition raises nothing on an idle subscription: only the PING probe can tell.
    monkeypatch.setattr(wakeups, "PING_INTERVAL", 0.3)
    proxy = ChaosProxy(redis_server.port).start()
    try:
        app = JobQ(proxy.url(redis_url))
        b = Background(app, poll_interval=0.2, maintenance=False)
        bg.append(b)
        wait_for(lambda: b.worker.pubsub_connected, 5, "pub/sub")
        proxy.blackhole()
        wait_for(lambda: not b.worker.pubsub_connected, 5, "the silent subscription noticed")
        proxy.pass_()
        wait_for(lambda: b.worker.pubsub_connected, 10, "pub/sub back after the heal")
        b.stop()
        b.join()
        app.close()
    finally:
        proxy.stop()


def test_heartbeat_renews_every_lease_third_in_one_round_trip(
    app: JobQ, bg: list[Background], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobq.storage.calls import SyncRunner
    from jobq.storage.scripts import ScriptName

    beats: list[tuple[float, list[str]]] = []
    real = SyncRunner.run_many

    def spy(self: SyncRunner, calls: Any, **kw: Any) -> Any:
        if calls and all(c.script is ScriptName.EXTEND for c in calls):
            beats.append((time.monotonic(), [c.queue for c in calls]))
        return real(self, calls, **kw)

    monkeypatch.setattr(SyncRunner, "run_many", spy)
    b = Background(app, queues=[("a", 1), ("b", 1), ("c", 1)], lease=0.6, maintenance=False)
    bg.append(b)
    wait_for(lambda: len(beats) >= 6, 5, "6 beats")
    b.stop()
    b.join()
    # One pipelined round trip per beat renews every queue; beats come every lease / 3.
    assert all(sorted(qs) == ["a", "b", "c"] for _, qs in beats)
    gaps = sorted(t2 - t1 for (t1, _), (t2, _) in itertools.pairwise(beats[:6]))
    assert 0.15 <= gaps[len(gaps) // 2] <= 0.3, gaps  # the median: robust to a loaded machine


def test_a_producer_of_an_earlier_version_still_wakes_an_idle_node(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    """Earlier versions' enqueue script PUBLISHes on the queue's classic channel: an idle node
    with a 60 s poll interval still hears it (a rolling upgrade loses no wake-ups)."""

    @app.task
    def ping() -> str:
        return "pong"

    b = Background(app, poll_interval=60)
    bg.append(b)
    wait_for(lambda: b.worker.pubsub_connected, 5, "pub/sub")
    wait_for(lambda: r.zcard(app.keys.idle("default")) == 1, 5, "armed")
    r.delete(app.keys.idle("default"))  # as if the job came through an old script: no token popped
    job = ping.enqueue()
    assert r.publish(app.keys.wake_all("default"), "r") == 1
    assert job.result(timeout=5, poll_interval=0.005) == "pong"
    b.stop()
    b.join()


def test_a_woken_node_without_a_free_slot_passes_the_wake_up_on(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    """Node a (one slot, queues q1 and q2) is the longest idle in both; a long job in q1 fills
    it; a job in q2 then pops a's token first, and a hands the wake-up to b, which runs it at
    once (both poll only every 60 s)."""
    release = threading.Event()
    ran: list[str] = []

    @app.task(queue="q1")
    def hold() -> None:
        release.wait(20)

    @app.task(queue="q2")
    def quick() -> str:
        ran.append("q2")
        return "ok"

    a = Background(app, queues=[("q1", 1), ("q2", 1)], concurrency=1, poll_interval=60, node_id="a")
    bg.append(a)
    wait_for(lambda: r.zcard(app.keys.idle("q1")) == 1 and r.zcard(app.keys.idle("q2")) == 1, 5, "a armed")
    b = Background(app, queues=[("q2", 1)], concurrency=1, poll_interval=60, node_id="b")
    bg.append(b)
    wait_for(lambda: r.zcard(app.keys.idle("q2")) == 2, 5, "b armed")
    try:
        hold.enqueue()
        wait_for(lambda: a.worker.busy == 1, 5, "a busy")
        assert [m.decode() for m in r.zrange(app.keys.idle("q2"), 0, -1)] == ["a", "b"]
        t0 = time.monotonic()
        assert quick.enqueue().result(timeout=5, poll_interval=0.005) == "ok"
        assert time.monotonic() - t0 < 2  # not a poll: a passed it on, b ran it
        assert b.worker.stats["completed"] == 1 and a.worker.stats["completed"] == 0
    finally:
        release.set()
    for n in (a, b):
        n.stop()
        n.join()


def test_dead_letters_trimmed_by_count_are_counted_and_logged(
    redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """dead_max = 2 and four jobs that die: two dead letters are deleted as the later ones die,
    and the node says so, in jobq_dead_trimmed_total and one WARNING line per trim."""
    app = JobQ(redis_url, dead_max=2)
    try:

        @app.task(max_attempts=1)
        def boom(i: int) -> None:
            raise RuntimeError(f"boom {i}")

        jobs = [boom.enqueue(i) for i in range(4)]
        metrics = Metrics(app, collect_queues=False)
        w = Worker(app, WorkerConfig(burst=True, concurrency=1), metrics=metrics)
        with caplog.at_level("WARNING"):
            asyncio.run(w.run())
        # Two dead letters kept, two deleted (which ones: the oldest by time of death, and jobs
        # dying in the same millisecond tie, so not asserted).
        states = collections.Counter(j.status() for j in jobs)
        assert states == {JobState.DEAD: 2, JobState.UNKNOWN: 2}, states
        assert r.zcard(app.keys.dead("default")) == 2
        assert 'jobq_dead_trimmed_total{queue="default"} 2.0' in metrics.exposition().decode()
        lines = [x.getMessage() for x in caplog.records if "dead letter(s) deleted" in x.getMessage()]
        assert len(lines) == 2 and all("dead_max (2)" in line for line in lines), lines
    finally:
        app.close()


def test_max_interruptions_zero_never_dead_letters_but_still_counts(
    app: JobQ, r: redis.Redis, bg: list[Background]
) -> None:
    """--max-interruptions 0 means never dead-letter; a started job released at the end of the
    grace still keeps its attempt and counts its interruption (0 is not "never started")."""

    started = threading.Semaphore(0)

    @app.task
    async def forever() -> None:
        started.release()
        await asyncio.sleep(60)

    job = forever.enqueue()
    for n in (1, 2):
        b = Background(app, grace=0.1, max_interruptions=0)
        bg.append(b)
        assert started.acquire(timeout=5), "the job did not start"
        b.stop()
        b.join()
        info = job.info()
        assert (info.state, info.attempts, info.interrupted) == (JobState.READY, n, n)
