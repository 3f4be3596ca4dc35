"""A caller-chosen job id can be used again once its dead (or finished) hash has expired, while its
old entry still waits in the dead-letter (or finished) index. Trimming, purging or retrying that
old entry must not touch the new job that now carries the id (issue 16, item 3)."""

from __future__ import annotations

import pytest
import redis

import jobq
from tests.integration.conftest import T0

pytestmark = pytest.mark.integration

Q = "reuse"
ID = "order-42"
DEAD_TTL_S = jobq.storage.calls.Limits().dead_ttl_ms / 1000


def claim(app: jobq.JobQ, node: str = "n1", n: int = 10) -> list[jobq.storage.calls.ClaimedJob]:
    res = app.run(app.store.claim(Q, node, n, 30_000, now_ms=app.now_ms()))
    assert res.dead == []
    return res.jobs


def dead_then_expired(app: jobq.JobQ, r: redis.Redis) -> None:
    """order-42 dies; its hash then expires (as after dead_ttl) while its dead entry stays."""
    app.enqueue("t", queue=Q, job_id=ID, max_attempts=1)
    assert [j.id for j in claim(app)] == [ID]
    assert app.run(app.store.fail(Q, "n1", ID, "boom", now_ms=app.now_ms())).outcome == "dead"
    assert r.zscore(app.keys.dead(Q), ID) == T0
    r.delete(app.keys.job(Q, ID))  # the dead hash's PEXPIRE (dead_ttl) ran out


def new_job_runs_normally(app: jobq.JobQ, r: redis.Redis) -> None:
    jobs = claim(app, "n2")
    assert [(j.id, jobq.codec.decode_payload(j.payload)) for j in jobs] == [(ID, ([2], {}))]
    assert app.run(app.store.ack(Q, "n2", [(ID, b"")], now_ms=app.now_ms())) == [1]
    assert app.job(ID, Q).status() is jobq.JobState.DONE


def test_age_trim_keeps_the_new_job_with_a_reused_id(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    dead_then_expired(fapp, r)
    clock.advance(DEAD_TTL_S + 1)
    fapp.enqueue("t", [2], queue=Q, job_id=ID)  # the id is free again: a new job
    # The old dead entry is past its age bound: the reaper's trim drops it, not the new hash.
    fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms()))
    assert r.zcard(fapp.keys.dead(Q)) == 0
    assert r.hget(fapp.keys.job(Q, ID), "state") == b"ready"
    new_job_runs_normally(fapp, r)


def test_count_trim_keeps_the_new_job_with_a_reused_id(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    dead_then_expired(fapp, r)
    fapp.enqueue("t", [2], queue=Q, job_id=ID)
    # dead_max = 1: the next death trims the oldest entry, order-42's old one.
    fapp.store.limits = jobq.storage.calls.Limits(dead_max=1)
    clock.advance(1)
    other = fapp.enqueue("t", queue=Q, max_attempts=1, priority=1)
    assert [j.id for j in claim(fapp, n=1)] == [other.id]  # priority 1 first
    assert fapp.run(fapp.store.fail(Q, "n1", other.id, "boom", now_ms=fapp.now_ms())).outcome == "dead"
    assert r.zrange(fapp.keys.dead(Q), 0, -1) == [other.id.encode()]
    new_job_runs_normally(fapp, r)


def test_purge_dead_keeps_the_new_job_with_a_reused_id(fapp: jobq.JobQ, r: redis.Redis) -> None:
    dead_then_expired(fapp, r)
    fapp.enqueue("t", [2], queue=Q, job_id=ID)
    assert fapp.run(fapp.store.purge(Q, "dead")) == 1
    assert r.zcard(fapp.keys.dead(Q)) == 0
    new_job_runs_normally(fapp, r)


def test_purge_finished_keeps_the_new_job_with_a_reused_id(fapp: jobq.JobQ, r: redis.Redis) -> None:
    fapp.enqueue("t", queue=Q, job_id=ID)
    assert [j.id for j in claim(fapp)] == [ID]
    assert fapp.run(fapp.store.ack(Q, "n1", [(ID, b"")], now_ms=fapp.now_ms())) == [1]
    r.delete(fapp.keys.job(Q, ID))  # its retention ran out; the index entry is still there
    fapp.enqueue("t", [2], queue=Q, job_id=ID)
    assert fapp.run(fapp.store.purge(Q, "finished")) == 1
    new_job_runs_normally(fapp, r)


def test_retry_dead_leaves_a_running_job_with_a_reused_id_alone(fapp: jobq.JobQ, r: redis.Redis) -> None:
    dead_then_expired(fapp, r)
    fapp.enqueue("t", [2], queue=Q, job_id=ID)
    # The new job is running when the old dead entry is retried: it must stay where it is.
    jobs = claim(fapp, "n2")
    assert [j.id for j in jobs] == [ID]
    assert fapp.run(fapp.store.retry_dead(Q, now_ms=fapp.now_ms())) == 0
    assert r.zcard(fapp.keys.ready(Q)) == 0 and r.zcard(fapp.keys.dead(Q)) == 0
    assert r.hget(fapp.keys.job(Q, ID), "state") == b"active"
    assert fapp.run(fapp.store.ack(Q, "n2", [(ID, b"")], now_ms=fapp.now_ms())) == [1]
    assert fapp.job(ID, Q).status() is jobq.JobState.DONE
