"""The tests of jobq on each Redis setup other than one plain server: Redis Cluster, Sentinel,
TLS and ACL users, and the connection URLs that reach them.

Fixtures: one 3-primary Redis Cluster per session (started on free loopback ports with
``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``), and helpers shared
by the cluster, Sentinel and TLS/ACL tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from jobq import JobQ
from jobq.worker import Worker, WorkerConfig
from tests.harness.cluster import RedisClusterHarness


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisClusterHarness]:
    c = RedisClusterHarness(primaries=3).start()
    yield c
    c.cleanup()


@pytest.fixture
def cluster_url(cluster: RedisClusterHarness) -> str:
    cluster.flush()
    return cluster.url


@pytest.fixture
def capp(cluster_url: str) -> Iterator[JobQ]:
    a = JobQ(cluster_url)
    yield a
    a.close()


def burst(app: JobQ, **cfg: Any) -> Worker:
    """Run one worker node in burst mode until nothing runnable is left."""
    cfg.setdefault("queues", [("default", 1)])
    w = Worker(app, WorkerConfig(burst=True, **cfg))
    asyncio.run(w.run())
    return w
