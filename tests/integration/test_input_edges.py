"""Inputs that used to slip past validation (issue 17 §4), refused the same way from Python, the
CLI and HTTP, with nothing stored: a shard suffix on a queue that is not sharded, a job id that
is not a safe path segment, a number that overflows to infinity, and JSON that is not UTF-8."""

from __future__ import annotations

import dataclasses
import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobq import EnqueueRequest, InvalidJobId, InvalidQueueName, JobQ
from jobq.cli import main
from jobq.web import ApiServer
from tests.harness.cli import cli_runner

pytestmark = [pytest.mark.integration]


def cli(redis_url: str, *args: str, input: str | bytes | None = None) -> tuple[int, str]:
    result = cli_runner().invoke(main, ["--redis-url", redis_url, *args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


@pytest.fixture
def port(redis_url: str) -> Iterator[int]:
    app = JobQ(redis_url)
    server = ApiServer(app, "127.0.0.1", 0).start()
    yield server.port
    server.close()
    app.close()


def post(port: int, body: bytes, ctype: str = "application/json") -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/jobs", body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def nothing_stored(r: redis.Redis) -> bool:
    return not [k for k in r.keys("*") if b":job:" in k]


# -- a shard suffix on a queue the app does not shard ------------------------------------------
def test_hash_suffix_needs_a_sharded_queue(redis_url: str, r: redis.Redis, port: int) -> None:
    app = JobQ(redis_url)
    with pytest.raises(InvalidQueueName, match="'#' is reserved for the shards"):
        app.enqueue("t", queue="hot#1")
    with pytest.raises(InvalidQueueName, match="'#' is reserved"):
        app.task(queue="hot#1")(lambda: None)
    code, out = cli(redis_url, "enqueue", "t", "--queue", "hot#1")
    assert code == 2 and "'#' is reserved for the shards" in out
    status, body = post(port, json.dumps({"task": "t", "queue": "hot#1"}).encode())
    assert status == 400 and body["field"] == "queue" and "reserved" in body["error"]
    assert nothing_stored(r)
    # A shard of a sharded queue can still be named (its index in range).
    sharded = JobQ(redis_url, shards={"hot": 2})
    assert sharded.enqueue("t", queue="hot#1").queue == "hot#1"
    with pytest.raises(InvalidQueueName, match=r"shards #0\.\.#1"):
        sharded.enqueue("t", queue="hot#2")
    sharded.close()
    app.close()


# -- job ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../x", "a/b", "a%2fb", "a?b", "a#b", ".hidden", "-x", "é", "a+b"])
def test_job_ids_are_safe_path_segments(redis_url: str, r: redis.Redis, port: int, bad: str) -> None:
    app = JobQ(redis_url)
    with pytest.raises(InvalidJobId, match="not a valid job id"):
        app.enqueue("t", job_id=bad)
    code, out = cli(redis_url, "enqueue", "t", "--job-id", bad)
    assert code == 2 and "not a valid job id" in out
    status, body = post(port, json.dumps({"task": "t", "job_id": bad}).encode())
    assert status == 400 and body["field"] == "id"
    assert nothing_stored(r)
    app.close()


@pytest.mark.parametrize("good", ["order-123", "v1.2_x", "tenant:42:job", "_private", "A" * 128])
def test_usual_job_ids_are_accepted(redis_url: str, good: str) -> None:
    app = JobQ(redis_url)
    assert app.enqueue("t", job_id=good).id == good
    app.close()


def test_a_job_stored_under_an_old_id_is_still_reachable(redis_url: str, r: redis.Redis) -> None:
    """Lookups keep the looser rule, so a job enqueued before it can still be read and cancelled."""
    app = JobQ(redis_url)
    queue, spec = app.prepare(EnqueueRequest("t"))
    app.run(app.store.enqueue(queue, [dataclasses.replace(spec, id="../../x")]))
    r.sadd(app.keys.queues, queue)
    code, out = cli(redis_url, "status", "../../x")
    assert code == 0 and "ready" in out
    code, out = cli(redis_url, "cancel", "../../x", "--yes")
    assert code == 0, out
    app.close()


# -- numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[1e999]", "[-1e999]", '{"x": [1E400]}', "[NaN]", "[Infinity]"])
def test_numbers_beyond_a_float_are_refused(redis_url: str, r: redis.Redis, port: int, text: str) -> None:
    code, out = cli(redis_url, "enqueue", "t", text)
    assert code == 2 and "not valid JSON" in out
    line = '{"task": "t", "args": [' + text + "]}\n"
    code, out = cli(redis_url, "enqueue", "--from-file", "-", input=line)
    assert code == 2 and "line 1" in out
    status, body = post(port, line.encode())
    assert status == 400 and body["field"] == "body"
    assert nothing_stored(r)


def test_large_finite_numbers_are_kept(redis_url: str) -> None:
    code, out = cli(redis_url, "enqueue", "m.t", "[1e308, -2.5e-300]")
    assert code == 0
    app = JobQ(redis_url)
    assert app.job(out.strip()).info().args == [1e308, -2.5e-300]
    app.close()


# -- encodings -----------------------------------------------------------------------------------
def test_utf16_json_is_refused_and_a_bom_is_ignored(
    redis_url: str, r: redis.Redis, port: int, tmp_path: Path
) -> None:
    body = '{"task": "m.t", "args": ["é"]}'
    for enc, name in (("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-32", "UTF-32")):
        status, err = post(port, body.encode(enc))
        assert status == 400 and f"must be UTF-8, this is {name}" in err["error"], err
    status, err = post(port, b'{"task": "t", "args": ["\xff"]}')
    assert status == 400 and "must be UTF-8" in err["error"]
    f16 = tmp_path / "jobs16.ndjson"
    f16.write_bytes((body + "\n").encode("utf-16"))
    code, out = cli(redis_url, "enqueue", "--from-file", str(f16))
    assert code == 2 and "UTF-16" in out and "nothing enqueued" in out
    assert nothing_stored(r)
    # A UTF-8 byte order mark is skipped: HTTP, an NDJSON file, and the CLI argument.
    status, ok = post(port, b"\xef\xbb\xbf" + body.encode())
    assert status == 201, ok
    fbom = tmp_path / "bom.ndjson"
    fbom.write_bytes(b"\xef\xbb\xbf" + (body + "\n" + body + "\n").encode())
    code, out = cli(redis_url, "enqueue", "--from-file", str(fbom))
    assert code == 0 and len(out.split()) == 2, out
    code, out = cli(redis_url, "enqueue", "m.t", '\ufeff["é"]')
    assert code == 0, out
    app = JobQ(redis_url)
    assert app.job(out.strip()).info().args == ["é"]
    app.close()
