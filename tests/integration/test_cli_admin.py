"""The admin CLI against a real redis-server: read commands change nothing, destructive ones need
--yes, tables for people and JSON for machines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis

from jobq import JobQ
from jobq.cli import main
from jobq.storage.calls import SyncRunner
from jobq.worker import Worker, WorkerConfig
from jobq.worker.heartbeat import Heartbeat
from tests.harness.cli import cli_runner

pytestmark = [pytest.mark.integration]


def run(redis_url: str, *args: str) -> tuple[int, str, str]:
    result = cli_runner().invoke(main, ["--redis-url", redis_url, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def snapshot(r: redis.Redis) -> dict[bytes, Any]:
    # Values and whether a TTL is set (the remaining TTL itself ticks down).
    return {k: (r.dump(k), r.pttl(k) > 0) for k in sorted(r.keys("*"))}


def make_dead(app: JobQ, queue: str, n: int) -> list[str]:
    ids = [app.enqueue("t", [i], queue=queue).id for i in range(n)]
    claimed = app.run(app.store.claim(queue, "n-dead", n, 30_000))
    for job in claimed.jobs:
        app.run(app.store.fail(queue, "n-dead", job.id, f"boom {job.id}", dead=True))
    return ids


@pytest.fixture
def seeded(app: JobQ, redis_url: str) -> dict[str, Any]:
    """ready, scheduled, active, dead jobs in two queues, a paused queue and a live node."""
    ready = [app.enqueue("t", [i], queue="alpha").id for i in range(3)]
    sched = app.enqueue("t", queue="alpha", delay=600).id
    dead = make_dead(app, "beta", 2)
    app.enqueue("t", queue="beta")
    active = app.run(app.store.claim("beta", "n-live", 1, 30_000)).jobs[0].id
    app.client.set(app.keys.paused("gamma"), "1")
    app.enqueue("t", queue="gamma")
    client = redis.Redis.from_url(redis_url)
    hb = Heartbeat(
        app,
        SyncRunner(client),
        "n-live",
        ["beta"],
        30_000,
        known=lambda: {"beta": {active}},
        on_beat=lambda _: None,
        on_fence=lambda *_: None,
        info=lambda: {"concurrency": 8, "inflight": 1, "busy": 1},
    )
    assert hb.beat() is not None
    client.close()
    return {"ready": ready, "scheduled": sched, "dead": dead, "active": active}


def test_read_commands_have_no_side_effects(redis_url: str, r: redis.Redis, seeded: dict[str, Any]) -> None:
    before = snapshot(r)
    reads = [
        ["stats"],
        ["stats", "--json"],
        ["stats", "--watch", "--interval", "10ms", "--iterations", "2"],
        ["status", seeded["ready"][0]],
        ["status", seeded["dead"][0], "--json", "--args"],
        ["jobs", "list"],
        ["jobs", "list", "--queue", "alpha", "--state", "scheduled", "--json"],
        ["dead", "list", "--queue", "beta"],
        ["nodes"],
        ["nodes", "--json", "--all"],
    ]
    for args in reads:
        code, _, err = run(redis_url, *args)
        assert code == 0, (args, err)
    assert snapshot(r) == before


def test_stats_table_and_json(redis_url: str, seeded: dict[str, Any]) -> None:
    code, out, _ = run(redis_url, "stats", "--json")
    assert code == 0
    data = json.loads(out)
    by_q = {q["queue"]: q for q in data["queues"]}
    assert (by_q["alpha"]["ready"], by_q["alpha"]["scheduled"]) == (3, 1)
    assert (by_q["beta"]["dead"], by_q["beta"]["active"], by_q["beta"]["nodes"]) == (2, 1, 1)
    assert by_q["gamma"]["paused"] is True
    assert data["totals"]["ready"] == 4 and data["nodes"] == 1
    code, out, _ = run(redis_url, "stats")
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["QUEUE", "READY", "SCHEDULED", "ACTIVE", "DEAD"]
    alpha = next(line for line in lines if line.startswith("alpha"))
    assert alpha.split()[1:5] == ["3", "1", "0", "0"]
    assert any(line.startswith("TOTAL") for line in lines)
    code, out, _ = run(redis_url, "stats", "--watch", "--interval", "10ms", "--iterations", "3")
    assert code == 0 and out.count("QUEUE") == 3


def test_status_and_jobs_list(redis_url: str, seeded: dict[str, Any]) -> None:
    code, out, _ = run(redis_url, "status", seeded["dead"][0], "--json")
    data = json.loads(out)
    assert data["state"] == "dead" and data["queue"] == "beta" and data["error"].startswith("boom")
    assert "args" not in data
    code, out, _ = run(redis_url, "status", seeded["ready"][1], "--args")
    assert code == 0 and "state" in out and "ready" in out and "args" in out
    code, _, err = run(redis_url, "status", "no-such-job")
    assert code == 1 and "no-such-job" in err
    code, out, _ = run(redis_url, "jobs", "list", "--queue", "alpha", "--state", "ready", "--json")
    assert [j["id"] for j in json.loads(out)] == seeded["ready"]  # run order
    code, out, _ = run(redis_url, "jobs", "list", "--queue", "beta", "--state", "active")
    assert seeded["active"] in out and out.splitlines()[0].startswith("ID")
    code, out, _ = run(redis_url, "jobs", "list", "--limit", "2", "--json")
    assert len(json.loads(out)) == 2
    code, _, err = run(redis_url, "jobs", "list", "--state", "sleeping")
    assert code == 2


def test_status_shows_interruptions(redis_url: str, app: JobQ) -> None:
    """A started job released unfinished (a shutdown; max_interruptions > 0 marks it started) shows
    its interruptions in `jobq status`."""
    job = app.enqueue("t", queue="alpha")
    for n in (1, 2):
        (claimed,) = app.run(app.store.claim("alpha", "n1", 1, 30_000)).jobs
        assert claimed.attempts == n
        res = app.run(
            app.store.release("alpha", "n1", [job.id], attempts=[claimed.attempts], max_interruptions=[5])
        )
        assert (res.released, res.interrupted) == (1, 1)
    code, out, _ = run(redis_url, "status", job.id)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert fields["interrupted"] == "2" and fields["attempts"] == "2" and fields["state"] == "ready"
    code, out, _ = run(redis_url, "status", job.id, "--json")
    assert json.loads(out)["interrupted"] == 2


def test_nodes(redis_url: str, seeded: dict[str, Any]) -> None:
    code, out, _ = run(redis_url, "nodes", "--json")
    (node,) = json.loads(out)
    assert node["node"] == "n-live" and node["live"] and node["queues"] == ["beta"]
    assert (node["inflight"], node["concurrency"]) == (1, 8)
    assert node["heartbeat_age_s"] < 60
    code, out, _ = run(redis_url, "nodes")
    assert code == 0 and "n-live" in out and "1/8" in out and "live" in out


@pytest.mark.parametrize(
    "args",
    [
        ["cancel", "x"],
        ["queue", "purge", "alpha"],
        ["queue", "purge", "alpha", "--state", "all"],
        ["dead", "purge", "--queue", "beta"],
        ["dead", "retry", "--queue", "beta"],
    ],
)
def test_destructive_commands_need_yes(
    redis_url: str, r: redis.Redis, seeded: dict[str, Any], args: list[str]
) -> None:
    before = snapshot(r)
    code, _, err = run(redis_url, *args)
    assert code == 2 and "--yes" in err
    assert snapshot(r) == before


def test_cancel(redis_url: str, app: JobQ, seeded: dict[str, Any]) -> None:
    target = seeded["scheduled"]
    code, out, _ = run(redis_url, "cancel", target, "--yes")
    assert code == 0 and "cancelled" in out
    assert app.job(target, "alpha").status().value == "cancelled"
    code, out, _ = run(redis_url, "cancel", seeded["active"], "--yes")  # running: taken from its node
    assert code == 0 and "cancelled" in out
    assert app.job(seeded["active"], "beta").status().value == "cancelled"
    code, _, err = run(redis_url, "cancel", seeded["active"], "--yes")
    assert code == 1 and "finished" in err
    code, _, err = run(redis_url, "cancel", "nope", "--yes")
    assert code == 1


def test_dead_list_retry_purge(redis_url: str, app: JobQ, r: redis.Redis, seeded: dict[str, Any]) -> None:
    code, out, _ = run(redis_url, "dead", "list", "--queue", "beta", "--json")
    assert {j["id"] for j in json.loads(out)} == set(seeded["dead"])
    one = seeded["dead"][0]
    code, out, _ = run(redis_url, "dead", "retry", "--queue", "beta", one)
    assert code == 0 and out.startswith("1 ")
    info = app.job(one, "beta").info()
    assert info.state.value == "ready" and info.attempts == 0
    more = make_dead(app, "beta", 3)
    code, out, _ = run(redis_url, "dead", "retry", "--queue", "beta", "--yes")
    assert code == 0 and out.startswith("4 ")
    assert r.zcard(app.keys.dead("beta")) == 0
    make_dead(app, "delta", 2)
    code, out, _ = run(redis_url, "dead", "purge", "--queue", "delta", "--yes")
    assert code == 0 and out.startswith("2 ")
    assert r.zcard(app.keys.dead("delta")) == 0
    assert all(not r.exists(app.keys.job("delta", i)) for i in more)


def test_queue_purge(redis_url: str, app: JobQ, r: redis.Redis, seeded: dict[str, Any]) -> None:
    code, out, _ = run(redis_url, "queue", "purge", "alpha", "--yes")
    assert code == 0 and "3 ready" in out and "1 scheduled" in out
    assert r.zcard(app.keys.ready("alpha")) == 0 and r.zcard(app.keys.scheduled("alpha")) == 0
    assert not r.exists(app.keys.job("alpha", seeded["ready"][0]))
    # Running jobs are never purged.
    code, out, _ = run(redis_url, "queue", "purge", "beta", "--state", "all", "--yes")
    assert code == 0 and "2 dead" in out
    assert app.job(seeded["active"], "beta").status().value == "active"


def test_paused_queue_is_not_claimed_and_resumes_in_order(redis_url: str, app: JobQ, r: redis.Redis) -> None:
    ran: list[int] = []

    @app.task(name="record", queue="pq")
    def record(i: int) -> None:
        ran.append(i)

    for i in range(5):
        app.enqueue("record", [i])
    code, out, _ = run(redis_url, "queue", "pause", "pq")
    assert code == 0 and "paused" in out
    assert run(redis_url, "queue", "pause", "pq")[1].strip().endswith("already paused")
    asyncio.run(Worker(app, WorkerConfig(queues=[("pq", 1)], burst=True, concurrency=1)).run())
    assert ran == [] and r.zcard(app.keys.ready("pq")) == 5
    code, out, _ = run(redis_url, "stats", "--json", "--queue", "pq")
    assert json.loads(out)["queues"][0]["paused"] is True
    code, out, _ = run(redis_url, "queue", "resume", "pq")
    assert code == 0 and "resumed" in out
    asyncio.run(Worker(app, WorkerConfig(queues=[("pq", 1)], burst=True, concurrency=1)).run())
    assert ran == [0, 1, 2, 3, 4]


def test_redis_unavailable_is_exit_1_with_a_redacted_message() -> None:
    code, _, err = run("redis://user:hunter2@127.0.0.1:1/0", "stats")
    assert code == 1
    assert "hunter2" not in err
