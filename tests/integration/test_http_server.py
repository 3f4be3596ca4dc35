"""The web stack under the API (jobq.web.server, uvicorn) and the worker's /metrics port, tried
as a user and an attacker would: keep-alive latency, bursts of connects, slow and short requests,
methods nobody routes, the Server header, and what /metrics of ``jobq serve`` exports."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from jobq import JobQ
from jobq.metrics import Metrics
from jobq.metrics import serve as serve_metrics
from jobq.web import ApiServer

pytestmark = [pytest.mark.integration]


@pytest.fixture
def server(redis_url: str) -> Iterator[ApiServer]:
    app = JobQ(redis_url)
    srv = ApiServer(app, "127.0.0.1", 0, request_timeout=1.0).start()
    yield srv
    srv.close()
    app.close()


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _raw(port: int, data: bytes, timeout: float = 10.0, half_close: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return _read_all(s)


def _keepalive_p50(port: int, method: str, path: str, body: bytes | None, n: int = 40) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        times.append(time.perf_counter() - t0)
        assert resp.status < 300
        assert resp.getheader("Connection", "").lower() != "close"
    conn.close()
    return statistics.median(times[1:])


def test_keep_alive_requests_do_not_stall(server: ApiServer) -> None:
    # Nagle's algorithm meeting delayed ACK made every request after the first take ~44 ms.
    post = _keepalive_p50(server.port, "POST", "/jobs", b'{"task": "t"}')
    get = _keepalive_p50(server.port, "GET", "/health", None)
    print(f"keep-alive p50: POST /jobs {post * 1000:.2f} ms, GET /health {get * 1000:.2f} ms")
    assert post < 0.02 and get < 0.02


def test_worker_metrics_port_keep_alive_scrape_does_not_stall(redis_url: str) -> None:
    app = JobQ(redis_url)
    ms = serve_metrics(Metrics(app, node="n1"), "127.0.0.1", 0)
    try:
        p50 = _keepalive_p50(ms.port, "GET", "/metrics", None, n=20)
        print(f"worker /metrics keep-alive scrape p50 {p50 * 1000:.2f} ms")
        assert p50 < 0.03
        head = _raw(ms.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"Python" not in head.split(b"\r\n\r\n")[0]
    finally:
        ms.close()
        app.close()


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "POST", "BREW"])
def test_worker_metrics_port_answers_json_405_and_cuts_slow_clients(redis_url: str, method: str) -> None:
    app = JobQ(redis_url)
    ms = serve_metrics(Metrics(app, node="n1"), "127.0.0.1", 0)
    try:
        data = _raw(ms.port, f"{method} /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405"), head
        assert b"\r\nAllow: GET, HEAD" in head and b"Content-Type: application/json" in head
        assert json.loads(body)["field"] == "method"
        if method != "OPTIONS":
            return
        # A client trickling its request is cut off at the request deadline, not per read.
        handler = ms.httpd.RequestHandlerClass
        handler.request_deadline = 1.0  # type: ignore[attr-defined]
        with socket.create_connection(("127.0.0.1", ms.port), timeout=10) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            got = b"x"
            while time.monotonic() - t0 < 8:
                time.sleep(0.3)
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                    s.settimeout(0.01)
                    got = s.recv(100)
                    if not got:
                        break
                except (TimeoutError, BlockingIOError):
                    continue
                except OSError:
                    got = b""
                    break
            assert got == b"" and time.monotonic() - t0 < 4, "the trickling request was not cut off"
    finally:
        ms.close()
        app.close()


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "PROPFIND", "BREW"])
def test_unrouted_methods_are_json_405_with_allow(server: ApiServer, method: str) -> None:
    data = _raw(server.port, f"{method} /jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405"), head
    headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n")[1:])}
    assert b"GET" in headers[b"allow"]
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["field"] == "method"


def test_server_header_names_no_versions(server: ApiServer) -> None:
    data = _raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\nserver: jobq\r\n" in head
    assert b"python" not in head and b"uvicorn" not in head


def test_slow_clients_are_cut_off_at_the_request_deadline(server: ApiServer) -> None:
    # Headers trickled one byte a while: answered 408 (or closed) at the deadline, never 500.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        t0 = time.monotonic()
        out = b""
        try:
            for byte in b"GET /stats HTTP/1.1\r\n":
                s.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - t0 > 3:
                    break
            while chunk := s.recv(4096):
                out += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        took = time.monotonic() - t0
    assert out == b"" or out.startswith(b"HTTP/1.1 408"), out[:200]
    assert took < 3.5
    # A body that never arrives in full: 408 at the deadline.
    t0 = time.monotonic()
    data = _raw(
        server.port,
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
    )
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["field"] == "body"
    assert time.monotonic() - t0 < 3


def test_header_deadline_is_each_requests_own_on_a_keepalive_connection(server: ApiServer) -> None:
    # One timer serves a connection's requests: a second request whose headers never end is cut
    # off a deadline after it began (not after the connection opened, nor never).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first or not first.endswith(b"}"):
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        time.sleep(0.6)  # past half the 1 s deadline counted from the connection's opening
        t0 = time.monotonic()
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        out = _read_all(s)
        took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert 0.8 < took < 3, took


def test_short_body_then_eof_is_not_a_5xx(server: ApiServer, r: redis.Redis) -> None:
    data = _raw(
        server.port,
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{",
        half_close=True,
    )
    assert data == b"" or data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 408")), data[:200]
    assert r.dbsize() == 0
    # ... and the server still answers.
    assert _raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200"
    )


def test_500_concurrent_connections_all_answered(redis_url: str, r: redis.Redis) -> None:
    # The server's default request deadline (30 s from a connection's opening to the end of its
    # headers), not the 1 s of the `server` fixture: opening 500 connections and starting 500
    # threads can take over a second on a loaded machine, and the first connections would then
    # be answered 408 (seen once in a rehearsal). Deadlines have tests of their own.
    app = JobQ(redis_url)
    server = ApiServer(app, "127.0.0.1", 0).start()
    n = 500
    socks: list[socket.socket] = []
    errors: list[str] = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        socks.append(s)
    body = b'{"task": "t"}'
    req = (
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    statuses: list[int] = []
    lock = threading.Lock()

    def one(s: socket.socket) -> None:
        try:
            s.sendall(req)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            with lock:
                statuses.append(int(out.split(b" ", 2)[1]))
        except OSError as exc:
            with lock:
                errors.append(repr(exc))
        finally:
            s.close()

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.close()
    app.close()
    assert errors == []
    assert statuses == [201] * n
    assert r.dbsize() > 0


def test_redis_connections_stay_bounded_after_a_burst(server: ApiServer, r: redis.Redis) -> None:
    # The stdlib server held one Redis connection per client thread and ran out after fuzzing.
    def hammer() -> None:
        for _ in range(20):
            _raw(server.port, b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    threads = [threading.Thread(target=hammer) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    clients = len(r.client_list())
    print(f"redis clients after 2000 requests from 100 threads: {clients}")
    assert clients <= 60  # the thread pool (40) + the health client + this test's own
    assert _raw(server.port, b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200"
    )


def test_serve_metrics_export_only_producer_series(server: ApiServer) -> None:
    _raw(
        server.port,
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
        b'Connection: close\r\n\r\n{"task": "t"}',
    )
    text = _raw(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    names = {f.name for f in text_string_to_metric_families(text.partition(b"\r\n\r\n")[2].decode())}
    assert "jobq_jobs_enqueued" in names and "jobq_queue_ready" in names and "jobq_redis_up" in names
    worker_only = {
        "jobq_redis_eviction_policy_ok",
        "jobq_pubsub_connected",
        "jobq_node_jobs_in_flight",
        "jobq_node_busy_slots",
        "jobq_node_zombie_threads",
        "jobq_jobs_started",
        "jobq_job_duration_seconds",
    }
    assert names & worker_only == set()


@pytest.mark.parametrize(
    "body",
    [
        {"task": "t"},
        {"task": "t", "delay": 0},
        {"task": "t", "delay": 60},
        {"task": "t", "run_at": 1000},
        {"task": "t", "run_at": 2**40},
        {"task": "t", "unique_key": "u1", "delay": 60},
        {"task": "t", "job_id": "given-1"},
    ],
)
def test_post_answers_the_state_the_job_was_stored_in(server: ApiServer, body: dict[str, object]) -> None:
    # The state comes from the request when the id is new (no second round trip): it must agree.
    for _ in range(2):  # the second POST of a unique_key/job_id returns the existing job
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/jobs", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        got = json.loads(resp.read())
        conn.close()
        assert resp.status == 201, got
        assert got["status"] == server.app.job(got["id"], got["queue"]).status().value


def test_enqueue_each_gives_every_request_its_own_outcome(redis_url: str, r: redis.Redis) -> None:
    """What the HTTP API sends for single-job POSTs that arrive together: one round trip, and a
    call Redis refuses whole (max_depth) is sent again job by job, so each request is refused or
    stored for its own reason, as it would be alone."""
    from jobq import errors
    from jobq.requests import request_from_json

    app = JobQ(redis_url, max_depth={"full": 3})
    try:
        reqs = [request_from_json({"task": "t", "queue": "full", "args": [i]}) for i in range(6)]
        reqs.insert(2, request_from_json({"task": "t", "queue": "other", "delay": 60}))
        reqs.insert(4, request_from_json({"task": "t", "queue": "other", "args": ["x" * 2_000_000]}))
        out = app.enqueue_each(reqs)
        stored = [o for o in out if not isinstance(o, Exception)]
        refused = [o for o in out if isinstance(o, Exception)]
        assert [type(e) for e in refused].count(errors.QueueFull) == 3
        assert isinstance(out[4], errors.InvalidInput)  # its own error: the payload is too large
        assert len(stored) == 4
        assert r.zcard(app.keys.ready("full")) == 3 and r.zcard(app.keys.scheduled("other")) == 1
        for job, state in stored:
            assert state == job.status().value
        assert out[2][1] == "scheduled"  # type: ignore[index]
    finally:
        app.close()


def test_concurrent_posts_each_get_their_answer(redis_url: str, r: redis.Redis) -> None:
    """Eight keep-alive clients at once (their POSTs share round trips): every job is stored
    once, each client gets its own job's id, and a queue at its max_depth refuses the excess."""
    app = JobQ(redis_url, max_depth={"full": 10})
    srv = ApiServer(app, "127.0.0.1", 0).start()
    results: list[tuple[int, dict[str, object], int]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        for i in range(25):
            queue = "full" if i % 5 == 0 else "open"
            body = json.dumps({"task": "t", "queue": queue, "args": [n, i]})
            conn.request("POST", "/jobs", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            with lock:
                results.append((resp.status, data, n * 100 + i))
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 200
        ok = [(d, tag) for status, d, tag in results if status == 201]
        assert sorted(s for s, _, _ in results if s != 201) == [503] * 30  # 40 to "full", 10 fit
        assert len({d["id"] for d, _ in ok}) == 170
        for d, tag in ok:  # each answer names the job that request stored
            assert app.job(str(d["id"]), str(d["queue"])).info().args == [tag // 100, tag % 100]
        assert r.zcard(app.keys.ready("open")) == 160 and r.zcard(app.keys.ready("full")) == 10
    finally:
        srv.close()
        app.close()


def test_connections_over_the_cap_get_a_json_503_and_no_thread(redis_url: str) -> None:
    """Idle connections cost no thread (one event loop serves them all), and past the cap a
    request is answered 503 in JSON with Retry-After; once connections close, requests pass."""
    app = JobQ(redis_url)
    srv = ApiServer(app, "127.0.0.1", 0, max_connections=50).start()
    idle: list[socket.socket] = []
    try:
        assert _raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )
        threads = threading.active_count()
        for _ in range(60):
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        state = srv.server.server_state
        deadline = time.monotonic() + 10
        while len(state.connections) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(state.connections) >= 60
        assert threading.active_count() <= threads + 1  # no thread per connection
        data = _raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"\r\nretry-after: " in head.lower() and b"content-type: application/json" in head.lower()
        assert json.loads(body)["field"] == "connection"
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 10
        while len(state.connections) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )
    finally:
        for s in idle:
            s.close()
        srv.close()
        app.close()
