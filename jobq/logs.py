"""Logging setup for jobq's processes: text or JSON lines, with secrets redacted.

``configure(fmt="text"|"json", level="INFO")`` installs one handler on the root logger (calling it
again replaces that handler, never stacks a second one). Both formats carry the job fields a
caller passes through ``extra=`` (``job_id``, ``task``, ``queue``, ``attempt``, ``error``, and
``node``, ``outcome``, ``delay_s``)::

    log.warning("job failed", extra={"job_id": j.id, "task": j.task, "queue": j.queue,
                                     "attempt": 2, "error": "ValueError: bad"})

JSON: one object per line with ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``, ``message``,
the job fields that were given, and ``exc`` (the traceback) when there is one.

Every record that reaches the handler passes :class:`RedactingFilter` first, whatever logger it
came from (handler filters apply to propagated records; logger filters would not): passwords in
URLs (``redis://user:***@host``), ``Authorization``/``Proxy-Authorization`` values, ``Bearer``
tokens, ``password=``-style pairs, and the literal values of ``JOBQ_SMTP_PASSWORD``,
``JOBQ_HTTP_TOKEN`` and the password in ``JOBQ_REDIS_URL`` are replaced with ``***``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from jobq.storage.clients import redact as redact_urls

#: The ``extra=`` fields both formats show, in this order.
JOB_FIELDS = ("job_id", "task", "queue", "attempt", "error", "node", "outcome", "delay_s")
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Environment variables whose values are secrets wherever they appear.
SECRET_ENV = ("JOBQ_SMTP_PASSWORD", "JOBQ_HTTP_TOKEN")

_MASK = "***"
_HEADER_RE = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]key|cookie)(\W{0,3}\s*[:=]\s*['\"]?)"
    r"([^'\"\r\n,}]+)"
)
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic|token)(\s+)([A-Za-z0-9._~+/=-]{4,})")
_PAIR_RE = re.compile(r"(?i)\b(password|passwd|pwd|secret)(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}&]+)")
#: Words one of the patterns above (or a URL's password, or ``sentinel_password``) needs to
#: match: a text holding none of them skips those substitutions. Most lines (``jobq serve``'s
#: access line for each request) hold none, and plain ``in`` tests on the lowered text cost a
#: tenth of a case-insensitive regex search.
_SECRET_WORDS = (
    "://", "authorization", "api-key", "api_key", "cookie", "bearer", "basic", "token", "passw", "pwd",
    "secret",
)  # fmt: skip


def _could_hold_secret(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in _SECRET_WORDS)


_extra_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_MAX_EXTRA_SECRETS = 256


def add_secret(value: str | None) -> None:
    """Redact this literal value from every log record from now on (short values are ignored:
    masking every "a" would destroy the logs). Bounded; for process-wide secrets."""
    if value and len(value) >= 4:
        with _secrets_lock:
            if len(_extra_secrets) < _MAX_EXTRA_SECRETS:
                _extra_secrets.add(value)


#: The last answer of :func:`_env_secrets` and what it was computed from: every log record asks
#: (``jobq serve`` logs a line per request), and parsing the URL and sorting cost a fifth of the
#: redaction each time. The environment is still read per record, so a change is seen at once.
_env_cache: tuple[tuple[Any, ...], int, list[str]] | None = None


_ENV_NAMES = (*SECRET_ENV, "JOBQ_REDIS_URL")
#: ``os.environ``'s own store (encoded names to encoded values; every change to ``os.environ``
#: lands there), read without the encode and decode ``os.environ.get`` makes for each of three
#: names on every record (more than half of the redaction of an access line). Absent on an
#: interpreter whose ``os.environ`` is built differently: then ``os.environ.get``.
_environ = os.environ
_environ_data: dict[Any, Any] | None = getattr(_environ, "_data", None)
try:
    _ENV_KEYS: tuple[Any, ...] = tuple(os.environ.encodekey(n) for n in _ENV_NAMES)
except AttributeError:  # pragma: no cover - not CPython's os._Environ
    _environ_data = None
    _ENV_KEYS = ()


def _env_raw() -> tuple[Any, ...]:
    data = _environ_data
    if data is not None and os.environ is _environ:  # (a test may swap os.environ for a dict)
        return tuple([data.get(k) for k in _ENV_KEYS])
    return tuple([os.environ.get(n) for n in _ENV_NAMES])


def _env_secrets() -> list[str]:
    global _env_cache
    key = _env_raw()
    n_extra = len(_extra_secrets)  # only grows (add_secret), so its size tells a change
    cached = _env_cache
    if cached is not None and cached[0] == key and cached[1] == n_extra:
        return cached[2]
    raw = tuple(os.environ.get(name, "") for name in _ENV_NAMES)
    found = _compute_env_secrets(raw)
    _env_cache = (key, n_extra, found)
    return found


def _compute_env_secrets(raw: tuple[str, ...]) -> list[str]:
    out = list(raw[:-1])
    url = raw[-1]
    if url:
        try:
            out.append(unquote(urlsplit(url).password or ""))
        except ValueError:
            pass
        # Unparsed too: a password holding an unencoded '/' or '#' ends where the last '@' is.
        rest = url.partition("://")[2]
        if "@" in rest:
            out.append(rest[: rest.rfind("@")].partition(":")[2])
    with _secrets_lock:
        out.extend(_extra_secrets)
    # Longest first, so a secret containing another is masked whole.
    return sorted((s for s in out if len(s) >= 4), key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every secret jobq knows of replaced by ``***``."""
    if _could_hold_secret(text):
        text = redact_urls(text)
        text = _HEADER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)
        text = _BEARER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)
        text = _PAIR_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)
    for secret in _env_secrets():
        text = text.replace(secret, _MASK)
    return text


