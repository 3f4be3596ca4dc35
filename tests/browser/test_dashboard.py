"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright through ``executable_path``: no browser download) against a real worker process and
a real redis-server. Every page opens with 0 console errors (a CSP violation is one); a job is
seen going ready -> done without a reload; a dead letter retried from its page runs; a queue
paused from its page is paused for ``jobq stats``; read-only shows no action.

``JOBQ_SCREENSHOTS=DIR`` saves a screenshot of each page there (docs/img holds the committed
ones: ``JOBQ_SCREENSHOTS=docs/img pytest tests/browser -k "every_page or charts or progress"``)."""

from __future__ import annotations

import json
import os
import shutil
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
from tests.harness.proxy_fixtures import wait_for

pytestmark = [pytest.mark.integration]

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():  # pragma: no cover - scripts/check installs it
    pytest.skip("chromium not installed (apt-get install chromium)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "browser-t0ken"
TASKS = "tests.integration.worker_tasks"


def _env(url: str, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JOBQ_REDIS_URL=url, JOBQ_TEST_RECORD_DIR=str(tmp), PYTHONPATH=str(ROOT))
    return env


@pytest.fixture
def fleet(redis_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A worker process serving ``proc``, the API with the dashboard, and a JobQ handle."""
    app = JobQ(redis_url)
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "jobq", "worker", "-A", TASKS, "--queues", "proc", "--concurrency", "4"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(redis_url, tmp_path),
        cwd=ROOT,
    )
    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True).start()
    try:
        wait_for(lambda: admin.live_node_count(app) >= 1, 30)
        yield {"app": app, "url": f"http://127.0.0.1:{server.port}", "tmp": tmp_path, "redis_url": redis_url}
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
        server.close()
        app.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page with its console errors collected."""

    def __init__(self, browser: Any, base: str) -> None:
        self.ctx = browser.new_context(
            http_credentials={"username": "admin", "password": TOKEN}, viewport={"width": 1200, "height": 760}
        )
        self.page = self.ctx.new_page()
        self.base = base
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())

    def open(self, path: str, shot: str | None = None) -> Any:
        resp = self.page.goto(self.base + path)
        assert resp is not None and resp.status == 200, (path, resp and resp.status)
        self.page.wait_for_load_state("networkidle")
        where = os.environ.get("JOBQ_SCREENSHOTS")
        if shot and where:
            Path(where).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(where) / f"ui-{shot}.png"), full_page=True)
        return self.page


def _enqueue(app: JobQ, task: str, *args: Any, **extra: Any) -> Any:
    return app.enqueue_request(
        request_from_json({"task": f"{TASKS}.{task}", "args": list(args), "queue": "proc", **extra})
    )


def test_every_page_opens_without_console_errors(fleet: dict[str, Any], browser: Any) -> None:
    app = fleet["app"]
    for i in range(3):
        _enqueue(app, "record", i)
    _enqueue(app, "record", 99, delay=3600)
    (fleet["tmp"] / "fail-7").write_text("")
    dead = _enqueue(app, "flaky", 7)
    wait_for(lambda: dead.status().value == "dead", 30)
    p = Page(browser, fleet["url"])
    pages = {
        "overview": "/ui/",
        "queue": "/ui/queues/proc?state=scheduled",
        "job-dead": f"/ui/jobs/proc/{dead.id}",  # ui-job.png: a running job, in the progress test
        "dead": "/ui/dead",
        "scheduled": "/ui/scheduled",
        "nodes": "/ui/nodes",
    }
    for shot, path in pages.items():
        # The overview's screenshot is taken with its charts drawn, in the charts' test.
        p.open(path, None if shot == "overview" else shot)
        time.sleep(1.2)  # one live poll
        assert p.errors == [], (path, p.errors)
    job_page = p.open(f"/ui/jobs/proc/{dead.id}")
    error = job_page.locator("pre[data-k=error]")
    assert error.is_visible()  # the last error with the task's traceback
    text = error.text_content() or ""
    assert text.startswith("RuntimeError: flaky 7: failing on purpose") and ", in flaky" in text


@pytest.fixture
def fast_charts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard samples its charts every 0.5 s (not 10 s) in this test's server."""
    from jobq.web import history

    monkeypatch.setattr(history, "SAMPLE_S", 0.5)


