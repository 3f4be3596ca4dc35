"""The heartbeat's self-fence: when renewals stop, it tells a Redis outage (connection refused,
LOADING, BUSY: every client alike) from a failure that may be this node's alone (a timeout, a
reset), because only the second lets other nodes take the jobs. The renewal calls are stubbed;
the fence runs on a clock moved by hand. The same path against a real, killed redis-server is
tests/fault/test_redis_faults.py (F4b, F6)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import fakeredis
import pytest
import redis
import redis.backoff
import redis.retry

from jobq import JobQ
from jobq.errors import JobqError, RedisBusy, RedisUnavailable
from jobq.storage.calls import ExtendResult, map_error
from jobq.worker.heartbeat import Heartbeat

LEASE_MS = 3000


class StubRunner:
    """Answers ``run_many`` with whatever the test set: an error to raise, or a renewal."""

    def __init__(self) -> None:
        self.error: JobqError | None = None
        #: Per-queue errors, answered in place (as ``SyncRunner.run_many`` does when asked to).
        self.queue_errors: dict[str, JobqError] = {}

    def run_many(self, calls: Sequence[Any], *, return_exceptions: bool = False) -> list[Any]:
        if self.error is not None:
            raise self.error
        out: list[Any] = []
        for c in calls:
            err = self.queue_errors.get(c.queue)
            if err is not None and not return_exceptions:
                raise err
            out.append(err or ExtendResult(now_ms=1_000, owned=[]))
        return out


@pytest.fixture
def fence() -> tuple[Heartbeat, StubRunner, list[tuple[bool, bool]]]:
    app = JobQ(client=fakeredis.FakeRedis())
    runner = StubRunner()
    calls: list[tuple[bool, bool]] = []
    hb = Heartbeat(
        app,
        runner,  # type: ignore[arg-type]
        "n1",
        ["q"],
        LEASE_MS,
        known=dict,
        on_beat=lambda _: None,
        on_fence=lambda fenced, down: calls.append((fenced, down)),
        info=dict,
    )
    return hb, runner, calls


def _fail(hb: Heartbeat, runner: StubRunner, error: JobqError) -> None:
    """One failed renewal, with the last success a whole lease ago: the fence must rise."""
    runner.error = error
    assert hb.beat() is None
    hb.last_ok = time.monotonic() - LEASE_MS / 1000
    hb._check_fence()


@functools.cache
def refused() -> RedisUnavailable:
    """What a call to a stopped redis-server raises (nothing listens on port 1)."""
    once = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    try:
        redis.Redis(port=1, socket_connect_timeout=1, retry=once).ping()
    except redis.ConnectionError as exc:
        mapped = map_error(exc)
    assert isinstance(mapped, RedisUnavailable)
    return mapped


def test_a_refused_connection_is_marked_refused_and_a_timeout_is_not() -> None:
    assert refused().refused
    timeout = map_error(redis.TimeoutError("Timeout reading from 10.0.0.1:6379"))
    assert isinstance(timeout, RedisUnavailable) and not timeout.refused


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.ClusterError("TTL exhausted."),
        redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
        redis.exceptions.ClusterDownError("The cluster is down"),
        redis.exceptions.ResponseError(
            "Script attempted to access a non local key in a cluster node script: f_1 on @user_script:1."
        ),
    ],
    ids=["ttl-exhausted", "tryagain", "clusterdown", "non-local-key"],
)
def test_a_moving_cluster_slot_is_redis_side_unavailability(exc: Exception) -> None:
    mapped = map_error(exc, "enqueue", "q")
    assert isinstance(mapped, RedisUnavailable) and mapped.refused and mapped.slot
    assert "slot is moving or down" in str(mapped)


@pytest.mark.parametrize(
    "error",
    [
        refused(),
        RedisBusy("claim: Redis is busy: LOADING Redis is loading the dataset in memory"),
        map_error(redis.exceptions.ClusterError("TTL exhausted."), "extend", "q"),
    ],
    ids=["refused", "loading", "slot-moving"],
)
def test_renewals_refused_or_loading_fence_with_redis_down(fence: Any, error: JobqError) -> None:
    hb, runner, calls = fence
    _fail(hb, runner, error)
    assert calls == [(True, True)] and hb.fenced


def _two_queue_fence(on_fence: list[tuple[bool, bool]]) -> tuple[Heartbeat, StubRunner]:
    runner = StubRunner()
    hb = Heartbeat(
        JobQ(client=fakeredis.FakeRedis()),
        runner,  # type: ignore[arg-type]
        "n1",
        ["moving", "other"],
        LEASE_MS,
        known=dict,
        on_beat=lambda _: None,
        on_fence=lambda fenced, down: on_fence.append((fenced, down)),
        info=dict,
    )
    return hb, runner


def _slot_moving() -> RedisUnavailable:
    exc = map_error(redis.exceptions.ClusterError("TTL exhausted."), "extend", "moving")
    assert isinstance(exc, RedisUnavailable) and exc.slot
    return exc


def test_one_queue_whose_slot_moves_does_not_fence_the_node() -> None:
    """Renewals of one queue refused because its cluster slot is moving (nothing can reap it
    then either) leave the node serving its other queues: the beat counts as a renewal."""
    calls: list[tuple[bool, bool]] = []
    hb, runner = _two_queue_fence(calls)
    runner.queue_errors["moving"] = _slot_moving()
    hb.last_ok = time.monotonic() - LEASE_MS / 1000
    result = hb.beat()
    assert result is not None and result.now_ms == 1_000
    hb._check_fence()
    assert calls == [] and not hb.fenced and hb.failures == 0


@pytest.mark.parametrize("every_queue", [False, True], ids=["other-error", "every-queue-moving"])
def test_a_slot_refusal_with_any_other_failure_still_fences(every_queue: bool) -> None:
    """Only a refusal of some queues' slots while the others renew is tolerated: every queue
    refused, or another failure beside it, fences as before."""
    calls: list[tuple[bool, bool]] = []
    hb, runner = _two_queue_fence(calls)
    moving = _slot_moving()
    runner.queue_errors["moving"] = moving
    runner.queue_errors["other"] = (
        moving if every_queue else RedisUnavailable("extend: Redis unavailable: Timeout reading")
    )
    assert hb.beat() is None
    hb.last_ok = time.monotonic() - LEASE_MS / 1000
    hb._check_fence()
    assert calls == [(True, every_queue)] and hb.fenced


def test_renewals_that_time_out_fence_as_a_partition(fence: Any) -> None:
    hb, runner, calls = fence
    _fail(hb, runner, RedisUnavailable("extend: Redis unavailable: Timeout reading"))
    assert calls == [(True, False)]


def test_a_redis_down_fence_hardens_when_failures_turn_to_timeouts(fence: Any) -> None:
    hb, runner, calls = fence
    _fail(hb, runner, refused())
    _fail(hb, runner, refused())  # still down: nothing new to say
    assert calls == [(True, True)]
    _fail(hb, runner, RedisUnavailable("extend: Redis unavailable: Timeout reading"))
    assert calls == [(True, True), (True, False)]
    _fail(hb, runner, refused())  # never softened again: the cancelled jobs are gone anyway
    assert calls == [(True, True), (True, False)]
    runner.error = None
    assert hb.beat() is not None
    hb._check_fence()
    assert calls[-1] == (False, False) and not hb.fenced


def test_a_short_silence_does_not_fence(fence: Any) -> None:
    hb, runner, calls = fence
    runner.error = refused()
    hb.last_ok = time.monotonic()
    assert hb.beat() is None
    hb._check_fence()  # the last success was just now
    assert calls == [] and not hb.fenced


# -- per shard (RELIABILITY F19): one queue's primary of a Redis Cluster down or cut off ---------------
def _shard_down(refused_: bool) -> RedisUnavailable:
    """What a cluster client's call to the one dead (or unreachable) primary raises."""
    why = "Connection refused." if refused_ else "Timeout reading from socket"
    return RedisUnavailable(f"extend on queue 'down': Redis unavailable: {why}", refused=refused_, shard=True)


