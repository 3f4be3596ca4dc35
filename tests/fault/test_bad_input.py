"""Bad input (RELIABILITY.md B1 over the CLI/NDJSON/HTTP, B2, B5, B6).

B1 over the Python API, B3 and B4 are the core's tests; here the same refusals are checked at the
process edges (``jobq enqueue``, NDJSON on stdin, the HTTP API), and corrupt state already in
Redis is fed to a running worker (B2).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import redis

from jobq import JobQ
from jobq.codec import encode_payload
from tests.harness import proxy_fixtures
from tests.harness.proxy_fixtures import ThreadWorker, keyspace

pytestmark = [pytest.mark.fault]

seed = proxy_fixtures.seed
thread_workers = proxy_fixtures.thread_workers

ROOT = Path(__file__).resolve().parents[2]
Q = "bad"


# -- B2: corrupt state already in Redis -------------------------------------------------------------
def test_b2_corrupt_jobs_dead_lettered_with_reason_worker_keeps_going(
    redis_url: str, r: redis.Redis, thread_workers: list[ThreadWorker], caplog: pytest.LogCaptureFixture
) -> None:
    done: set[int] = set()
    app = JobQ(redis_url)

    @app.task(name="ok", queue=Q)
    def ok(i: int) -> int:
        done.add(i)
        return i

    n = 1000
    app.enqueue_many([{"task": "ok", "args": [i], "queue": Q} for i in range(n)])
    k = app.keys
    # Garbage bytes and truncated msgpack in a stored payload.
    for job_id, payload in (
        ("garbage", b"\xc1\xff\x00 not msgpack"),
        ("truncated", encode_payload([1, "two", [3]], {"k": "v" * 50}, 1 << 20)[:-7]),
        ("not-a-pair", msgpack.packb({"a": 1})),
    ):
        app.enqueue("ok", [0], queue=Q, job_id=job_id)
        r.hset(k.job(Q, job_id), "payload", payload)
    # An id in ready with no job hash at all.
    app.enqueue("ok", [0], queue=Q, job_id="missing")
    r.delete(k.job(Q, "missing"))
    # A key of the wrong type where a job hash belongs.
    app.enqueue("ok", [0], queue=Q, job_id="wrongtype")
    r.delete(k.job(Q, "wrongtype"))
    r.set(k.job(Q, "wrongtype"), "a string, not a hash")
    bad = {"garbage": "decode_error", "truncated": "decode_error", "not-a-pair": "decode_error"}
    bad |= {"missing": "missing_job", "wrongtype": "wrong_type"}
    caplog.set_level(logging.WARNING, logger="jobq")

    w = ThreadWorker(app, queues=[(Q, 1)], concurrency=8, lease=5, burst=True)
    thread_workers.append(w.start())
    assert w.join(120), "the worker did not finish the queue"
    assert w.error is None, f"the worker crashed: {w.error!r}"
    assert done == set(range(n))  # every good job ran
    dead = {m.decode() for m in r.zrange(k.dead(Q), 0, -1)}
    assert dead == set(bad)
    for job_id, reason in bad.items():
        if reason == "wrong_type":
            assert r.type(k.job(Q, job_id)) == b"string"  # left for an operator, not overwritten
        else:
            assert r.hget(k.job(Q, job_id), "state") == b"dead"
            error = (r.hget(k.job(Q, job_id), "error") or b"").decode()
            assert error.startswith(reason), (job_id, error)
        lines = [rec for rec in caplog.records if job_id in rec.getMessage()]
        assert len(lines) == 1, (job_id, [rec.getMessage() for rec in lines])
        assert reason in lines[0].getMessage()
    assert r.zcard(k.ready(Q)) == 0 and r.zcard(k.leases(Q)) == 0
    app.close()


# -- B1 / B6 over the CLI ----------------------------------------------------------------------------
def _jobq(args: list[str], url: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JOBQ_REDIS_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "jobq", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )


def _has_enqueue_cli() -> bool:
    from jobq.cli import main

    return "enqueue" in main.commands


needs_cli = pytest.mark.skipif(not _has_enqueue_cli(), reason="jobq enqueue is not built yet")

#: (argv after "enqueue", the field the error must name)
BAD_CLI = [
    (["t", "{bad json"], "args"),
    (["t", "[]", "--queue", ""], "queue"),
    (["t", "[]", "--queue", "a{b}"], "queue"),
    (["t", "[]", "--queue", "has space"], "queue"),
    (["t", "[]", "--queue", "x" * 300], "queue"),
    (["t", "[]", "--priority", "1000"], "priority"),
    (["t", "[]", "--priority", "high"], "priority"),
    (["t", "[]", "--delay", "30x"], "delay"),
    (["t", "[]", "--delay", "-5"], "delay"),
    (["t", "[]", "--delay", "nan"], "delay"),
    (["t", "[]", "--max-attempts", "0"], "max_attempts"),
    (["t", "[]", "--unique", "u" * 600], "unique_key"),
    (["t", "[]", "--timeout", "-1"], "timeout"),
    (["t", "[]", "--at", "not-a-date"], "at"),
    (["t", "[]", "--job-id", "has space"], "id"),
    (["t", "[]", "--kwargs", "[1, 2]"], "kwargs"),
    (["t", "\udcff"], "args"),
    (["bad\x01task", "[]"], "task"),
    (["t", "[NaN]"], "args"),
    (["t", "[Infinity]"], "args"),
]


@needs_cli
@pytest.mark.parametrize(("argv", "field"), BAD_CLI, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_CLI)])
def test_b1_cli_rejects_with_exit_2_naming_the_field(
    redis_url: str, r: redis.Redis, argv: list[str], field: str
) -> None:
    app = JobQ(redis_url)
    app.enqueue("t", [1], queue=Q)  # some state to compare
    before = keyspace(r)
    res = _jobq(["enqueue", *argv], redis_url)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    out = res.stdout + res.stderr
    squash = out.lower().replace("_", "").replace("-", "")
    assert field.replace("_", "") in squash, out
    assert "Traceback" not in out
    assert keyspace(r) == before
    app.close()


@needs_cli
def test_b6_ndjson_one_bad_line_in_1000_all_or_nothing(redis_url: str, r: redis.Redis) -> None:
    """The documented behaviour: the whole file is validated first; one bad line refuses it all
    (nothing enqueued), the error names the line number and the field, exit 2."""
    import json

    lines = [json.dumps({"task": "t", "args": [i], "queue": Q}) for i in range(1000)]
    lines[636] = json.dumps({"task": "t", "args": [636], "queue": Q, "priority": 1000})
    before = keyspace(r)
    res = _jobq(["enqueue", "--from-file", "-"], redis_url, stdin="\n".join(lines) + "\n")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "637" in out, out  # 1-based line number
    assert "priority" in out, out
    assert keyspace(r) == before
    # Bad JSON on one line: the same.
    lines[636] = '{"task": "t", "args": [636'
    res = _jobq(["enqueue", "--from-file", "-"], redis_url, stdin="\n".join(lines) + "\n")
    assert res.returncode != 0 and "637" in res.stdout + res.stderr
    assert keyspace(r) == before
    # With --skip-invalid (the documented opt-in): the 999 valid lines go in, the bad one is
    # reported by its line number.
    res = _jobq(["enqueue", "--from-file", "-", "--skip-invalid"], redis_url, stdin="\n".join(lines) + "\n")
    assert "line 637" in res.stderr and "skipping 1 invalid line" in res.stderr
    assert r.zcard(JobQ(redis_url).keys.ready(Q)) == 999
    r.flushall()
    before = keyspace(r)
    # All good: all 1000 enqueued.
    lines[636] = json.dumps({"task": "t", "args": [636], "queue": Q})
    t0 = time.monotonic()
    res = _jobq(["enqueue", "--from-file", "-"], redis_url, stdin="\n".join(lines) + "\n")
    assert res.returncode == 0, res.stdout + res.stderr
    assert r.zcard(JobQ(redis_url).keys.ready(Q)) == 1000
    assert time.monotonic() - t0 < 30
