"""The dashboard (/ui) against a real redis-server and a real worker: every page answers with
a strict CSP and no third-party URL, auth (bearer or basic), read-only hides every action and
refuses POSTs, actions need the CSRF token and the same origin, pause/purge/cancel/retry act as
the CLI's, arguments are masked, and paging reads by index (timed)."""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobq import JobQ, admin
from jobq.requests import request_from_json
from jobq.web import ApiServer
from tests.harness.proxy_fixtures import ThreadWorker, wait_for

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ui-t0ken"
BASIC = "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()
PAGES = [
    "/ui/",
    "/ui/queues/emails",
    "/ui/queues/emails?state=dead",
    "/ui/dead",
    "/ui/scheduled",
    "/ui/nodes",
]


class Browser:
    """Just enough of a browser: basic auth, GET pages, POST forms with their CSRF field."""

    def __init__(self, port: int, auth: str | None = BASIC) -> None:
        self.port, self.auth = port, auth

    def request(
        self, method: str, path: str, body: str | None = None, **headers: str
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.auth:
            h.setdefault("Authorization", self.auth)
        if body is not None:
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read().decode("utf-8", "replace")
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def get(self, path: str) -> str:
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body[:300])
        return body

    def post(
        self, page: str, action: str, extra: str = "", **headers: str
    ) -> tuple[int, dict[str, str], str]:
        html = self.get(page)
        m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
        assert m, f"no form on {page}"
        return self.request("POST", action, f"csrf={m.group(1)}{extra}", **headers)


@pytest.fixture
def ui(redis_url: str) -> Iterator[tuple[JobQ, Browser]]:
    app = JobQ(redis_url)
    for i in range(3):
        kw = {"password": "hunter2", "to": f"u{i}@example.com"}
        app.enqueue_request(request_from_json({"task": "send", "queue": "emails", "kwargs": kw}))
    app.enqueue_request(request_from_json({"task": "send", "queue": "emails", "delay": 600}))
    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True).start()
    yield app, Browser(server.port)
    server.close()
    app.close()


def test_every_page_has_a_strict_csp_and_no_third_party_url(ui: tuple[JobQ, Browser]) -> None:
    _, b = ui
    for page in PAGES:
        status, headers, body = b.request("GET", page)
        assert status == 200, (page, body[:300])
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert headers["x-frame-options"] == "DENY"
        assert not re.search(r'(src|href|action)="(https?:)?//', body), page
        assert "<script>" not in body  # no inline script: the CSP would block it
    for asset in ("/ui/static/ui.css", "/ui/static/ui.js"):
        status, _, body = b.request("GET", asset)
        assert status == 200 and "http" not in body.replace("http-equiv", "")


def test_off_unless_started(redis_url: str) -> None:
    """The API server without ``ui=True`` (``jobq serve --no-ui``) has no /ui; ``jobq serve``
    turns it on, on 127.0.0.1 unless told otherwise (the process test checks the binding)."""
    from jobq.cli.serve import serve

    app = JobQ(redis_url)
    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN).start()
    try:
        b = Browser(server.port, auth=f"Bearer {TOKEN}")
        for path in ("/ui/", "/ui/nodes", "/ui/static/ui.js"):
            assert b.request("GET", path)[0] == 404, path
    finally:
        server.close()
        app.close()
    defaults = {p.name: p.default for p in serve.params}
    assert defaults["host"] == "127.0.0.1" and defaults["ui"] is True


def test_auth_bearer_or_basic_else_401(ui: tuple[JobQ, Browser]) -> None:
    _, b = ui
    status, headers, _ = Browser(b.port, auth=None).request("GET", "/ui/")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    wrong = "Basic " + base64.b64encode(b"admin:nope").decode()
    assert Browser(b.port, auth=wrong).request("GET", "/ui/")[0] == 401
    assert Browser(b.port, auth=f"Bearer {TOKEN}").request("GET", "/ui/")[0] == 200


