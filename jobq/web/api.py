"""The HTTP API as an ASGI application: submit, inspect and cancel jobs from any language.

Routes (see ``jobq/openapi.json``, served at ``GET /openapi.json``)::

    POST   /jobs            enqueue one job (a JSON object) or many (a JSON array) -> 201
    GET    /jobs            ?queue=&status=&limit=  list jobs
    GET    /jobs/{id}       ?queue=  one job's status
    DELETE /jobs/{id}       ?queue=  cancel a job (a running one too: its node stops it)
    GET    /stats           per-queue depths and totals
    GET    /events          ?queue=&since=&last=&follow=&limit=&timeout=  lifecycle events as
                            Server-Sent Events (docs/events.md)
    GET    /health          200 when Redis answers a read, else 503
    GET    /metrics         Prometheus text format (enqueue counters, queue gauges)
    GET    /openapi.json    the OpenAPI 3 document

Errors are JSON ``{"error": message, "field": name}``: 400 bad input (naming the field), 401
missing/wrong bearer token, 404, 405 (with ``Allow``), 408 body not sent within the request
deadline, 409 finished (not cancellable), 411 no Content-Length, 413 body over the limit (refused before it is
read), 415 not ``application/json``, 503 queue full (with ``Retry-After``; nothing stored) or Redis
unavailable.

The Redis work of a request (one or two round trips) runs on a bounded thread pool
(``jobq.web.pool.MAX_THREADS``), so a slow Redis holds at most that many threads (and Redis
connections), never one per client connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

from jobq import admin, errors, requests, strict_json
from jobq.app import JobQ
from jobq.events import BLOCK_MS, EventReader
from jobq.metrics import Metrics
from jobq.storage import clients as connection
from jobq.storage import errors as storage_errors
from jobq.web import pool

log = logging.getLogger("jobq.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
T = TypeVar("T")

_timeout: Any = getattr(asyncio, "timeout", None)

#: Default largest request body, bytes (the encoded payload limit is 1 MiB; JSON is larger).
DEFAULT_MAX_BODY = 2 * 1024 * 1024
#: Round trips of single-job POST /jobs batches out at once (the next batch gathers meanwhile):
#: with two, one batch's thread hop and reply overlap the other's time at Redis.
BATCHES_IN_FLIGHT = 2
#: Most jobs one POST /jobs array may carry.
MAX_BULK = 10_000
#: Seconds a client may take to send a whole request (headers and body) before it is cut off.
REQUEST_TIMEOUT = 30.0
#: Seconds a client should wait before retrying after a 503.
RETRY_AFTER = 5

#: The methods each route answers (HEAD goes with GET).
ROUTES_ALLOW = {
    "/jobs": "GET, POST",
    "/jobs/{id}": "GET, DELETE",
    "/stats": "GET",
    "/events": "GET",
    "/health": "GET",
    "/metrics": "GET",
    "/openapi.json": "GET",
}
#: Paths answered without the bearer token (probes and scrapers).
PUBLIC = frozenset({"/health", "/metrics", "/openapi.json"})


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document describing this API."""
    text = resources.files("jobq").joinpath("openapi.json").read_text("utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


class HttpError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.extra = extra


class _Reply:
    """One response: status, body, content type and extra headers; ``close`` ends the connection."""

    __slots__ = ("body", "close", "ctype", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        ctype: bytes = b"application/json",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.ctype = ctype
        self.headers = headers or []
        self.close = False


#: ``json.dumps(data, default=str)`` without building an encoder per response.
_encode = json.JSONEncoder(default=str).encode


def _json_reply(status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None) -> _Reply:
    return _Reply(status, _encode(data).encode(), headers=headers)


def _error_reply(exc: HttpError) -> _Reply:
    out: dict[str, Any] = {"error": exc.message}
    if exc.field is not None:
        out["field"] = exc.field
    allow = exc.extra.pop("allow", None)
    out.update(exc.extra)
    headers: list[tuple[bytes, bytes]] = []
    if exc.status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER).encode()))
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    if exc.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="jobq"'))
    return _json_reply(exc.status, out, headers)


