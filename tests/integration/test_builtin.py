"""Built-in tasks against local servers: ``webhook`` against an http.server, ``email`` against a
tiny SMTP sink written here; then both end to end through a burst worker on a real redis-server."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import shutil
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from jobq import Fail, JobQ, Retry, builtin
from jobq.builtin import EmailError, WebhookError, send_email, webhook
from jobq.worker import Worker, WorkerConfig
from tests.harness.redis_server import free_port

pytestmark = [pytest.mark.integration]

SECRET_HEADER = "Bearer hook-s3cret-value"
SMTP_PASSWORD = "smtp-pa55word-value"


# -- a local HTTP endpoint --------------------------------------------------------------------------
class Hook:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hook.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                path = self.path.split("?")[0]
                status, extra = 200, {}
                if path.startswith("/status/"):
                    status = int(path.rsplit("/", 1)[1])
                if status == 429:
                    extra["Retry-After"] = "7"
                if path == "/slow":
                    hook.release.wait(10)
                reply = b'{"ok": true}'
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                try:
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def test_webhook_2xx_sends_json_and_headers(hook: Hook) -> None:
    out = webhook(f"{hook.url}/ok?x=1", headers={"Authorization": SECRET_HEADER}, json={"id": 7})
    assert out["status"] == 200 and json.loads(out["body"]) == {"ok": True}
    (req,) = hook.requests
    assert req["method"] == "POST" and req["path"] == "/ok?x=1"
    assert req["headers"]["Authorization"] == SECRET_HEADER
    assert req["headers"]["Content-Type"] == "application/json"
    assert json.loads(req["body"]) == {"id": 7}
    out = webhook(f"{hook.url}/put", method="put", body="plain text")
    assert out["status"] == 200 and hook.requests[1]["method"] == "PUT"
    assert hook.requests[1]["body"] == b"plain text"


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_webhook_5xx_retries(hook: Hook, status: int) -> None:
    with pytest.raises(WebhookError, match=f"HTTP {status}"):
        webhook(f"{hook.url}/status/{status}", headers={"Authorization": SECRET_HEADER})


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422, 301])
def test_webhook_other_4xx_fails_without_retry(hook: Hook, status: int) -> None:
    with pytest.raises(Fail, match=f"HTTP {status}") as exc:
        webhook(f"{hook.url}/status/{status}", headers={"Authorization": SECRET_HEADER})
    assert "s3cret" not in str(exc.value)


def test_webhook_429_honours_retry_after(hook: Hook) -> None:
    with pytest.raises(Retry) as exc:
        webhook(f"{hook.url}/status/429")
    assert exc.value.delay == 7


def test_webhook_timeout_and_refused_connection_retry(hook: Hook) -> None:
    started = time.monotonic()
    with pytest.raises(WebhookError, match="timed out"):
        webhook(f"{hook.url}/slow", timeout=0.3)
    assert time.monotonic() - started < 5
    hook.release.set()
    with pytest.raises(WebhookError):
        webhook(f"http://127.0.0.1:{free_port()}/x", timeout=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "ftp://example.com/"},
        {"url": "not a url"},
        {"url": "http://h/", "method": "TRACE"},
        {"url": "http://h/", "headers": {"X": "a\r\nInjected: 1"}},
        {"url": "http://h/", "body": "a", "json": {}},
        {"url": "http://h/", "timeout": 0},
    ],
)
def test_webhook_bad_arguments_fail_without_retry(kwargs: dict[str, Any]) -> None:
    with pytest.raises(Fail):
        webhook(**kwargs)


def test_webhook_error_hides_credentials_in_the_url(hook: Hook) -> None:
    with pytest.raises(Fail) as exc:
        webhook(f"http://user:pw-secret@127.0.0.1:{hook.url.rsplit(':', 1)[1]}/status/404?token=qs-secret")
    assert "pw-secret" not in str(exc.value) and "qs-secret" not in str(exc.value)
    assert (
        hook.requests[0]["headers"]["Authorization"]
        == "Basic " + base64.b64encode(b"user:pw-secret").decode()
    )


# -- a local SMTP sink -------------------------------------------------------------------------------
class SmtpSink(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(
        self, user: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.messages: list[dict[str, Any]] = []
        self.user, self.password = user, password
        self.tls = tls
        self.tls_sessions = 0
        self.reject: dict[str, str] = {}
        super().__init__(("127.0.0.1", 0), _SmtpHandler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _SmtpHandler(socketserver.StreamRequestHandler):
    """Just enough ESMTP for smtplib: EHLO, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    server: SmtpSink

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        try:
            self.session()
        finally:
            if isinstance(self.request, ssl.SSLSocket):  # socketserver closes only the plain one
                self.rfile.close()
                self.wfile.close()
                self.request.close()

    def ehlo(self) -> None:
        self.reply("250-sink")
        if self.server.tls is not None and not isinstance(self.request, ssl.SSLSocket):
            self.reply("250-STARTTLS")
        if self.server.user is not None:
            self.reply("250-AUTH PLAIN")
        self.reply("250 SIZE 1000000")

    def auth(self, line: str) -> bool:
        parts = line.split(" ")
        token = parts[2] if len(parts) > 2 else ""
        if not token:
            self.reply("334 ")
            token = self.rfile.readline().decode().strip()
        _, user, pw = base64.b64decode(token).decode().split("\0")
        ok = (user, pw) == (self.server.user, self.server.password)
        self.reply("235 ok" if ok else "535 5.7.8 authentication failed")
        return ok

    def starttls(self) -> bool:
        assert self.server.tls is not None
        self.reply("220 go ahead")
        try:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError):
            return False  # the client refused our certificate
        self.server.tls_sessions += 1
        self.rfile = self.request.makefile("rb")
        self.wfile = self.request.makefile("wb", buffering=0)
        return True

    def data(self) -> bytes:
        self.reply("354 end with .")
        lines = []
        while True:
            chunk = self.rfile.readline()
            if chunk in (b".\r\n", b""):
                break
            lines.append(chunk[1:] if chunk.startswith(b"..") else chunk)
        return b"".join(lines)

    def session(self) -> None:
        authed = self.server.user is None
        sender, rcpts = "", []
        self.reply("220 sink ESMTP")
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self.ehlo()
            elif verb == "STARTTLS" and self.server.tls is not None:
                if not self.starttls():
                    return
            elif verb == "HELO":
                self.reply("250 sink")
            elif verb == "AUTH":
                authed = self.auth(line)
            elif verb == "MAIL":
                if not authed:
                    self.reply("530 5.7.0 authentication required")
                    continue
                sender, rcpts = line.split(":", 1)[1].strip().split(" ")[0].strip("<>"), []
                self.reply("250 ok")
            elif verb == "RCPT":
                addr = line.split(":", 1)[1].strip().strip("<>")
                if addr in self.server.reject:
                    self.reply(self.server.reject[addr])
                else:
                    rcpts.append(addr)
                    self.reply("250 ok")
            elif verb == "DATA":
                data = self.data()
                self.server.messages.append({"from": sender, "to": rcpts, "data": data.decode()})
                self.reply("250 queued")
            elif verb in ("RSET", "NOOP"):
                self.reply("250 ok")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not implemented")