def test_job_page_masks_secret_arguments(ui: tuple[JobQ, Browser]) -> None:
    _, b = ui
    page = b.get("/ui/queues/emails")
    link = re.search(r'href="(/ui/jobs/emails/[^"]+)"', page)
    assert link
    status, headers, job = b.request("GET", link.group(1))
    assert status == 200 and headers["content-security-policy"].startswith("default-src 'none'")
    assert "<script>" not in job and not re.search(r'(src|href|action)="(https?:)?//', job)
    assert "hunter2" not in job and "***" in job
    for field in ("progress", "attempts", "interruptions", "enqueued", "started", "finished", "node"):
        assert f"<dt>{field}</dt>" in job


def test_pause_from_the_page_and_jobq_stats_agrees(ui: tuple[JobQ, Browser], redis_url: str) -> None:
    app, b = ui
    status, headers, _ = b.post("/ui/queues/emails", "/ui/queues/emails/pause")
    assert status == 303 and headers["location"] == "/ui/queues/emails"
    out = subprocess.run(
        [sys.executable, "-m", "jobq", "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"JOBQ_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r'"queue": "emails"[^}]*"paused": true', out.stdout.replace("\n", " ")), out.stdout
    assert "Resume" in b.get("/ui/queues/emails")
    assert b.post("/ui/queues/emails", "/ui/queues/emails/resume")[0] == 303
    assert not admin.queue_stats(app, ["emails"])[0].paused


def test_purge_needs_the_typed_confirmation(ui: tuple[JobQ, Browser]) -> None:
    app, b = ui
    assert b.post("/ui/queues/emails", "/ui/queues/emails/purge", "&confirm=wrong")[0] == 400
    assert admin.queue_stats(app, ["emails"])[0].ready == 3
    assert b.post("/ui/queues/emails", "/ui/queues/emails/purge", "&confirm=emails")[0] == 303
    stats = admin.queue_stats(app, ["emails"])[0]
    assert (stats.ready, stats.scheduled) == (0, 0)


def test_actions_need_csrf_and_the_same_origin(ui: tuple[JobQ, Browser]) -> None:
    app, b = ui
    assert b.request("POST", "/ui/queues/emails/pause", "")[0] == 403
    assert b.request("POST", "/ui/queues/emails/pause", "csrf=00")[0] == 403
    status, _, body = b.post("/ui/queues/emails", "/ui/queues/emails/pause", Origin="http://evil.example")
    assert status == 403 and "origin" in body
    status, _, _ = b.post("/ui/queues/emails", "/ui/queues/emails/pause", Sec_Fetch_Site="cross-site")
    assert status == 403
    assert b.request("GET", "/ui/queues/emails/pause")[0] in (404, 200)
    assert not admin.queue_stats(app, ["emails"])[0].paused
    # A GET never acts.
    b.request("GET", "/ui/queues/emails/pause")
    assert not admin.queue_stats(app, ["emails"])[0].paused


def test_read_only_shows_no_action_and_refuses_posts(redis_url: str) -> None:
    app = JobQ(redis_url)
    app.enqueue_request(request_from_json({"task": "send", "queue": "emails"}))
    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True, read_only=True).start()
    try:
        b = Browser(server.port)
        for page in PAGES:
            body = b.get(page)
            assert "<form" not in body.replace('<form method="get"', "") and "<button" not in body.replace(
                "<button>Find</button>", ""
            ), page
            assert "read-only" in body
        assert b.request("POST", "/ui/queues/emails/pause", "csrf=x")[0] == 403
        assert not admin.queue_stats(app, ["emails"])[0].paused
    finally:
        server.close()
        app.close()


FAIL = {"on": True}