class ApiApp:
    """The API as an ASGI callable over ``app`` (a :class:`~jobq.JobQ`).

    ``token``: require ``Authorization: Bearer TOKEN`` on every route but /health, /metrics and
    /openapi.json (compared in constant time). ``max_body``: largest request body, refused with
    413 before it is read. ``request_timeout``: seconds a client has to send a request's body (the
    server adds the same deadline on the headers). ``metrics``: the registry /metrics exports
    (default: enqueue counters and queue gauges, no worker series). ``ui``: serve the dashboard
    (:mod:`jobq.web.ui`) at ``/ui``, with the same token (or basic auth) and ``read_only``."""

    def __init__(
        self,
        app: JobQ,
        *,
        token: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        metrics: Metrics | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        ui: bool = False,
        read_only: bool = False,
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.metrics = metrics if metrics is not None else Metrics(app, node="http", worker=False)
        # A separate client for /health: short timeouts and no retries, so a probe answers fast.
        self.health_client = connection.sync_client(
            app.url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=storage_errors.no_retry()
        )
        self._openapi: bytes | None = None
        self._batcher = _EnqueueBatcher(app)
        self.ui: Any = None
        if ui:
            from jobq.web.ui import UiApp

            self.ui = UiApp(app, token=token, read_only=read_only, prefix="/ui")

    def close(self) -> None:
        self.health_client.close()
        if self.ui is not None:
            self.ui.close()

    def _run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return pool.run_sync(fn, *args)

    # -- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not served
            return
        started = time.monotonic()
        method: str = scope["method"]
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under root_path, handed the full path
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        if self.ui is not None and (path == "/ui" or path.startswith("/ui/")):
            await self.ui(scope, receive, send)
            log.info("%s %s (%.1f ms)", method, path, (time.monotonic() - started) * 1000)
            return
        headers = _headers(scope)
        req = _Request(self, scope, receive, headers)
        try:
            reply = await self._handle(req, method, path)
        except Exception as exc:  # the mapping of errors to statuses
            reply = self._reply_for(exc, method, path)
        if isinstance(reply, EventStream):
            sent = await reply.run(send, receive)
            log.info("%s %s -> 200, %d events (%.1f s)", method, path, sent, time.monotonic() - started)
            return
        if req.body_pending():
            # A request body we did not read would be parsed as the next request: close instead.
            reply.close = True
        await _send_reply(send, reply)
        if log.isEnabledFor(logging.INFO):
            # After the response has left (the server writes it at the end of this turn).
            took = (time.monotonic() - started) * 1000
            asyncio.get_running_loop().call_soon(_access_line, method, path, reply.status, took)

    def _reply_for(self, exc: Exception, method: str, path: str) -> _Reply:
        if isinstance(exc, HttpError):
            reply = _error_reply(exc)
            reply.close = exc.status in (408, 411, 413, 415) or reply.close
            return reply
        if isinstance(exc, errors.QueueFull):
            body = {"error": str(exc), "field": "queue", "queue": exc.queue, "limit": exc.limit}
            return _json_reply(503, body, [(b"retry-after", str(RETRY_AFTER).encode())])
        if isinstance(exc, errors.InvalidInput):
            return _json_reply(400, {"error": str(exc), "field": exc.field})
        if isinstance(exc, errors.JobNotFound):
            return _json_reply(404, {"error": str(exc), "field": "id"})
        if isinstance(exc, errors.JobNotCancellable):
            return _json_reply(409, {"error": str(exc), "field": "id"})
        if isinstance(
            exc,
            (
                errors.RedisUnavailable,
                errors.RedisBusy,
                errors.RedisOutOfMemory,
                *storage_errors.CONNECTION_ERRORS,
            ),
        ):
            body = {"error": connection.redact(str(exc))}
            return _json_reply(503, body, [(b"retry-after", str(RETRY_AFTER).encode())])
        log.error("%s %s failed", method, path, exc_info=exc)
        return _json_reply(500, {"error": f"internal error: {type(exc).__name__}"})

    def _authorized(self, path: str, headers: dict[bytes, bytes]) -> bool:
        token = self.token
        if token is None or path in PUBLIC:
            return True
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token)

    async def _handle(self, req: _Request, method: str, path: str) -> _Reply | EventStream:
        if not self._authorized(path, req.headers):
            raise HttpError(401, "missing or wrong bearer token", "Authorization")
        route = _route_of(path)
        if route is None:
            raise HttpError(404, f"no route {path}", "path")
        allowed = ROUTES_ALLOW[route]
        if method not in allowed.split(", ") and not (method == "HEAD" and "GET" in allowed):
            raise HttpError(405, f"{method} not allowed here (allowed: {allowed})", "method", allow=allowed)
        if route == "/jobs":
            if method == "POST":
                body = await req.json()
                if isinstance(body, list):
                    status, data = await self._run(self.post_jobs, body)
                else:
                    status, data = await self.post_one(body)
                root = req.scope.get("root_path", "")  # mounted: the path the client sees
                loc = [(b"location", f"{root}/jobs/{data['id']}".encode())] if "id" in data else []
                return _json_reply(status, data, loc)
            return _json_reply(200, await self._run(self.get_jobs, req.query()))
        if route == "/jobs/{id}":
            job_id = unquote(path[len("/jobs/") :])
            if method == "DELETE":
                return _json_reply(200, await self._run(self.delete_job, job_id, req.query()))
            return _json_reply(200, await self._run(self.get_job, job_id, req.query()))
        if route == "/stats":
            return _json_reply(200, await self._run(self.stats))
        if route == "/events":
            stream = self.events(req)
            return _Reply(200, b"", SSE_TYPE, SSE_HEADERS) if method == "HEAD" else stream
        if route == "/health":
            ok, detail = await self._run(self.health)
            return _json_reply(200 if ok else 503, {"status": "ok" if ok else "unhealthy", "detail": detail})
        if route == "/metrics":
            from prometheus_client.exposition import CONTENT_TYPE_LATEST

            body = await self._run(self.metrics.exposition)
            return _Reply(200, body, CONTENT_TYPE_LATEST.encode())
        return _Reply(200, self.openapi_bytes())

    def openapi_bytes(self) -> bytes:
        if self._openapi is None:
            self._openapi = json.dumps(openapi_document(), indent=2).encode()
        return self._openapi

    # -- routes (synchronous: they run on the thread pool) ----------------------------------------
    def health(self) -> tuple[bool, str]:
        try:
            # TIME only: no key, so on a Redis Cluster no one slot's primary decides the answer
            # (GET /stats names the shards it cannot reach).
            secs, _ = self.health_client.time()
        except Exception as exc:
            return False, f"Redis unavailable: {connection.redact(str(exc))}"
        return True, f"ok (Redis time {int(secs)})"

    def post_jobs(self, body: Any) -> tuple[int, dict[str, Any]]:
        if isinstance(body, list):
            if not 1 <= len(body) <= MAX_BULK:
                raise HttpError(400, f"body: an array must hold 1..{MAX_BULK} jobs", "body")
            reqs = [requests.request_from_json(item, index=i) for i, item in enumerate(body)]
            jobs = self.app.enqueue_many(reqs)
            return 201, {"jobs": [{"id": j.id, "queue": j.queue} for j in jobs]}
        job, state = self.app.enqueue_request_state(requests.request_from_json(body))
        return 201, {"id": job.id, "queue": job.queue, "status": state or job.status().value}

    async def post_one(self, body: Any) -> tuple[int, dict[str, Any]]:
        """POST /jobs with one job: validated here, stored by the batcher (one round trip for
        the requests that arrived while the previous one was out)."""
        req = requests.request_from_json(body)
        job, state = await self._batcher.submit(req)
        if state is None:
            state = (await self._run(job.status)).value
        return 201, {"id": job.id, "queue": job.queue, "status": state}

    def get_jobs(self, query: dict[str, str]) -> dict[str, Any]:
        limit_s = query.get("limit", "100")
        if not limit_s.isdigit():
            raise HttpError(400, f"limit: must be an integer 1..{admin.MAX_LIST}", "limit")
        state = query.get("status") or query.get("state") or None
        if state is not None and state not in admin.LIST_STATES:
            raise HttpError(400, f"status: must be one of {', '.join(admin.LIST_STATES)}", "status")
        jobs = admin.list_jobs(self.app, query.get("queue") or None, state, limit=int(limit_s))
        return {"jobs": [admin.redacted(j) for j in jobs]}

    def get_job(self, job_id: str, query: dict[str, str]) -> dict[str, Any]:
        info = admin.job_info(self.app, job_id, query.get("queue") or None)
        return admin.redacted(info)

    def delete_job(self, job_id: str, query: dict[str, str]) -> dict[str, Any]:
        queue = admin.cancel(self.app, job_id, query.get("queue") or None)
        return {"id": job_id, "queue": queue, "status": "cancelled"}

    def events(self, req: _Request) -> EventStream:
        """GET /events: checks the parameters (400 before anything is sent) and builds the
        stream; a ``Last-Event-ID`` header (an ``EventSource`` reconnecting) resumes after it."""
        qs = parse_qs(req.scope.get("query_string", b"").decode("latin-1"))
        query = {k: v[-1] for k, v in qs.items()}
        queues = [q for v in qs.get("queue", []) for q in v.split(",") if q] or None
        follow = _flag(query.get("follow", "false"), "follow")
        limit = _int_param(query.get("limit"), "limit", 1, 1_000_000)
        last = _int_param(query.get("last"), "last", 0, 100_000)
        timeout = _int_param(query.get("timeout"), "timeout", 1, MAX_EVENTS_TIMEOUT)
        since = query.get("since") or None
        resume = req.headers.get(b"last-event-id", b"").decode("latin-1").strip()
        if resume:
            since, last = resume, None
        # Checked here (a 400); the stream reads on a connection of its own, closed at its end.
        reader = EventReader(self.app, queues, since=since, last=last, follow=follow)
        return EventStream(
            self.app, reader, limit=limit, timeout=timeout or (EVENTS_TIMEOUT if follow else None)
        )

    def stats(self) -> dict[str, Any]:
        # On a Redis Cluster with a primary down, the queues of the others, and the shards that
        # did not answer (``unreachable``), instead of a 503.
        return admin.stats_report(self.app).to_dict()