CHART_HAS = """([kind, cls, minY]) => {
  const svg = document.querySelector(`svg[data-chart=${kind}][data-q=proc]`);
  if (!svg) return false;
  for (const el of svg.querySelectorAll(`.${cls}`)) {
    const ys = el.tagName === "circle" ? [el.getAttribute("cy")]
      : el.getAttribute("points").split(" ").map((p) => p.split(",")[1]);
    if (ys.some((y) => Number(y) < minY)) return true;
  }
  return false;
}"""


def test_overview_charts_draw_rates_and_waits_live(
    fast_charts: None, fleet: dict[str, Any], browser: Any
) -> None:
    """The overview's charts (inline SVG from the dashboard's own JS) grow without a reload, and
    show jobs finished and their waits once a worker has run some."""
    app = fleet["app"]
    _enqueue(app, "record", 0)
    p = Page(browser, fleet["url"])
    page = p.page
    resp = page.goto(fleet["url"] + "/ui/")
    assert resp is not None and resp.status == 200
    rate = page.locator("svg[data-chart=rate][data-q=proc]")
    points = "() => Number(document.querySelector('svg[data-chart=rate][data-q=proc]').dataset.points) >= 2"
    page.wait_for_function(points, timeout=20_000)
    before = int(rate.get_attribute("data-points") or 0)
    admin.pause(app, "proc")
    for i in range(40):
        _enqueue(app, "record", i)
    time.sleep(0.3)  # the jobs wait in ready, so their waits show
    admin.resume(app, "proc")
    # Above the baseline (y = 31): a made-ready rate (l1), a finished rate (l2), and a wait.
    page.wait_for_function(CHART_HAS, arg=["rate", "l1", 30], timeout=20_000)
    page.wait_for_function(CHART_HAS, arg=["rate", "l2", 30], timeout=20_000)
    page.wait_for_function(CHART_HAS, arg=["wait", "l1", 31], timeout=20_000)
    assert int(rate.get_attribute("data-points") or 0) > before  # no reload: the page polls
    assert page.locator("span[data-fig=wait][data-q=proc]").text_content().endswith(" ms")
    assert p.errors == []
    where = os.environ.get("JOBQ_SCREENSHOTS")
    if where:
        for i in range(200):  # a steady trickle, so the screenshot's charts have a shape
            _enqueue(app, "record", i)
            time.sleep(0.05)
        page.screenshot(path=str(Path(where) / "ui-overview.png"), full_page=True)


def test_job_goes_ready_to_done_live(fleet: dict[str, Any], browser: Any) -> None:
    app = fleet["app"]
    admin.pause(app, "proc", create=True)
    job = _enqueue(app, "record", 1)
    p = Page(browser, fleet["url"])
    page = p.open(f"/ui/jobs/proc/{job.id}")
    state = page.locator("[data-k=state]")
    assert state.text_content() == "ready"
    admin.resume(app, "proc")
    state.filter(has_text="done").wait_for(timeout=15_000)  # no reload: the page polls
    assert p.errors == []


def test_job_page_shows_progress_live(fleet: dict[str, Any], browser: Any) -> None:
    """A real worker runs a task that reports progress in steps this test sends (over a Redis
    list it pops from); the job page shows each step's bar and message without a reload, then
    done. The message is masked as ``jobq status`` masks it."""
    import redis

    app = fleet["app"]
    job = _enqueue(app, "stepped", 11)
    steps = redis.Redis.from_url(fleet["redis_url"])
    p = Page(browser, fleet["url"])
    try:
        page = p.open(f"/ui/jobs/proc/{job.id}")
        page.locator("[data-k=state]").filter(has_text="active").wait_for(timeout=15_000)
        assert page.get_by_text("none reported").is_visible()
        bar = page.locator("progress[data-k=progress]")
        assert not bar.is_visible()
        navigations: list[str] = []
        page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)

        steps.rpush("jobq-test:steps:11", json.dumps([0.25, "copying https://u:hunter2@example.com/x"]))
        page.locator("[data-k=progress_pct]").filter(has_text="25 %").wait_for(timeout=15_000)
        assert bar.is_visible() and not page.get_by_text("none reported").is_visible()
        assert bar.evaluate("b => b.value") == 0.25
        # The events panel gets the progress event without a reload.
        events = page.locator("tbody[data-events]")
        events.locator("td.ev-progress").first.wait_for(timeout=15_000)
        message = page.locator("[data-k=progress_message]").text_content() or ""
        assert message.startswith("copying https://u:") and "hunter2" not in message
        where = os.environ.get("JOBQ_SCREENSHOTS")
        if where:
            page.screenshot(path=str(Path(where) / "ui-job.png"), full_page=True)

        steps.rpush("jobq-test:steps:11", json.dumps([0.75, "three quarters"]))
        page.locator("[data-k=progress_message]").filter(has_text="three quarters").wait_for(timeout=15_000)
        assert bar.evaluate("b => b.value") == 0.75
        assert not page.locator("pre[data-k=result]").is_visible()  # no result while it runs
        assert page.locator("[data-k=progress_pct]").text_content() == "75 %"
        assert page.locator("[data-k=node]").text_content()  # the node running it

        steps.rpush("jobq-test:steps:11", json.dumps(None))
        page.locator("[data-k=state]").filter(has_text="done").wait_for(timeout=15_000)
        page.locator("[data-k=finished]").filter(has_text="UTC").wait_for(timeout=5_000)
        events.locator("td.ev-done").wait_for(timeout=15_000)
        kinds = events.locator("td:nth-child(2)").all_text_contents()
        assert kinds == ["enqueued", "started", "progress", "progress", "done"], kinds
        assert "hunter2" not in (events.text_content() or "")  # the message, masked
        result = page.locator("pre[data-k=result]")
        result.filter(has_text="11").wait_for(timeout=5_000)  # the result, shown when it is done
        assert result.is_visible()
        assert navigations == []  # every change above came without a reload
        assert job.result(timeout=10) == 11
        assert p.errors == []
    finally:
        steps.close()


