"""Built-in tasks usable with no user code: ``webhook`` and ``email``.

``register(app)`` registers them on ``app`` under the names ``webhook`` and ``email`` (a task the
app already has under either name is left alone). ``jobq worker`` calls it for every app it runs,
so a shell or HTTP client can enqueue them::

    jobq enqueue webhook --kwargs '{"url": "https://example.com/hook", "json": {"id": 1}}'
    jobq enqueue email --kwargs '{"to": "ops@example.com", "subject": "hi", "body": "..."}'

Both use the standard library only (``urllib.request``, ``smtplib``): one request or one message
per job needs no connection pool, and nothing is added to jobq's dependencies.

Outcomes follow jobq's retry policy: a raised exception retries with backoff until the job's
attempts run out, :class:`jobq.Fail` dead-letters at once, :class:`jobq.Retry` retries after a
given delay.

Secrets: request headers and the SMTP password are never logged, never put in an error message
and never stored in a result; errors name the URL without its credentials or query string.
"""

from __future__ import annotations

import base64
import email.utils
import inspect
import json as jsonlib
import logging
import os
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from jobq.app import JobQ, Validator
from jobq.errors import Fail, InvalidArguments, Retry

log = logging.getLogger("jobq.builtin")

WEBHOOK_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
#: 4xx answers that are worth retrying: request timeout, too early, rate limited.
WEBHOOK_RETRY_4XX = (408, 425, 429)
#: Most of the response body kept as the job's result.
MAX_RESULT_BODY = 4096
DEFAULT_WEBHOOK_TIMEOUT = 10.0
#: Job-level defaults for the built-in tasks.
MAX_ATTEMPTS = 5
RETRY_BACKOFF = 2.0


class WebhookError(Exception):
    """A webhook attempt that should be retried (5xx, timeout, connection failure)."""


class EmailError(Exception):
    """An email attempt that should be retried (connection failure, 4xx SMTP reply)."""


