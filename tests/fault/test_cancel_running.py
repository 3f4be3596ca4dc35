"""F20: cancelling a running job, end to end with real ``jobq worker`` processes (the tasks are in
:mod:`tests.harness.cancel_tasks`): the node hears of it at once on its wake-up channel, or from
its next lease renewal when it was cut off from Redis (the chaos proxy); the job ends
``cancelled`` once, is never retried, and keeps no result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from jobq import JobQ, JobState
from tests.harness import proxy_fixtures
from tests.harness.proxy_fixtures import wait_for
from tests.harness.redis_server import RedisServer

pytestmark = [pytest.mark.fault]

chaos_proxy = proxy_fixtures.chaos_proxy

REPO = Path(__file__).resolve().parents[2]
APP = "tests.harness.cancel_tasks:app"
Q = "fault"


def _get(r: redis.Redis, key: str, what: str) -> str | None:
    v = r.get(f"cx:{key}:{what}")
    return None if v is None else v.decode()


def _job(r: redis.Redis, app: JobQ, job_id: str) -> dict[bytes, bytes]:
    return r.hgetall(app.keys.job(Q, job_id))  # type: ignore[no-any-return]


def _assert_cancelled_once(r: redis.Redis, app: JobQ, job_id: str, key: str) -> None:
    h = _job(r, app, job_id)
    assert h[b"state"] == b"cancelled" and b"result" not in h, h
    assert int(h[b"attempts"]) == 1 and _get(r, key, "runs") == "1"
    assert not r.zscore(app.keys.leases(Q), job_id)
    assert not r.zscore(app.keys.ready(Q), job_id) and not r.zscore(app.keys.scheduled(Q), job_id)
    assert r.zscore(app.keys.finished(Q), job_id) is not None
    assert app.job(job_id, Q).status() is JobState.CANCELLED


def _running(r: redis.Redis, key: str, timeout: float = 20.0) -> None:
    wait_for(lambda: _get(r, key, "runs") == "1", timeout)


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_cancel_reaches_the_node_at_once_over_pubsub(
    redis_server: RedisServer, r: redis.Redis, worker_fleet: Any, kind: str
) -> None:
    """A lease of 30 s renews every 10 s: a stop within 2 s came over the cancel channel."""
    fleet = worker_fleet(redis_server.url, app=APP, lease=30.0, poll_interval=0.2)
    (node,) = fleet.start(1)
    app = JobQ(redis_server.url)
    key = f"pubsub-{kind}"
    task = "cancel.aslow" if kind == "async" else "cancel.sslow"
    job = app.enqueue(task, [key, 60], queue=Q)
    _running(r, key)
    # jobq.current_job() inside the task (a sync one reads it in its pool thread).
    cur = json.loads(_get(r, key, "current") or "{}")
    assert cur == {"id": job.id, "queue": Q, "task": task, "attempt": 1}
    t0 = time.monotonic()
    job.cancel()
    assert job.status() is JobState.CANCELLED  # at once, whatever the node does
    want = "cancelled" if kind == "async" else "saw-cancelled"
    took = wait_for(lambda: _get(r, key, "end") == want, 5.0)
    assert took < 2.0, f"the node took {took:.2f} s: not the cancel channel"
    if kind == "sync":
        assert _get(r, key, "callback") == "1"
    wait_for(lambda: "cancelled while it runs" in node.log_text(), 5.0)
    time.sleep(0.5)  # room for a wrong ack or retry to land
    _assert_cancelled_once(r, app, job.id, key)
    assert time.monotonic() - t0 < 10.0
    # The node goes on: its slot is free again.
    nxt = app.enqueue("cancel.aslow", ["after", 0], queue=Q)
    assert nxt.result(timeout=10) == "not-stored"  # a finished one does keep its result
    fleet.shutdown()
    assert node.log_text().count("cancelled while it runs") == 1
    app.close()


def test_a_sync_task_that_ignores_cancel_keeps_no_result_and_is_not_retried(
    redis_server: RedisServer, r: redis.Redis, worker_fleet: Any
) -> None:
    fleet = worker_fleet(redis_server.url, app=APP, lease=2.0, poll_interval=0.2)
    (node,) = fleet.start(1)
    app = JobQ(redis_server.url)
    job = app.enqueue("cancel.stubborn", ["stubborn", 1.5], queue=Q)
    _running(r, "stubborn")
    job.cancel()
    wait_for(lambda: _get(r, "stubborn", "end") == "finished", 10.0)  # it ran to its end anyway
    wait_for(lambda: "outcome discarded" in node.log_text(), 5.0)
    time.sleep(2.0)  # a lease and more: a reap or a retry would show now
    _assert_cancelled_once(r, app, job.id, "stubborn")
    fleet.shutdown()
    assert "stale completion" not in node.log_text()
    app.close()


def test_cancel_from_the_command_line_stops_a_running_job(
    redis_server: RedisServer, r: redis.Redis, worker_fleet: Any
) -> None:
    fleet = worker_fleet(redis_server.url, app=APP, lease=30.0, poll_interval=0.2)
    fleet.start(1)
    app = JobQ(redis_server.url)
    job = app.enqueue("cancel.aslow", ["cli", 60], queue=Q)
    _running(r, "cli")
    env = {**os.environ, "JOBQ_REDIS_URL": redis_server.url}
    out = subprocess.run(
        [sys.executable, "-m", "jobq", "cancel", job.id, "--yes"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and f"cancelled {job.id}" in out.stdout, out.stderr
    wait_for(lambda: _get(r, "cli", "end") == "cancelled", 5.0)
    _assert_cancelled_once(r, app, job.id, "cli")
    fleet.shutdown()
    app.close()


@pytest.mark.parametrize("cut", [0.5, 2.0], ids=["short-cut", "fenced"])
def test_cancel_while_the_node_is_cut_off_still_ends_cancelled_once(
    redis_server: RedisServer, r: redis.Redis, chaos_proxy: Any, worker_fleet: Any, cut: float
) -> None:
    """Node a reaches Redis only through the proxy. Both jobs are cancelled while it is cut off
    for ``cut`` leases (2.0: it fences itself, and its async job is stopped as lost); after the
    heal the cancel reaches it (the held pub/sub message, or its first renewal's reply), and the
    jobs stay cancelled: never reaped, retried, run again or given a result."""
    lease = 2.0
    proxy = chaos_proxy(redis_server)
    fleet = worker_fleet(redis_server.url, app=APP, lease=lease, reap_interval=0.5, poll_interval=0.2)
    a = fleet.spawn(
        "a",
        env={
            "JOBQ_REDIS_URL": proxy.url(redis_server.url) + "?socket_timeout=1",
            "JOBQ_CANCEL_SIGNAL_URL": redis_server.url,
        },
    )
    app = JobQ(redis_server.url)
    ajob = app.enqueue("cancel.aslow", ["cut-async", 30], queue=Q)
    sjob = app.enqueue("cancel.sslow", ["cut-sync", 30], queue=Q)
    _running(r, "cut-async")
    _running(r, "cut-sync")
    assert {m.decode() for m in r.zrange(app.keys.active(Q, "a"), 0, -1)} == {ajob.id, sjob.id}
    fleet.start(1)  # another node, which would take a reaped job
    with proxy.partition():
        ajob.cancel()
        sjob.cancel()
        assert ajob.status() is JobState.CANCELLED and sjob.status() is JobState.CANCELLED
        time.sleep(cut * lease)
    wait_for(lambda: _get(r, "cut-sync", "end") == "saw-cancelled", 3 * lease)
    wait_for(lambda: _get(r, "cut-async", "end") == "cancelled", 3 * lease)
    time.sleep(2 * lease)  # reaper passes, renewals: nothing may bring the jobs back
    _assert_cancelled_once(r, app, ajob.id, "cut-async")
    _assert_cancelled_once(r, app, sjob.id, "cut-sync")
    fleet.shutdown()
    log = a.log_text()
    assert log.count(f"job {sjob.id} (cancel.sslow, queue {Q}): cancelled while it runs") == 1
    app.close()


def test_without_pubsub_the_next_lease_renewal_delivers_the_cancel(
    redis_server: RedisServer, r: redis.Redis, worker_fleet: Any
) -> None:
    """A burst node does not subscribe: the cancel reaches it in its next renewal's reply."""
    fleet = worker_fleet(redis_server.url, app=APP, lease=1.5, poll_interval=0.2)
    app = JobQ(redis_server.url)
    job = app.enqueue("cancel.aslow", ["burst", 60], queue=Q)
    node = fleet.spawn(extra=["--burst"])
    _running(r, "burst")
    job.cancel()
    wait_for(lambda: _get(r, "burst", "end") == "cancelled", 3 * 1.5)
    assert node.wait(20) == 0  # nothing left: the burst node exits
    assert "cancelled while it runs" in node.log_text()
    _assert_cancelled_once(r, app, job.id, "burst")
    app.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_progress_is_stored_and_shown(
    redis_server: RedisServer, r: redis.Redis, worker_fleet: Any, kind: str
) -> None:
    fleet = worker_fleet(redis_server.url, app=APP, lease=30.0, poll_interval=0.2)
    fleet.start(1)
    app = JobQ(redis_server.url)
    key = f"progress-{kind}"
    job = app.enqueue("cancel.sreport" if kind == "sync" else "cancel.areport", [key], queue=Q)
    wait_for(lambda: _get(r, key, "reported") == "1", 20.0)
    want = (0.5, "half way") if kind == "sync" else (0.75, "three quarters")
    info = job.info()
    assert (info.progress, info.progress_message) == want and info.progress_ms is not None
    env = {**os.environ, "JOBQ_REDIS_URL": redis_server.url}
    out = subprocess.run(
        [sys.executable, "-m", "jobq", "status", job.id, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = json.loads(out.stdout)
    assert (shown["progress"], shown["progress_message"]) == want, out.stderr
    job.cancel()  # ends it; the progress stays as it was
    assert (job.info().progress, job.info().progress_message) == want
    fleet.shutdown()
    app.close()
