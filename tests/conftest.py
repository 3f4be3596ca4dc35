"""Shared fixtures: a real redis-server per test session (and fresh ones for fault tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from jobq import JobQ
from tests.harness.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway redis-server for the session; tests flush it before use. With
    ``JOBQ_TEST_REDIS=cluster`` it is a 3-primary Redis Cluster instead (tests/harness/cluster.py),
    so ``redis_url``, ``r`` and ``app`` speak to the cluster (scripts/check runs a subset so)."""
    if os.environ.get("JOBQ_TEST_REDIS") == "cluster":
        from tests.harness.cluster import RedisClusterHarness

        cluster = RedisClusterHarness(primaries=3).start()
        yield cluster  # type: ignore[misc]
        cluster.cleanup()
        return
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    c = redis_server.admin_client()
    c.flushall()
    c.script_flush()
    c.close()
    return redis_server.url


@pytest.fixture
def r(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A raw client on the test server, for seeding and reading state."""
    c = redis_server.admin_client()
    yield c
    c.close()


@pytest.fixture
def app(redis_url: str) -> Iterator[JobQ]:
    a = JobQ(redis_url)
    yield a
    a.close()


@pytest.fixture
def fresh_server() -> Iterator[RedisServer]:
    """A private redis-server this test may kill, restart or reconfigure."""
    server = RedisServer()
    yield server
    server.cleanup()
