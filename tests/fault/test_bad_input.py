"""Bad input (RELIABILITY.md B1 over the CLI/NDJSON/HTTP, B2, B5, B6).

B1 over the Python API, B3 and B4 are the core's tests; here the same refusals are checked at the
process edges (``jobq enqueue``, NDJSON on stdin, the HTTP API), and corrupt state already in
Redis is fed to a running worker (B2).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import redis
from hypothesis import strategies as st

from jobq import JobQ
from jobq.codec import encode_payload
from tests.harness import proxy_fixtures
from tests.harness.proxy_fixtures import ThreadWorker, keyspace

pytestmark = [pytest.mark.fault]

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


# -- B1 over HTTP, B5: the HTTP API ------------------------------------------------------------------
def _http_api(url: str) -> Iterator[tuple[JobQ, int]]:
    from jobq.web import ApiServer

    app = JobQ(url)
    server = ApiServer(app, port=0).start()
    try:
        yield app, server.port
    finally:
        server.close()
        app.close()


@pytest.fixture
def http_api(redis_url: str) -> Iterator[tuple[JobQ, int]]:
    yield from _http_api(redis_url)


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    ctype: str | None = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    hdrs = dict(headers or {})
    if ctype is not None:
        hdrs["Content-Type"] = ctype
    t0 = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.monotonic() - t0
    finally:
        conn.close()


def _post_raw(port: int, body: bytes) -> tuple[int, bytes]:
    """POST /jobs over a plain socket, tolerating a server that answers (and closes) before the
    whole body is sent; returns (status, response body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = (
            "POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        try:
            s.sendall(head.encode() + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
            if b"\r\n\r\n" in raw:
                header, _, rest = raw.partition(b"\r\n\r\n")
                length = int(header.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    return int(raw.split(b" ", 2)[1]), rest[:length]
    return int(raw.split(b" ", 2)[1]), raw.partition(b"\r\n\r\n")[2]


def _deep(n: int) -> str:
    return "[" * n + "]" * n


#: (body, expected status, field the error must name)
BAD_HTTP: list[tuple[bytes, int, str]] = [
    (b"{bad json", 400, "body"),
    (b"\xff\xfe\x00garbage", 400, "body"),
    (b'{"task": "t", "args": [NaN]}', 400, "body"),
    (b'{"task": "t", "args": [Infinity]}', 400, "body"),
    (('{"task": "t", "args": ' + _deep(10_000) + "}").encode(), 400, "body"),
    (json.dumps({"task": "t\n"}).encode(), 400, "task"),
    (json.dumps({"task": "t", "priority": 1000}).encode(), 400, "priority"),
    (json.dumps({"task": "t", "priority": "high"}).encode(), 400, "priority"),
    (json.dumps({"task": "t", "delay": "30x"}).encode(), 400, "delay"),
    (json.dumps({"task": "t", "delay": -1}).encode(), 400, "delay"),
    (json.dumps({"task": "t", "run_at": 2**60}).encode(), 400, "run_at"),
    (json.dumps({"task": "t", "run_at": 2000, "deadline": 1000}).encode(), 400, "deadline"),
    (json.dumps({"task": "t", "max_attempts": 0}).encode(), 400, "max_attempts"),
    (json.dumps({"task": "t", "queue": ""}).encode(), 400, "queue"),
    (json.dumps({"task": "t", "queue": "a{b}"}).encode(), 400, "queue"),
    (json.dumps({"task": "t", "queue": "a b"}).encode(), 400, "queue"),
    (json.dumps({"task": "t", "queue": "q\n"}).encode(), 400, "queue"),
    (json.dumps({"task": "t", "queue": "q\u0000"}).encode(), 400, "queue"),
    (json.dumps({"task": "t", "queue": "x" * 300}).encode(), 400, "queue"),
    (json.dumps({"task": "bad\u0001task"}).encode(), 400, "task"),
    (json.dumps({"task": "t", "unique_key": "u" * 600}).encode(), 400, "unique_key"),
    (json.dumps({"task": "t", "kwargs": [1]}).encode(), 400, "kwargs"),
    (json.dumps({"task": "t", "nope": 1}).encode(), 400, "nope"),
    (json.dumps({"args": [1]}).encode(), 400, "task"),
    (json.dumps([{"task": "t"}, {"task": "t", "priority": 999}]).encode(), 400, "priority"),
    (json.dumps({"task": "t", "args": ["x" * (1024 * 1024)]}).encode(), 400, "payload"),
    (b'{"task": "t", "args": ["' + b"x" * (3 * 1024 * 1024) + b'"]}', 413, "body"),
]


@pytest.mark.parametrize(
    ("body", "status", "field"), BAD_HTTP, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(BAD_HTTP)]
)
def test_b1_http_rejects_naming_the_field_nothing_written(
    http_api: tuple[JobQ, int], r: redis.Redis, body: bytes, status: int, field: str
) -> None:
    app, port = http_api
    app.enqueue("t", [1], queue="default")
    before = keyspace(r)
    if status == 413:
        # Refused before the body is read: the server may close while the client still sends.
        got, data = _post_raw(port, body)
    else:
        got, data, _ = _request(port, "POST", "/jobs", body)
    assert got == status, (got, data[:300])
    err = json.loads(data)
    assert err.get("field", "").replace("-", "_").lower().endswith(field), err
    assert keyspace(r) == before


def test_b5_http_limits_413_fast_415_411(http_api: tuple[JobQ, int], r: redis.Redis) -> None:
    _, port = http_api
    before = keyspace(r)
    # 100 MiB announced, a few bytes sent: refused without reading, at once.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 104857600\r\n\r\n{"task": '
        )
        head = s.recv(65536)
        took = time.monotonic() - t0
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    print(f"B5: 413 for 100 MiB announced in {took * 1000:.1f} ms")
    assert took <= 0.1, f"413 took {took * 1000:.0f} ms"
    status, data, _ = _request(port, "POST", "/jobs", b'{"task": "t"}', ctype="text/plain")
    assert status == 415 and json.loads(data)["field"] == "Content-Type"
    status, data, _ = _request(port, "POST", "/jobs", b'{"task": "t"}', ctype=None)
    assert status == 415
    assert keyspace(r) == before


# Hypothesis strategies for B5: any JSON, job-like objects with hostile field values, raw bytes.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = "task args kwargs queue priority delay run_at scheduled_at max_attempts timeout deadline"
_fields = st.sampled_from([*_FIELDS.split(), "unique_key", "retry_backoff", "job_id", "bogus"])
_job = st.dictionaries(_fields, _json, max_size=6).map(lambda d: {"task": "t", **d})
_body = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    _job.map(lambda v: json.dumps(v).encode()),
    st.lists(_job, max_size=5).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)
_path = st.one_of(
    st.sampled_from(["/jobs", "/jobs/", "/stats", "/health", "/metrics", "/openapi.json", "/", "/nope"]),
    st.text(alphabet="abcdefghij0123456789-_%{}", max_size=12).map(lambda s: "/jobs/" + s),
    st.sampled_from(["/jobs?queue=", "/jobs?queue=a{b", "/jobs?state=zzz&limit=-1", "/jobs?limit=abc"]),
)


def test_b5_http_fuzz_no_5xx(http_api: tuple[JobQ, int], seed: int) -> None:
    """Random methods, paths, content types and bodies against the API: never a 5xx, and every
    4xx is a JSON error (with the field for 400/411/413/415)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    _, port = http_api
    seen: dict[int, int] = {}

    @hseed(seed)
    @settings(
        max_examples=proxy_fixtures.scale(800, 10_000),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD"]),
        path=_path,
        body=_body,
        ctype=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None]),
    )
    def one(method: str, path: str, body: bytes, ctype: str | None) -> None:
        send = body if method in ("POST", "PUT", "PATCH", "DELETE") else None
        status, data, _ = _request(port, method, path, send, ctype=ctype)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (method, path, body[:200], status, data[:300])
        if 400 <= status < 500 and method != "HEAD":
            err = json.loads(data)
            assert isinstance(err.get("error"), str)
            if status in (400, 411, 413, 415):
                assert isinstance(err.get("field"), str), err  # may be "" for an unknown "" key

    one()
    print(f"B5: statuses {dict(sorted(seen.items()))}")
