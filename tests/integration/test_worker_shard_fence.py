"""A queue fenced alone (RELIABILITY F19): when one Redis Cluster shard fails its lease renewals
while the node's other queues renew, the heartbeat fences that queue only
(``Heartbeat.on_queue_fence``, unit-tested in tests/unit/test_fence.py). The node then claims
nothing from it, and handles its held jobs as a node-wide fence does: async jobs are cancelled
when the shard may be alive and cut off from this node (another node may take them), and go on
when the shard refuses connections (nobody can take them). The other queue runs on untouched.
The fence is raised here as the heartbeat raises it, on the node's loop; the fault test F19 kills
a real primary."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from jobq import JobQ, JobState
from tests.integration.test_worker import Background, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def nodes() -> Iterator[list[Background]]:
    """Background nodes started by a test are stopped at its end even if it fails."""
    started: list[Background] = []
    yield started
    for b in started:
        if b.thread.is_alive():
            b.stop(graceful=False)
            b.thread.join(10)


def _fence(b: Background, queue: str, fenced: bool, redis_down: bool) -> None:
    w = b.worker
    assert w._loop is not None
    w._loop.call_soon_threadsafe(w.executor.fence_queue, queue, fenced, redis_down)


@pytest.mark.parametrize("redis_down", [False, True], ids=["cut-off", "refused"])
def test_a_queue_fenced_alone_stops_its_own_claims_and_jobs_only(
    app: JobQ, nodes: list[Background], redis_down: bool
) -> None:
    started: list[str] = []
    cancelled: list[str] = []
    finished: list[str] = []
    release = threading.Event()

    @app.task
    async def hold(name: str) -> None:
        started.append(name)
        try:
            while not release.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        finished.append(name)

    @app.task
    def quick(name: str) -> None:
        finished.append(name)

    app.enqueue(hold, ("a-held",), queue="a")
    app.enqueue(hold, ("b-held",), queue="b")
    b = Background(app, queues=[("a", 1), ("b", 1)], concurrency=4, poll_interval=0.05)
    nodes.append(b)
    wait_for(lambda: sorted(started) == ["a-held", "b-held"], what="both held jobs to start")

    _fence(b, "a", True, redis_down)
    if redis_down:
        time.sleep(0.3)
        assert cancelled == []  # nobody can take it while its shard refuses: it goes on
    else:
        wait_for(lambda: cancelled == ["a-held"], what="the fenced queue's job to be cancelled")
    # No claims from the fenced queue; the other queue runs as before.
    ja = app.enqueue(quick, ("a-quick",), queue="a")
    jb = app.enqueue(quick, ("b-quick",), queue="b")
    wait_for(lambda: "b-quick" in finished, what="the other queue's new job")
    time.sleep(0.3)
    assert "a-quick" not in finished and ja.status() is JobState.READY
    assert "b-held" in started and "b-held" not in cancelled

    _fence(b, "a", False, False)
    wait_for(lambda: "a-quick" in finished, what="the unfenced queue's job")
    wait_for(lambda: jb.status() is JobState.DONE, what="the other queue's job to be acked")
    release.set()
    wait_for(lambda: "b-held" in finished, what="the other queue's held job to end")
    b.stop()
    b.join()
    assert ("a-held" in finished) is redis_down  # went on, and was acked, only when refused
