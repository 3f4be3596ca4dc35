"""Lifecycle events (docs/events.md): written by the scripts that change a job's state, in order,
never for a refused change, capped, optional per queue; read by app.events(), app.iter_events(),
``jobq events`` and ``GET /events``. With ``JOBQ_TEST_REDIS=cluster`` they run on a 3-primary
Redis Cluster (several queues are then read one XREAD per queue)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

import jobq
from jobq.cli import main
from jobq.events import Event, EventReader

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
Q = "ev"
T0 = 1_700_000_000_000


def types(app: jobq.JobQ, job_id: str | None = None, queue: str = Q) -> list[str]:
    return [e.type for e in app.iter_events([queue]) if job_id is None or e.job_id == job_id]


@pytest.fixture
def fapp(redis_url: str) -> Iterator[jobq.JobQ]:
    a = jobq.JobQ(redis_url, clock=jobq.FakeClock(T0))
    yield a
    a.close()


def test_a_jobs_whole_life_is_in_the_stream_in_order_with_a_real_worker(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """enqueued, started, progress, retried, started, progress, done for a job that fails once;
    enqueued, started, dead for one that fails for good; no argument ever in an event."""
    from tests.integration import event_tasks

    app = jobq.JobQ(redis_url)
    try:
        ok = app.enqueue(event_tasks.half_then_flaky.name, ["hunter2-arg"], queue=Q, retry_backoff=0)
        bad = app.enqueue(event_tasks.always_fails.name, ["hunter2-arg"], queue=Q, max_attempts=1)
        env = dict(os.environ, JOBQ_REDIS_URL=redis_url, PYTHONPATH=str(REPO))
        log = open(tmp_path / "worker.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobq", "worker", "-A", "tests.integration.event_tasks", "--queues", Q],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # Follow the stream until both jobs ended (no sleeps: the read blocks until events come).
            seen: list[Event] = []
            ended: set[str] = set()
            deadline = time.monotonic() + 60
            for ev in app.iter_events([Q], since="0", follow=True):
                seen.append(ev)
                if ev.type in ("done", "dead"):
                    ended.add(ev.job_id)
                if ended == {ok.id, bad.id} or time.monotonic() > deadline:
                    break
        finally:
            proc.kill()
            proc.wait(10)
            log.close()
        assert ended == {ok.id, bad.id}, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        app.close()
    life = [(e.type, e.attempt) for e in seen if e.job_id == ok.id]
    assert life == [
        ("enqueued", None),
        ("started", 1),
        ("progress", 1),
        ("retried", 1),
        ("started", 2),
        ("progress", 2),
        ("done", 2),
    ]
    by_type = {e.type: e for e in seen if e.job_id == ok.id}
    assert by_type["progress"].fraction == 0.5 and by_type["progress"].message == "half way"
    assert "first attempt fails" in (by_type["retried"].error or "")
    assert by_type["started"].task == event_tasks.half_then_flaky.name and by_type["started"].node
    assert [e.type for e in seen if e.job_id == bad.id] == ["enqueued", "started", "dead"]
    dead = next(e for e in seen if e.job_id == bad.id and e.type == "dead")
    assert "no luck" in (dead.error or "") and dead.attempt == 1
    # Ids in stream order, times on the Redis clock; the arguments never appear.
    ids = [tuple(map(int, e.id.split("-"))) for e in seen]
    assert ids == sorted(ids)
    raw = r.xrange(f"jobq:{{{Q}}}:events")
    assert b"hunter2" not in repr(raw).encode()


def test_cancel_reap_release_promote_and_retry_dead_write_their_events(fapp: jobq.JobQ) -> None:
    s, now = fapp.store, T0
    cancelled = fapp.enqueue("t", queue=Q)
    cancelled.cancel()
    assert types(fapp, cancelled.id) == ["enqueued", "cancelled"]
    assert next(e for e in fapp.iter_events([Q]) if e.type == "cancelled").state == "ready"

    lost = fapp.enqueue("t", queue=Q)
    fapp.run(s.claim(Q, "n1", 1, 1_000, now_ms=now))
    reaped = fapp.run(s.reap(Q, node_ttl_ms=60_000, now_ms=now + 5_000))
    assert reaped.requeued == [lost.id]
    assert types(fapp, lost.id) == ["enqueued", "started", "reaped"]
    reap_ev = next(e for e in fapp.iter_events([Q]) if e.type == "reaped")
    assert (reap_ev.attempt, reap_ev.node, reap_ev.time_ms) == (1, "n1", now + 5_000)

    # The reaped job again, claimed and given back: never started (released), then started
    # and stopped by a shutdown (interrupted).
    fapp.run(s.claim(Q, "n2", 1, 30_000, now_ms=now))
    fapp.run(s.release(Q, "n2", [lost.id], now_ms=now))
    fapp.run(s.claim(Q, "n2", 1, 30_000, now_ms=now))
    fapp.run(s.release(Q, "n2", [lost.id], max_interruptions=[5], now_ms=now))
    assert types(fapp, lost.id)[3:] == ["started", "released", "started", "interrupted"]

    later = fapp.enqueue("t", queue=Q, delay=10)
    promoted = fapp.run(s.promote(Q, now_ms=now + 20_000))
    assert promoted.promoted == 1
    assert types(fapp, later.id) == ["enqueued", "promoted"]
    assert next(e.run_at_ms for e in fapp.iter_events([Q]) if e.job_id == later.id) == now + 10_000

    fapp.run(s.claim(Q, "n3", 5, 30_000, now_ms=now + 20_000))
    fapp.run(s.fail(Q, "n3", later.id, "gave up", dead=True, now_ms=now + 20_000))
    assert fapp.run(s.retry_dead(Q, [later.id], now_ms=now + 21_000)) == 1
    assert types(fapp, later.id)[2:] == ["started", "dead", "requeued"]


def test_a_refused_change_writes_no_event(fapp: jobq.JobQ, r: redis.Redis) -> None:
    """A stale ack, a failure from a lost attempt, progress from another node, a repeated enqueue
    and a cancel of a finished job change nothing, and write nothing to the stream."""
    s, now = fapp.store, T0
    job = fapp.enqueue("t", queue=Q, job_id="j1")
    fapp.run(s.claim(Q, "n1", 1, 1_000, now_ms=now))
    fapp.run(s.reap(Q, node_ttl_ms=60_000, now_ms=now + 5_000))
    fapp.run(s.claim(Q, "n2", 1, 30_000, now_ms=now + 5_000))  # attempt 2 on n2
    key = f"jobq:{{{Q}}}:events"
    before = r.xrange(key)
    assert [f[b"type"] for _, f in before] == [b"enqueued", b"started", b"reaped", b"started"]
    assert fapp.run(s.ack(Q, "n1", [(job.id, b"")], attempts=[1], now_ms=now)) == [-2]
    assert fapp.run(s.fail(Q, "n1", job.id, "late", attempt=1, now_ms=now)).outcome == "lease_lost"
    assert fapp.run(s.progress(Q, "n1", job.id, 1, 0.5, now_ms=now)) == -2
    assert fapp.enqueue("t", queue=Q, job_id="j1").id == job.id
    assert r.xrange(key) == before
    assert fapp.run(s.progress(Q, "n2", job.id, 2, 0.25, now_ms=now)) == 1  # no message: none kept
    assert r.xrevrange(key, count=1)[0][1] == {
        b"type": b"progress",
        b"id": job.id.encode(),
        b"t": str(now).encode(),
        b"attempt": b"2",
        b"fraction": b"0.25",
    }
    before = r.xrange(key)
    assert fapp.run(s.ack(Q, "n2", [(job.id, b"")], attempts=[2], now_ms=now)) == [1]
    assert fapp.run(s.ack(Q, "n2", [(job.id, b"")], attempts=[2], now_ms=now)) == [0]  # repeated
    assert fapp.run(s.cancel(Q, job.id, now_ms=now)) < 0  # finished: not cancellable
    assert [f[b"type"] for _, f in r.xrange(key)][len(before) :] == [b"done"]


def test_the_cap_bounds_the_stream_and_zero_writes_none(redis_url: str, r: redis.Redis) -> None:
    app = jobq.JobQ(redis_url, events_max={"small": 50, "quiet": 0})
    try:
        for q in ("small", "quiet", "other"):
            for _ in range(3):
                app.enqueue_many([jobq.EnqueueRequest("t", queue=q) for _ in range(100)])
        # MAXLEN ~ trims whole stream nodes (100 entries each by default): near the cap, never 300.
        assert 50 <= r.xlen("jobq:{small}:events") <= 50 + 100
        assert r.exists("jobq:{quiet}:events") == 0
        assert r.xlen("jobq:{other}:events") == 300
        assert list(app.iter_events(["quiet"])) == []
    finally:
        app.close()
    with pytest.raises(jobq.errors.InvalidInput, match="events_max"):
        jobq.JobQ(redis_url, events_max=-1)


def test_since_last_and_several_queues(fapp: jobq.JobQ) -> None:
    a = [fapp.enqueue("t", queue="qa") for _ in range(3)]
    b = [fapp.enqueue("t", queue="qb") for _ in range(2)]
    both = list(fapp.iter_events(["qa", "qb"]))
    assert [e.job_id for e in both] == [j.id for j in a + b]  # merged in entry-id order
    assert [e.job_id for e in fapp.iter_events(["qa", "qb"], last=2)] == [j.id for j in b]
    assert [e.job_id for e in fapp.iter_events(["qa"], since=both[0].id)] == [j.id for j in a[1:]]
    assert [e.queue for e in fapp.iter_events()] == ["qa"] * 3 + ["qb"] * 2  # every known queue
    # A position resumes every queue exactly, even within one millisecond.
    reader = EventReader(fapp, ["qa", "qb"])
    taken = [next(iter_ := iter(reader)) for _ in range(1)]
    rest = [e.job_id for e in fapp.iter_events(["qa", "qb"], since=reader.position())]
    assert [e.job_id for e in taken] + rest == [j.id for j in a + b]
    assert reader.position() == f"qa={both[0].id}"
    del iter_
    with pytest.raises(jobq.errors.InvalidInput, match="since"):
        list(fapp.iter_events(["qa"], since="yesterday"))


def test_follow_sees_a_new_event(fapp: jobq.JobQ) -> None:
    fapp.enqueue("t", queue=Q)
    (old,) = fapp.iter_events([Q])
    it = fapp.iter_events([Q], since=old.id, follow=True)
    got: list[Event] = []
    reader = threading.Thread(target=lambda: got.append(next(it)))
    reader.start()
    new = fapp.enqueue("t", queue=Q)
    reader.join(10)
    assert [e.job_id for e in got] == [new.id]


def test_app_events_is_an_async_iterator(redis_url: str) -> None:
    async def main_() -> list[Any]:
        app = jobq.JobQ(redis_url)
        try:
            first = await app.aenqueue("t", queue=Q)
            seen = [e async for e in app.events([Q])]
            follow = app.events([Q], since=seen[-1].id, follow=True)
            waiting = asyncio.ensure_future(follow.__anext__())
            second = await app.aenqueue("t", queue=Q)
            new = await asyncio.wait_for(waiting, 10)
            await follow.aclose()  # type: ignore[attr-defined]
            return [[e.job_id for e in seen], [first.id], new.job_id, second.id]
        finally:
            await app.aclose()
            app.close()

    seen, want, new, second = asyncio.run(main_())
    assert seen == want and new == second


def test_cli_events_json_and_follow(redis_url: str, fapp: jobq.JobQ) -> None:
    job = fapp.enqueue("t", queue=Q)
    out = CliRunner().invoke(main, ["--redis-url", redis_url, "events", "-q", Q, "--json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.output.splitlines()]
    assert [(d["type"], d["job_id"], d["queue"]) for d in lines] == [("enqueued", job.id, Q)]
    text = CliRunner().invoke(main, ["--redis-url", redis_url, "events", "-q", Q])
    assert "enqueued" in text.output and job.id in text.output

    env = dict(os.environ, JOBQ_REDIS_URL=redis_url)
    cmd = [
        sys.executable,
        "-m",
        "jobq",
        "events",
        "-q",
        Q,
        "--follow",
        "--json",
        "--since",
        "$",
        "--limit",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # It prints nothing until a new event comes; enqueue until it has started reading.
        new_ids = []
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            new_ids.append(fapp.enqueue("t", queue=Q).id)
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    got = json.loads(stdout.decode().strip())
    assert got["type"] == "enqueued" and got["job_id"] in new_ids


def _sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(id, data) of every event frame (a message, no ``event:`` name) of a text/event-stream body."""
    frames = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "data" in fields and "event" not in fields:
            frames.append((fields.get("id", ""), json.loads(fields["data"])))
    return frames