def test_retry_a_dead_letter_from_the_page_and_see_it_run(redis_url: str) -> None:
    app = JobQ(redis_url)

    @app.task(name="flaky", queue="work", max_attempts=1)
    def flaky() -> str:
        if FAIL["on"]:
            raise RuntimeError("boom")
        return "ok"

    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True).start()
    worker = ThreadWorker(app, queues=[("work", 1)], concurrency=2, lease=5).start()
    try:
        b = Browser(server.port)
        job = flaky.enqueue()
        wait_for(lambda: job.status().value == "dead", 20)
        dead = b.get("/ui/queues/work?state=dead")
        assert job.id in dead and "boom" in dead
        assert "Traceback" not in dead  # a list shows the error's first line
        page = b.get(f"/ui/jobs/work/{job.id}")
        assert "Retry" in page and "boom" in page
        # The job page shows the last error with the task's traceback (the worker keeps it).
        info = job.info()
        assert info.error is not None and info.error.startswith("RuntimeError: boom\n\nTraceback")
        assert "Traceback (most recent call last)" in page and ", in flaky" in page
        assert "executor.py" not in page  # it starts at the task's frame, not the worker's
        FAIL["on"] = False
        status, _, _ = b.post(f"/ui/jobs/work/{job.id}", f"/ui/jobs/work/{job.id}/retry")
        assert status == 303
        wait_for(lambda: job.status().value == "done", 20)
        assert "state-done" in b.get(f"/ui/jobs/work/{job.id}")
        # The live endpoint the page polls says the same.
        assert '"state": "done"' in b.get(f"/ui/api/job/work/{job.id}")
        # Each node records the jobq version it runs; the nodes page shows it.
        import jobq

        (node,) = [n for n in admin.nodes(app) if n.node == worker.node]
        assert node.version == jobq.__version__
        row = next(r for r in b.get("/ui/nodes").split("<tr>") if worker.node in r)
        assert f"<td>{jobq.__version__}</td>" in row
        assert re.search(r"<td class=num>\d+\.\d s</td>", row)  # heartbeat age
        overview = b.get("/ui/")
        version = app.client.info("server")["redis_version"]
        assert f"Redis version<b>{version}</b>" in overview and "Redis memory<b>" in overview
        assert 'nodes alive<b data-k="nodes">1</b>' in overview
    finally:
        FAIL["on"] = True
        worker.stop()
        server.close()
        app.close()


