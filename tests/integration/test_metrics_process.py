"""The real processes: ``jobq worker --metrics-port`` scraped over HTTP while it runs built-in
webhook jobs, and ``jobq serve`` taking jobs over HTTP; both stop cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobq import JobQ
from tests.harness.redis_server import free_port

pytestmark = [pytest.mark.integration]


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


@pytest.fixture
def hook() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200 if self.path == "/ok" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_worker_process_metrics_endpoint(redis_url: str, app: JobQ, hook: str) -> None:
    for _ in range(4):
        app.enqueue("webhook", kwargs={"url": f"{hook}/ok"}, queue="hooks")
    app.enqueue("webhook", kwargs={"url": f"{hook}/missing"}, queue="hooks")
    port = free_port()
    env = {**os.environ, "JOBQ_REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "jobq", "worker", "--queues", "hooks", "--metrics-port", str(port)]
    cmd += ["--log-format", "json", "--poll-interval", "0.1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        key = ("jobq_jobs_completed_total", (("queue", "hooks"), ("task", "webhook")))
        wait_for(lambda: samples(port).get(key) == 4, proc)
        wait_for(
            lambda: (
                samples(port).get(
                    ("jobq_jobs_dead_lettered_total", (("queue", "hooks"), ("task", "webhook")))
                )
                == 1
            ),
            proc,
        )
        s = samples(port)
        assert s[("jobq_jobs_started_total", (("queue", "hooks"), ("task", "webhook")))] == 5
        assert s[("jobq_queue_dead", (("queue", "hooks"),))] == 1
        assert s[("jobq_queue_ready", (("queue", "hooks"),))] == 0
        assert s[("jobq_nodes_live", ())] == 1
        assert s[("jobq_node_busy_slots", ())] == 0
        status, body = http("GET", f"http://127.0.0.1:{port}/health")
        assert status == 200, body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    # JSON logs: the dead-lettered attempt is logged with its job fields.
    failures = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{") and '"job_id"' in x]
    assert any(f["task"] == "webhook" and "HTTP 404" in f["error"] for f in failures), err.decode()


def test_serve_process(redis_url: str, app: JobQ) -> None:
    port = free_port()
    env = {**os.environ, "JOBQ_REDIS_URL": redis_url, "JOBQ_HTTP_TOKEN": "tok-for-test"}
    cmd = [sys.executable, "-m", "jobq", "serve", "--port", str(port), "--max-depth", "full=1"]
    cmd += ["--log-format", "json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http("GET", f"{base}/health")[0] == 200, proc)
        assert http("POST", f"{base}/jobs", {"task": "webhook"})[0] == 401
        status, body = http(
            "POST", f"{base}/jobs", {"task": "webhook", "kwargs": {"url": "http://x/"}}, "tok-for-test"
        )
        assert status == 201, body
        job_id = json.loads(body)["id"]
        assert app.job(job_id, "default").info().max_attempts == 5  # built-in task defaults
        assert http("POST", f"{base}/jobs", {"task": "t", "queue": "full"}, "tok-for-test")[0] == 201
        assert http("POST", f"{base}/jobs", {"task": "t", "queue": "full"}, "tok-for-test")[0] == 503
        # The dashboard comes with `jobq serve`, behind the same token.
        assert http("GET", f"{base}/ui/")[0] == 401
        assert http("GET", f"{base}/ui/", token="tok-for-test")[0] == 200
        # Bound to 127.0.0.1 by default, not to every address: another loopback address of
        # this host (all of 127/8 is loopback on Linux) is refused.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert "tok-for-test" not in err.decode()
    assert '"POST /jobs -> 201' in err.decode() or "POST /jobs -> 201" in err.decode()