@pytest.fixture
def api(redis_url: str) -> Iterator[tuple[jobq.JobQ, str]]:
    from jobq.web import ApiServer

    app = jobq.JobQ(redis_url)
    server = ApiServer(app, "127.0.0.1", 0, token="tok").start()
    yield app, f"127.0.0.1:{server.port}"
    server.close()
    app.close()


def _get(host: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    import http.client

    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request("GET", path, headers={"Authorization": "Bearer tok", **(headers or {})})
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, resp.getheader("content-type") or "", body


def test_get_events_streams_server_sent_events(api: tuple[jobq.JobQ, str]) -> None:
    app, host = api
    schema = jobq.web.api.openapi_document()["components"]["schemas"]["Event"]
    a = app.enqueue("t", queue=Q)
    b = app.enqueue("t", queue="other")
    status, ctype, body = _get(host, f"/events?queue={Q}")
    assert status == 200 and ctype.startswith("text/event-stream")
    frames = _sse(body)
    assert [(d["type"], d["job_id"]) for _, d in frames] == [("enqueued", a.id)]
    for position, data in frames:
        assert position == f"{Q}={data['id']}"
        assert set(schema["required"]) <= set(data) <= set(schema["properties"])
        assert data["type"] in schema["properties"]["type"]["enum"]
    # Several queues (repeated or comma-separated), `last`, and Last-Event-ID resuming.
    both = _sse(_get(host, f"/events?queue={Q},other")[2])
    assert [d["job_id"] for _, d in both] == [a.id, b.id]
    assert [d["job_id"] for _, d in _sse(_get(host, f"/events?queue={Q}&queue=other&last=1")[2])] == [b.id]
    resumed = _get(host, f"/events?queue={Q}&queue=other", {"Last-Event-ID": both[0][0]})[2]
    assert [d["job_id"] for _, d in _sse(resumed)] == [b.id]
    # Bad parameters: 400 before anything streams.
    for bad in ("since=yesterday", "limit=0", "timeout=99999", "follow=maybe", "queue=a%20b", "last=-1"):
        status, ctype, body = _get(host, f"/events?{bad}")
        assert status == 400 and ctype.startswith("application/json"), (bad, body)
    assert _get(host, "/events", {"Authorization": "Bearer wrong"})[0] == 401


def test_get_events_follow_sees_a_new_event(api: tuple[jobq.JobQ, str]) -> None:
    app, host = api
    old = app.enqueue("t", queue=Q)
    (first,) = app.iter_events([Q])
    got: list[tuple[int, str, str]] = []
    reader = threading.Thread(
        target=lambda: got.append(
            _get(host, f"/events?queue={Q}&follow=1&since={first.id}&limit=1&timeout=20")
        )
    )
    reader.start()
    new = app.enqueue("t", queue=Q)
    reader.join(30)
    assert got, "the stream did not end"
    status, _, body = got[0]
    assert status == 200
    assert [d["job_id"] for _, d in _sse(body)] == [new.id] and new.id != old.id


@pytest.mark.skipif(
    os.environ.get("JOBQ_TEST_REDIS") == "cluster", reason="counts the clients of one standalone server"
)
def test_a_client_that_goes_away_ends_its_stream(api: tuple[jobq.JobQ, str], r: redis.Redis) -> None:
    """The following stream's reader (a blocking XREAD on a connection of its own) stops when
    the client disconnects, and its Redis connection is closed."""
    import socket

    app, host = api
    app.enqueue("t", queue=Q)
    name, port = host.split(":")

    def readers() -> int:
        return sum(1 for c in r.client_list() if c.get("cmd") in ("xread", "xrevrange"))

    before = len(r.client_list())
    sock = socket.create_connection((name, int(port)), timeout=10)
    path = f"/events?queue={Q}&since=0&follow=1&timeout=60"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n".encode())
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 10
    while readers() == 0 and time.monotonic() < deadline:  # the blocking read is on
        time.sleep(0.05)
    assert readers() == 1
    sock.close()
    deadline = time.monotonic() + 10
    while len(r.client_list()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(r.client_list()) <= before and readers() == 0


def test_a_redis_failure_ends_the_stream_with_an_error_frame(fresh_server: Any) -> None:
    from jobq.web import ApiServer

    fresh_server.start()
    app = jobq.JobQ(fresh_server.url)
    server = ApiServer(app, "127.0.0.1", 0, token="tok").start()
    try:
        app.enqueue("t", queue=Q)
        got: list[tuple[int, str, str]] = []
        path = f"/events?queue={Q}&since=0&follow=1&timeout=60"
        reader = threading.Thread(target=lambda: got.append(_get(f"127.0.0.1:{server.port}", path)))
        reader.start()
        # Once the stream is following (a blocking read is on), Redis goes away.
        admin = fresh_server.admin_client()
        deadline = time.monotonic() + 10
        while not any(c.get("cmd") == "xread" for c in admin.client_list()) and time.monotonic() < deadline:
            time.sleep(0.05)
        admin.close()
        fresh_server.kill()
        reader.join(30)
        assert got, "the stream did not end"
        status, _, body = got[0]
        assert status == 200
        assert [d["type"] for _, d in _sse(body)] == ["enqueued"]
        assert "event: stream-error\ndata: " in body and "Redis" in body.split("event: stream-error", 1)[1]
    finally:
        server.close()
        app.close()