class RedactingFilter(logging.Filter):
    """Renders each record's message once, redacted, and redacts its job fields and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the raw template
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        for name in ("error", "url"):
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            # The formatter would render exc_info again, unredacted: keep only the text.
            record.exc_info = None
        return True


def _job_fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in JOB_FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            out[name] = value
    return out


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z WARNING jobq.worker: message job_id=... task=...``: the job
    fields the message does not already show, once each."""

    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    #: The last second rendered and its text: ``strftime`` once a second, not once a line.
    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        sec = int(record.created)
        if sec != self._second[0]:
            self._second = (sec, super().formatTime(record, datefmt))
        return f"{self._second[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        # ``logging.Formatter.format`` for this one format string, without the generic
        # ``%``-style rendering through the record's ``__dict__`` (a line per request in
        # ``jobq serve``): the same text.
        record.message = message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = f"{record.asctime} {record.levelname} {record.name}: {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}" if line[-1:] != "\n" else line + record.exc_text
        if record.stack_info:
            stack = self.formatStack(record.stack_info)
            line = f"{line}\n{stack}" if line[-1:] != "\n" else line + stack
        fields = _job_fields(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")
        # One set of fields per line: a field the message already shows (``task=X`` in
        # "job J failed: task=X ...", or the id in "job J ...") is not appended again.
        extras = " ".join(
            f"{k}={v!r}" if k == "error" else f"{k}={v}"
            for k, v in fields.items()
            if f"{k}=" not in message and not (k == "job_id" and f"job {v}" in message)
        )
        return f"{head} {extras}{sep}{tail}" if extras else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job fields, exc."""

    #: The last second rendered and its text (see :class:`TextFormatter`).
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        sec = int(record.created)
        if sec != self._second[0]:
            self._second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
        out: dict[str, Any] = {
            "time": f"{self._second[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_job_fields(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


_handler: logging.Handler | None = None


def configure(fmt: str = "text", level: str = "INFO", *, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (default stderr) as ``fmt`` lines at ``level`` and
    above, redacted. Replaces the handler an earlier call installed. Returns the handler."""
    global _handler
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format: {fmt!r} is not one of {', '.join(FORMATS)}")
    lvl = level.upper()
    if lvl not in LEVELS:
        raise ValueError(f"log level: {level!r} is not one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(lvl)
    _handler = handler
    return handler
