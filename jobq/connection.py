"""Building Redis clients from a URL, in one place, and keeping passwords out of sight.

Supported URLs: ``redis://[user:password@]host:port/db`` and ``rediss://`` (TLS), and
``unix://``. Every client gets socket timeouts so no call can hang on a dead peer, and a bounded
retry with jittered backoff on connection errors (a retried script call is safe: enqueue is
idempotent by job id, ack and fail are fenced by ownership).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

#: The URL used when none is given and ``JOBQ_REDIS_URL`` is unset.
DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Minimum Redis version: script flags (``#!lua flags=allow-oom``) need 7.0.
MIN_REDIS_VERSION = (7, 0, 0)

_PASSWORD_RE = re.compile(r"(?<=://)([^:@/]*):([^@/]*)@")


def default_url() -> str:
    return os.environ.get("JOBQ_REDIS_URL", DEFAULT_URL)


def redact(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    return _PASSWORD_RE.sub(lambda m: f"{m.group(1)}:***@", text)


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _common(socket_timeout: float | None, health_check_interval: int) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": health_check_interval,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
        "retry_on_error": [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    }


def sync_client(
    url: str, *, socket_timeout: float | None = 10.0, health_check_interval: int = 0, **kw: Any
) -> redis.Redis:
    """A synchronous client for ``url``."""
    opts = _common(socket_timeout, health_check_interval)
    opts.update(kw)
    return redis.Redis.from_url(url, **opts)


def async_client(
    url: str, *, socket_timeout: float | None = 10.0, health_check_interval: int = 0, **kw: Any
) -> redis.asyncio.Redis:
    """An asyncio client for ``url``."""
    opts = _common(socket_timeout, health_check_interval)
    opts["retry"] = redis.asyncio.retry.Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3)
    opts.update(kw)
    return redis.asyncio.Redis.from_url(url, **opts)


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])
