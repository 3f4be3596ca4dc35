"""Shared fixtures: a real redis-server per test session (and fresh ones for fault tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from jobq import JobQ
from tests.harness.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway redis-server for the session; tests flush it before use."""
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
