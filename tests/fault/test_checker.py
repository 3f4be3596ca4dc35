"""The fault harness's checker and invariant scan catch what they are meant to catch.

A checker that never fails proves nothing: each test here builds a history or a keyspace with
one known fault and asserts that the checker names it; a clean run through the real scripts
yields no violation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from jobq import JobQ
from tests.harness.checker import Snapshot, check, scan_invariants
from tests.harness.history import ENQUEUE_ERROR, ENQUEUE_OK, ENQUEUE_UNKNOWN, History, RecordFile

Q = "fault"


def _run(hist: History, job: str, node: str, outcome: str | None, attempt: int = 1) -> None:
    f = RecordFile(hist.dir / f"worker-{node}-1.jsonl", fsync=False)
    run = f"{job}-{node}-{attempt}-{time.monotonic_ns()}"
    t = time.time()
    f.append({"ev": "start", "job": job, "node": node, "pid": 1, "attempt": attempt, "t": t, "run": run})
    if outcome is not None:
        f.append({"ev": "end", "job": job, "node": node, "t": t + 0.01, "run": run, "outcome": outcome})
    f.close()


def _enqueue(app: JobQ, hist: History, job: str, status: str = ENQUEUE_OK) -> None:
    if status != ENQUEUE_ERROR:
        app.enqueue("fault.record", [job, 0], queue=Q, job_id=job)
    hist.log_enqueue(job, status)


def _claim_ack(app: JobQ, node: str, job: str, *, ack: bool = True) -> None:
    res = app.run(app.store.claim(Q, node, 10, 60_000))
    assert job in [j.id for j in res.jobs]
    if ack:
        assert app.run(app.store.ack(Q, node, [(job, b"")])) == [1]


def test_clean_run_has_no_violation(app: JobQ, r: redis.Redis, tmp_path: Path) -> None:
    hist = History(tmp_path)
    for j in ("a", "b"):
        _enqueue(app, hist, j)
        _claim_ack(app, "n1", j)
        _run(hist, j, "n1", "ok")
    rep = check(hist, Snapshot.take(r))
    assert rep.ok and rep.completed == 2 and not rep.duplicates, rep.summary()
    assert scan_invariants(r) == []


def test_lost_unexpected_and_recovered(app: JobQ, r: redis.Redis, tmp_path: Path) -> None:
    hist = History(tmp_path)
    _enqueue(app, hist, "stuck")  # enqueued, never ran: still ready at the end
    _enqueue(app, hist, "maybe", ENQUEUE_UNKNOWN)
    _claim_ack(app, "n1", "maybe")
    _run(hist, "maybe", "n1", "ok")
    _run(hist, "ghost", "n1", "ok")  # ran, never enqueued
    _enqueue(app, hist, "refused", ENQUEUE_ERROR)
    _run(hist, "refused", "n1", "ok")  # refused, yet it ran
    rep = check(hist, Snapshot.take(r))
    assert rep.lost == ["stuck"]
    assert rep.recovered == ["maybe"]
    assert rep.unexpected == ["ghost", "refused"]
    assert not rep.ok


def test_duplicates_need_a_reap_or_a_planned_failure(app: JobQ, r: redis.Redis, tmp_path: Path) -> None:
    hist = History(tmp_path)
    for j in ("reaped", "retried", "twice"):
        _enqueue(app, hist, j)
    _run(hist, "retried", "n1", "error")
    _run(hist, "retried", "n2", "ok", attempt=2)
    _run(hist, "reaped", "n1", None)
    _run(hist, "reaped", "n2", "ok", attempt=2)
    _run(hist, "twice", "n1", "ok")
    _run(hist, "twice", "n2", "ok")
    claimed = app.run(app.store.claim(Q, "n9", 10, 60_000))
    assert len(claimed.jobs) == 3
    assert app.run(app.store.ack(Q, "n9", [(j.id, b"") for j in claimed.jobs])) == [1, 1, 1]
    r.hset(app.keys.job(Q, "reaped"), "reaped", 1)
    rep = check(hist, Snapshot.take(r))
    assert set(rep.duplicates) == {"reaped", "retried", "twice"}
    assert list(rep.unexplained_duplicates) == ["twice"]
    assert rep.non_winner_ok == 1


def test_invariant_scan_names_each_broken_invariant(app: JobQ, r: redis.Redis, tmp_path: Path) -> None:
    hist = History(tmp_path)
    for j in ("in-two", "no-lease", "orphan-lease", "done-no-ttl"):
        _enqueue(app, hist, j)
    app.enqueue("fault.record", [0, 0], queue="other", job_id="in-two")  # I6: same id, 2 queues
    k = app.keys
    r.zadd(k.dead(Q), {"in-two": 1})  # I1: ready and dead
    app.run(app.store.claim(Q, "n1", 10, 60_000))
    r.zrem(k.leases(Q), "no-lease")  # I2: active without a lease
    r.zrem(k.active(Q, "n1"), "orphan-lease")  # I3: a lease without its active entry
    r.hset(k.job(Q, "orphan-lease"), "state", "ready")
    r.zadd(k.ready(Q), {"orphan-lease": 1})
    r.set(f"jobq:{{{Q}}}:mystery", 1)  # I5: unknown key
    r.hset(k.job(Q, "done-no-ttl"), "state", "done")  # I5 (and I1: still in an active list)
    v = scan_invariants(r)
    text = "\n".join(v)
    assert "I1 fault/in-two" in text, text
    assert "I2 fault/no-lease" in text, text
    assert "I3 fault/orphan-lease" in text, text
    assert f"I5 jobq:{{{Q}}}:mystery" in text, text
    assert f"I5 jobq:{{{Q}}}:job:done-no-ttl" in text, text
    assert "I6 in-two" in text, text


def test_keys_gone_between_the_scan_and_its_multi_are_not_judged(
    app: JobQ, r: redis.Redis, tmp_path: Path, monkeypatch: Any
) -> None:
    """The SCAN lists a reap lock, a finished job and a global key that expire before the MULTI
    reads them (PTTL -2): they are not in the view, so not "keys without a TTL"."""
    hist = History(tmp_path)
    _enqueue(app, hist, "live")
    expired = [f"jobq:{{{Q}}}:reap-lock", f"jobq:{{{Q}}}:job:expired", "jobq:node:gone"]
    listed = [*r.scan_iter(count=1000), *(k.encode() for k in expired)]
    monkeypatch.setattr(r, "scan_iter", lambda *a, **kw: iter(listed))
    assert scan_invariants(r) == []