def _safe_url(url: str) -> str:
    """The URL without user info, query or fragment: what logs and errors may show."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx answer is returned as an HTTPError and judged like any other


_opener = urllib.request.build_opener(_NoRedirect)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, min(3600.0, float(value)))
    except ValueError:
        return None


def _request_parts(
    url: str, headers: Mapping[str, str] | None, body: str | None, json: Any
) -> tuple[str, dict[str, str], bytes | None]:
    """The URL (without credentials), headers and body bytes of a webhook request."""
    hdrs = dict(headers or {})
    data: bytes | None = None
    if json is not None:
        data = jsonlib.dumps(json, separators=(",", ":")).encode()
        if not any(k.lower() == "content-type" for k in hdrs):
            hdrs["Content-Type"] = "application/json"
    elif body is not None:
        if not isinstance(body, str):
            raise Fail("webhook: body must be a string (use json for structured data)")
        data = body.encode()
    hdrs.setdefault("User-Agent", "jobq-webhook")
    parts = urlsplit(url)
    if parts.username is not None:
        # urllib does not take credentials from the URL: send them as Basic auth.
        if not any(k.lower() == "authorization" for k in hdrs):
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            hdrs["Authorization"] = "Basic " + base64.b64encode(cred).decode()
        url = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url, hdrs, data


def _url_ok(url: object) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # unbalanced IPv6 brackets, a port that is not a number
        return False


def webhook_problem(url: Any, method: Any, headers: Any, body: Any, json: Any, timeout: Any) -> str | None:
    """What is wrong with these webhook arguments (None: nothing). Checked at enqueue (so a bad
    job is refused, not dead-lettered) and again when the job runs."""
    if not _url_ok(url):
        return f"url must be an http(s) URL, got {_safe_url(str(url))!r}"
    if not isinstance(method, str) or method.upper() not in WEBHOOK_METHODS:
        return f"method must be one of {', '.join(WEBHOOK_METHODS)}, got {method!r}"
    if headers is not None and (
        not isinstance(headers, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        or any("\n" in k or "\r" in k or "\n" in v or "\r" in v for k, v in headers.items())
    ):
        return "headers must map strings to strings without line breaks"
    if body is not None and json is not None:
        return "give body or json, not both"
    if body is not None and not isinstance(body, str):
        return "body must be a string (use json for structured data)"
    if json is not None:
        try:
            jsonlib.dumps(json, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return f"json must be JSON data ({exc})"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 600:
        return f"timeout must be a number of seconds in (0, 600], got {timeout!r}"
    return None


def webhook(
    url: str,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    body: str | None = None,
    json: Any = None,
    timeout: float = DEFAULT_WEBHOOK_TIMEOUT,
) -> dict[str, Any]:
    """Make one HTTP request. 2xx succeeds (the result is ``{"status", "body"}``, the body cut
    to 4 KiB); 5xx, 408/425/429, timeouts and connection errors retry (429/503 honour
    ``Retry-After``); any other answer (other 4xx, 3xx) fails without retry. ``json`` sends a JSON
    body with ``Content-Type: application/json``; ``body`` sends text as is. Redirects are not
    followed. Credentials in the URL (``https://user:pw@host/``) are sent as Basic auth."""
    problem = webhook_problem(url, method, headers, body, json, timeout)
    if problem is not None:
        raise Fail(f"webhook: {problem}")
    safe = _safe_url(url)
    m = str(method).upper()
    url, hdrs, data = _request_parts(url, headers, body, json)
    req = urllib.request.Request(url, data=data, headers=hdrs, method=m)
    try:
        with _opener.open(req, timeout=float(timeout)) as resp:
            status = int(resp.status)
            text = resp.read(MAX_RESULT_BODY).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
        exc.close()
        if status >= 500 or status in WEBHOOK_RETRY_4XX:
            delay = _retry_after(exc.headers) if status in (429, 503) else None
            if delay is not None:
                raise Retry(delay, f"webhook {m} {safe}: HTTP {status}") from None
            raise WebhookError(f"{m} {safe}: HTTP {status}") from None
        raise Fail(f"webhook {m} {safe}: HTTP {status} (not retried)") from None
    except TimeoutError as exc:
        raise WebhookError(f"{m} {safe}: timed out after {timeout:g} s") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise WebhookError(f"{m} {safe}: timed out after {timeout:g} s") from None
        raise WebhookError(f"{m} {safe}: {exc.reason}") from None
    except (ConnectionError, OSError) as exc:
        raise WebhookError(f"{m} {safe}: {type(exc).__name__}: {exc}") from None
    log.debug("webhook %s %s -> HTTP %d", m, safe, status)
    return {"status": status, "body": text}


# -- email --------------------------------------------------------------------------------------------
def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def smtp_settings() -> dict[str, Any]:
    """The SMTP settings from the environment (read at each send, so a fix applies at once).

    ``JOBQ_SMTP_HOST`` (default localhost), ``JOBQ_SMTP_PORT`` (default 25, 587 with starttls,
    465 with ssl), ``JOBQ_SMTP_TLS`` (``none``, ``starttls`` or ``ssl``; ``true``/``false`` mean
    starttls/none), ``JOBQ_SMTP_USER`` and ``JOBQ_SMTP_PASSWORD`` (login only when a user is set),
    ``JOBQ_SMTP_FROM`` (default sender), ``JOBQ_SMTP_TIMEOUT`` (seconds, default 30),
    ``JOBQ_SMTP_CA_FILE`` (a CA bundle to verify the server's certificate with, for a private CA;
    certificates are always verified)."""
    tls = _env("JOBQ_SMTP_TLS", "none").lower()
    tls = {
        "true": "starttls",
        "1": "starttls",
        "yes": "starttls",
        "false": "none",
        "0": "none",
        "": "none",
    }.get(tls, tls)
    if tls not in ("none", "starttls", "ssl"):
        raise Fail(f"email: JOBQ_SMTP_TLS must be none, starttls or ssl, got {tls!r}")
    default_port = {"none": 25, "starttls": 587, "ssl": 465}[tls]
    try:
        port = int(_env("JOBQ_SMTP_PORT") or default_port)
        timeout = float(_env("JOBQ_SMTP_TIMEOUT") or 30)
    except ValueError:
        raise Fail("email: JOBQ_SMTP_PORT and JOBQ_SMTP_TIMEOUT must be numbers") from None
    return {
        "host": _env("JOBQ_SMTP_HOST") or "localhost",
        "port": port,
        "tls": tls,
        "user": _env("JOBQ_SMTP_USER"),
        "password": os.environ.get("JOBQ_SMTP_PASSWORD", ""),
        "sender": _env("JOBQ_SMTP_FROM"),
        "timeout": timeout,
        "ca_file": _env("JOBQ_SMTP_CA_FILE") or None,
    }


def _addresses(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (str, list, tuple)):
        raise Fail(f"email: {name} must be an email address or a list of them, got {value!r}")
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str) or "@" not in item or any(c in item for c in "\r\n"):
            raise Fail(f"email: {name} must be email addresses, got {item!r}")
        out.append(item.strip())
    return out


def email_problem(
    to: Any,
    subject: Any,
    body: Any,
    sender: Any = None,
    cc: Any = None,
    bcc: Any = None,
    reply_to: Any = None,
    html: Any = None,
) -> str | None:
    """What is wrong with these email arguments (None: nothing); the sender from the
    environment is the worker's, so only a given ``sender`` is checked here."""
    try:
        if not _addresses(to, "to"):
            return "to must name at least one address"
        for value, name in (
            (cc, "cc"),
            (bcc, "bcc"),
            (reply_to or None, "reply_to"),
            (sender or None, "sender"),
        ):
            _addresses(value, name)
    except Fail as exc:
        return str(exc).removeprefix("email: ")
    if not isinstance(subject, str) or any(c in subject for c in "\r\n"):
        return "subject must be a single line of text"
    if not isinstance(body, str):
        return "body must be text"
    if html is not None and not isinstance(html, str):
        return "html must be text"
    return None