class _EnqueueBatcher:
    """Single-job enqueues share round trips. A request goes to Redis at once (on the pool) while
    fewer than ``BATCHES_IN_FLIGHT`` round trips are out; the ones that arrive meanwhile wait, and
    go together in the next round trip (:meth:`JobQ.enqueue_each`: one script call per queue,
    each request its own outcome). One client alone pays one round trip, as before; eight at
    once share a few between them, not eight (each a thread hop, a Redis call and a GIL
    hand-over)."""

    def __init__(self, app: JobQ) -> None:
        self.app = app
        self.pending: list[tuple[requests.EnqueueRequest, asyncio.Future[tuple[Any, str | None]]]] = []
        self.running = 0
        self._tasks: set[asyncio.Future[None]] = set()

    async def submit(self, req: requests.EnqueueRequest) -> tuple[Any, str | None]:
        fut: asyncio.Future[tuple[Any, str | None]] = asyncio.get_running_loop().create_future()
        self.pending.append((req, fut))
        if self.running < BATCHES_IN_FLIGHT:
            self.running += 1
            task = asyncio.ensure_future(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch = self.pending[:MAX_BULK]
                del self.pending[: len(batch)]
                try:
                    if len(batch) == 1:
                        results: list[Any] = [await pool.run_sync(self._one, batch[0][0])]
                    else:
                        results = await pool.run_sync(self.app.enqueue_each, [r for r, _ in batch])
                except Exception as exc:  # pragma: no cover - enqueue_each returns its errors
                    results = [exc] * len(batch)
                for (_, fut), res in zip(batch, results, strict=True):
                    if fut.done():  # the client went away
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            self.running -= 1

    def _one(self, req: requests.EnqueueRequest) -> tuple[Any, str | None] | Exception:
        try:
            return self.app.enqueue_request_state(req)
        except Exception as exc:
            return exc


#: Content type and headers of an event stream: never cached, never buffered by a proxy.
SSE_TYPE = b"text/event-stream; charset=utf-8"
SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
#: Seconds a following GET /events lasts unless ``timeout`` says otherwise; an ``EventSource``
#: then reconnects with ``Last-Event-ID`` and misses nothing.
EVENTS_TIMEOUT = 300
#: The longest ``timeout`` of GET /events, seconds.
MAX_EVENTS_TIMEOUT = 3600
#: Seconds without an event after which a following stream sends a comment line, so proxies keep
#: the connection and a client that went away is noticed.
KEEPALIVE_S = 15.0


def _flag(value: str, name: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise HttpError(400, f"{name}: must be true or false", name)


def _int_param(value: str | None, name: str, lo: int, hi: int) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise HttpError(400, f"{name}: must be an integer {lo}..{hi}", name)
    return int(value)


def sse_frame(event: Any, position: str) -> bytes:
    """One event as a Server-Sent Events frame: ``id``, the reader's position after it
    (``queue=<entry id>,...``, which an ``EventSource`` sends back as ``Last-Event-ID`` when it
    reconnects, resuming every queue exactly), and one ``data`` line of JSON (the event's type is
    in it, so ``onmessage`` sees every event)."""
    data = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))
    return f"id: {position}\ndata: {data}\n\n".encode()


