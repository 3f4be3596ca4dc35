"""Process faults (RELIABILITY.md 2.2): real ``jobq worker`` processes killed, stopped, crashed.

Test configuration (RELIABILITY 2.1.3): lease 2 s, reap interval 0.5 s, grace 3 s, so a dead
node's jobs must start again within lease + reap interval + 1 s = 3.5 s. Every test logs its seed
(``JOBQ_SEED=<n>`` replays it) and, on failure, the history directory. The ``ci`` tier runs a few
trials of each; ``scripts/nightly`` (``JOBQ_NIGHTLY=1``) runs the 100-trial versions.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import jobq
from jobq import JobQ
from jobq._fault_injection import CRASH_EXIT_CODE
from tests.fault.conftest import tier
from tests.harness.checker import Snapshot, assert_invariants, check, wait_drained
from tests.harness.fleet import Node, WorkerFleet
from tests.harness.history import ARECORD_TASK, History, Producer

pytestmark = [pytest.mark.fault]

LEASE, REAP, GRACE = 2.0, 0.5, 3.0
#: G3 in test configuration: lease + reap interval + 1 s.
RECOVERY = LEASE + REAP + 1.0
NODE_TTL = 2 * LEASE
Q = "fault"


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - t0


def active_key(node: Node | str, q: str = Q) -> str:
    return f"jobq:{{{q}}}:active:{node if isinstance(node, str) else node.name}"


def ctx(seed: int, history: History) -> str:
    return f"seed={seed} (replay: JOBQ_SEED={seed}) history={history.dir}"


def claim_all_on(
    victim: Node, helpers: list[Node], r: redis.Redis, enqueue: Callable[[], list[str]], n: int
) -> list[str]:
    """Enqueue with the helpers frozen so that ``victim`` claims all ``n`` jobs; thaw them."""
    for h in helpers:
        h.stop()
    try:
        ids = enqueue()
        wait_until(lambda: r.zcard(active_key(victim)) >= n or not victim.alive(), 10, "victim claims all")
    finally:
        for h in helpers:
            h.cont()
    return ids


# -- F1: SIGKILL with 20 in flight, and the named crash points -------------------------------------
CRASH_SPECS = {
    "after_claim": "after_claim:1",
    # The timer fires 0.3 s after the first job starts: all 20 run (0.5-1.5 s each).
    "mid_execute": "mid_execute:1:0.3",
    "before_ack": "before_ack:1",
    "after_ack_sent": "after_ack_sent:1",
}


def run_f1(
    fleet: WorkerFleet,
    history: History,
    app: JobQ,
    r: redis.Redis,
    seed: int,
    points: list[str | None],
) -> dict[str, Any]:
    rng = random.Random(seed)
    prod = Producer(app, history)
    helpers = fleet.start(2, concurrency=10)
    trials: list[dict[str, Any]] = []
    for i, point in enumerate(points):
        env = {"JOBQ_CRASH_POINT": CRASH_SPECS[point], "JOBQ_CRASH_SEED": str(seed + i)} if point else {}
        victim = fleet.spawn(f"v{i}", concurrency=20, env=env)
        durations = [rng.uniform(0.5, 1.5) for _ in range(20)]
        ids = claim_all_on(
            victim,
            helpers,
            r,
            lambda d=durations: prod.enqueue_batch(  # type: ignore[misc]
                20, per_job=[{"sleep": x} for x in d], options={"max_attempts": 5}
            ),
            20,
        )
        assert len(ids) == 20
        if point is None:
            delay = rng.uniform(0.05, 0.45)  # before the shortest job ends: 20 in flight
            time.sleep(delay)
            assert r.zcard(active_key(victim)) == 20
            t_kill = time.time()
            victim.kill()
        else:
            rc = victim.wait(15)
            t_kill = time.time()
            assert rc == CRASH_EXIT_CODE, f"{point}: exit code {rc}\n{victim.log_text()[-2000:]}"
            assert f"crash point {point}" in victim.log_text()
        wait_drained(r, [Q], timeout=30)
        trials.append({"victim": victim.name, "point": point, "t_kill": t_kill, "ids": ids})
    return {"helpers": helpers, "trials": trials}


def check_f1(
    run: dict[str, Any],
    history: History,
    r: redis.Redis,
    seed: int,
    fleet: WorkerFleet,
    figures: Any,
    test_id: str,
) -> None:
    snap = Snapshot.take(r)
    rep = check(history, snap)
    rep.assert_ok(ctx(seed, history))
    assert not rep.lost and not rep.dead
    by_job = history.by_job()
    recoveries: list[float] = []
    rerun_total = 0
    for t in run["trials"]:
        rerun = []
        for jid in t["ids"]:
            js = snap.jobs[jid]
            assert js.state == "done", (jid, js)
            # Attempts: one per claim. The killed claim counted once, the re-run once: +1 exactly.
            assert js.attempts == 1 + js.reaped, (jid, js, ctx(seed, history))
            helper_runs = [a for a in by_job.get(jid, []) if a.node != t["victim"]]
            if helper_runs:
                rerun.append(jid)
                assert js.reaped == 1, (jid, js.reaped, ctx(seed, history))
                recoveries.append(helper_runs[0].t_start - t["t_kill"])
        rerun_total += len(rerun)
        if t["point"] in (None, "after_claim", "mid_execute", "before_ack"):
            assert len(rerun) == 20, (t["point"], len(rerun), ctx(seed, history))
        else:
            assert rerun, (t["point"], "no job was in flight at the crash")
    worst = max(recoveries)
    assert worst <= RECOVERY, f"recovery {worst:.2f} s > {RECOVERY} s; {ctx(seed, history)}"
    # The dead nodes' active lists and node entries are gone within 2 x node TTL.
    last_kill = run["trials"][-1]["t_kill"]
    victims = [t["victim"] for t in run["trials"]]

    def cleaned() -> bool:
        pipe = r.pipeline()
        for v in victims:
            pipe.exists(active_key(v))
            pipe.zscore(f"jobq:{{{Q}}}:nodes", v)
            pipe.exists(f"jobq:node:{v}")
        return not any(pipe.execute())

    wait_until(cleaned, max(0.1, last_kill + 2 * NODE_TTL + 1.0 - time.time()), "dead node cleanup")
    assert_invariants(
        r, ctx(seed, history), reap_interval_ms=int(REAP * 1000), node_ttl_ms=int(NODE_TTL * 1000)
    )
    assert not fleet.crashes(), fleet.crashes()
    figures(
        test_id,
        trials=len(run["trials"]),
        jobs=rep.enqueued_ok,
        lost=len(rep.lost),
        rerun=rerun_total,
        unexplained_duplicates=len(rep.unexplained_duplicates),
        recovery_max_s=round(worst, 2),
        recovery_bound_s=RECOVERY,
        seed=seed,
    )


def test_f1_sigkill_with_20_in_flight(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    run = run_f1(fleet, history, app, r, seed, [None] * tier(20, 100))
    check_f1(run, history, r, seed, fleet, figures, "F1")


@pytest.mark.parametrize("point", list(CRASH_SPECS))
def test_f1_crash_points(
    point: str, worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    run = run_f1(fleet, history, app, r, seed, [point] * tier(10, 10))
    check_f1(run, history, r, seed, fleet, figures, f"F1-{point}")


# -- F2: SIGTERM with 20 in flight and 50 queued ----------------------------------------------------
def test_f2_sigterm_graceful(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """Every running job finishes within grace; nothing else is claimed; exit 0; 0 duplicates."""
    rng = random.Random(seed)
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    prod = Producer(app, history)
    exits: list[float] = []
    trials = tier(20, 20)
    for i in range(trials):
        victim = fleet.spawn(f"v{i}", concurrency=20)
        # All 70 jobs take 0.3-2 s: shorter than the grace, longer than the signal delay.
        ids = prod.enqueue_batch(70, per_job=[{"sleep": rng.uniform(0.3, 2.0)} for _ in range(70)])
        wait_until(lambda v=victim: r.zcard(active_key(v)) == 20, 10, "20 in flight")
        time.sleep(rng.uniform(0.02, 0.2))
        assert r.zcard(active_key(victim)) == 20
        t0 = time.monotonic()
        victim.term()
        rc = victim.wait(GRACE + 5)
        exits.append(time.monotonic() - t0)
        assert rc == 0, victim.log_text()[-3000:]
        assert exits[-1] <= GRACE + 1, f"exit took {exits[-1]:.2f} s; {ctx(seed, history)}"
        assert not r.exists(active_key(victim))
        # 20 ran here; the 50 queued were never claimed, so their attempt count is 0.
        ran = {a.job_id for a in history.attempts() if a.node == victim.name}
        assert len(ran) == 20
        snap = Snapshot.take(r)
        for jid in ids:
            js = snap.jobs[jid]
            if jid in ran:
                assert js.state == "done" and js.attempts == 1, (jid, js)
            else:
                assert js.state == "ready" and js.attempts == 0, (jid, js)
        # Another node runs the rest.
        helper = fleet.spawn(f"h{i}", concurrency=20)
        wait_drained(r, [Q], timeout=30)
        helper.term()
        assert helper.wait(GRACE + 5) == 0
    snap = Snapshot.take(r)
    rep = check(history, snap)
    rep.assert_ok(ctx(seed, history))
    assert not rep.duplicates, rep.duplicates
    assert all(js.attempts == 1 and js.state == "done" for js in snap.jobs.values())
    assert_invariants(r, ctx(seed, history), reapers_running=False)
    figures(
        "F2",
        trials=trials,
        jobs=rep.enqueued_ok,
        lost=len(rep.lost),
        duplicates=len(rep.duplicates),
        exit_max_s=round(max(exits), 2),
        exit_bound_s=GRACE + 1,
        seed=seed,
    )


def test_f2_second_signal_releases_at_once(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """Jobs longer than the grace: a second SIGTERM exits < 1 s, releasing every job held (a
    started one keeps its attempt and counts an interruption); another node then runs each
    exactly once more."""
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    prod = Producer(app, history)
    victim = fleet.spawn("v0", concurrency=20)
    ids = prod.enqueue_batch(70, slow=30.0, slow_node="v0", sleep=0.05)
    wait_until(lambda: r.zcard(active_key(victim)) == 20, 10, "20 in flight")
    time.sleep(0.3)
    victim.term()
    time.sleep(0.5)
    assert victim.alive(), "exited before the grace ended although its jobs run 30 s"
    t0 = time.monotonic()
    victim.term()
    rc = victim.wait(10)
    took = time.monotonic() - t0
    assert rc == 0, victim.log_text()[-3000:]
    assert took < 1.0, f"second signal: exit took {took:.2f} s"
    assert not r.exists(active_key(victim))
    snap = Snapshot.take(r)
    # The 20 that started keep their attempt and count an interruption; the rest never started.
    started = {a.job_id for a in history.attempts() if a.node == victim.name}
    assert len(started) == 20
    for j in ids:
        want = (1, b"1") if j in started else (0, None)
        got = (snap.jobs[j].attempts, r.hget(app.keys.job(Q, j), "interrupted"))
        assert snap.jobs[j].state == "ready" and got == want, (j, snap.jobs[j], got)
    fleet.spawn("h0", concurrency=20)
    wait_drained(r, [Q], timeout=30)
    snap = Snapshot.take(r)
    rep = check(history, snap, allow_release=True)
    rep.assert_ok(ctx(seed, history))
    assert len(rep.duplicates) == 20 and all(n == 2 for n in rep.duplicates.values())
    assert all(
        js.attempts == (2 if j in started else 1) and js.state == "done" for j, js in snap.jobs.items()
    )
    figures(
        "F2-second-signal",
        jobs=rep.enqueued_ok,
        released=20,
        lost=len(rep.lost),
        exit_after_second_signal_s=round(took, 2),
        bound_s=1.0,
        seed=seed,
    )


# -- F3: SIGSTOP beyond the lease, then SIGCONT -----------------------------------------------------
@pytest.mark.parametrize("task", ["sync", "async"])
def test_f3_sigstop_beyond_lease(
    task: str, worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    rng = random.Random(seed)
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    prod = Producer(app, history, task=ARECORD_TASK if task == "async" else "fault.record")
    victim, helper = fleet.start(2, concurrency=10)
    notice: list[float] = []
    trials = tier(10, 10)
    n = 10
    for _ in range(trials):
        stale_before = len([ln for ln in victim.log_text().splitlines() if "stale completion" in ln])
        ids = claim_all_on(
            victim, [helper], r, lambda: prod.enqueue_batch(n, sleep=2.0 + rng.uniform(0, 0.3)), n
        )
        time.sleep(0.3)
        victim.stop()
        time.sleep(3 * LEASE)
        # Meanwhile the helper re-ran them all (reaped at <= lease + reap, 2 s each).
        by_job = history.by_job()
        assert all(
            any(a.node == helper.name and a.outcome == "ok" for a in by_job.get(j, [])) for j in ids
        ), f"helper did not finish every job while the victim was stopped; {ctx(seed, history)}"
        victim.cont()

        def noticed(before: int = stale_before) -> bool:
            lines = [ln for ln in victim.log_text().splitlines() if "stale completion" in ln]
            return len(lines) - before >= n

        notice.append(wait_until(noticed, 10, "victim counts its stale jobs"))
        wait_drained(r, [Q], timeout=20)
        # G4: the resumed node claims again (helper frozen so the work must go to the victim).
        resumed = claim_all_on(victim, [helper], r, lambda: prod.enqueue_batch(3, sleep=0.1), 3)
        wait_drained(r, [Q], timeout=10)
        assert all(a.node == victim.name for j in resumed for a in history.by_job()[j])
    snap = Snapshot.take(r)
    rep = check(history, snap, stale_reported=fleet.stale_count())
    rep.assert_ok(ctx(seed, history))
    by_job = history.by_job()
    stopped_ids = [j for j, runs in by_job.items() if len(runs) > 1]
    assert len(stopped_ids) == n * trials
    for jid in stopped_ids:
        js = snap.jobs[jid]
        # One extra start, tied to one reap; the winner's result stands.
        assert len(by_job[jid]) == 2 and js.reaped == 1, (jid, js, by_job[jid])
        assert js.node == helper.name and js.result["node"] == helper.name, (jid, js)
    # Every run of the stopped node was refused (sync: ack refused / result dropped; async:
    # cancelled or refused) and counted once.
    assert rep.non_winner_ok + rep.cancelled == n * trials == rep.stale_reported, rep.summary()
    # It noticed within one heartbeat interval after resuming (+ scheduling slack).
    assert max(notice) <= LEASE / 3 + 1.0, notice
    assert_invariants(
        r, ctx(seed, history), reap_interval_ms=int(REAP * 1000), node_ttl_ms=int(NODE_TTL * 1000)
    )
    assert not fleet.crashes()
    figures(
        f"F3-{task}",
        trials=trials,
        jobs=rep.enqueued_ok,
        lost=len(rep.lost),
        extra_starts_per_job_max=max(len(by_job[j]) - 1 for j in stopped_ids),
        stale_refused=rep.stale_reported,
        notice_max_s=round(max(notice), 2),
        seed=seed,
    )


# -- the per-attempt fence, end to end (issue 16) -------------------------------------------------
def _labelled(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_fence_stale_attempt_of_a_job_its_own_node_claimed_again(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """One node, a sync task. Attempt 1 of X finishes and its ack is held on its way
    (``JOBQ_HOLD_POINT``); the node is SIGSTOPped past its lease; X is reaped back to the head of
    ready; the node is SIGCONTed, claims X again (attempt 2) and runs it. Then attempt 1's ack
    reaches Redis: refused as stale, and counted. X ends done by attempt 2 with its result; the
    checker finds nothing else. (Before the per-attempt fence, attempt 1's ack finished X with its
    result, and attempt 2's ack was answered "already finished by this node".)"""
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    prod = Producer(app, history)
    node = fleet.spawn(
        "n1", concurrency=2, env={"JOBQ_HOLD_POINT": "before_ack"}, extra=["--metrics-port", "0"]
    )
    port = node.metrics_port()
    [jid] = prod.enqueue_batch(1, sleep=0.05)
    wait_until(lambda: "holding at before_ack" in node.log_text(), 10, "attempt 1's ack held")
    node.stop()

    def lease_expired() -> bool:
        score = r.zscore(app.keys.leases(Q), jid)
        sec, usec = r.time()
        return score is not None and score < sec * 1000 + usec // 1000

    wait_until(lease_expired, 3 * LEASE, "the stopped node's lease expires", interval=0.05)
    assert app.run(app.store.reap(Q, node_ttl_ms=int(NODE_TTL * 1000))).requeued == [jid]
    node.cont()

    def attempt2_ran() -> bool:
        return any(a.attempt == 2 and a.outcome == "ok" for a in history.by_job().get(jid, []))

    wait_until(attempt2_ran, 10, "the same node claims X again and runs attempt 2")
    # Attempt 2's ack waits behind attempt 1's held one: X is still attempt 2's, on this node.
    assert r.hmget(app.keys.job(Q, jid), "state", "attempts", "node") == [b"active", b"2", b"n1"]
    node.signal(signal.SIGUSR1)
    wait_drained(r, [Q], timeout=10)
    wait_until(lambda: fleet.stale_count() >= 1, 5, "the stale completion is logged")
    snap = Snapshot.take(r)
    js = snap.jobs[jid]
    assert js.state == "done" and js.attempts == 2 and js.reaped == 1, js
    assert js.result["attempt"] == 2 and js.result["node"] == "n1", js.result
    runs = history.by_job()[jid]
    assert [(a.attempt, a.outcome) for a in runs] == [(1, "ok"), (2, "ok")], runs
    assert fleet.stale_count() == 1
    metrics = node.scrape(port)
    assert _labelled(metrics, "jobq_jobs_stale_total", queue=Q) == 1
    assert _labelled(metrics, "jobq_jobs_completed_total", queue=Q) == 1
    rep = check(history, snap, stale_reported=fleet.stale_count())
    rep.assert_ok(ctx(seed, history))
    assert rep.non_winner_ok == 1 == rep.stale_reported and not rep.lost, rep.summary()
    assert_invariants(
        r, ctx(seed, history), reap_interval_ms=int(REAP * 1000), node_ttl_ms=int(NODE_TTL * 1000)
    )
    assert not fleet.crashes()
    figures("fence-reclaimed", stale_refused=rep.stale_reported, attempts=js.attempts, seed=seed)


# -- interruptions: a job longer than the grace, SIGTERMed again and again (issue 16) ------------
def test_interrupted_job_is_dead_lettered_after_max_interruptions(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """A sync job that outlasts the grace: every SIGTERM releases it with its attempt kept and an
    interruption counted (the next run is attempt k + 1); at --max-interruptions it is
    dead-lettered with reason ``interrupted`` instead of re-running at every deploy forever."""
    limit = 3
    fleet = worker_fleet(lease=LEASE, grace=0.3, reap_interval=REAP)
    prod = Producer(app, history)
    [jid] = prod.enqueue_batch(1, sleep=30.0, options={"max_attempts": 5})
    key = app.keys.job(Q, jid)
    node: Node | None = None
    for k in range(1, limit + 1):
        extra = ["--max-interruptions", str(limit), "--metrics-port", "0"]
        node = fleet.spawn("n1", concurrency=2, extra=extra) if node is None else fleet.restart(node)
        wait_until(
            lambda k=k: any(a.attempt == k for a in history.by_job().get(jid, [])),  # type: ignore[misc]
            10,
            f"run {k} starts",
        )
        node.term()
        assert node.wait(10) == 0, node.log_text()[-3000:]
        state, attempts, interrupted = r.hmget(key, "state", "attempts", "interrupted")
        assert int(attempts) == k and int(interrupted) == k, (k, state, attempts, interrupted)
        if k < limit:
            assert state == b"ready"
    info = app.job(jid, Q).info()
    assert info.state is jobq.JobState.DEAD and info.interrupted == limit and info.attempts == limit
    assert info.error is not None and info.error.startswith("interrupted"), info.error
    assert r.zscore(app.keys.dead(Q), jid) is not None
    assert node is not None and f"job {jid} dead-lettered at release: interrupted" in node.log_text()
    assert len(history.by_job()[jid]) == limit
    assert_invariants(r, ctx(seed, history), reapers_running=False)
    figures("interrupted", interruptions=info.interrupted, attempts=info.attempts, seed=seed)


def test_a_buffered_job_released_at_stop_keeps_attempts_zero(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int
) -> None:
    """Jobs claimed ahead of a free slot (the prefetch buffer) never started: the stop hands them
    back with no attempt and no interruption counted."""
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    prod = Producer(app, history)
    node = fleet.spawn("n1", concurrency=2)
    # Quick jobs first, so the node learns its run time and prefetches; then slow ones fill both
    # slots and the buffer.
    prod.enqueue_batch(40, sleep=0.005)
    wait_drained(r, [Q], timeout=10)
    slow = prod.enqueue_batch(6, sleep=1.0)

    def buffered() -> list[str]:
        held = [x.decode() for x in r.zrange(active_key(node), 0, -1)]
        started = {a.job_id for a in history.attempts() if a.node == node.name}
        return [j for j in held if j in slow and j not in started]

    wait_until(lambda: len(buffered()) > 0, 10, "a job waits in the prefetch buffer")
    held_unstarted = buffered()
    node.term()
    assert node.wait(GRACE + 5) == 0, node.log_text()[-3000:]
    for jid in held_unstarted:
        if any(a.job_id == jid for a in history.attempts()):
            continue  # it started from the buffer before the stop
        attempts, interrupted = r.hmget(app.keys.job(Q, jid), "attempts", "interrupted")
        assert int(attempts) == 0 and interrupted is None, (jid, attempts, interrupted)


# -- F11: poison pill ------------------------------------------------------------------------------
def test_f11_poison_pill(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    prod = Producer(app, history)
    nodes = fleet.start(2, concurrency=5)
    for node in nodes:
        fleet.supervise(node)
    n = 1000
    ok = prod.enqueue_batch(n // 2, options={"max_attempts": 5})
    poison = "poison-pill"
    assert prod.enqueue(poison, mode="exit", options={"max_attempts": 3}) == "enqueue_ok"
    ok += prod.enqueue_batch(n - n // 2, options={"max_attempts": 5})
    wait_until(lambda: r.hget(f"jobq:{{{Q}}}:job:{poison}", "state") == b"dead", 60, "poison dead")
    wait_drained(r, [Q], timeout=60)
    snap = Snapshot.take(r)
    js = snap.jobs[poison]
    assert js.state == "dead" and js.attempts == 3, js
    assert js.error and js.error.startswith("lease_expired"), js.error
    assert len([a for a in history.attempts() if a.job_id == poison]) == 3
    rep = check(history, snap)
    rep.assert_ok(ctx(seed, history))
    assert set(rep.dead) == {poison} and rep.completed == n
    restarts = sum(node.restarts for node in nodes)
    assert restarts == 3, [(node.name, node.exit_codes) for node in nodes]
    assert sorted(c for node in nodes for c in node.exit_codes) == [1, 1, 1]
    figures("F11", jobs=n, completed=rep.completed, poison_claims=js.attempts, restarts=restarts, seed=seed)


# -- F12: a sync task stuck in a system call --------------------------------------------------------
def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return 0


def test_f12_sync_task_stuck_in_recv(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # never accepts, never sends: connect() succeeds, recv() blocks
    host, port = silent.getsockname()
    addr = f"{host}:{port}"
    try:
        fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
        prod = Producer(app, history)
        a = fleet.spawn("a", concurrency=1, extra=["--metrics-port", "0"])
        baseline = _threads(a.pid)
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], _threads(a.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stuck = "stuck-recv"
        prod.enqueue(
            stuck,
            mode="recv",
            addr=addr,
            sleep=8.0,
            options={"timeout": 1.0, "max_attempts": 2, "retry_backoff": 0},
        )
        wait_until(lambda: any(x.job_id == stuck for x in history.attempts()), 10, "stuck job starts")
        t_start = next(x.t_start for x in history.attempts() if x.job_id == stuck)
        wait_until(
            lambda: (r.hget(f"jobq:{{{Q}}}:job:{stuck}", "error") or b"").startswith(b"timeout"),
            10,
            "the job is failed with a timeout",
        )
        t_failed = time.time()
        fail_latency = t_failed - t_start
        # Its only thread is a zombie now: the node must not claim work it cannot start.
        b = fleet.spawn("b", concurrency=2, extra=["--metrics-port", "0"])
        ids = prod.enqueue_batch(10, sleep=0.05)
        wait_until(lambda: all(j in history.completed() for j in ids), 15, "other jobs complete")
        wait_until(lambda: r.hget(f"jobq:{{{Q}}}:job:{stuck}", "state") == b"dead", 15, "stuck job dead")
        assert all(x.node == "b" for j in ids for x in history.by_job()[j]), (
            "node a claimed work it could not run"
        )
        stop.set()
        sampler.join()
        # The stuck thread is counted where an operator looks (RELIABILITY.md F12). Scraped only
        # now: each scrape is served on a thread of its own, which the sampler would count.
        # Each attempt of the stuck job left one such thread on the node that ran it.
        stuck_on = [x.node for x in history.by_job()[stuck]]
        for n in (a, b):
            assert n.sample("jobq_node_zombie_threads") == stuck_on.count(n.name), (n.name, stuck_on)
        t0 = time.monotonic()
        a.term()
        rc = a.wait(GRACE + 5)
        took = time.monotonic() - t0
        assert rc == 0 and took <= GRACE + 1, (rc, took)
        zombie_lines = [ln for ln in a.log_text().splitlines() if "still running at exit" in ln]
        b.term()
        assert b.wait(GRACE + 5) == 0
    finally:
        silent.close()
    snap = Snapshot.take(r)
    # Attempt 1 failed with a timeout that its stuck thread could not record.
    rep = check(history, snap, explained={stuck: 1})
    rep.assert_ok(ctx(seed, history))
    assert snap.jobs[stuck].attempts == 2 and snap.jobs[stuck].error.startswith("timeout")
    assert fail_latency <= 1.0 + LEASE / 3 + 0.5, fail_latency
    assert peak[0] <= baseline + 1, (baseline, peak)
    figures(
        "F12",
        fail_latency_s=round(fail_latency, 2),
        bound_s=round(1.0 + LEASE / 3, 2),
        threads_baseline=baseline,
        threads_peak=peak[0],
        concurrency=1,
        zombie_exit_log=zombie_lines[-1] if zombie_lines else "",
        lost=len(rep.lost),
        seed=seed,
    )


# -- F13: an async task blocks the event loop for 3 x lease -----------------------------------------
def test_f13_async_task_blocks_the_loop(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    prod = Producer(app, history, task=ARECORD_TASK)
    a, helper = fleet.start(2, concurrency=10)

    def enqueue() -> list[str]:
        others = prod.enqueue_batch(8, sleep=1.0)
        prod.enqueue("blocker", mode="block", sleep=3 * LEASE, options={"timeout": 2.0, "max_attempts": 1})
        return [*others, "blocker"]

    ids = claim_all_on(a, [helper], r, enqueue, 9)
    wait_drained(r, [Q], timeout=30)
    snap = Snapshot.take(r)
    rep = check(history, snap)
    rep.assert_ok(ctx(seed, history))
    reaps = sum(snap.jobs[j].reaped for j in ids)
    assert reaps == 0, {j: snap.jobs[j].reaped for j in ids}
    assert not rep.duplicates
    assert all(x.node == a.name for j in ids for x in history.by_job()[j])
    # The blocker overran its 2 s timeout while it held the loop; at its first await the
    # timeout fires: failed (max_attempts=1: dead) with a timeout error, never reaped.
    blocker = snap.jobs["blocker"]
    assert blocker.state == "dead" and (blocker.error or "").startswith("timeout"), blocker
    assert not fleet.crashes()
    figures(
        "F13",
        reaps_of_other_jobs=reaps,
        duplicates=len(rep.duplicates),
        blocker_state=blocker.state,
        blocker_error=blocker.error,
        seed=seed,
    )


def test_f12_max_zombies_drains_and_exits(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """``--max-zombies 1``: the first stuck thread makes the node drain and exit 0 within grace;
    another node runs the retry and the rest of the queue."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    host, port = silent.getsockname()
    try:
        fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
        prod = Producer(app, history)
        a = fleet.spawn("a", concurrency=2, extra=["--max-zombies", "1"])
        stuck = "stuck-recv"
        prod.enqueue(
            stuck,
            mode="recv",
            addr=f"{host}:{port}",
            sleep=8.0,
            options={"timeout": 1.0, "max_attempts": 2, "retry_backoff": 0},
        )
        ids = prod.enqueue_batch(5, sleep=0.5)
        rc = a.wait(15)
        t_exit = time.time()
        assert rc == 0, a.log_text()[-3000:]
        t_start = next(x.t_start for x in history.attempts() if x.job_id == stuck and x.node == "a")
        took = t_exit - t_start - 1.0  # from the timeout to the exit
        assert took <= GRACE + 1, took
        assert "--max-zombies 1" in a.log_text()
        assert not r.exists(active_key(a))
        fleet.spawn("b", concurrency=2)
        wait_until(lambda: r.hget(f"jobq:{{{Q}}}:job:{stuck}", "state") == b"dead", 20, "stuck job dead")
        wait_drained(r, [Q], timeout=20)
    finally:
        silent.close()
    snap = Snapshot.take(r)
    rep = check(history, snap, explained={stuck: 1}, allow_release=True)
    rep.assert_ok(ctx(seed, history))
    assert all(snap.jobs[j].state == "done" for j in ids)
    figures(
        "F12-max-zombies", exit_code=rc, exit_after_timeout_s=round(took, 2), bound_s=GRACE + 1, seed=seed
    )
