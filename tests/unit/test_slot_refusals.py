"""One queue whose Redis Cluster slot is moving must not stop a node's other queues.

While a slot moves, Redis refuses every script of that queue (the slot guard, see
lua/lib/common.lua), and ``map_error`` marks the error ``RedisUnavailable(slot=True)``. The
reaper and the scheduler then skip that queue and go on with the others; the reaper also leaves
the queue alone for one lease after its last refusal, so live nodes renew the leases they could
not renew during the move before anything is reaped. Any other failure still stops the pass.
The stub runner stands in for Redis: the F18 fault test moves a real slot.
"""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
import redis

from jobq import JobQ
from jobq.errors import RedisUnavailable
from jobq.storage.calls import Call, PromoteResult, ReapResult, map_error
from jobq.worker.reaper import Reaper
from jobq.worker.scheduler import Scheduler


def _slot_moving(queue: str) -> RedisUnavailable:
    tryagain = redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot")
    exc = map_error(tryagain, "reap", queue)
    assert isinstance(exc, RedisUnavailable) and exc.slot
    return exc


class StubRunner:
    """Answers reap and promote calls; queues in ``refuse`` raise their error instead."""

    def __init__(self) -> None:
        self.refuse: dict[str, Exception] = {}
        self.seen: list[str] = []

    async def run(self, call: Call[Any]) -> Any:
        self.seen.append(call.queue)
        err = self.refuse.get(call.queue)
        if err is not None:
            raise err
        if call.script.value == "reap":
            return ReapResult(requeued=[f"{call.queue}-job"], dead=[])
        return PromoteResult(promoted=1, next_due_ms=None, now_ms=1_000)


@pytest.fixture
def app() -> JobQ:
    return JobQ(client=fakeredis.FakeRedis())


def _reaper(app: JobQ, runner: StubRunner, queues: list[str]) -> Reaper:
    return Reaper(app, runner, queues, node_ttl_ms=3000, interval=0.5, hold=60.0)  # type: ignore[arg-type]


def test_the_reaper_skips_a_moving_queue_and_holds_it_for_a_lease(app: JobQ) -> None:
    runner = StubRunner()
    reaper = _reaper(app, runner, ["moving", "other"])
    runner.refuse["moving"] = _slot_moving("moving")
    report = asyncio.run(reaper.run_once())
    assert report.requeued == {"other": ["other-job"]}
    # The move is over, but the queue waits one lease (hold) after its last refusal.
    del runner.refuse["moving"]
    runner.seen.clear()
    report = asyncio.run(reaper.run_once())
    assert runner.seen == ["other"] and report.requeued == {"other": ["other-job"]}
    backoff, _ = reaper.slots.down["moving"]
    reaper.slots.down["moving"] = (backoff, 0.0)  # the lease has passed
    report = asyncio.run(reaper.run_once())
    assert report.requeued == {"moving": ["moving-job"], "other": ["other-job"]}


@pytest.mark.parametrize(
    "error",
    [RedisUnavailable("reap: Redis unavailable: Timeout reading"), "slot-moving-single-queue"],
    ids=["timeout", "one-queue-only"],
)
def test_the_reaper_stops_its_pass_on_any_other_failure(app: JobQ, error: Any) -> None:
    runner = StubRunner()
    queues = ["moving"] if error == "slot-moving-single-queue" else ["moving", "other"]
    runner.refuse["moving"] = _slot_moving("moving") if isinstance(error, str) else error
    with pytest.raises(RedisUnavailable):
        asyncio.run(_reaper(app, runner, queues).run_once())
    assert runner.seen == ["moving"]


def test_the_scheduler_promotes_the_other_queues(app: JobQ) -> None:
    runner = StubRunner()
    runner.refuse["moving"] = _slot_moving("moving")
    sched = Scheduler(app, runner, ["moving", "other"], [])  # type: ignore[arg-type]
    report = asyncio.run(sched.run_once())
    assert report.promoted == 1 and runner.seen == ["moving", "other"]
    runner.refuse["moving"] = RedisUnavailable("promote: Redis unavailable: Connection refused")
    with pytest.raises(RedisUnavailable):
        asyncio.run(sched.run_once())
