"""The dashboard: server-rendered pages at ``/ui`` over the same operations as the CLI.

Overview (queues with counts, nodes, Redis memory and version, live), a queue's jobs by state
with paging by index (fast at a million jobs), a job (state, attempts, interruptions, times,
node, last error, arguments masked as the CLI masks them), dead letters, scheduled jobs, nodes.
Actions (pause, resume, purge, cancel, retry dead letters) are POST forms with a CSRF token and a
same-origin check; ``read_only`` hides them and refuses every POST.

Safety: the API's bearer token, or HTTP basic auth with that token as the password (what a
browser can send); every response carries a strict Content-Security-Policy (scripts, styles and
requests only from this origin, no inline script, no framing); the CSS and JS are files in the
package, nothing is loaded from another host.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime, timezone
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from jobq import admin, errors, util
from jobq.app import JobInfo, JobQ
from jobq.events import Event, check_since
from jobq.web import pool
from jobq.web.history import History

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Jobs per page of a queue's list.
PAGE = 50
#: Most entries of a queue's event stream the job page reads for one job's events (the stream
#: is per queue), on opening and per live poll.
EVENTS_SCAN = 2000
#: Events the queue page's live feed shows (the newest).
FEED = 30
#: Largest form body accepted, bytes (a few hundred selected ids).
MAX_FORM = 64 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on form posts
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
STATIC = {
    "ui.css": b"text/css; charset=utf-8",
    "ui.js": b"text/javascript; charset=utf-8",
    "icon.svg": b"image/svg+xml",
}


class _Answer(Exception):
    def __init__(self, status: int, body: bytes, ctype: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(status)
        self.status, self.body, self.ctype, self.headers = status, body, ctype, headers


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


class UiApp:
    """The dashboard as an ASGI callable. ``prefix``: the path it is served under when it gets
    full paths (``jobq serve`` passes ``/ui``); under a mount that sets ``root_path``, leave it
    empty. ``token``: bearer token or basic-auth password (None: open, for 127.0.0.1 use).
    ``read_only``: no actions."""

    def __init__(
        self,
        app: JobQ,
        *,
        token: str | None = None,
        read_only: bool = False,
        prefix: str = "",
        history_interval: float | None = None,
    ) -> None:
        self.app = app
        #: The overview's charts: sampled on a thread of its own from the first request on.
        self.history = History(app, history_interval)
        self.token = token.encode() if token else None
        self.read_only = read_only
        self.prefix = prefix.rstrip("/")
        self._secret = os.urandom(32)
        self._static = {
            name: resources.files("jobq.web").joinpath(f"static/{name}").read_bytes() for name in STATIC
        }

    def close(self) -> None:
        self.history.close()

    # -- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.history.start()
        base = scope.get("root_path", "") + self.prefix
        path: str = scope["path"]
        if scope.get("root_path") and path.startswith(scope["root_path"]):
            path = path[len(scope["root_path"]) :]
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix) :]
        path = path or "/"
        headers = {k.lower(): v for k, v in scope["headers"]}
        method = scope["method"]
        try:
            credential = self._authenticate(headers)
            if method in ("GET", "HEAD"):
                body = b""
            elif method == "POST":
                body = await _read_form(receive, headers)
            else:
                raise _Answer(405, b"method not allowed", b"text/plain", [(b"allow", b"GET, POST")])
            query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            view = _View(self, base, credential, query)
            if method == "POST":
                form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
                self._check_post(headers, form, credential)
                location = await pool.run_sync(view.act, path, form)
                raise _Answer(303, b"", b"text/plain", [(b"location", location.encode())])
            if path.startswith("/static/"):
                name = path[len("/static/") :]
                if name not in STATIC:
                    raise _Answer(404, b"not found", b"text/plain", [])
                raise _Answer(200, self._static[name], STATIC[name], [(b"cache-control", b"max-age=300")])
            status, out, ctype = await pool.run_sync(view.get, path)
            raise _Answer(status, out, ctype, [])
        except _Answer as a:
            await _respond(send, a)
        except errors.JobqError as exc:
            msg = f"<p class=bad>{_e(exc)}</p>".encode()
            await _respond(
                send, _Answer(400, _page(base, "Error", msg, self.read_only), b"text/html; charset=utf-8", [])
            )

    # -- safety ---------------------------------------------------------------------------------
    def _authenticate(self, headers: dict[bytes, bytes]) -> bytes:
        """The credential the request carries (b"" when no token is configured); 401 if wrong."""
        if self.token is None:
            return b""
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        given = b""
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except ValueError:
                given = b""
        if given and hmac.compare_digest(given, self.token):
            return given
        raise _Answer(
            401,
            b"authentication required",
            b"text/plain",
            [(b"www-authenticate", b'Basic realm="jobq", charset="UTF-8"')],
        )

    def csrf(self, credential: bytes) -> str:
        return hmac.new(self._secret, b"csrf:" + credential, hashlib.sha256).hexdigest()

    def _check_post(self, headers: dict[bytes, bytes], form: dict[str, list[str]], credential: bytes) -> None:
        if self.read_only:
            raise _Answer(403, b"read-only dashboard", b"text/plain", [])
        # Same origin only: browsers send Origin on POST and Sec-Fetch-Site where they know it.
        host = headers.get(b"host", b"")
        origin = headers.get(b"origin")
        if origin is not None and origin.split(b"://", 1)[-1] != host:
            raise _Answer(403, b"cross-origin request refused", b"text/plain", [])
        if headers.get(b"sec-fetch-site", b"same-origin") not in (b"same-origin", b"none"):
            raise _Answer(403, b"cross-site request refused", b"text/plain", [])
        token = (form.get("csrf") or [""])[-1]
        if not hmac.compare_digest(token.encode(), self.csrf(credential).encode()):
            raise _Answer(403, b"missing or wrong CSRF token", b"text/plain", [])


async def _read_form(receive: Receive, headers: dict[bytes, bytes]) -> bytes:
    ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded":
        raise _Answer(415, b"form posts only", b"text/plain", [])
    length = headers.get(b"content-length", b"")
    if not length.isdigit() or int(length) > MAX_FORM:
        raise _Answer(
            413, b"form too large or without Content-Length", b"text/plain", [(b"connection", b"close")]
        )
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


async def _respond(send: Send, a: _Answer) -> None:
    headers = [(b"content-type", a.ctype), (b"content-length", str(len(a.body)).encode()), *SECURITY_HEADERS]
    headers += a.headers
    await send({"type": "http.response.start", "status": a.status, "headers": headers})
    await send({"type": "http.response.body", "body": a.body})


def _page(base: str, title: str, content: bytes, read_only: bool, live: str = "", history: str = "") -> bytes:
    nav = "".join(
        f'<a href="{base}{href}">{label}</a>'
        for href, label in (
            ("/", "Overview"),
            ("/dead", "Dead letters"),
            ("/scheduled", "Scheduled"),
            ("/nodes", "Nodes"),
        )
    )
    ro = '<span class="ro">read-only</span>' if read_only else ""
    live_attr = f' data-live="{_e(live)}"' if live else ""
    if history:
        live_attr += f' data-history="{_e(history)}"'
    return (
        (
            f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)} · jobq</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="{base}/static/icon.svg"><link rel="stylesheet" href="{base}/static/ui.css"></head>'
            f"<body{live_attr}><header><strong>jobq</strong>{nav}{ro}</header><main><h1>{_e(title)}</h1>"
        ).encode()
        + content
        + f'</main><script src="{base}/static/ui.js"></script></body></html>'.encode()
    )


def _event_cells(e: Event) -> list[str]:
    """An event as the panel's cells: time, type, attempt, and what else it carries."""
    detail = []
    if e.node:
        detail.append(f"node {e.node}")
    if e.fraction is not None:
        detail.append(f"{e.fraction * 100:.0f} %")
    if e.message:
        detail.append(e.message)
    if e.run_at_ms:
        detail.append(f"runs at {_when(e.run_at_ms)}")
    if e.state:
        detail.append(f"was {e.state}")
    if e.error:
        detail.append(_error_line(e.error))  # its first line: the traceback is on the page
    return [_when(e.time_ms), e.type, "" if e.attempt is None else str(e.attempt), "; ".join(detail)]