class EventStream:
    """The body of GET /events: events from an async iterator (:meth:`jobq.JobQ.events`) as SSE
    frames, until the iterator ends (not following), ``limit`` events, ``timeout`` seconds, or the
    client goes away. Reading runs in a task of its own, so keep-alive comments go out while it
    waits and a disconnect stops it at once. A Redis error ends the stream with a ``stream-error``
    event (the status line has left already)."""

    def __init__(self, app: JobQ, reader: EventReader, *, limit: int | None, timeout: float | None) -> None:
        self.app = app
        self.reader = reader
        self.limit = limit
        self.timeout = timeout

    async def run(self, send: Send, receive: Receive) -> int:
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)
        producer = asyncio.ensure_future(self._produce(inbox))
        gone = asyncio.ensure_future(_disconnected(receive))
        headers = [(b"content-type", SSE_TYPE), *SSE_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        sent = 0
        try:
            while self.limit is None or sent < self.limit:
                wait = KEEPALIVE_S if deadline is None else min(KEEPALIVE_S, deadline - loop.time())
                if wait <= 0:
                    break
                getter = asyncio.ensure_future(inbox.get())
                done, _ = await asyncio.wait(
                    {getter, gone}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    if gone in done:
                        return sent
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                    continue
                item = getter.result()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    body = json.dumps({"error": connection.redact(str(item))})
                    await send(
                        {
                            "type": "http.response.body",
                            "body": f"event: stream-error\ndata: {body}\n\n".encode(),
                            "more_body": True,
                        }
                    )
                    break
                await send({"type": "http.response.body", "body": sse_frame(*item), "more_body": True})
                sent += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # A blocking read is not cut short by a cancel (redis-py's asyncio client goes on
            # reading): the reader stops after its current read (BLOCK_MS) instead.
            self.reader.closed = True
            gone.cancel()
            _, pending = await asyncio.wait({producer, gone}, timeout=BLOCK_MS / 1000 + 2)
            for task in pending:
                task.cancel()
        return sent

    async def _produce(self, inbox: asyncio.Queue[Any]) -> None:
        # A blocking read holds its connection while it waits: one client per stream, closed here.
        self.reader.aclient = client = connection.async_client(self.app.url)
        events = self.reader.__aiter__()
        try:
            async for ev in events:
                # The reader's position as the event is taken: the frame's id, for Last-Event-ID.
                await inbox.put((ev, self.reader.position()))
            await inbox.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            from jobq.storage.calls import map_error

            await inbox.put(map_error(exc, "GET /events"))
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _route_of(path: str) -> str | None:
    if path in ROUTES_ALLOW:
        return path
    if path.startswith("/jobs/") and path.count("/") == 2:
        return "/jobs/{id}"
    return None


def _headers(scope: Scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        out[name.lower()] = value
    return out


class _Request:
    """The parts of a request the routes read: query, headers and a deadline-bound JSON body."""

    def __init__(self, api: ApiApp, scope: Scope, receive: Receive, headers: dict[bytes, bytes]) -> None:
        self.api = api
        self.scope = scope
        self.receive = receive
        self.headers = headers
        self.body_read = False

    def query(self) -> dict[str, str]:
        qs = self.scope.get("query_string", b"").decode("latin-1")
        return {k: v[-1] for k, v in parse_qs(qs).items()}

    def body_pending(self) -> bool:
        if self.body_read:
            return False
        length = self.headers.get(b"content-length", b"").strip()
        return length not in (b"", b"0") or b"transfer-encoding" in self.headers

    async def json(self) -> Any:
        h = self.headers
        ctype = h.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if ctype != b"application/json":
            raise HttpError(415, "Content-Type must be application/json", "Content-Type")
        if b"transfer-encoding" in h:
            raise HttpError(411, "send a Content-Length (chunked bodies are not accepted)", "Content-Length")
        length_s = h.get(b"content-length")
        if length_s is None or not length_s.strip().isdigit():
            raise HttpError(411, "Content-Length required", "Content-Length")
        length = int(length_s)
        if length > self.api.max_body:
            # Refused without reading it: the connection is closed after the answer.
            raise HttpError(413, f"body: {length} bytes is over the {self.api.max_body}-byte limit", "body")
        try:
            if _timeout is not None:  # Python 3.11+: a timer on this task, not a task of its own
                raw = await _within(self.api.request_timeout, self._read(length))
            else:  # pragma: no cover - Python 3.10
                raw = await asyncio.wait_for(self._read(length), self.api.request_timeout)
        except asyncio.TimeoutError:
            raise HttpError(
                408, f"body: not received within {self.api.request_timeout:g} s", "body"
            ) from None
        if len(raw) < length:
            raise HttpError(400, "body: shorter than its Content-Length", "body")
        try:
            return strict_json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"body: not valid JSON: {exc}", "body") from None

    async def _read(self, length: int) -> bytes:
        chunks: list[bytes] = []
        got = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            got += len(chunk)
            if got > length:  # more than announced: the parser would not allow it; be safe
                raise HttpError(400, "body: longer than its Content-Length", "body")
            if not message.get("more_body", False):
                self.body_read = True
                break
        return b"".join(chunks)


async def _within(seconds: float, aw: Awaitable[T]) -> T:
    """``async with asyncio.timeout(seconds): return await aw`` (Python 3.11+) for about 3 µs
    less a request (its body is read under it, and is usually there already): one timer that
    cancels this task, with ``asyncio.timeout``'s accounting of cancellations, so a cancellation
    from elsewhere is never mistaken for the deadline (nor the other way round)."""
    task: Any = asyncio.current_task()
    cancelling = task.cancelling()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        result = await aw
    except asyncio.CancelledError:
        handle.cancel()
        if expired and task.uncancel() <= cancelling:
            raise asyncio.TimeoutError from None
        raise
    except BaseException:
        handle.cancel()
        if expired:
            task.uncancel()
        raise
    handle.cancel()
    if expired:  # the awaitable finished anyway: take back the cancel it absorbed
        task.uncancel()
    return result


def _access_line(method: str, path: str, status: int, took_ms: float) -> None:
    """``log.info("POST /jobs -> 201 (0.4 ms)")`` without the stack walk ``Logger.info`` makes
    to find its caller's file and line (a sixth of the line's cost; no jobq format shows them):
    the same record, filters and handlers."""
    args = (method, path, status, took_ms)
    log.handle(log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, _ACCESS, args, None))


_ACCESS = "%s %s -> %d (%.1f ms)"


async def _send_reply(send: Send, reply: _Reply) -> None:
    headers = [
        (b"content-type", reply.ctype),
        (b"content-length", str(len(reply.body)).encode()),
        *reply.headers,
    ]
    if reply.close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
