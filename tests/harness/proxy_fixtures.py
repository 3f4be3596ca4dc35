"""Fixtures and helpers of the Redis, network, bad-input and security fault tests.

The test modules assign the fixtures they use at module level (``chaos_proxy = proxy_fixtures.
chaos_proxy``), so nothing here depends on a shared conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from jobq import JobQ
from jobq.worker import Worker, WorkerConfig
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


#: ``ci`` (default) or ``nightly`` (``JOBQ_NIGHTLY=1``, as scripts/nightly sets, or
#: ``JOBQ_TIER=nightly``): the longer, many-trial versions.
TIER = "nightly" if os.environ.get("JOBQ_NIGHTLY") == "1" else os.environ.get("JOBQ_TIER", "ci")


def scale(ci: int, nightly: int) -> int:
    """A count for the current tier."""
    return nightly if TIER == "nightly" else ci


def keyspace(client: redis.Redis) -> dict[bytes, tuple[bytes, bytes, bool]]:
    """A snapshot of every key: (type, DUMP, has a TTL). Two equal snapshots mean nothing was
    written (B1, F14)."""
    out: dict[bytes, tuple[bytes, bytes, bool]] = {}
    for key in client.scan_iter(count=1000):
        pipe = client.pipeline(transaction=False)
        pipe.type(key)
        pipe.dump(key)
        pipe.pttl(key)
        kind, dump, pttl = pipe.execute()
        if dump is not None:
            out[key] = (kind, dump, pttl > 0)
    return out


class ThreadWorker:
    """A worker node run on a thread of the test process (its own event loop), so a test can
    put a chaos proxy in front of it and look at its state. ``config`` are
    :class:`jobq.worker.WorkerConfig` fields."""

    def __init__(self, app: JobQ, *, url: str | None = None, **config: Any) -> None:
        self.worker = Worker(app, WorkerConfig(**config), url=url)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"worker-{self.worker.node}")
        self._thread.daemon = True

    @property
    def node(self) -> str:
        return self.worker.node

    def _main(self) -> None:
        try:
            asyncio.run(self.worker.run())
        except BaseException as exc:  # reported by the test through .error
            self.error = exc
            log.exception("worker %s crashed", self.worker.node)

    def start(self) -> ThreadWorker:
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.worker._loop is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def join(self, timeout: float) -> bool:
        """Wait for the node to exit (burst mode); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 20.0) -> None:
        if self._thread.is_alive():
            self.worker.stop()
            self._thread.join(timeout)
        assert not self._thread.is_alive(), f"worker {self.node} did not stop within {timeout} s"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


@pytest.fixture
def thread_workers() -> Iterator[list[ThreadWorker]]:
    """Append :class:`ThreadWorker` objects here; every one still running is stopped after the
    test."""
    started: list[ThreadWorker] = []
    yield started
    for w in started:
        with contextlib.suppress(AssertionError):
            w.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll ``predicate`` until it holds; return the seconds it took, or raise TimeoutError."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start
