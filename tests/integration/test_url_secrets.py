"""A Redis URL that does not parse is never echoed with its password (issue 17 §4): not by the
library, not by the CLI, not in a worker's log; a malformed IPv6 host is a clear error, not a
traceback. And ``unix://`` URLs connect (they raised a TypeError before)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobq import InvalidInput, JobQ
from jobq.cli import main
from jobq.storage import clients
from tests.harness.cli import cli_runner
from tests.harness.redis_server import RedisServer

pytestmark = [pytest.mark.integration]

SECRET = "Zq9-secret"

BAD = [
    (f"redis://:{SECRET[:3]}/{SECRET[4:]}@db.internal:6379/0", "must be percent-encoded"),
    (f"redis://app:#{SECRET}@db.internal:6379/0", "must be percent-encoded"),
    (f"redis://app:{SECRET}?x@db.internal:6379/0", "must be percent-encoded"),
    (f"redis+sentinel://app:{SECRET}/x@h1:26379,h2:26379/mymaster", "must be percent-encoded"),
    (f"redis://app:{SECRET}@[::1:6379/0", "an IPv6 host is written [::1]:6379"),
    ("redis://[::1:6379/0", "an IPv6 host is written [::1]:6379"),
    (f"redis://app:{SECRET}@db.internal:notaport/0", "is not host:port"),
    ("redis://db.internal:6379/0#frag", "'#' is not allowed"),
]
SECRET_PIECES = (SECRET, SECRET[:3], SECRET[4:], "secret")


@pytest.mark.parametrize(("url", "why"), BAD)
def test_library_errors_name_the_problem_not_the_password(url: str, why: str) -> None:
    with pytest.raises(InvalidInput) as e:
        clients.parse_url(url)
    assert e.value.field == "url" and why in str(e.value)
    assert not any(p in str(e.value) for p in SECRET_PIECES), str(e.value)
    assert not any(p in clients.redact_url(url) for p in SECRET_PIECES), clients.redact_url(url)


@pytest.mark.parametrize(("url", "why"), BAD)
def test_cli_errors_name_the_problem_not_the_password(url: str, why: str) -> None:
    res = cli_runner().invoke(main, ["stats"], env={"JOBQ_REDIS_URL": url})
    assert res.exit_code in (1, 2) and not isinstance(res.exception, (TypeError, ValueError)), res.output
    assert why in res.output and "Traceback" not in res.output
    assert not any(p in res.output for p in SECRET_PIECES), res.output


def test_a_worker_logs_no_password_from_a_bad_url(tmp_path: Path) -> None:
    url, _ = BAD[0]
    proc = subprocess.run(
        [sys.executable, "-m", "jobq", "worker", "--burst"],
        env={"JOBQ_REDIS_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "must be percent-encoded" in out
    assert "Traceback" not in out and not any(p in out for p in SECRET_PIECES), out


def test_redact_url_keeps_what_is_safe() -> None:
    assert clients.redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert clients.redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert clients.redact_url("rediss://user@host:1/0") == "rediss://user@host:1/0"
    assert clients.redact_url("redis://a/b:pw@host/0") == "redis://***@host/0"


def test_a_percent_encoded_password_with_slash_and_hash_works() -> None:
    password = "p/w#x@y?"
    server = RedisServer(password=password).start()
    try:
        encoded = "p%2Fw%23x%40y%3F"
        app = JobQ(f"redis://:{encoded}@127.0.0.1:{server.port}/0")
        assert app.enqueue("t").status().value == "ready"
        app.close()
    finally:
        server.cleanup()


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    sock = Path("/tmp") / f"jobq-test-{tmp_path.name[-20:]}.sock"
    server = RedisServer(extra=["--unixsocket", str(sock), "--unixsocketperm", "700"]).start()
    yield server, sock
    server.cleanup()


def test_unix_socket_urls_connect(unix_server: tuple[RedisServer, Path]) -> None:
    _, sock = unix_server
    app = JobQ(f"unix://{sock}?db=2")
    job = app.enqueue("t")
    assert job.status().value == "ready"
    app.close()
    res = cli_runner().invoke(main, ["--redis-url", f"unix://{sock}?db=2", "stats", "--json"])
    assert res.exit_code == 0 and '"ready": 1' in res.output


# -- credentials inside a job's argument values ---------------------------------------------------
CREDENTIAL_ARGS = (
    ["https://alice:pw-Q1x@hooks.example.com/in?token=tok-Q2x&page=2", "postgres://app:pw-Q3x@db/prod"],
    {
        "dsn": "host=db user=app password=pw-Q4x dbname=prod",
        "urls": ["https://ghp-Q5xLONGTOKEN@github.com/o/r.git", "https://s3/x?X-Amz-Signature=sig-Q6x&a=1"],
        "headers": {"X-Trace": "Bearer tok-Q7xLONGER", "Authorization": "Basic Q8x"},
        "note": "see https://example.com/@user and a@example.com",
    },
)
LEAKS = ("pw-Q1x", "tok-Q2x", "pw-Q3x", "pw-Q4x", "ghp-Q5x", "sig-Q6x", "tok-Q7x", "Q8x")


def _seed(redis_url: str) -> tuple[JobQ, str]:
    app = JobQ(redis_url)
    job = app.enqueue("t", CREDENTIAL_ARGS[0], CREDENTIAL_ARGS[1], queue="creds")
    return app, job.id


def test_status_args_mask_credentials_inside_values(redis_url: str) -> None:
    app, job_id = _seed(redis_url)
    for extra in ([], ["--json"]):
        res = cli_runner().invoke(main, ["--redis-url", redis_url, "status", job_id, "--args", *extra])
        assert res.exit_code == 0, res.output
        assert not any(s in res.output for s in LEAKS), res.output
        # What is not a secret is still shown.
        for kept in ("alice:***@hooks.example.com", "page=2", "app:***@db/prod", "user=app", "dbname=prod"):
            assert kept in res.output, (kept, res.output)
        assert "https://example.com/@user" in res.output and "a@example.com" in res.output
    # The stored job is untouched: the task gets its real arguments.
    assert app.job(job_id).info().args == CREDENTIAL_ARGS[0]
    app.close()


def test_http_job_view_masks_credentials_inside_values(redis_url: str) -> None:
    import http.client
    import json

    from jobq.web import ApiServer

    app, job_id = _seed(redis_url)
    server = ApiServer(app, "127.0.0.1", 0).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", f"/jobs/{job_id}")
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
    finally:
        server.close()
        app.close()
    assert resp.status == 200
    assert not any(s in text for s in LEAKS), text
    body = json.loads(text)
    assert body["args"][1] == "postgres://app:***@db/prod"
    assert body["kwargs"]["headers"] == {"X-Trace": "Bearer ***", "Authorization": "***"}
