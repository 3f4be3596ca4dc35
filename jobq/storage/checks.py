"""Checks of the Redis server's configuration that a worker runs once at startup.

The eviction policy: jobq keeps every job in Redis, and an evicting ``maxmemory-policy`` (any
policy but ``noeviction``) would silently delete jobs, leases or dead letters under memory
pressure. With ``noeviction`` Redis refuses the enqueue instead (``jobq.RedisOutOfMemory``), and
ack, fail and reap keep working (their scripts carry ``allow-oom``), so nothing is lost.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions

from jobq.storage.clients import redact
from jobq.util import to_str

log = logging.getLogger("jobq.redis")

#: The only policy under which Redis never deletes a job by itself.
SAFE_POLICY = "noeviction"


async def eviction_policy(client: Any) -> str | None:
    """The server's ``maxmemory-policy``, from ``INFO memory`` (falling back to ``CONFIG GET``);
    ``None`` when neither is permitted (an ACL user without ``INFO``/``CONFIG``). Connection
    errors propagate."""
    try:
        info = await client.info("memory")
        policy = info.get("maxmemory_policy")
        if policy is not None:
            return to_str(policy)
    except redis.exceptions.ResponseError as exc:  # NOPERM, or INFO renamed
        log.debug("INFO memory refused: %s", exc)
    try:
        cfg = await client.config_get("maxmemory-policy")
        value = cfg.get("maxmemory-policy") or cfg.get(b"maxmemory-policy")
        return None if value is None else to_str(value)
    except redis.exceptions.ResponseError as exc:
        log.debug("CONFIG GET maxmemory-policy refused: %s", exc)
        return None


async def check_eviction_policy(client: Any) -> bool | None:
    """Log one WARNING unless the policy is ``noeviction``. Returns True (safe), False (an
    evicting policy) or None (cannot check: permission denied)."""
    try:
        policy = await eviction_policy(client)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        log.warning("cannot check the Redis eviction policy now (%s)", redact(str(exc)))
        return None
    if policy is None:
        log.warning(
            "cannot check the Redis eviction policy (NOPERM: INFO and CONFIG GET refused); "
            "jobq needs maxmemory-policy noeviction"
        )
        return None
    if policy != SAFE_POLICY:
        log.warning(
            "Redis maxmemory-policy is %s: under memory pressure Redis may evict jobq's jobs, "
            "leases and dead letters (lost jobs). Set maxmemory-policy noeviction.",
            policy,
        )
        return False
    return True
