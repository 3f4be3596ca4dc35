"""Serving the ASGI application with uvicorn: one process, one event loop, bounded everything.

What the server adds to the application: a listen backlog sized for bursts of connects, a cap on
open connections (beyond it uvicorn answers 503), a deadline on each request's headers (a client
trickling bytes is answered 408 and cut off; the application bounds the body the same way), a
keep-alive idle timeout, ``TCP_NODELAY`` on every connection (no 40 ms Nagle/delayed-ACK stall on
keep-alive requests) and a ``Server`` header that names no versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from typing import Any, cast

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from jobq.app import JobQ
from jobq.metrics import Metrics
from jobq.web.api import DEFAULT_MAX_BODY, REQUEST_TIMEOUT, RETRY_AFTER, ApiApp

log = logging.getLogger("jobq.http")

#: Pending connects the kernel queues before accept (the stdlib server's 5 reset bursts).
BACKLOG = 2048
#: Open connections served at once; more are answered 503 and closed.
MAX_CONNECTIONS = 2000
#: Seconds an idle keep-alive connection is kept.
KEEP_ALIVE = 30


#: The methods some route answers: the ``Allow`` of a 405 for a method the parser does not know.
ALL_METHODS = "GET, HEAD, POST, DELETE"


def _raw_reply(status: str, error: dict[str, str], *extra: bytes) -> bytes:
    """A JSON error written by the protocol itself (the application never saw the request)."""
    body = json.dumps(error).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n".encode()
        + b"".join(h + b"\r\n" for h in extra)
        + b"connection: close\r\nserver: jobq\r\n\r\n"
        + body
    )


def _timeout_reply() -> bytes:
    err = {"error": "request not received within the deadline", "field": "headers"}
    return _raw_reply("408 Request Timeout", err)


class _CoalescingTransport:
    """A transport whose writes in one turn of the event loop leave in one ``send``: uvicorn
    writes a response's head and body separately, and with ``TCP_NODELAY`` each write was a
    packet of its own (and a system call, and a wake-up of the client)."""

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buf: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._buf:
            self._loop.call_soon(self.flush)
        self._buf.append(data)

    def flush(self) -> None:
        if self._buf:
            data = b"".join(self._buf)
            self._buf.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline from a request's first byte (or the
    connection's opening) to the end of its headers."""

    header_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    #: One timer per connection, not one per request: arming sets ``_header_deadline`` (and
    #: starts the timer only if none is pending), disarming clears the deadline and leaves the
    #: timer; when it fires it expires the request, is set again for a later deadline, or ends.
    _header_timer: asyncio.TimerHandle | None = None
    _header_deadline: float | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.transport = cast(asyncio.Transport, _CoalescingTransport(transport, self.loop))
        with contextlib.suppress(OSError, AttributeError):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def data_received(self, data: bytes) -> None:
        unset = getattr(self, "_unset_keepalive_if_required", None)
        if unset is not None:
            unset()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            err = {"error": f"method not allowed (allowed: {ALL_METHODS})", "field": "method"}
            self._refuse(_raw_reply("405 Method Not Allowed", err, b"allow: " + ALL_METHODS.encode()))
        except httptools.HttpParserUpgrade:
            # No WebSockets or h2c here: the request was answered as plain HTTP/1.1.
            pass
        except httptools.HttpParserError as exc:
            self._refuse(
                _raw_reply("400 Bad Request", {"error": f"malformed HTTP request: {exc}", "field": ""})
            )

    def _refuse(self, reply: bytes) -> None:
        self._stop_timer()
        if not self.transport.is_closing():
            self.transport.write(reply)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm()
        # Over the cap (open connections, this one included, or requests in progress): this
        # request is answered 503 in JSON with Retry-After, and its connection closed.
        if len(self.connections) > self.max_connections or len(self.tasks) >= self.max_connections:
            app, self.app = self.app, _over_capacity
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # The response whole: it leaves now, not after the callbacks queued meanwhile (when a
        # round trip answers several requests at once, the others' replies and access lines).
        flush = getattr(self.transport, "flush", None)
        if flush is not None:
            flush()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_deadline is not None:
            return
        self._header_deadline = deadline = self.loop.time() + self.header_timeout
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(deadline, self._expired)

    def _disarm(self) -> None:
        self._header_deadline = None

    def _stop_timer(self) -> None:
        self._header_deadline = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:  # disarmed since: nothing to time
            return
        if deadline > self.loop.time():  # re-armed for a later request: wait for its deadline
            self._header_timer = self.loop.call_at(deadline, self._expired)
            return
        self._header_deadline = None
        if self.transport.is_closing():
            return
        # A request in progress whose headers are complete is the application's to bound.
        if self.cycle is not None and not self.cycle.response_complete:
            return
        self.transport.write(_timeout_reply())
        self.transport.close()


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    body = json.dumps({"error": "too many connections: try again later", "field": "connection"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _protocol(header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    attrs = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("DeadlineProtocol", (_DeadlineProtocol,), attrs)


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is not on every platform
        return "asyncio"
    return "uvloop"


class ApiServer:
    """The API on ``host:port`` (``port=0`` picks a free one; see ``.port``), served by uvicorn.
    ``serve_forever()`` blocks (SIGINT/SIGTERM stop it); ``start()`` runs it on a daemon thread;
    ``close()`` stops it. The socket is bound on construction (an ``OSError`` if it cannot be)."""

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
        backlog: int = BACKLOG,
        max_connections: int = MAX_CONNECTIONS,
        ui: bool = False,
        read_only: bool = False,
    ) -> None:
        self.app = app
        self.api = ApiApp(
            app,
            token=token,
            max_body=max_body,
            metrics=metrics,
            request_timeout=request_timeout,
            ui=ui,
            read_only=read_only,
        )
        self.metrics = self.api.metrics
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            self.api.close()
            raise
        self.sock.setblocking(False)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.config = uvicorn.Config(
            self.api,
            http=_protocol(request_timeout, max_connections),
            loop=_loop(),
            lifespan="off",
            proxy_headers=False,  # the client address is the peer's; no X-Forwarded-* trust
            log_config=None,
            access_log=False,
            server_header=False,
            headers=[("server", "jobq")],
            backlog=backlog,
            limit_concurrency=None,  # the protocol caps connections (a JSON 503, not uvicorn's text)
            timeout_keep_alive=KEEP_ALIVE,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or ``close()``."""
        self.server.run(sockets=[self.sock])

    def start(self) -> ApiServer:
        """Serve on a daemon thread (uvicorn leaves signals alone off the main thread)."""
        self._thread = threading.Thread(target=self.serve_forever, name="jobq-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()
        self.api.close()

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