def test_queue_page_event_feed_is_live(fleet: dict[str, Any], browser: Any) -> None:
    """The queue page's event feed shows a job enqueued after the page opened, then done, at the
    top, without a reload; its id links to its page."""
    app = fleet["app"]
    p = Page(browser, fleet["url"])
    page = p.open("/ui/queues/proc")
    job = _enqueue(app, "record", 21)
    feed = page.locator("tbody[data-feed]")
    first = feed.locator("tr").first
    first.locator("td.ev-done").wait_for(timeout=15_000)
    assert first.locator("a").text_content() == job.id
    assert feed.locator(f"a[href$='/{job.id}']").count() == 3  # enqueued, started, done
    first.locator("a").click()
    page.wait_for_url(f"**/ui/jobs/proc/{job.id}")
    assert p.errors == []


def test_retry_a_dead_letter_from_the_page_and_see_it_run(fleet: dict[str, Any], browser: Any) -> None:
    app = fleet["app"]
    (fleet["tmp"] / "fail-3").write_text("")
    job = _enqueue(app, "flaky", 3)
    wait_for(lambda: job.status().value == "dead", 30)
    p = Page(browser, fleet["url"])
    page = p.open(f"/ui/jobs/proc/{job.id}")
    (fleet["tmp"] / "fail-3").unlink()
    page.get_by_role("button", name="Retry").click()
    page.locator("[data-k=state]").filter(has_text="done").wait_for(timeout=15_000)
    assert job.status().value == "done"
    assert p.errors == []


def test_pause_from_the_page_and_jobq_stats_agrees(fleet: dict[str, Any], browser: Any) -> None:
    app = fleet["app"]
    _enqueue(app, "record", 5)
    p = Page(browser, fleet["url"])
    page = p.open("/ui/queues/proc")
    page.get_by_role("button", name="Pause").click()
    page.wait_for_load_state("networkidle")
    assert page.get_by_role("button", name="Resume").count() == 1
    out = subprocess.run(
        [sys.executable, "-m", "jobq", "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(fleet["redis_url"], fleet["tmp"]),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    queues = {q["queue"]: q for q in json.loads(out.stdout)["queues"]}
    assert queues["proc"]["paused"] is True
    assert p.errors == []


def test_read_only_shows_no_action(fleet: dict[str, Any], browser: Any) -> None:
    app = fleet["app"]
    job = _enqueue(app, "record", 8, delay=3600)
    server = ApiServer(app, "127.0.0.1", 0, token=TOKEN, ui=True, read_only=True).start()
    try:
        p = Page(browser, f"http://127.0.0.1:{server.port}")
        for path in (
            "/ui/",
            "/ui/queues/proc",
            f"/ui/jobs/proc/{job.id}",
            "/ui/dead",
            "/ui/scheduled",
            "/ui/nodes",
        ):
            page = p.open(path)
            names = [b.text_content() for b in page.get_by_role("button").all()]
            assert names in ([], ["Find"]), (path, names)
            assert page.locator("form[method=post]").count() == 0
        assert p.errors == []
    finally:
        server.close()
