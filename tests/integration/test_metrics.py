"""Prometheus metrics: a running worker is scraped over HTTP, the text is parsed with
prometheus_client's parser, and every value is checked against the work done."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from jobq import Fail, JobQ, Retry
from jobq.metrics import OTHER, Metrics, serve
from jobq.worker import Worker, WorkerConfig
from tests.harness.tools import require_tool

pytestmark = [pytest.mark.integration]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def metrics_app(redis_url: str) -> Iterator[JobQ]:
    app = JobQ(redis_url)

    @app.task(name="ok", queue="mq")
    def ok(x: int) -> int:
        return x * 2

    @app.task(name="flaky", queue="mq", max_attempts=2)
    def flaky() -> None:
        raise Retry(0, "try again at once")

    @app.task(name="fatal", queue="mq")
    def fatal() -> None:
        raise Fail("bad input")

    yield app
    app.close()


def test_worker_counters_histograms_and_queue_gauges(metrics_app: JobQ, r: redis.Redis) -> None:
    app = metrics_app
    m = Metrics(app, node="n-metrics")
    # Given: 3 jobs that succeed, one that fails twice (retried, then dead), one that Fails.
    for i in range(3):
        app.enqueue("ok", [i])
    app.enqueue("flaky")
    app.enqueue("fatal")
    # Two delayed jobs (scheduled) and a paused queue holding ready jobs of two priorities, where
    # the oldest job is not the first member of the ready set (the high-priority one is).
    app.enqueue("ok", [9], delay=3600)
    app.enqueue("ok", [9], delay=3600)
    old = app.enqueue("ok", [1], queue="paused-q", priority=0)
    app.enqueue("ok", [2], queue="paused-q", priority=5)
    r.set(app.keys.paused("paused-q"), "1")
    secs, micros = r.time()
    r.hset(app.keys.job("paused-q", old.id), "ready_ms", secs * 1000 + micros // 1000 - 100_000)
    assert r.zrange(app.keys.ready("paused-q"), 0, 0)[0].decode() != old.id

    # When: a running node works through what is runnable, and is scraped over HTTP.
    w = Worker(
        app,
        WorkerConfig(queues=[("mq", 1)], concurrency=4, node_id="n-metrics", poll_interval=0.1),
        metrics=m,
    )
    thread = threading.Thread(target=lambda: asyncio.run(w.run()), daemon=True)
    thread.start()
    server = serve(m, "127.0.0.1", 0, w.health)
    try:

        def done(s: Samples) -> bool:
            return (
                val(s, "jobq_jobs_completed_total", queue="mq", task="ok") == 3
                and val(s, "jobq_jobs_dead_lettered_total", queue="mq", task="flaky") == 1
                and val(s, "jobq_jobs_dead_lettered_total", queue="mq", task="fatal") == 1
            )

        wait_for(lambda: done(scrape(server.port)[1]))
        text, s = scrape(server.port)
    finally:
        w.stop()
        thread.join(30)
        server.close()
    assert not thread.is_alive()

    # Then: counters match the work done.
    assert val(s, "jobq_jobs_enqueued_total", queue="mq", task="ok") == 5
    assert val(s, "jobq_jobs_enqueued_total", queue="mq", task="flaky") == 1
    assert val(s, "jobq_jobs_enqueued_total", queue="paused-q", task="ok") == 2
    assert val(s, "jobq_jobs_started_total", queue="mq", task="ok") == 3
    assert val(s, "jobq_jobs_started_total", queue="mq", task="flaky") == 2
    assert val(s, "jobq_jobs_started_total", queue="mq", task="fatal") == 1
    assert val(s, "jobq_jobs_completed_total", queue="mq", task="ok") == 3
    assert val(s, "jobq_jobs_completed_total", queue="mq", task="flaky") == 0
    assert val(s, "jobq_jobs_failed_total", queue="mq", task="flaky") == 2
    assert val(s, "jobq_jobs_failed_total", queue="mq", task="fatal") == 1
    assert val(s, "jobq_jobs_retried_total", queue="mq", task="flaky") == 1
    assert val(s, "jobq_jobs_dead_lettered_total", queue="mq", task="flaky") == 1
    assert val(s, "jobq_jobs_dead_lettered_total", queue="mq", task="fatal") == 1
    # Histograms: one observation per attempt, in seconds.
    assert val(s, "jobq_job_duration_seconds_count", queue="mq", task="ok") == 3
    assert val(s, "jobq_job_duration_seconds_count", queue="mq", task="flaky") == 2
    assert 0 <= val(s, "jobq_job_duration_seconds_sum", queue="mq", task="ok") < 30
    assert val(s, "jobq_job_wait_seconds_count", queue="mq", task="ok") == 3
    assert val(s, "jobq_job_wait_seconds_bucket", queue="mq", task="ok", le="+Inf") == 3
    # Queue gauges, read from Redis at scrape time.
    assert val(s, "jobq_redis_up") == 1
    assert val(s, "jobq_queue_ready", queue="mq") == 0
    assert val(s, "jobq_queue_scheduled", queue="mq") == 2
    assert val(s, "jobq_queue_active", queue="mq") == 0
    assert val(s, "jobq_queue_dead", queue="mq") == 2
    assert val(s, "jobq_queue_paused", queue="mq") == 0
    assert val(s, "jobq_queue_ready", queue="paused-q") == 2
    assert val(s, "jobq_queue_paused", queue="paused-q") == 1
    age = val(s, "jobq_queue_oldest_ready_age_seconds", queue="paused-q")
    assert 100 <= age < 160, age
    assert val(s, "jobq_queue_oldest_ready_age_seconds", queue="mq") == 0
    # Node gauges exist; the burst worker finished everything.
    assert val(s, "jobq_node_jobs_in_flight") == 0
    assert ("jobq_node_busy_slots", frozenset()) in s
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_promtool_accepts_the_exposition(metrics_app: JobQ) -> None:
    require_tool("promtool", "prometheus", "exposition parsed above")
    m = Metrics(metrics_app)
    m.job_started("mq", "ok", 0.5)
    m.job_completed("mq", "ok", 0.1)
    m.jobs_reaped("mq", 2)
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=m.exposition(), capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_reaped_and_stale_on_a_live_worker(metrics_app: JobQ, r: redis.Redis) -> None:
    app = metrics_app
    node = "n-live"
    release = threading.Event()

    @app.task(name="loses_lease", queue="mq")
    def loses_lease() -> None:
        # The job leaves this node's active list while it runs, as if its lease had been reaped
        # and another node had taken it: the ack that follows is refused (stale completion).
        r.zrem(app.keys.active("mq", node), job_box[0])
        release.wait(10)

    job_box: list[str] = []
    m = Metrics(app, node=node)
    # A job claimed by a node that died at once (1 ms lease): the live node's reaper recovers it.
    ghost = app.enqueue("ok", [21])
    claimed = app.run(app.store.claim("mq", "ghost", 1, 1))
    assert [j.id for j in claimed.jobs] == [ghost.id]

    w = Worker(
        app,
        WorkerConfig(queues=[("mq", 1)], concurrency=2, node_id=node, reap_interval=0.05, poll_interval=0.1),
        metrics=m,
    )
    thread = threading.Thread(target=lambda: asyncio.run(w.run()), daemon=True)
    thread.start()
    server = serve(m, "127.0.0.1", 0, w.health)
    try:
        wait_for(lambda: val(scrape(server.port)[1], "jobq_jobs_completed_total", queue="mq", task="ok") == 1)
        _, s = scrape(server.port)
        assert val(s, "jobq_jobs_reaped_total", queue="mq") == 1
        status, body = get(server.port, "/health")
        assert status == 200, body
        assert b'"ok"' in body

        job_box.append(app.enqueue("loses_lease").id)
        wait_for(
            lambda: (
                val(scrape(server.port)[1], "jobq_jobs_started_total", queue="mq", task="loses_lease") == 1
            )
        )
        release.set()
        wait_for(
            lambda: val(scrape(server.port)[1], "jobq_jobs_stale_total", queue="mq", task="loses_lease") == 1
        )
        _, s = scrape(server.port)
        assert val(s, "jobq_jobs_completed_total", queue="mq", task="loses_lease") == 0
        assert val(s, "jobq_nodes_live") >= 1
    finally:
        release.set()
        w.stop()
        thread.join(30)
        server.close()
    assert not thread.is_alive()


def test_health_503_when_unhealthy_and_404_elsewhere(metrics_app: JobQ) -> None:
    m = Metrics(metrics_app, collect_queues=False)
    healthy = [True]
    server = serve(m, "127.0.0.1", 0, lambda: (healthy[0], "detail text"))
    try:
        assert get(server.port, "/health")[0] == 200
        healthy[0] = False
        status, body = get(server.port, "/health")
        assert status == 503 and b"detail text" in body
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.close()


def test_scrape_answers_when_redis_is_down() -> None:
    app = JobQ("redis://127.0.0.1:1/0")
    m = Metrics(app)
    server = serve(m, "127.0.0.1", 0)
    try:
        _, s = scrape(server.port)
        assert val(s, "jobq_redis_up") == 0
        assert not any(name.startswith("jobq_queue_") for name, _ in s)
    finally:
        server.close()
        app.close()


def test_label_values_are_bounded(metrics_app: JobQ) -> None:
    m = Metrics(metrics_app, collect_queues=False, max_label_values=3)
    for i in range(10):
        m.job_enqueued("mq", f"user-task-{i}")
    m.job_enqueued("mq", "ok")  # registered on the app: always its own label
    tasks: set[Any] = set()
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for sample in fam.samples:
            if sample.name == "jobq_jobs_enqueued_total":
                tasks.add(sample.labels["task"])
    assert tasks == {"user-task-0", "user-task-1", "user-task-2", OTHER, "ok"}


def test_metrics_bound_to_loopback_by_default(metrics_app: JobQ) -> None:
    server = serve(Metrics(metrics_app, collect_queues=False), port=0)
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
    finally:
        server.close()