def _event_row(e: Event) -> str:
    cells = _event_cells(e)
    return (
        f"<tr><td>{_e(cells[0])}</td><td class=ev-{_e(cells[1])}>{_e(cells[1])}</td>"
        f"<td class=num>{_e(cells[2])}</td><td>{_e(cells[3])}</td></tr>"
    )


def _error_line(error: str | None) -> str:
    """A list's view of a last error: its first line (the traceback follows it), masked."""
    return admin.redact_text((error or "").split("\n", 1)[0])[:120]


def _job_live(info: JobInfo) -> dict[str, Any]:
    """The job page's live values (``/api/job/...``, polled every second): what changes while a
    job waits and runs. The progress message is masked as ``jobq status`` masks it."""
    fraction = info.progress
    message = admin.redact_text(info.progress_message) if info.progress_message else ""
    return {
        "state": info.state.value,
        "attempts": info.attempts,
        "interruptions": info.interrupted,
        "reaped": info.reaped,
        "node": info.node,
        "run_at": _when(info.run_at_ms),
        "started": _when(info.started_ms),
        "finished": _when(info.finished_ms),
        "deadline": _when(info.deadline_ms),
        # The bar's value (null: the task has not reported progress) and its text.
        "progress": fraction,
        "progress_pct": "" if fraction is None else f"{fraction * 100:.0f} %",
        "progress_message": message,
        "progress_at": _when(info.progress_ms),
        "error": admin.redact_text(info.error) if info.error else "",
        # A done job's result, masked like the arguments ("" while there is none to show).
        "result": (
            json.dumps(admin.redact_args(info.result), indent=2, default=str)
            if info.has_result and info.state.value == "done"
            else ""
        ),
    }


