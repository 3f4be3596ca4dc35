"""The async producer API and notified results on Redis Cluster and through Sentinel: jobs
enqueued with ``aenqueue``/``aenqueue_many`` into queues on several slots, their results awaited
with the fallback poll at 30 s (so only the completion notices can deliver them in time), with a
real worker process on the same URL; the sync ``result()`` the same."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from jobq import JobQ, JobState
from tests.harness import result_tasks as rt
from tests.harness.sentinel import SentinelGroup
from tests.harness.worker_process import worker_process

pytestmark = pytest.mark.integration

QUEUES = ("default", "q-a", "q-b", "q-c")


def _producer(url: str) -> Iterator[JobQ]:
    rt.app.bind(url=url)
    rt.app._known_queues.clear()
    try:
        yield rt.app
    finally:
        rt.app.close()


def _round_trip(app: JobQ) -> None:
    rt.add.enqueue(0, 0).result(timeout=30)  # the worker is up

    async def main() -> None:
        started = time.monotonic()
        one = await rt.add.aenqueue(1, 2)
        other = await app.aenqueue("rt.aadd", [3, 4], queue="q-b")
        many = await app.aenqueue_many(
            [rt.add.options(queue=QUEUES[i % len(QUEUES)]).request(i, 1) for i in range(40)]
        )
        assert {j.queue for j in many} == set(QUEUES)  # several hash tags: several slots
        assert await one.aresult(timeout=20, poll_interval=30) == 3
        assert await other.aresult(timeout=20, poll_interval=30) == 7
        results = await asyncio.gather(*(j.aresult(timeout=20, poll_interval=30) for j in many))
        assert results == [i + 1 for i in range(40)]
        assert time.monotonic() - started < 20  # never waited out a 30 s poll
        assert await one.astatus() is JobState.DONE
        assert (await other.ainfo()).result == 7
        later = await rt.add.options(delay=600, queue="q-c").aenqueue(1, 1)
        await later.acancel()
        assert await later.astatus() is JobState.CANCELLED
        await app.aclose()

    asyncio.run(main())
    t0 = time.monotonic()
    assert rt.nap.enqueue(0.2).result(timeout=20, poll_interval=30) == 0.2
    assert time.monotonic() - t0 < 10


def test_async_api_and_notified_results_on_a_cluster(cluster_url: str) -> None:
    with worker_process(cluster_url, queues=",".join(QUEUES)):
        for app in _producer(cluster_url):
            _round_trip(app)


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    g = SentinelGroup(replicas=1).start()
    yield g
    g.cleanup()


def test_async_api_and_notified_results_through_sentinel(group: SentinelGroup) -> None:
    with worker_process(group.url, queues=",".join(QUEUES)):
        for app in _producer(group.url):
            _round_trip(app)
