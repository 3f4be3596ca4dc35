"""Fixtures and helpers of the Redis, network, bad-input and security fault tests.

The test modules assign the fixtures they use at module level (``chaos_proxy = proxy_fixtures.
chaos_proxy``), so nothing here depends on a shared conftest.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator

import pytest

from tests.harness.chaos_proxy import ChaosProxy
from tests.harness.redis_server import RedisServer

log = logging.getLogger("tests.fault")


@pytest.fixture
def chaos_proxy() -> Iterator[Callable[[RedisServer], ChaosProxy]]:
    """A factory: ``chaos_proxy(server)`` starts one proxy in front of ``server``; every proxy
    started is stopped after the test."""
    made: list[ChaosProxy] = []

    def make(server: RedisServer) -> ChaosProxy:
        p = ChaosProxy(server.port).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A logged, reproducible seed: ``JOBQ_TEST_SEED=<n>`` re-runs a failure."""
    value = int(os.environ.get("JOBQ_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\n{request.node.nodeid}: seed={value} (re-run with JOBQ_TEST_SEED={value})")
    log.warning("%s: seed=%d", request.node.nodeid, value)
    return value
