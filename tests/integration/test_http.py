"""The HTTP API against a real redis-server: every route, every error status, back-pressure,
body limits, content types and the bearer token."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from jobq import JobQ
from jobq.web import ApiServer, openapi_document
from tests.harness.redis_server import RedisServer

pytestmark = [pytest.mark.integration]


class Client:
    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = dict(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            hdrs.setdefault("Content-Type", ctype)
        if self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        rh = {k.lower(): v for k, v in resp.getheaders()}
        if rh.get("content-type", "").startswith("application/json"):
            return resp.status, rh, json.loads(payload)
        return resp.status, rh, payload.decode()


@pytest.fixture
def api(redis_url: str) -> Iterator[tuple[JobQ, Client]]:
    app = JobQ(redis_url, max_depth={"small": 2})
    server = ApiServer(app, "127.0.0.1", 0, max_body=64 * 1024).start()
    yield app, Client(server.port)
    server.close()
    app.close()


def test_post_get_list_delete(api: tuple[JobQ, Client], r: redis.Redis) -> None:
    app, c = api
    status, headers, body = c.request(
        "POST",
        "/jobs",
        {
            "task": "send_email",
            "args": ["a@example.com"],
            "kwargs": {"subject": "hi"},
            "queue": "emails",
            "priority": 5,
            "max_attempts": 4,
            "timeout": "30s",
            "unique_key": "welcome-1",
        },
    )
    assert status == 201, body
    assert body["status"] == "ready" and body["queue"] == "emails"
    assert headers["location"] == f"/jobs/{body['id']}"
    job_id = body["id"]
    info = app.job(job_id, "emails").info()
    assert (info.task, info.args, info.kwargs) == ("send_email", ["a@example.com"], {"subject": "hi"})
    assert (info.priority, info.max_attempts, info.timeout_ms) == (5, 4, 30_000)

    # Delayed and scheduled_at jobs land in scheduled.
    s1, _, b1 = c.request("POST", "/jobs", {"task": "t", "queue": "emails", "delay": 60})
    s2, _, b2 = c.request(
        "POST", "/jobs", {"task": "t", "queue": "emails", "scheduled_at": "2040-01-01T00:00:00Z"}
    )
    assert (s1, b1["status"], s2, b2["status"]) == (201, "scheduled", 201, "scheduled")
    assert app.job(b2["id"], "emails").info().run_at_ms == 2208988800000

    status, _, one = c.request("GET", f"/jobs/{job_id}")
    assert status == 200 and one["state"] == "ready" and one["kwargs"] == {"subject": "hi"}
    status, _, listed = c.request("GET", "/jobs?queue=emails&status=scheduled&limit=10")
    assert status == 200 and {j["id"] for j in listed["jobs"]} == {b1["id"], b2["id"]}
    status, _, listed = c.request("GET", "/jobs?queue=emails&limit=2")
    assert len(listed["jobs"]) == 2

    status, _, stats = c.request("GET", "/stats")
    assert status == 200
    (emails,) = [q for q in stats["queues"] if q["queue"] == "emails"]
    assert (emails["ready"], emails["scheduled"]) == (1, 2)
    assert stats["totals"]["scheduled"] == 2

    status, _, body = c.request("DELETE", f"/jobs/{job_id}")
    assert status == 200 and body["status"] == "cancelled"
    assert app.job(job_id, "emails").status().value == "cancelled"
    status, _, body = c.request("DELETE", f"/jobs/{job_id}")
    assert status == 409 and body["field"] == "id"
    status, _, body = c.request("GET", "/jobs/nosuchjob")
    assert status == 404
    status, _, body = c.request("DELETE", "/jobs/nosuchjob")
    assert status == 404


def test_delete_cancels_a_running_job(api: tuple[JobQ, Client], r: redis.Redis) -> None:
    app, c = api
    job = app.enqueue("t", queue="emails")
    assert [j.id for j in app.run(app.store.claim("emails", "n1", 1, 30_000)).jobs] == [job.id]
    status, _, body = c.request("DELETE", f"/jobs/{job.id}")
    assert status == 200 and body["status"] == "cancelled"
    assert job.status().value == "cancelled"
    assert r.zcard(app.keys.active("emails", "n1")) == 0  # taken from its node at once
    status, _, body = c.request("DELETE", f"/jobs/{job.id}")
    assert status == 409


def test_get_shows_progress_with_secrets_masked(api: tuple[JobQ, Client]) -> None:
    app, c = api
    job = app.enqueue("t", queue="emails")
    app.run(app.store.claim("emails", "n1", 1, 30_000))
    msg = "fetching https://user:hunter2@example.com/data"
    assert app.run(app.store.progress("emails", "n1", job.id, 1, 0.4, msg)) == 1
    status, _, body = c.request("GET", f"/jobs/{job.id}")
    assert status == 200 and body["progress"] == 0.4 and isinstance(body["progress_ms"], int)
    assert "hunter2" not in body["progress_message"] and "example.com" in body["progress_message"]


def test_bulk_post_is_all_or_nothing(api: tuple[JobQ, Client], r: redis.Redis) -> None:
    _app, c = api
    status, _, body = c.request("POST", "/jobs", [{"task": "t", "args": [i]} for i in range(3)])
    assert status == 201 and len(body["jobs"]) == 3
    before = r.dbsize()
    status, _, body = c.request("POST", "/jobs", [{"task": "t"}, {"task": "t", "priority": "high"}])
    assert status == 400 and body["field"] == "priority" and "job 1" in body["error"]
    assert r.dbsize() == before


def test_secret_arguments_are_masked_in_job_views(api: tuple[JobQ, Client]) -> None:
    _, c = api
    kwargs = {"url": "http://x/", "headers": {"Authorization": "Bearer s3cr3t-token", "X-Trace": "1"}}
    _, _, body = c.request("POST", "/jobs", {"task": "webhook", "kwargs": kwargs})
    _, _, one = c.request("GET", f"/jobs/{body['id']}")
    assert one["kwargs"]["headers"] == {"Authorization": "***", "X-Trace": "1"}
    assert "s3cr3t" not in json.dumps(one)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"args": []}, "task"),
        ({"task": "bad task"}, "task"),
        ({"task": "t", "priority": 101}, "priority"),
        ({"task": "t", "priority": "5"}, "priority"),
        ({"task": "t", "delay": -1}, "delay"),
        ({"task": "t", "delay": "soon"}, "delay"),
        ({"task": "t", "delay": 5, "scheduled_at": "2040-01-01T00:00:00Z"}, "delay"),
        ({"task": "t", "scheduled_at": "next tuesday"}, "run_at"),
        ({"task": "t", "max_attempts": 0}, "max_attempts"),
        ({"task": "t", "timeout": "x"}, "timeout"),
        ({"task": "t", "queue": "a:b"}, "queue"),
        ({"task": "t", "unique_key": ""}, "unique_key"),
        ({"task": "t", "args": {"a": 1}}, "args"),
        ({"task": "t", "kwargs": [1]}, "kwargs"),
        ({"task": "t", "colour": "red"}, "colour"),
        ("just a string", "body"),
    ],
)
def test_bad_input_is_400_naming_the_field(
    api: tuple[JobQ, Client], r: redis.Redis, body: Any, field: str
) -> None:
    _, c = api
    status, _, resp = c.request("POST", "/jobs", body)
    assert status == 400, resp
    assert resp["field"] == field, resp
    assert resp["error"]
    assert r.dbsize() == 0


def test_bad_json_bad_type_and_limits(api: tuple[JobQ, Client], r: redis.Redis) -> None:
    _, c = api
    status, _, resp = c.request("POST", "/jobs", raw=b"{nope")
    assert status == 400 and resp["field"] == "body"
    status, _, resp = c.request("POST", "/jobs", raw=b'{"task": "t"}', ctype="text/plain")
    assert status == 415 and resp["field"] == "Content-Type"
    status, _, resp = c.request(
        "POST", "/jobs", raw=b'{"task": "t"}', ctype="application/json; charset=utf-8"
    )
    assert status == 201
    status, _, resp = c.request("GET", "/jobs?status=sleeping")
    assert status == 400 and resp["field"] == "status"
    status, _, resp = c.request("GET", "/jobs?limit=abc")
    assert status == 400 and resp["field"] == "limit"
    status, headers, resp = c.request("PUT", "/jobs")
    assert status == 405 and headers["allow"] == "GET, POST"
    status, _, resp = c.request("GET", "/nothing")
    assert status == 404


def test_oversized_body_is_refused_before_it_is_read(api: tuple[JobQ, Client], r: redis.Redis) -> None:
    _, c = api
    # Announce 10 MiB but send only a few bytes: the answer comes without the rest being read.
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 10485760\r\n\r\n{"task": '
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["field"] == "body"
    assert r.dbsize() == 0


def test_unread_body_closes_the_connection(redis_url: str) -> None:
    app = JobQ(redis_url)
    server = ApiServer(app, "127.0.0.1", 0, token="t0ken").start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            body = b'{"task": "t"}'
            # A refused POST (no token) followed by a second request on the same connection: the
            # unread body must not be taken for the next request.
            s.sendall(
                b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
                + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 401")
        assert data.count(b"HTTP/1.1 ") == 1 and b"connection: close" in data.lower()
    finally:
        server.close()
        app.close()


def test_queue_full_is_503_with_retry_after_and_nothing_stored(
    api: tuple[JobQ, Client], r: redis.Redis
) -> None:
    app, c = api
    for _ in range(2):
        assert c.request("POST", "/jobs", {"task": "t", "queue": "small"})[0] == 201
    status, headers, body = c.request("POST", "/jobs", {"task": "t", "queue": "small", "job_id": "overflow"})
    assert status == 503
    assert int(headers["retry-after"]) > 0
    assert body["field"] == "queue" and body["queue"] == "small" and body["limit"] == 2
    assert r.zcard(app.keys.ready("small")) == 2
    assert not r.exists(app.keys.job("small", "overflow"))


def test_health_metrics_and_openapi(api: tuple[JobQ, Client]) -> None:
    _, c = api
    status, _, body = c.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    c.request("POST", "/jobs", {"task": "t", "queue": "m"})
    c.request("POST", "/jobs", [{"task": "t", "queue": "m"}, {"task": "u", "queue": "m"}])
    status, headers, text = c.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("jobq_jobs_enqueued_total", (("queue", "m"), ("task", "t")))] == 2
    assert samples[("jobq_jobs_enqueued_total", (("queue", "m"), ("task", "u")))] == 1
    assert samples[("jobq_queue_ready", (("queue", "m"),))] == 3
    status, _, doc = c.request("GET", "/openapi.json")
    assert status == 200 and doc == openapi_document()
    assert doc["openapi"].startswith("3.")
    # Every route the server answers is documented, with its error statuses.
    assert set(doc["paths"]) == {
        "/jobs",
        "/jobs/{id}",
        "/stats",
        "/events",
        "/health",
        "/metrics",
        "/openapi.json",
    }
    assert {"201", "400", "413", "415", "503"} <= set(doc["paths"]["/jobs"]["post"]["responses"])


def test_health_is_503_when_redis_is_unreachable(fresh_server: RedisServer) -> None:
    fresh_server.start()
    app = JobQ(fresh_server.url)
    server = ApiServer(app, "127.0.0.1", 0).start()
    c = Client(server.port)
    try:
        assert c.request("GET", "/health")[0] == 200
        fresh_server.kill()
        status, _, body = c.request("GET", "/health")
        assert status == 503 and body["status"] == "unhealthy"
        status, headers, body = c.request("POST", "/jobs", {"task": "t"})
        assert status == 503 and "retry-after" in headers
    finally:
        server.close()
        app.close()


def test_bearer_token(redis_url: str) -> None:
    app = JobQ(redis_url)
    server = ApiServer(app, "127.0.0.1", 0, token="let-me-in").start()
    try:
        anon = Client(server.port)
        status, headers, _body = anon.request("POST", "/jobs", {"task": "t"})
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert anon.request("GET", "/stats", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert anon.request("GET", "/health")[0] == 200
        assert anon.request("GET", "/metrics")[0] == 200
        assert Client(server.port, token="let-me-in").request("POST", "/jobs", {"task": "t"})[0] == 201
    finally:
        server.close()
        app.close()


def test_access_line_per_request_with_secrets_masked(api: tuple[JobQ, Client]) -> None:
    """Each request is logged at INFO as ``METHOD PATH -> STATUS (N ms)`` once its response has
    left, through the handler's redaction like any other record."""
    import io
    import logging
    import re
    import threading

    from jobq import logs

    _, client = api
    out = io.StringIO()
    lines: list[str] = []
    two = threading.Event()

    class Handler(logging.StreamHandler):  # type: ignore[type-arg]
        def emit(self, record: logging.LogRecord) -> None:
            super().emit(record)
            lines.append(self.format(record))
            if len(lines) >= 2:
                two.set()

    handler = Handler(out)
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(logs.RedactingFilter())
    http_log = logging.getLogger("jobq.http")
    old_level = http_log.level
    http_log.setLevel(logging.INFO)
    http_log.addHandler(handler)
    try:
        status, _, _ = client.request("POST", "/jobs", {"task": "t", "queue": "q"})
        assert status == 201
        status, _, _ = client.request("GET", "/jobs/password=hunter22x")
        assert status == 404
        assert two.wait(10), lines
    finally:
        http_log.removeHandler(handler)
        http_log.setLevel(old_level)
    assert re.fullmatch(r"\S+Z INFO jobq\.http: POST /jobs -> 201 \(\d+\.\d ms\)", lines[0]), lines
    assert re.fullmatch(r"\S+Z INFO jobq\.http: GET /jobs/password=\*\*\* -> 404 \(\d+\.\d ms\)", lines[1])
    assert "hunter22x" not in out.getvalue()