def _shard_fence(
    queue_calls: list[tuple[str, bool, bool]], node_calls: list[tuple[bool, bool]]
) -> tuple[Heartbeat, StubRunner]:
    runner = StubRunner()
    hb = Heartbeat(
        JobQ(client=fakeredis.FakeRedis()),
        runner,  # type: ignore[arg-type]
        "n1",
        ["down", "other"],
        LEASE_MS,
        known=dict,
        on_beat=lambda _: None,
        on_fence=lambda fenced, down: node_calls.append((fenced, down)),
        info=dict,
        on_queue_fence=lambda q, fenced, down: queue_calls.append((q, fenced, down)),
    )
    return hb, runner


@pytest.mark.parametrize("refused_", [True, False], ids=["refused", "timeout"])
def test_a_dead_shard_fences_its_queue_alone(refused_: bool) -> None:
    """The other queue renews: the node is not fenced; the dead shard's queue is, once its own
    renewals have been silent for a lease, with ``redis_down`` when the primary refuses (nobody
    can take its jobs then) and without on a timeout (others might). It unfences on success."""
    queue_calls: list[tuple[str, bool, bool]] = []
    node_calls: list[tuple[bool, bool]] = []
    hb, runner = _shard_fence(queue_calls, node_calls)
    runner.queue_errors["down"] = _shard_down(refused_)
    assert hb.beat() is not None  # the other queue renewed
    hb._check_fence()
    assert queue_calls == []  # not silent long enough yet
    hb.queue_last_ok["down"] = time.monotonic() - LEASE_MS / 1000
    hb._check_fence()
    assert queue_calls == [("down", True, refused_)]
    assert node_calls == [] and not hb.fenced
    runner.queue_errors.clear()
    assert hb.beat() is not None
    hb._check_fence()
    assert queue_calls[-1] == ("down", False, False) and hb.queue_fenced == {}


def test_a_refused_shard_fence_hardens_when_its_failures_turn_to_timeouts() -> None:
    queue_calls: list[tuple[str, bool, bool]] = []
    hb, runner = _shard_fence(queue_calls, [])
    runner.queue_errors["down"] = _shard_down(True)
    hb.beat()
    hb.queue_last_ok["down"] = time.monotonic() - LEASE_MS / 1000
    hb._check_fence()
    runner.queue_errors["down"] = _shard_down(False)
    hb.beat()
    hb._check_fence()
    assert queue_calls == [("down", True, True), ("down", True, False)]


def test_every_shard_down_fences_the_node_as_before() -> None:
    node_calls: list[tuple[bool, bool]] = []
    hb, runner = _shard_fence([], node_calls)
    runner.queue_errors["down"] = runner.queue_errors["other"] = _shard_down(True)
    assert hb.beat() is None
    hb.last_ok = time.monotonic() - LEASE_MS / 1000
    hb._check_fence()
    assert node_calls == [(True, True)] and hb.fenced
