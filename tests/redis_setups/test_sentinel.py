"""Sentinel failover under load: a primary, replicas and three sentinels on loopback; producers
and a worker run through a ``redis+sentinel://`` URL, the primary is SIGKILLed, and both carry
on with the promoted replica. Counts the acknowledged enqueues lost across the failover, with
and without durable mode (docs/redis.md, "Sentinel")."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import jobq
from jobq import JobQ, JobState
from jobq.worker import Worker, WorkerConfig
from tests.harness.chaos_proxy import ChaosProxy
from tests.harness.sentinel import SentinelGroup

pytestmark = pytest.mark.integration

BEFORE, AFTER = 300, 200


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    g = SentinelGroup(replicas=2).start()
    yield g
    g.cleanup()


class Producer(threading.Thread):
    """Enqueues job after job; on an error retries the same job id (a no-op if it was stored),
    and records each id only once Redis acknowledged it."""

    def __init__(self, app: JobQ, ids: Iterator[int], acked: list[tuple[str, float]]) -> None:
        super().__init__(daemon=True)
        self.app, self.ids, self.acked = app, ids, acked
        self.stop_flag = threading.Event()
        self.errors: list[str] = []
        self.failed: BaseException | None = None

    def run(self) -> None:
        while not self.stop_flag.is_set():
            i = next(self.ids)
            job_id = f"job-{i}"
            while not self.stop_flag.is_set():
                try:
                    self.app.enqueue("work", [i], job_id=job_id)
                    self.acked.append((job_id, time.monotonic()))
                    break
                except (jobq.RedisUnavailable, jobq.NotReplicated, jobq.RedisBusy) as exc:
                    self.errors.append(type(exc).__name__)
                    time.sleep(0.05)
                except Exception as exc:  # anything else is a bug: stop and report it
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    self.failed = exc
                    return


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def failover_under_load(
    group: SentinelGroup, durable: bool, lag: ChaosProxy | None = None, lag_s: float = 0.5
) -> dict[str, Any]:
    """Load, SIGKILL the primary, wait for the promotion, more load, drain. With ``lag`` (a
    proxy on the replication link) the link is blackholed ``lag_s`` before the kill: a replica
    that fell behind is promoted, the case asynchronous replication loses writes in."""
    app = JobQ(group.url, durable=durable, durable_timeout=0.5)
    ran: list[int] = []

    @app.task(name="work")
    def work(i: int) -> None:
        ran.append(i)

    worker = Worker(app, WorkerConfig(concurrency=8, lease=3, poll_interval=0.2, grace=2))
    wthread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    wthread.start()
    acked: list[tuple[str, float]] = []
    ids = itertools.count()
    producers = [Producer(app, ids, acked) for _ in range(2)]
    for p in producers:
        p.start()
    try:
        wait_for(lambda: len(acked) >= BEFORE, 60, "enqueues before the failover")
        old = group.master_port()
        if lag is not None:
            lag.blackhole()
            time.sleep(lag_s)
        group.server_on(old).kill()
        killed_at = time.monotonic()
        if lag is not None:
            lag.rst()  # the replica's link drops too: it is promoted with what it had
        new = group.wait_failover(old)
        promoted_after = time.monotonic() - killed_at
        if lag is not None:
            # the old primary comes back empty and the sentinels make it the new replica, so
            # durable enqueues (WAIT 1) can be acknowledged again
            group.server_on(old).restart(wipe=True)
        n_at_kill = len([1 for _, t in acked if t <= killed_at])
        wait_for(
            lambda: len(acked) >= n_at_kill + AFTER or any(p.failed for p in producers),
            60,
            "enqueues after the failover",
        )
        assert not [p.failed for p in producers if p.failed], [p.errors[-3:] for p in producers]
        for p in producers:
            p.stop_flag.set()
        for p in producers:
            p.join(10)
        r = group.server_on(new).admin_client()
        all_ids = [job_id for job_id, _ in acked]

        def states() -> list[bytes | None]:
            pipe = r.pipeline(transaction=False)
            for job_id in all_ids:
                pipe.hget(app.keys.job("default", job_id), "state")
            return list(pipe.execute())

        wait_for(
            lambda: all(s in (None, b"done") for s in states()), 60, "the worker to run every stored job"
        )
        final = states()
        lost = [j for j, s in zip(all_ids, final, strict=True) if s is None]
        lost_never_ran = [j for j in lost if int(j.split("-")[1]) not in set(ran)]
        after = [j for j, t in acked if t > killed_at + promoted_after]
        r.close()
    finally:
        for p in producers:
            p.stop_flag.set()
        worker.stop(graceful=True)
        wthread.join(15)
        app.close()
    return {
        "acked": len(all_ids),
        "lost": len(lost),
        "lost_never_ran": len(lost_never_ran),
        "acked_after_promotion": len(after),
        "producer_errors": len([e for p in producers for e in p.errors]),
        "promoted_after_s": round(promoted_after, 2),
        "ran": len(ran),
        "ran_after": len(set(ran) & {int(j.split("-")[1]) for j in after}),
        "completed": worker.stats["completed"],
        "final_done": sum(1 for s in final if s == b"done"),
        "state": JobState.DONE.value,
    }


@pytest.mark.parametrize("durable", [False, True], ids=["async-replication", "durable"])
def test_failover_under_load(group: SentinelGroup, durable: bool, capsys: pytest.CaptureFixture[str]) -> None:
    res = failover_under_load(group, durable)
    with capsys.disabled():
        print(f"\nsentinel failover durable={durable}: {res}")
    # producers reconnected to the promoted replica and carried on
    assert res["acked_after_promotion"] > 0
    # the worker did too: jobs enqueued after the promotion ran
    assert res["ran_after"] > 0
    # every stored job finished; only never-replicated ones can be missing
    assert res["final_done"] == res["acked"] - res["lost"]
    if durable:
        assert res["lost"] == 0


@pytest.mark.parametrize("durable", [False, True], ids=["async-replication", "durable"])
def test_failover_to_a_lagging_replica(durable: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """The replication link is cut 0.5 s before the primary dies: without durable mode the
    enqueues acknowledged in that window are lost; with it they were refused (NotReplicated),
    retried with the same job id, and none is lost."""
    group = SentinelGroup(replicas=1)
    proxy = ChaosProxy(group.primary.port).start()
    group.replica_upstream = proxy.port
    try:
        group.start()
        res = failover_under_load(group, durable, lag=proxy)
    finally:
        group.cleanup()
        proxy.stop()
    with capsys.disabled():
        print(f"\nsentinel failover to a lagging replica, durable={durable}: {res}")
    assert res["acked_after_promotion"] > 0 and res["ran_after"] > 0
    assert res["final_done"] == res["acked"] - res["lost"]
    if durable:
        assert res["lost"] == 0
    else:
        assert res["lost"] > 0  # the window is real: this is what durable mode is for