def _progress_html(live: dict[str, Any]) -> str:
    """A <progress> bar (its value set by ui.js: no inline style, which the CSP forbids), the
    percentage, the task's message and when it was reported; "none reported" until then."""
    value = live["progress"]
    attrs = f' value="{value}"' if value is not None else ' value="0"'
    hidden = "" if value is not None else " hidden"
    return (
        f'<span class="progress" data-show-if="progress"{hidden}>'
        f'<progress max="1"{attrs} data-k="progress" data-bar aria-label="progress"></progress> '
        f'<b data-k="progress_pct">{_e(live["progress_pct"])}</b> '
        f'<span data-k="progress_message">{_e(live["progress_message"])}</span> '
        f'<span class="muted">at <span data-k="progress_at">{_e(live["progress_at"])}</span></span></span>'
        f'<span class="muted" data-hide-if="progress"{"" if hidden else " hidden"}>none reported</span>'
    )


class _View:
    """One request's pages and actions (synchronous: runs on the bounded pool)."""

    def __init__(self, ui: UiApp, base: str, credential: bytes, query: dict[str, str]) -> None:
        self.ui, self.app, self.base, self.query = ui, ui.app, base, query
        self.csrf = ui.csrf(credential)

    # -- pages ----------------------------------------------------------------------------------
    def get(self, path: str) -> tuple[int, bytes, bytes]:
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        if parts == []:
            return self._html(
                "Overview",
                self.overview(),
                live=f"{self.base}/api/overview",
                history=f"{self.base}/api/history",
            )
        if parts == ["api", "overview"]:
            return 200, json.dumps(self.overview_data()).encode(), b"application/json"
        if parts == ["api", "history"]:
            return 200, json.dumps(self.ui.history.to_json()).encode(), b"application/json"
        if len(parts) == 4 and parts[:2] == ["api", "job"]:
            info = admin.job_info(self.app, parts[3], parts[2], with_args=False)
            data = _job_live(info)
            after = self.query.get("after")
            if after:  # the events panel's cursor: the job's events after it
                data["events"], data["events_after"] = self.job_events_after(info.queue, info.id, after)
            return 200, json.dumps(data).encode(), b"application/json"
        if len(parts) == 3 and parts[:2] == ["api", "events"]:
            after = self.query.get("after", "")
            rows, cursor = self.queue_events_after(parts[2], after)
            return 200, json.dumps({"events": rows, "events_after": cursor}).encode(), b"application/json"
        if len(parts) == 2 and parts[0] == "queues":
            return self._html(
                f"Queue {parts[1]}", self.queue_page(parts[1]), live=f"{self.base}/api/overview"
            )
        if len(parts) == 3 and parts[0] == "jobs":
            q, job_id = parts[1], parts[2]
            live = f"{self.base}/api/job/{quote(q, safe='')}/{quote(job_id, safe='')}"
            return self._html(f"Job {job_id}", self.job_page(q, job_id), live=live)
        if parts == ["search"]:
            q, job_id = self.query.get("queue", ""), self.query.get("id", "").strip()
            info = admin.job_info(self.app, job_id, q or None, with_args=False)
            loc = f"{self.base}/jobs/{quote(info.queue, safe='')}/{quote(info.id, safe='')}"
            raise _Answer(303, b"", b"text/plain", [(b"location", loc.encode())])
        if parts == ["dead"]:
            return self._html("Dead letters", self.dead_page())
        if parts == ["scheduled"]:
            return self._html("Scheduled", self.scheduled_page())
        if parts == ["nodes"]:
            return self._html("Nodes", self.nodes_page())
        return self._html("Not found", b"<p>No such page.</p>", status=404)

    def _html(
        self, title: str, content: bytes, *, live: str = "", history: str = "", status: int = 200
    ) -> tuple[int, bytes, bytes]:
        page = _page(self.base, title, content, self.ui.read_only, live, history)
        return status, page, b"text/html; charset=utf-8"

    def _form(
        self, action: str, label: str, *, extra: str = "", danger: bool = False, confirm: str = ""
    ) -> str:
        if self.ui.read_only:
            return ""
        cls = ' class="danger"' if danger else ""
        conf = f' data-confirm="{_e(confirm)}"' if confirm else ""
        return (
            f'<form class="inline" method="post" action="{_e(self.base + action)}"{conf}>'
            f'<input type="hidden" name="csrf" value="{self.csrf}">{extra}'
            f"<button{cls}>{_e(label)}</button></form>"
        )

    def overview_data(self) -> dict[str, Any]:
        stats = admin.queue_stats(self.app)
        data: dict[str, Any] = {"nodes": admin.live_node_count(self.app)}
        for s in stats:
            for f in ("ready", "scheduled", "active", "dead"):
                data[f"{s.queue}.{f}"] = getattr(s, f)
            data[f"{s.queue}.paused"] = "paused" if s.paused else ""
        return data

    def overview(self) -> bytes:
        stats = admin.queue_stats(self.app)
        info = self.app.client.info("memory")
        server = self.app.client.info("server")
        cards = (
            f'<div class="cards"><div class="card">nodes alive<b data-k="nodes">{admin.live_node_count(self.app)}</b></div>'
            f'<div class="card">queues<b>{len(stats)}</b></div>'
            f'<div class="card">Redis memory<b>{_e(info.get("used_memory_human"))}</b></div>'
            f'<div class="card">Redis version<b>{_e(server.get("redis_version"))}</b></div></div>'
        )
        rows = "".join(
            f'<tr><td><a href="{self.base}/queues/{quote(s.queue, safe="")}">{_e(s.queue)}</a> '
            f'<span class="paused" data-k="{_e(s.queue)}.paused">{"paused" if s.paused else ""}</span></td>'
            + "".join(
                f'<td class="num" data-k="{_e(s.queue)}.{f}">{getattr(s, f)}</td>'
                for f in ("ready", "scheduled", "active", "dead")
            )
            + f'<td class="num">{s.oldest_ready_age_s:.1f} s</td>'
            + "".join(
                f'<td class="chart"><svg class="spark" data-chart="{kind}" data-q="{_e(s.queue)}" '
                f'viewBox="0 0 160 32" preserveAspectRatio="none" role="img" aria-label="{_e(s.queue)} {kind}, last hour">'
                f'</svg><span class="fig" data-fig="{kind}" data-q="{_e(s.queue)}"></span></td>'
                for kind in ("rate", "wait")
            )
            + "</tr>"
            for s in stats
        )
        table = (
            "<table><tr><th>queue</th><th class=num>ready</th><th class=num>scheduled</th><th class=num>active</th>"
            "<th class=num>dead</th><th class=num>oldest ready</th>"
            '<th>per second, last hour: <span class="k1">made ready</span> / <span class="k2">finished</span></th>'
            '<th>wait to start, last hour: <span class="k1">p50</span> / <span class="k2">p95</span></th>'
            f"</tr>{rows}</table>"
        )
        if not stats:
            table = "<p class=muted>No queues yet.</p>"
        return (cards + table).encode()

    def queue_page(self, queue: str) -> bytes:
        state = self.query.get("state", "ready")
        page = int(self.query.get("page", "1")) if self.query.get("page", "1").isdigit() else 1
        page = max(1, page)
        (stats,) = admin.queue_stats(self.app, [queue])
        tabs = "".join(
            f'<a class="{"on" if st == state else ""}" href="{self.base}/queues/{quote(queue, safe="")}?state={st}">'
            f'{st} (<span data-k="{_e(queue)}.{st}">{getattr(stats, st)}</span>)</a>'
            for st in admin.PAGED_STATES
        )
        qa = f"/queues/{quote(queue, safe='')}"
        actions = ""
        if not self.ui.read_only:
            actions = (
                '<div class="actions">'
                + (
                    self._form(f"{qa}/resume", "Resume")
                    if stats.paused
                    else self._form(f"{qa}/pause", "Pause")
                )
                + self._form(
                    f"{qa}/purge",
                    "Purge ready and scheduled",
                    extra='<input type="text" name="confirm" placeholder="type the queue name" required> ',
                    danger=True,
                    confirm=f"Delete every ready and scheduled job of {queue}?",
                )
                + "</div>"
            )
        paused = '<p class="paused">paused</p>' if stats.paused else ""
        search = (
            f'<form method="get" action="{self.base}/search"><input type="hidden" name="queue" value="{_e(queue)}">'
            '<input type="text" name="id" placeholder="job id"> <button>Find</button></form>'
        )
        started = time.perf_counter()
        jobs, total = admin.page_jobs(self.app, queue, state, offset=(page - 1) * PAGE, limit=PAGE)
        took_ms = (time.perf_counter() - started) * 1000
        body = self._jobs_table(queue, jobs, select=state == "dead" and not self.ui.read_only)
        pages = max(1, -(-total // PAGE))
        nav = []
        if page > 1:
            nav.append(f'<a href="?{urlencode({"state": state, "page": page - 1})}">previous</a>')
        if page < pages:
            nav.append(f'<a href="?{urlencode({"state": state, "page": page + 1})}">next</a>')
        pager = f'<p class="muted">page {page} of {pages} ({total} jobs; read in {took_ms:.1f} ms) {" ".join(nav)}</p>'
        feed = self.events_feed(queue)
        return (paused + actions + search + f'<p class="tabs">{tabs}</p>' + body + pager + feed).encode()

    def events_feed(self, queue: str) -> str:
        """The queue's newest lifecycle events, newest first, with the new ones added live (the
        page polls ``/api/events/<queue>?after=<cursor>``)."""
        newest = list(itertools.islice(self.app.iter_events([queue], last=FEED), EVENTS_SCAN))[-FEED:]
        cursor = newest[-1].id if newest else "0-0"
        rows = "".join(self._feed_row(e) for e in reversed(newest))
        src = f"{self.base}/api/events/{quote(queue, safe='')}"
        return (
            f"<h2>Events</h2>"
            '<table class="events"><thead><tr><th>time</th><th>event</th><th>job</th><th>task</th>'
            "<th class=num>attempt</th><th>detail</th></tr></thead>"
            f'<tbody data-feed data-src="{_e(src)}" data-jobs="{_e(self.base)}/jobs/{quote(queue, safe="")}/" '
            f'data-after="{_e(cursor)}" data-keep="{FEED}">{rows}</tbody></table>'
        )

    def _feed_row(self, e: Event) -> str:
        t, kind, attempt, detail = _event_cells(e)
        href = f"{self.base}/jobs/{quote(e.queue, safe='')}/{quote(e.job_id, safe='')}"
        return (
            f"<tr><td>{_e(t)}</td><td class=ev-{_e(kind)}>{_e(kind)}</td>"
            f'<td><a href="{_e(href)}"><code>{_e(e.job_id)}</code></a></td><td>{_e(e.task or "")}</td>'
            f"<td class=num>{_e(attempt)}</td><td>{_e(detail)}</td></tr>"
        )

    def queue_events_after(self, queue: str, after: str) -> tuple[list[list[str]], str]:
        """The queue's events after the cursor, oldest first, as rows (time, type, job id, task,
        attempt, detail), at most ``FEED`` (the newest: the page keeps no more), and the new cursor."""
        after = check_since(after)
        if after == "$":
            raise errors.InvalidInput("after: an event id, not '$'", "after")
        scanned = list(itertools.islice(self.app.iter_events([queue], since=after), EVENTS_SCAN))
        rows = []
        for e in scanned[-FEED:]:
            t, kind, attempt, detail = _event_cells(e)
            rows.append([t, kind, e.job_id, e.task or "", attempt, detail])
        return rows, scanned[-1].id if scanned else after

    def _jobs_table(self, queue: str, jobs: list[Any], *, select: bool = False) -> str:
        if not jobs:
            return "<p class=muted>No jobs.</p>"
        rows = "".join(
            "<tr>"
            + (f'<td><input type="checkbox" name="id" value="{_e(j.id)}" form="sel"></td>' if select else "")
            + f'<td><a href="{self.base}/jobs/{quote(j.queue, safe="")}/{quote(j.id, safe="")}"><code>{_e(j.id)}</code></a></td>'
            f"<td>{_e(j.task)}</td><td class=state-{_e(j.state.value)}>{_e(j.state.value)}</td>"
            f"<td class=num>{j.attempts}</td><td>{_e(_when(j.run_at_ms or j.enqueued_ms))}</td>"
            f'<td class="bad">{_e(_error_line(j.error))}</td></tr>'
            for j in jobs
        )
        head = "<th></th>" if select else ""
        table = (
            f"<table><tr>{head}<th>id</th><th>task</th><th>state</th><th class=num>attempts</th>"
            f"<th>run at / enqueued</th><th>last error</th></tr>{rows}</table>"
        )
        if select:
            qa = f"/queues/{quote(queue, safe='')}/dead"
            table = (
                '<div class="actions">'
                + f'<form id="sel" class="inline" method="post" action="{_e(self.base + qa + "/retry")}">'
                f'<input type="hidden" name="csrf" value="{self.csrf}"><button>Retry selected</button></form>'
                + f'<button form="sel" formaction="{_e(self.base + qa + "/delete")}" class="danger">Delete selected</button>'
                + self._form(f"{qa}/retry", "Retry all", extra='<input type="hidden" name="all" value="1">')
                + self._form(
                    f"{qa}/delete",
                    "Delete all",
                    extra='<input type="hidden" name="all" value="1">',
                    danger=True,
                    confirm=f"Delete every dead letter of {queue}?",
                )
                + "</div>"
                + table
            )
        return table

    def job_page(self, queue: str, job_id: str) -> bytes:
        info = admin.job_info(self.app, job_id, queue)
        shown = admin.redacted(info)
        live = _job_live(info)
        jq = f"/jobs/{quote(info.queue, safe='')}/{quote(info.id, safe='')}"
        actions = ""
        if info.state.value in ("ready", "scheduled", "active"):  # a running one: its node stops it
            actions += self._form(f"{jq}/cancel", "Cancel", danger=True, confirm="Cancel this job?")
        if info.state.value == "dead":
            actions += self._form(f"{jq}/retry", "Retry")
            actions += self._form(f"{jq}/delete", "Delete", danger=True, confirm="Delete this dead letter?")
        fields = [
            ("queue", f'<a href="{self.base}/queues/{quote(info.queue, safe="")}">{_e(info.queue)}</a>'),
            ("task", _e(info.task)),
            (
                "state",
                f'<span data-k="state" data-state class="state-{_e(info.state.value)}">{_e(info.state.value)}</span>',
            ),
            ("progress", _progress_html(live)),
            ("attempts", f'<span data-k="attempts">{info.attempts}</span> of {_e(info.max_attempts)}'),
            ("interruptions", f'<span data-k="interruptions">{info.interrupted}</span>'),
            ("reaped", f'<span data-k="reaped">{info.reaped}</span>'),
            ("priority", _e(info.priority)),
            ("enqueued", _e(_when(info.enqueued_ms))),
            ("run at", f'<span data-k="run_at">{_e(live["run_at"])}</span>'),
            ("started", f'<span data-k="started">{_e(live["started"])}</span>'),
            ("finished", f'<span data-k="finished">{_e(live["finished"])}</span>'),
            ("deadline", f'<span data-k="deadline">{_e(live["deadline"])}</span>'),
            ("node", f'<span data-k="node">{_e(info.node)}</span>'),
            ("unique key", _e(info.unique_key)),
        ]
        dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in fields)
        args = json.dumps({"args": shown.get("args"), "kwargs": shown.get("kwargs")}, indent=2, default=str)
        # Always rendered (hidden while there is none): a retried job's error appears live.
        hide = "" if info.error else " hidden"
        err = (
            f'<section data-show-if="error"{hide}><h2>Last error</h2>'
            f'<pre data-k="error">{_e(shown.get("error"))}</pre></section>'
        )
        hide = "" if live["result"] else " hidden"  # shown live when the job finishes
        result = (
            f'<section data-show-if="result"{hide}><h2>Result</h2>'
            f'<pre data-k="result">{_e(live["result"])}</pre></section>'
        )
        acts = f'<div class="actions">{actions}</div>' if actions else ""
        events = self.events_panel(info)
        return (f"{acts}<dl>{dl}</dl>{events}<h2>Arguments</h2><pre>{_e(args)}</pre>{err}{result}").encode()

    # -- the job's lifecycle events -------------------------------------------------------------
    def events_panel(self, info: JobInfo) -> str:
        """The job's lifecycle events found among its queue's newest ``EVENTS_SCAN`` (the stream
        is per queue: a job's events are picked out by id), oldest first; the page then asks for
        the ones after the cursor with each poll."""
        scanned = list(itertools.islice(self.app.iter_events([info.queue], last=EVENTS_SCAN), EVENTS_SCAN))
        mine = [e for e in scanned if e.job_id == info.id]
        cursor = scanned[-1].id if scanned else "0-0"
        rows = "".join(_event_row(e) for e in mine)
        note = ""
        if not any(e.type == "enqueued" for e in mine) and info.enqueued_ms:
            note = (
                f'<p class="muted">Earlier events of this job are not shown: they are older than the newest '
                f"{EVENTS_SCAN:,} events of queue {_e(info.queue)}, or no longer kept (its stream is capped; "
                "<code>events_max</code>).</p>"
            )
        return (
            "<h2>Events</h2>"
            + note
            + '<table class="events"><thead><tr><th>time</th><th>event</th><th class=num>attempt</th>'
            + "<th>detail</th></tr></thead>"
            + f'<tbody data-events data-after="{_e(cursor)}">{rows}</tbody></table>'
        )

    def job_events_after(self, queue: str, job_id: str, after: str) -> tuple[list[list[str]], str]:
        """The job's events after the cursor ``after`` (an entry id of the queue's stream), as
        rows of text, and the new cursor (the last entry read, whichever job's it was). At most
        ``EVENTS_SCAN`` entries are read per call; a busier queue is caught up over the next."""
        after = check_since(after)
        if after == "$":
            raise errors.InvalidInput("after: an event id, not '$'", "after")
        scanned = list(itertools.islice(self.app.iter_events([queue], since=after), EVENTS_SCAN))
        rows = [_event_cells(e) for e in scanned if e.job_id == job_id]
        return rows, scanned[-1].id if scanned else after

    def dead_page(self) -> bytes:
        stats = [s for s in admin.queue_stats(self.app) if s.dead]
        if not stats:
            return b"<p class=muted>No dead letters.</p>"
        parts = []
        for s in stats:
            jobs, total = admin.page_jobs(self.app, s.queue, "dead", limit=20)
            link = f'<a href="{self.base}/queues/{quote(s.queue, safe="")}?state=dead">{_e(s.queue)}</a>'
            parts.append(f"<h2>{link} ({total})</h2>" + self._jobs_table(s.queue, jobs, select=False))
        return "".join(parts).encode()

    def scheduled_page(self) -> bytes:
        parts = []
        for s in admin.queue_stats(self.app):
            if not s.scheduled:
                continue
            jobs, total = admin.page_jobs(self.app, s.queue, "scheduled", limit=20)
            link = f'<a href="{self.base}/queues/{quote(s.queue, safe="")}?state=scheduled">{_e(s.queue)}</a>'
            parts.append(f"<h2>{link} ({total})</h2>" + self._jobs_table(s.queue, jobs))
        crons = list(getattr(self.app, "cron_entries", []))
        if crons:
            now = admin.server_now_ms(self.app)
            rows = []
            for c in crons:
                task = self.app.tasks.get(c.task)
                queue = getattr(getattr(task, "defaults", None), "queue", None) or "default"
                last = self.app.client.get(self.app.keys.cron(queue, c.key_name))
                try:
                    last_ms = int(util.to_str(last)) if last is not None else None
                except ValueError:
                    last_ms = None
                rows.append(
                    f"<tr><td>{_e(c.key_name)}</td><td>{_e(c.task)}</td><td><code>{_e(c.schedule.label)}</code></td>"
                    f"<td>{_e(queue)}</td><td>{_e(_when(c.schedule.prev_tick(now)))}</td><td>{_e(_when(last_ms))}</td>"
                    f"<td>{_e(_when(c.schedule.next_tick(now)))}</td></tr>"
                )
            parts.append(
                "<h2>Cron</h2><table><tr><th>entry</th><th>task</th><th>schedule</th><th>queue</th>"
                f"<th>latest tick due</th><th>last tick enqueued</th><th>next tick</th></tr>{''.join(rows)}</table>"
            )
        return ("".join(parts) or "<p class=muted>Nothing scheduled.</p>").encode()

    def nodes_page(self) -> bytes:
        ns = admin.nodes(self.app)
        if not ns:
            return b"<p class=muted>No live nodes.</p>"
        rows = "".join(
            f"<tr><td><code>{_e(n.node)}</code></td><td>{_e(', '.join(n.queues))}</td><td class=num>{_e(n.concurrency)}</td>"
            f"<td class=num>{_e(n.inflight)}</td><td class=num>{n.heartbeat_age_s:.1f} s</td><td>{_e(n.host)}</td>"
            f"<td>{_e(n.version or '')}</td></tr>"
            for n in ns
        )
        return (
            "<table><tr><th>node</th><th>queues</th><th class=num>concurrency</th><th class=num>in flight</th>"
            f"<th class=num>heartbeat age</th><th>host</th><th>version</th></tr>{rows}</table>"
        ).encode()

    # -- actions --------------------------------------------------------------------------------
    def act(self, path: str, form: dict[str, list[str]]) -> str:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        app = self.app
        if len(parts) == 3 and parts[0] == "queues":
            q, verb = parts[1], parts[2]
            back = f"{self.base}/queues/{quote(q, safe='')}"
            if verb == "pause":
                admin.pause(app, q)
            elif verb == "resume":
                admin.resume(app, q)
            elif verb == "purge":
                if (form.get("confirm") or [""])[-1] != q:
                    raise _Answer(400, b"type the queue name to confirm the purge", b"text/plain", [])
                admin.purge(app, q)
            else:
                raise _Answer(404, b"no such action", b"text/plain", [])
            return back
        if len(parts) == 4 and parts[0] == "queues" and parts[2] == "dead":
            q, verb = parts[1], parts[3]
            back = f"{self.base}/queues/{quote(q, safe='')}?state=dead"
            if verb == "retry":
                ids = form.get("id") or []
                if ids:
                    admin.retry_dead(app, q, ids)
                elif form.get("all"):
                    admin.retry_dead(app, q)
                return back
            if verb == "delete":
                ids = form.get("id") or []
                if ids:
                    admin.delete_dead(app, q, ids)
                elif form.get("all"):
                    admin.purge(app, q, ("dead",))
                return back
        if len(parts) == 4 and parts[0] == "jobs":
            q, job_id, verb = parts[1], parts[2], parts[3]
            back = f"{self.base}/jobs/{quote(q, safe='')}/{quote(job_id, safe='')}"
            if verb == "cancel":
                admin.cancel(app, job_id, q)
                return back
            if verb == "retry":
                admin.retry_dead(app, q, [job_id])
                return back
            if verb == "delete":
                admin.delete_dead(app, q, [job_id])
                return f"{self.base}/queues/{quote(q, safe='')}?state=dead"
        raise _Answer(404, b"no such action", b"text/plain", [])
