"""The Redis client's own exception and retry types, for the code above storage that must
recognise a connection failure or ask for a client that never re-sends: nothing outside
``jobq/storage/`` imports ``redis`` for these."""

from __future__ import annotations

from typing import Any

import redis.asyncio.retry
import redis.backoff
import redis.exceptions
import redis.retry

#: A connection refused, dropped or timed out, as the Redis client raises it (not yet mapped to
#: :class:`jobq.errors.RedisUnavailable`).
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def no_retry() -> Any:
    """A retry policy for a synchronous client that never re-sends a command."""
    return redis.retry.Retry(redis.backoff.NoBackoff(), 0)


def no_retry_async() -> Any:
    """A retry policy for an asyncio client that never re-sends a command."""
    return redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