@pytest.fixture
def smtp(monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpSink]:
    sink = SmtpSink(user="mailer", password=SMTP_PASSWORD)
    monkeypatch.setenv("JOBQ_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("JOBQ_SMTP_PORT", str(sink.port))
    monkeypatch.setenv("JOBQ_SMTP_USER", "mailer")
    monkeypatch.setenv("JOBQ_SMTP_PASSWORD", SMTP_PASSWORD)
    monkeypatch.setenv("JOBQ_SMTP_TLS", "none")
    monkeypatch.setenv("JOBQ_SMTP_FROM", "jobq@example.com")
    monkeypatch.setenv("JOBQ_SMTP_TIMEOUT", "5")
    yield sink
    sink.close()


def test_email_is_sent_with_login(smtp: SmtpSink) -> None:
    out = send_email(
        ["a@example.com", "b@example.com"], "Hello", "Body line\n.leading dot", cc="c@example.com"
    )
    assert out["accepted"] == ["a@example.com", "b@example.com", "c@example.com"]
    (msg,) = smtp.messages
    assert msg["from"] == "jobq@example.com"
    assert msg["to"] == ["a@example.com", "b@example.com", "c@example.com"]
    assert "Subject: Hello" in msg["data"] and "To: a@example.com, b@example.com" in msg["data"]
    assert "\n.leading dot" in msg["data"]
    assert out["message_id"] in msg["data"]


def test_email_wrong_password_retries_without_echoing_it(
    smtp: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBQ_SMTP_PASSWORD", "wrong-pa55word")
    with pytest.raises(EmailError, match="535") as exc:
        send_email("a@example.com", "s", "b")
    assert "pa55word" not in str(exc.value)
    assert smtp.messages == []


def test_email_refused_recipient_fails_and_temporary_refusal_retries(smtp: SmtpSink) -> None:
    smtp.reject["gone@example.com"] = "550 5.1.1 no such user"
    smtp.reject["busy@example.com"] = "451 4.3.0 try later"
    with pytest.raises(Fail, match=r"gone@example\.com"):
        send_email("gone@example.com", "s", "b")
    with pytest.raises(EmailError, match=r"busy@example\.com"):
        send_email("busy@example.com", "s", "b")
    assert smtp.messages == []


def test_email_server_down_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("JOBQ_SMTP_PORT", str(free_port()))
    monkeypatch.setenv("JOBQ_SMTP_FROM", "jobq@example.com")
    with pytest.raises(EmailError):
        send_email("a@example.com", "s", "b")


@pytest.fixture
def tls_smtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SmtpSink, Path]]:
    """A STARTTLS sink with a self-signed certificate for 127.0.0.1 (made with openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    sink = SmtpSink(user="mailer", password=SMTP_PASSWORD, tls=ctx)
    for name, value in {
        "JOBQ_SMTP_HOST": "127.0.0.1",
        "JOBQ_SMTP_PORT": str(sink.port),
        "JOBQ_SMTP_USER": "mailer",
        "JOBQ_SMTP_PASSWORD": SMTP_PASSWORD,
        "JOBQ_SMTP_TLS": "starttls",
        "JOBQ_SMTP_FROM": "jobq@example.com",
        "JOBQ_SMTP_TIMEOUT": "5",
    }.items():
        monkeypatch.setenv(name, value)
    yield sink, cert
    sink.close()


def test_email_over_starttls_verifies_the_certificate(
    tls_smtp: tuple[SmtpSink, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, cert = tls_smtp
    # Not trusted (no CA given): refused before any credential is sent, and retried.
    with pytest.raises(EmailError, match="CERTIFICATE_VERIFY_FAILED"):
        send_email("a@example.com", "s", "b")
    assert sink.messages == []
    monkeypatch.setenv("JOBQ_SMTP_CA_FILE", str(cert))
    send_email("a@example.com", "over tls", "b")
    assert sink.tls_sessions == 1
    (msg,) = sink.messages
    assert "Subject: over tls" in msg["data"]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("not-an-address", "s", "b"), {}),
        ((["a@example.com"], "two\nlines", "b"), {}),
        ((["a@example.com\r\nBcc: x@y.z"], "s", "b"), {}),
        (([], "s", "b"), {}),
    ],
)
def test_email_bad_arguments_fail_without_retry(
    smtp: SmtpSink, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(Fail):
        send_email(*args, **kwargs)
    assert smtp.messages == []


# -- end to end through a worker ------------------------------------------------------------------------
def test_builtin_tasks_through_a_worker(
    redis_url: str, r: redis.Redis, hook: Hook, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    app = JobQ(redis_url)
    builtin.register(app)
    assert {"webhook", "email"} <= set(app.tasks)
    headers = {"Authorization": SECRET_HEADER}
    ok = app.enqueue("webhook", kwargs={"url": f"{hook.url}/ok", "json": {"n": 1}, "headers": headers})
    gone = app.enqueue("webhook", kwargs={"url": f"{hook.url}/status/404", "headers": headers})
    down = app.enqueue("webhook", kwargs={"url": f"{hook.url}/status/503", "headers": headers})
    mail = app.enqueue("email", kwargs={"to": "ops@example.com", "subject": "hi", "body": "text"})
    caplog.set_level(logging.DEBUG)
    asyncio.run(Worker(app, WorkerConfig(queues=[("default", 1)], burst=True, concurrency=4)).run())
    try:
        assert ok.result(timeout=5) == {"status": 200, "body": '{"ok": true}'}
        assert mail.result(timeout=5)["accepted"] == ["ops@example.com"]
        assert len(smtp.messages) == 1
        info = gone.info()
        assert (info.state.value, info.attempts) == ("dead", 1)
        assert "HTTP 404" in (info.error or "")
        info = down.info()
        assert (info.state.value, info.attempts, info.max_attempts) == ("scheduled", 1, 5)
        assert "HTTP 503" in (info.error or "")
        # No secret in any log line or in anything stored in Redis besides the job's own payload.
        assert "s3cret" not in caplog.text and SMTP_PASSWORD not in caplog.text
        assert "failed" in caplog.text  # the failures were logged
        for key in r.keys("*"):
            if r.type(key) == b"hash":
                fields = r.hgetall(key)
                # The payload, and its 64-byte parts p2..p<k> when it is longer (data-model.md).
                for name in [b"payload", *(f for f in fields if re.fullmatch(rb"p\d+", f))]:
                    fields.pop(name, None)
                assert b"s3cret" not in b"".join(fields.values())
    finally:
        app.close()


def test_register_keeps_an_app_task_of_the_same_name(redis_url: str) -> None:
    app = JobQ(redis_url)

    @app.task(name="webhook")
    def my_webhook() -> str:
        return "mine"

    builtin.register(app)
    assert app.tasks["webhook"].fn is my_webhook.fn
    assert app.tasks["email"].fn is send_email
    app.close()