def test_queue_pages_read_by_index(redis_url: str) -> None:
    """Paging: the last page of a large queue costs what the first does (ZRANGE by index)."""
    app = JobQ(redis_url)
    n = 20_000
    reqs: list[Any] = [{"task": "t", "queue": "big"} for _ in range(n)]
    for i in range(0, n, 5_000):
        app.enqueue_many(reqs[i : i + 5_000])
    times = {}
    for offset in (0, n // 2, n - 50):
        t0 = time.perf_counter()
        jobs, total = admin.page_jobs(app, "big", "ready", offset=offset, limit=50)
        times[offset] = time.perf_counter() - t0
        assert total == n and len(jobs) == 50
    print("page_jobs ms:", {k: round(v * 1000, 1) for k, v in times.items()})
    assert max(times.values()) < 0.2
    server = ApiServer(app, "127.0.0.1", 0, ui=True).start()
    try:
        body = Browser(server.port, auth=None).get(f"/ui/queues/big?state=ready&page={n // 50}")
        assert f"page {n // 50} of {n // 50}" in body
    finally:
        server.close()
        app.close()


@pytest.mark.slow
def test_queue_page_at_a_million_jobs_under_200_ms(redis_url: str) -> None:
    """The issue's bound, measured: a queue of 1,000,000 ready jobs (really enqueued), the
    dashboard's queue page at its first, middle and last page in at most 200 ms each (the whole
    request seen from the client on the same host: an upper bound of the server's time; median
    of 3). Slow to set up: under a minute and about 300 MB of Redis on 2 cores (marked slow)."""
    app = JobQ(redis_url)
    n, chunk = 1_000_000, 5_000
    reqs: list[Any] = [{"task": "t", "queue": "huge"} for _ in range(chunk)]
    for _ in range(n // chunk):
        app.enqueue_many(reqs)
    server = ApiServer(app, "127.0.0.1", 0, ui=True).start()
    try:
        b = Browser(server.port, auth=None)
        last = n // 50
        took = {}
        for page in (1, last // 2, last):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                body = b.get(f"/ui/queues/huge?state=ready&page={page}")
                runs.append((time.perf_counter() - t0) * 1000)
                listed = body.split("<h2>Events</h2>", 1)[0]  # the jobs, not the event feed below
                assert f"page {page} of {last} ({n} jobs" in body and listed.count("/ui/jobs/huge/") == 50
            took[page] = sorted(runs)[1]
        print("queue page ms at 1,000,000 jobs:", {k: round(v, 1) for k, v in took.items()})
        assert max(took.values()) <= 200, took
    finally:
        server.close()
        app.close()


def test_scheduled_page_lists_cron_entries_when_mounted(redis_url: str) -> None:
    """Mounted with asgi_app over the app that declares the cron entries (as a worker's app)."""
    import asyncio

    from jobq.web import asgi_app

    app = JobQ(redis_url)

    @app.periodic("*/5 * * * *", queue="reports")
    def nightly_report() -> None:
        pass

    # The last tick a node enqueued for the entry (what the cron loop records).
    (entry,) = app.cron_entries
    app.client.set(app.keys.cron("reports", entry.key_name), 1_800_000_000_000)
    asgi = asgi_app(app)
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        scope = {"type": "http", "method": "GET", "path": "/ui/scheduled", "headers": [], "query_string": b""}
        await asgi(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 200
    body = sent[1]["body"].decode()
    assert "*/5 * * * *" in body and "nightly_report" in body and "reports" in body
    assert "<th>next tick</th>" in body and "<th>last tick enqueued</th>" in body
    assert "<td>2027-01-15 08:00:00.000 UTC</td>" in body  # the last tick enqueued
    nxt = re.findall(r"<td>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.000 UTC</td></tr>", body)
    assert nxt and nxt[-1][-5:-3] in {f"{m:02d}" for m in range(0, 60, 5)}  # a */5 minute


@pytest.mark.parametrize("full_path", [True, False])
def test_mounted_under_a_root_path(redis_url: str, full_path: bool) -> None:
    """Mounted at /jobq: ASGI servers and frameworks hand the app either the full path with
    root_path set (Starlette's Mount today) or the path below the mount; both route."""
    import asyncio

    from jobq.web import asgi_app

    app = JobQ(redis_url)
    asgi = asgi_app(app)

    def get(path: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        scope = {
            "type": "http",
            "method": "GET",
            "path": ("/jobq" + path) if full_path else path,
            "root_path": "/jobq",
            "headers": [],
            "query_string": b"",
        }
        asyncio.run(asgi(scope, receive, send))
        return sent[0]["status"], sent[1]["body"]

    try:
        assert get("/stats")[0] == 200
        status, body = get("/ui/")
        assert status == 200 and b'href="/jobq/ui/static/ui.css"' in body
    finally:
        asgi.close()
        app.close()


def test_delete_one_and_selected_dead_letters(redis_url: str, r: Any) -> None:
    app = JobQ(redis_url)

    @app.task(name="always_fails", queue="work2", max_attempts=1)
    def always_fails(n: int) -> None:
        raise RuntimeError(f"no {n}")

    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True).start()
    worker = ThreadWorker(app, queues=[("work2", 1)], concurrency=2, lease=5).start()
    try:
        jobs = [
            app.enqueue_request(
                request_from_json(
                    {"task": "always_fails", "args": [i], "queue": "work2", "unique_key": f"u{i}"}
                )
            )
            for i in range(4)
        ]
        wait_for(lambda: all(j.status().value == "dead" for j in jobs), 20)
        b = Browser(server.port)
        # One from its page ...
        status, headers, _ = b.post(f"/ui/jobs/work2/{jobs[0].id}", f"/ui/jobs/work2/{jobs[0].id}/delete")
        assert status == 303 and headers["location"].endswith("?state=dead")
        # ... two selected on the queue's dead tab (the "Delete selected" button's formaction).
        page = b.get("/ui/queues/work2?state=dead")
        assert "Delete selected" in page
        extra = f"&id={jobs[1].id}&id={jobs[2].id}"
        assert b.post("/ui/queues/work2?state=dead", "/ui/queues/work2/dead/delete", extra)[0] == 303
        assert admin.queue_stats(app, ["work2"])[0].dead == 1
        assert [j.status().value for j in jobs] == ["unknown", "unknown", "unknown", "dead"]
        assert not r.exists(app.keys.job("work2", jobs[0].id))
        # Their unique keys are free again; the remaining dead letter keeps its own.
        assert not r.exists(app.keys.unique("work2", "u0")) and not r.exists(app.keys.unique("work2", "u1"))
    finally:
        worker.stop()
        server.close()
        app.close()


def test_search_cancel_retry_selected_and_all_resume(redis_url: str) -> None:
    """The remaining actions, each as the page posts it, against a real worker (and a result
    shown masked): search by id,
    cancel a waiting job and a running one (its node stops it), retry selected and all dead
    letters (they run), resume a paused queue."""
    import jobq

    app = JobQ(redis_url)
    fail = {"on": True}

    @app.task(name="sometimes", queue="work3", max_attempts=1)
    def sometimes(n: int) -> int:
        if fail["on"]:
            raise RuntimeError(f"no {n}")
        return n

    @app.task(name="waits", queue="work3")
    def waits() -> None:
        jobq.current_job().wait_cancelled(30)  # returns when the node is told of the cancel

    @app.task(name="login", queue="work3")
    def login() -> dict[str, Any]:
        return {"user": "ann", "password": "hunter2", "dsn": "redis://ann:s3cret@db:6379/0"}

    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True).start()
    worker = ThreadWorker(app, queues=[("work3", 1)], concurrency=4, lease=5).start()
    try:
        b = Browser(server.port)
        dead = [sometimes.enqueue(i) for i in range(3)]
        wait_for(lambda: all(j.status().value == "dead" for j in dead), 20)
        # A done job's result, masked as `jobq status` masks it.
        done = login.enqueue()
        assert done.result(timeout=20)["password"] == "hunter2"
        shown = b.get(f"/ui/jobs/work3/{done.id}")
        assert "<h2>Result</h2>" in shown and "ann" in shown
        assert "hunter2" not in shown and "s3cret" not in shown and "***" in shown
        # Search by id: a redirect to the job's page.
        status, headers, _ = b.request("GET", f"/ui/search?queue=work3&id={dead[0].id}")
        assert status == 303 and headers["location"] == f"/ui/jobs/work3/{dead[0].id}"
        # Retry one selected, then all the rest: each runs to done.
        fail["on"] = False
        assert (
            b.post("/ui/queues/work3?state=dead", "/ui/queues/work3/dead/retry", f"&id={dead[0].id}")[0]
            == 303
        )
        wait_for(lambda: dead[0].status().value == "done", 20)
        assert [j.status().value for j in dead[1:]] == ["dead", "dead"]
        assert b.post("/ui/queues/work3?state=dead", "/ui/queues/work3/dead/retry", "&all=1")[0] == 303
        wait_for(lambda: all(j.status().value == "done" for j in dead), 20)
        # Cancel a running job from its page: the node stops it and it ends cancelled.
        running = waits.enqueue()
        wait_for(lambda: running.status().value == "active", 20)
        page = f"/ui/jobs/work3/{running.id}"
        assert b.post(page, f"{page}/cancel")[0] == 303
        wait_for(lambda: running.status().value == "cancelled", 20)
        # Pause, then cancel a waiting job, then resume.
        admin.pause(app, "work3")
        waiting = sometimes.enqueue(9)
        page = f"/ui/jobs/work3/{waiting.id}"
        assert b.post(page, f"{page}/cancel")[0] == 303
        assert waiting.status().value == "cancelled"
        assert "Resume" in b.get("/ui/queues/work3")
        assert b.post("/ui/queues/work3", "/ui/queues/work3/resume")[0] == 303
        assert not admin.queue_stats(app, ["work3"])[0].paused
    finally:
        worker.stop()
        server.close()
        app.close()


def test_job_page_shows_its_events_and_the_new_ones_after_its_cursor(redis_url: str) -> None:
    """The job page's events panel: the job's lifecycle events picked out of its queue's stream
    (another job's left out), oldest first; the live endpoint then gives only the job's events
    after the page's cursor, as they happen (a retry from the dead letters here)."""
    app = JobQ(redis_url)
    fail = {"on": True}

    @app.task(name="twice", queue="evq", max_attempts=1)
    def twice() -> int:
        if fail["on"]:
            raise RuntimeError("first try fails")
        return 1

    @app.task(name="other", queue="evq")
    def other() -> int:
        return 2

    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True).start()
    worker = ThreadWorker(app, queues=[("evq", 1)], concurrency=2, lease=5).start()
    try:
        b = Browser(server.port)
        job = twice.enqueue()
        wait_for(lambda: job.status().value == "dead", 20)
        assert other.enqueue().result(timeout=20) == 2  # its events are in the same stream

        def panel(page: str) -> tuple[list[str], str]:
            body = page.split("<tbody data-events", 1)[1].split("</tbody>", 1)[0]
            m = re.search(r'data-after="([^"]+)"', body)
            assert m
            return re.findall(r"<td class=ev-(\w+)>", body), m.group(1)

        page = b.get(f"/ui/jobs/evq/{job.id}")
        types, cursor = panel(page)
        assert types == ["enqueued", "started", "dead"], types
        body = page.split("<tbody data-events", 1)[1].split("</tbody>", 1)[0]
        assert "RuntimeError: first try fails" in body and "Traceback" not in body
        assert "Earlier events of this job" not in page
        # The event itself carries the error's first line (the traceback follows it on the job).
        (dead,) = [e for e in app.iter_events(["evq"]) if e.type == "dead"]
        assert dead.error == "RuntimeError: first try fails"

        def live(after: str) -> dict[str, Any]:
            data: dict[str, Any] = json.loads(b.get(f"/ui/api/job/evq/{job.id}?after={after}"))
            return data

        assert live(cursor)["events"] == [] and live(cursor)["events_after"] == cursor
        fail["on"] = False
        admin.retry_dead(app, "evq", [job.id])
        wait_for(lambda: job.status().value == "done", 20)
        got = live(cursor)
        assert [row[1] for row in got["events"]] == ["requeued", "started", "done"], got
        assert got["events"][1][3].startswith("node ")  # started: on which node
        assert got["events_after"] != cursor
        assert live(got["events_after"])["events"] == []
        assert b.request("GET", f"/ui/api/job/evq/{job.id}?after=nonsense")[0] == 400
        # The queue page's feed: the queue's newest events, newest first, every job's.
        feed = b.get("/ui/queues/evq").split("<tbody data-feed", 1)[1].split("</tbody>", 1)[0]
        kinds = re.findall(r"<td class=ev-(\w+)>", feed)
        assert kinds[0] == "done" and kinds.count("enqueued") == 2 and len(kinds) == 9, kinds
        assert f'href="/ui/jobs/evq/{job.id}"' in feed
        m = re.search(r'data-after="([^"]+)"', feed)
        assert m
        assert json.loads(b.get(f"/ui/api/events/evq?after={m.group(1)}"))["events"] == []
        third = other.enqueue()
        assert third.result(timeout=20) == 2
        rows = json.loads(b.get(f"/ui/api/events/evq?after={m.group(1)}"))["events"]
        assert [(r[1], r[2]) for r in rows] == [
            ("enqueued", third.id),
            ("started", third.id),
            ("done", third.id),
        ]
    finally:
        worker.stop()
        server.close()
        app.close()


def test_history_samples_rates_and_waits(redis_url: str) -> None:
    """The overview's charts read what Redis saw between two samples: jobs made ready, jobs
    finished, and the ready-to-started wait of the finished ones (checked against their hashes)."""
    from jobq.web.history import History

    app = JobQ(redis_url)

    @app.task(name="quick", queue="charts")
    def quick(i: int) -> int:
        return i

    history = History(app, interval=3600)  # sampled by hand below
    worker = None
    try:
        quick.enqueue(-1)  # the queue exists; the first sample sets the watermarks
        history.sample()
        assert history.to_json()["queues"] == {}  # no interval yet
        admin.pause(app, "charts")
        jobs = [quick.enqueue(i) for i in range(20)]
        worker = ThreadWorker(app, queues=[("charts", 1)], concurrency=4, lease=5).start()
        time.sleep(0.05)  # the jobs wait a little in ready: their waits are > 0
        admin.resume(app, "charts")
        wait_for(lambda: all(j.status().value == "done" for j in jobs), 20)
        history.sample()
        data = history.to_json()
        cols = data["queues"]["charts"]
        assert len(cols["t_ms"]) == 1
        point = {name: values[0] for name, values in cols.items()}
        # Both per second of the same interval: 20 made ready in it, 21 finished (with job -1).
        assert point["ready_per_s"] > 0
        assert abs(point["finished_per_s"] / point["ready_per_s"] - 21 / 20) < 0.02, point
        waits = sorted(
            int(s) - int(r or e)  # no ready_ms: ready since the enqueue
            for r, e, s in (
                app.client.hmget(app.keys.job("charts", j.id), "ready_ms", "enqueued_ms", "started_ms")
                for j in jobs
            )
        )
        assert point["wait_p50_ms"] in waits and point["wait_p95_ms"] in waits
        assert point["wait_p95_ms"] >= point["wait_p50_ms"] >= 40
        # A third sample with nothing new: zero rates, no waits.
        history.sample()
        last = {k: v[-1] for k, v in history.to_json()["queues"]["charts"].items()}
        assert (last["ready_per_s"], last["finished_per_s"], last["wait_p50_ms"]) == (0, 0, None)
    finally:
        if worker is not None:
            worker.stop()
        history.close()
        app.close()


def test_mounted_in_a_starlette_app(redis_url: str) -> None:
    """``asgi_app`` mounted under /jobq in a Starlette application served by uvicorn: the API
    (bearer token, Location under the mount), the dashboard (basic auth, links, a CSRF-checked
    action) and the host application's own route all answer on one port."""
    starlette = pytest.importorskip("starlette")
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from jobq.web import asgi_app
    from tests.harness.redis_server import free_port

    assert starlette.__version__
    app = JobQ(redis_url)
    api = asgi_app(app, token=TOKEN)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the host application")

    host = Starlette(routes=[Route("/", home), Mount("/jobq", app=api)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(host, "127.0.0.1", port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20)
        b = Browser(port)
        assert b.get("/") == "the host application"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = b.request("GET", "/jobq/stats", **bearer)
        assert status == 200 and "totals" in body
        status, headers, body = b.request(
            "POST",
            "/jobq/jobs",
            '{"task": "t", "queue": "mounted"}',
            Content_Type="application/json",
            **bearer,
        )
        assert status == 201, body
        assert headers["location"].startswith("/jobq/jobs/")
        status, _, body = b.request("GET", headers["location"] + "?queue=mounted", **bearer)
        assert status == 200 and json.loads(body)["queue"] == "mounted", body
        assert Browser(port, auth=None).request("GET", "/jobq/stats")[0] == 401
        page = b.get("/jobq/ui/queues/mounted")
        assert 'href="/jobq/ui/static/ui.css"' in page
        status, headers, _ = b.post("/jobq/ui/queues/mounted", "/jobq/ui/queues/mounted/pause")
        assert status == 303 and headers["location"] == "/jobq/ui/queues/mounted"
        assert admin.queue_stats(app, ["mounted"])[0].paused
    finally:
        server.should_exit = True
        thread.join(10)
        api.close()
        app.close()
