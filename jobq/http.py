"""The HTTP API (``jobq serve``): submit, inspect and cancel jobs from any language.

Built on the standard library's ``ThreadingHTTPServer``: the API is a handful of JSON routes
whose work is one or two Redis round trips each, so a thread per connection is plenty; it adds no
dependency to every jobq install (an ASGI framework plus a server would be three), and the request
limits that matter (body size before reading, content type, a socket timeout against slow
clients) are a few lines. Put a reverse proxy in front for TLS and public exposure.

Routes (see ``jobq/openapi.json``, served at ``GET /openapi.json``)::

    POST   /jobs            enqueue one job (a JSON object) or many (a JSON array) -> 201
    GET    /jobs            ?queue=&status=&limit=  list jobs
    GET    /jobs/{id}       ?queue=  one job's status
    DELETE /jobs/{id}       ?queue=  cancel a job that has not started
    GET    /stats           per-queue depths and totals
    GET    /health          200 when Redis answers a read, else 503
    GET    /metrics         Prometheus text format (enqueue counters, queue gauges)
    GET    /openapi.json    the OpenAPI 3 document

Errors are JSON ``{"error": message, "field": name}``: 400 bad input (naming the field), 401
missing/wrong bearer token, 404, 405, 409 not cancellable, 411 no Content-Length, 413 body over
the limit (refused before it is read), 415 not ``application/json``, 503 queue full (with
``Retry-After``; nothing stored) or Redis unavailable.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobq import admin, errors, requests, strict_json
from jobq.app import JobQ
from jobq.metrics import Metrics
from jobq.storage import clients, reads

log = logging.getLogger("jobq.http")

#: Default largest request body, bytes (the encoded payload limit is 1 MiB; JSON is larger).
DEFAULT_MAX_BODY = 2 * 1024 * 1024
#: Most jobs one POST /jobs array may carry.
MAX_BULK = 10_000
#: Seconds a client may take to send its request before the connection is dropped.
REQUEST_TIMEOUT = 30.0
#: Seconds a client should wait before retrying after a 503.
RETRY_AFTER = 5


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


class ApiServer:
    """The API on ``host:port`` (``port=0`` picks a free one; see ``.port``). ``serve_forever()``
    blocks; ``start()`` runs it on a daemon thread; ``close()`` stops it."""

    def __init__(
        self,
        app: JobQ,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        token: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        metrics: Metrics | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.metrics = metrics if metrics is not None else Metrics(app, node="http")
        # A separate client for /health: short timeouts and no retries, so a probe answers fast.
        self.health_client = clients.sync_client(
            app.url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        handler = type("Handler", (_ApiHandler,), {"api": self, "timeout": request_timeout})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None
        self._openapi: bytes | None = None

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.serve_forever, name="jobq-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.health_client.close()

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def openapi_bytes(self) -> bytes:
        if self._openapi is None:
            self._openapi = json.dumps(openapi_document(), indent=2).encode()
        return self._openapi

    # -- routes -----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        try:
            secs = reads.health(self.health_client, self.app.keys)
        except Exception as exc:
            return False, f"Redis unavailable: {clients.redact(str(exc))}"
        return True, f"ok (Redis time {secs})"

    def post_jobs(self, body: Any) -> tuple[int, dict[str, Any]]:
        if isinstance(body, list):
            if not 1 <= len(body) <= MAX_BULK:
                raise HttpError(400, f"body: an array must hold 1..{MAX_BULK} jobs", "body")
            reqs = [requests.request_from_json(item, index=i) for i, item in enumerate(body)]
            jobs = self.app.enqueue_many(reqs)
            return 201, {"jobs": [{"id": j.id, "queue": j.queue} for j in jobs]}
        job = self.app.enqueue_request(requests.request_from_json(body))
        return 201, {"id": job.id, "queue": job.queue, "status": job.status().value}

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

    def stats(self) -> dict[str, Any]:
        stats = admin.queue_stats(self.app)
        return {
            "queues": [s.to_dict() for s in stats],
            "totals": admin.totals(stats),
            "nodes": admin.live_node_count(self.app),
        }


def _error_body(exc: HttpError) -> bytes:
    out: dict[str, Any] = {"error": exc.message}
    if exc.field is not None:
        out["field"] = exc.field
    out.update(exc.extra)
    return json.dumps(out).encode()


class _ApiHandler(BaseHTTPRequestHandler):
    api: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = "jobq"

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json", **headers: str) -> None:
        if not getattr(self, "_body_read", False) and self.headers.get("Content-Length", "0").strip() not in (
            "",
            "0",
        ):
            # A request body we did not read would be parsed as the next request: close instead.
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, **headers: str) -> None:
        self._send(status, json.dumps(data, default=str).encode(), **headers)

    def _authorized(self, path: str) -> bool:
        token = self.api.token
        if token is None or path in ("/health", "/metrics", "/openapi.json"):
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)

    def _read_json(self) -> Any:
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            self.close_connection = True
            raise HttpError(415, "Content-Type must be application/json", "Content-Type")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(411, "send a Content-Length (chunked bodies are not accepted)", "Content-Length")
        length_s = self.headers.get("Content-Length")
        if length_s is None or not length_s.strip().isdigit():
            self.close_connection = True
            raise HttpError(411, "Content-Length required", "Content-Length")
        length = int(length_s)
        if length > self.api.max_body:
            # Refused without reading it: the connection is closed after the answer.
            self.close_connection = True
            raise HttpError(413, f"body: {length} bytes is over the {self.api.max_body}-byte limit", "body")
        raw = self.rfile.read(length)
        self._body_read = True
        if len(raw) < length:
            self.close_connection = True
            raise HttpError(400, "body: shorter than its Content-Length", "body")
        try:
            return strict_json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"body: not valid JSON: {exc}", "body") from None

    def _route(self, method: str) -> None:
        started = time.monotonic()
        self._body_read = False
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        status = 500
        try:
            if not self._authorized(path):
                raise HttpError(401, "missing or wrong bearer token", "Authorization")
            status = self._dispatch(method, path, query)
        except HttpError as exc:
            status = exc.status
            headers = {"Retry_After": str(RETRY_AFTER)} if status == 503 else {}
            if status == 405:
                headers["Allow"] = str(exc.extra.get("allow", ""))
            if status == 401:
                headers["WWW_Authenticate"] = 'Bearer realm="jobq"'
            self._send(status, _error_body(exc), **headers)
        except errors.QueueFull as exc:
            status = 503
            body = {"error": str(exc), "field": "queue", "queue": exc.queue, "limit": exc.limit}
            self._json(503, body, Retry_After=str(RETRY_AFTER))
        except errors.InvalidInput as exc:
            status = 400
            self._json(400, {"error": str(exc), "field": exc.field})
        except errors.JobNotFound as exc:
            status = 404
            self._json(404, {"error": str(exc), "field": "id"})
        except errors.JobNotCancellable as exc:
            status = 409
            self._json(409, {"error": str(exc), "field": "id"})
        except (
            errors.RedisUnavailable,
            errors.RedisBusy,
            errors.RedisOutOfMemory,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        ) as exc:
            status = 503
            self._json(503, {"error": clients.redact(str(exc))}, Retry_After=str(RETRY_AFTER))
        except Exception as exc:
            status = 500
            log.exception("%s %s failed", method, path)
            self._json(500, {"error": f"internal error: {type(exc).__name__}"})
        finally:
            log.info("%s %s -> %d (%.1f ms)", method, path, status, (time.monotonic() - started) * 1000)

    def _dispatch(self, method: str, path: str, query: dict[str, str]) -> int:
        api = self.api
        if path == "/jobs":
            if method == "POST":
                status, data = api.post_jobs(self._read_json())
                loc = {"Location": f"/jobs/{data['id']}"} if "id" in data else {}
                self._json(status, data, **loc)
                return status
            self._allow(method, "GET, POST")
            self._json(200, api.get_jobs(query))
            return 200
        if path.startswith("/jobs/") and path.count("/") == 2:
            job_id = unquote(path[len("/jobs/") :])
            if method == "DELETE":
                self._json(200, api.delete_job(job_id, query))
                return 200
            self._allow(method, "GET, DELETE")
            self._json(200, api.get_job(job_id, query))
            return 200
        if path == "/stats":
            self._allow(method, "GET")
            self._json(200, api.stats())
            return 200
        if path == "/health":
            self._allow(method, "GET")
            ok, detail = api.health()
            status = 200 if ok else 503
            self._json(status, {"status": "ok" if ok else "unhealthy", "detail": detail})
            return status
        if path == "/metrics":
            self._allow(method, "GET")
            from prometheus_client.exposition import CONTENT_TYPE_LATEST

            self._send(200, api.metrics.exposition(), CONTENT_TYPE_LATEST)
            return 200
        if path == "/openapi.json":
            self._allow(method, "GET")
            self._send(200, api.openapi_bytes())
            return 200
        raise HttpError(404, f"no route {path}", "path")

    def _allow(self, method: str, allowed: str) -> None:
        if method not in allowed.split(", ") and not (method == "HEAD" and "GET" in allowed):
            raise HttpError(405, f"{method} not allowed here (allowed: {allowed})", "method", allow=allowed)

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        # Routes are logged by _route (method, path, status, time; never headers or bodies).
        pass