def send_email(
    to: str | Sequence[str],
    subject: str,
    body: str,
    *,
    sender: str | None = None,
    cc: str | Sequence[str] | None = None,
    bcc: str | Sequence[str] | None = None,
    reply_to: str | None = None,
    html: str | None = None,
) -> dict[str, Any]:
    """Send one message through the SMTP server of :func:`smtp_settings`. Refused recipients,
    a refused sender or any other permanent (5xx) answer fails without retry; connection
    problems, timeouts and temporary (4xx) answers retry. Returns ``{"message_id", "accepted"}``."""
    problem = email_problem(to, subject, body, sender, cc, bcc, reply_to, html)
    if problem is not None:
        raise Fail(f"email: {problem}")
    recipients = _addresses(to, "to")
    cfg = smtp_settings()
    from_addr = sender or cfg["sender"]
    if not from_addr:
        raise Fail("email: no sender (give sender= or set JOBQ_SMTP_FROM)")
    _addresses(from_addr, "sender")
    msg = EmailMessage()
    msg["From"] = from_addr
    msg["To"] = ", ".join(recipients)
    ccs = _addresses(cc, "cc")
    if ccs:
        msg["Cc"] = ", ".join(ccs)
    if reply_to:
        msg["Reply-To"] = _addresses(reply_to, "reply_to")[0]
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain=from_addr.rsplit("@", 1)[-1] or None)
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    all_rcpts = recipients + ccs + _addresses(bcc, "bcc")
    where = f"{cfg['host']}:{cfg['port']}"
    try:
        smtp: smtplib.SMTP
        if cfg["tls"] == "ssl":
            smtp = smtplib.SMTP_SSL(
                cfg["host"],
                cfg["port"],
                timeout=cfg["timeout"],
                context=ssl.create_default_context(cafile=cfg["ca_file"]),
            )
        else:
            smtp = smtplib.SMTP(cfg["host"], cfg["port"], timeout=cfg["timeout"])
        with smtp:
            smtp.ehlo()
            if cfg["tls"] == "starttls":
                smtp.starttls(context=ssl.create_default_context(cafile=cfg["ca_file"]))
                smtp.ehlo()
            if cfg["user"]:
                smtp.login(cfg["user"], cfg["password"])
            refused = smtp.send_message(msg, from_addr=from_addr, to_addrs=all_rcpts)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = {code for code, _ in exc.recipients.values()}
        text = ", ".join(f"{addr} ({code})" for addr, (code, _) in exc.recipients.items())
        if all(400 <= c < 500 for c in codes):
            raise EmailError(f"{where}: recipients temporarily refused: {text}") from None
        raise Fail(f"email via {where}: recipients refused: {text}") from None
    except smtplib.SMTPAuthenticationError as exc:
        # Never echo the credentials; the server's code is enough. Retried: a fixed password
        # in the environment applies at the next attempt.
        raise EmailError(f"{where}: SMTP login as {cfg['user']!r} refused ({exc.smtp_code})") from None
    except smtplib.SMTPResponseException as exc:
        reply = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        if 500 <= exc.smtp_code < 600:
            raise Fail(f"email via {where}: SMTP {exc.smtp_code} {reply}") from None
        raise EmailError(f"{where}: SMTP {exc.smtp_code} {reply}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise EmailError(f"{where}: {type(exc).__name__}: {exc}") from None
    accepted = [a for a in all_rcpts if a not in refused]
    log.debug("email %s sent via %s to %d recipient(s)", msg["Message-ID"], where, len(accepted))
    return {"message_id": str(msg["Message-ID"]), "accepted": accepted}


def _validator(name: str, fn: Callable[..., Any], problem: Callable[..., str | None]) -> Validator:
    sig = inspect.signature(fn)

    def validate(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        bound = sig.bind(*args, **kwargs)  # the signature check ran first: this binds
        bound.apply_defaults()
        found = problem(**bound.arguments)
        if found is not None:
            raise InvalidArguments(f"args: {name}: {found}")

    return validate


def register(app: JobQ) -> None:
    """Register ``webhook`` and ``email`` on ``app`` (5 attempts, 2 s exponential backoff, the
    app's default queue); names the app already uses are left alone. Their arguments are
    checked at enqueue (a JSON object as a webhook ``body``, a URL that is not http(s), an
    address without ``@`` ...), so a job they would refuse is never stored."""
    if "webhook" not in app.tasks:
        t = app.task(name="webhook", max_attempts=MAX_ATTEMPTS, retry_backoff=RETRY_BACKOFF, timeout=660)(
            webhook
        )
        t.validate_args = _validator("webhook", webhook, webhook_problem)
    if "email" not in app.tasks:
        t2 = app.task(name="email", max_attempts=MAX_ATTEMPTS, retry_backoff=RETRY_BACKOFF, timeout=300)(
            send_email
        )
        t2.validate_args = _validator("email", send_email, email_problem)
