"""Redis-side faults (RELIABILITY.md F4, F4b, F4c, F5, F9, F14, F15, F16).

Each test runs against a private redis-server (the ``fresh_server`` fixture or its own
:class:`RedisServer`) so it may fill, block, flush or kill it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest
import redis

from jobq import JobQ, RedisOutOfMemory
from jobq.errors import RedisBusy
from tests.harness import proxy_fixtures
from tests.harness.proxy_fixtures import ThreadWorker, keyspace, wait_for
from tests.harness.redis_server import RedisServer

pytestmark = [pytest.mark.fault]

seed = proxy_fixtures.seed
thread_workers = proxy_fixtures.thread_workers

Q = "rf"


class Runs:
    """Executions recorded by the in-process test tasks: job key -> [(t_start, t_end)]."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self.errors: list[str] = []

    def record(self, key: int, t0: float) -> None:
        with self.lock:
            self.spans[key].append((t0, time.monotonic()))

    def duplicates(self) -> dict[int, int]:
        return {k: len(v) for k, v in self.spans.items() if len(v) > 1}

    def overlapping(self) -> list[int]:
        """Jobs that ran twice at the same time."""
        out = []
        for k, spans in self.spans.items():
            s = sorted(spans)
            if any(b[0] < a[1] for a, b in itertools.pairwise(s)):
                out.append(k)
        return out


def make_app(url: str, runs: Runs, **kw: object) -> JobQ:
    """An app with the recording tasks: ``rec(key, sleep=0)`` (sync) and ``arec`` (async)."""
    app = JobQ(url, **kw)  # type: ignore[arg-type]

    @app.task(name="rec", queue=Q)
    def rec(key: int, sleep: float = 0.0, pad: str = "") -> int:
        t0 = time.monotonic()
        if sleep:
            time.sleep(sleep)
        runs.record(key, t0)
        return key

    @app.task(name="arec", queue=Q)
    async def arec(key: int, sleep: float = 0.0) -> int:
        import asyncio

        t0 = time.monotonic()
        if sleep:
            await asyncio.sleep(sleep)
        runs.record(key, t0)
        return key

    return app


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private redis-server; ``@pytest.mark.parametrize("server", [dict(...)], indirect=True)``
    passes :class:`RedisServer` options."""
    opts = getattr(request, "param", {})
    s = RedisServer(**opts).start()
    yield s
    s.cleanup()


# -- F14: out of memory ----------------------------------------------------------------------------
@pytest.mark.parametrize("server", [{"maxmemory": "20mb", "maxmemory_policy": "noeviction"}], indirect=True)
def test_f14_oom_refuses_enqueue_whole_and_drains(
    server: RedisServer, thread_workers: list[ThreadWorker], caplog: pytest.LogCaptureFixture
) -> None:
    runs = Runs()
    app = make_app(server.url, runs, result_ttl=0)
    admin = server.admin_client()
    pad = "x" * 100_000
    n = 0
    with pytest.raises(RedisOutOfMemory):
        while True:  # the backlog itself fills the 20 MB
            app.enqueue("rec", [n], {"pad": pad}, queue=Q)
            n += 1
    assert n > 50
    print(f"F14: {n} jobs filled 20 MB")
    # Full: every further enqueue is refused whole, naming the queue, and writes nothing.
    before = keyspace(admin)
    dbsize = admin.dbsize()
    for i in range(20):
        with pytest.raises(RedisOutOfMemory) as exc_info:
            app.enqueue("rec", [10_000 + i], queue=Q)
        assert repr(Q) in str(exc_info.value), str(exc_info.value)
        with pytest.raises(RedisOutOfMemory):
            app.enqueue_many([{"task": "rec", "args": [20_000 + i], "queue": Q} for _ in range(5)])
        assert repr(Q) in str(exc_info.value) or "enqueue" in str(exc_info.value)
    assert admin.dbsize() == dbsize
    assert keyspace(admin) == before

    # Ack, fail and reap still run under OOM (allow-oom), straight through the scripts.
    st, run = app.store, app.run
    claimed = run(st.claim(Q, "n-oom", 3, 60_000)).jobs
    assert len(claimed) == 3
    assert run(st.ack(Q, "n-oom", [(claimed[0].id, b"")])) == [1]
    assert run(st.fail(Q, "n-oom", claimed[1].id, "boom", delay_ms=0)).outcome == "retry"
    far = int(admin.time()[0]) * 1000 + 3_600_000
    reaped = run(st.reap(Q, node_ttl_ms=1_000_000_000, now_ms=far))
    assert claimed[2].id in reaped.requeued
    with pytest.raises(RedisOutOfMemory):
        app.enqueue("rec", [30_000], queue=Q)

    # A worker drains the backlog under OOM: claim, ack and its heartbeat keep working.
    w = ThreadWorker(app, queues=[(Q, 1)], concurrency=5, lease=5, burst=True, poll_interval=0.2)
    thread_workers.append(w.start())
    assert w.join(120), "the worker did not drain the backlog"
    assert w.error is None
    assert admin.zcard(app.keys.ready(Q)) == 0
    assert admin.zcard(app.keys.scheduled(Q)) == 0
    assert admin.zcard(app.keys.leases(Q)) == 0
    # Every job ran: the one acked by hand above did not need to.
    assert set(runs.spans) | {0} >= set(range(n)), "jobs lost under OOM"
    # Memory came back with the drained jobs (result_ttl=0 deletes them): enqueue works again.
    job = app.enqueue("rec", [99_999], queue=Q)
    assert job.status().value == "ready"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "crash" in r.getMessage()]
    app.close()
    admin.close()


# -- F15: eviction policy ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("server", "warned"),
    [
        ({"maxmemory_policy": "allkeys-lru"}, True),
        ({"maxmemory_policy": "volatile-lru"}, True),
        ({"maxmemory_policy": "noeviction"}, False),
    ],
    indirect=["server"],
)
def test_f15_eviction_policy_warning_at_worker_start(
    server: RedisServer, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    policy = server.maxmemory_policy
    app = make_app(server.url, Runs())
    caplog.set_level(logging.WARNING, logger="jobq")
    w = ThreadWorker(app, queues=[(Q, 1)], concurrency=1, lease=2, burst=True).start()
    assert w.join(30) and w.error is None
    hits = [
        r for r in caplog.records if r.levelno == logging.WARNING and "maxmemory-policy" in r.getMessage()
    ]
    if warned:
        assert len(hits) == 1, [r.getMessage() for r in hits]
        assert policy in hits[0].getMessage()
        assert w.worker.eviction_policy_ok is False
    else:
        assert hits == []
        assert w.worker.eviction_policy_ok is True
    app.close()


# -- F16: BUSY -----------------------------------------------------------------------------------
BUSY_SCRIPT = """
local s = redis.call('TIME')
local start = tonumber(s[1]) * 1000000 + tonumber(s[2])
while true do
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - start > tonumber(ARGV[1]) * 1000 then break end
end
return 1
"""


@pytest.mark.parametrize("server", [{"extra": ["--busy-reply-threshold", "100"]}], indirect=True)
def test_f16_busy_script_workers_back_off_and_resume(
    server: RedisServer, thread_workers: list[ThreadWorker], caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign script runs 2 s (far past busy-reply-threshold 100 ms): every other command
    gets BUSY. The nodes back off without crashing, and claim again within 2 s after."""
    runs = Runs()
    app = make_app(server.url, runs)
    caplog.set_level(logging.WARNING)
    workers = [
        ThreadWorker(app, queues=[(Q, 1)], concurrency=4, lease=6, poll_interval=0.2) for _ in range(2)
    ]
    for w in workers:
        thread_workers.append(w.start())
    app.enqueue_many(
        [{"task": "rec", "args": [i], "kwargs": {"sleep": 0.01}, "queue": Q} for i in range(200)]
    )
    wait_for(lambda: len(runs.spans) >= 50, 30)
    busy_client = redis.Redis(port=server.port, socket_timeout=10)
    done = threading.Event()

    def foreign() -> None:
        busy_client.eval(BUSY_SCRIPT, 0, 2000)
        done.set()

    t = threading.Thread(target=foreign)
    t.start()
    time.sleep(0.3)
    # A producer sees BUSY as jobq.RedisBusy, not a generic error.
    with pytest.raises(RedisBusy):
        app.enqueue("rec", [10_000], queue=Q)
    t.join(10)
    assert done.is_set()
    ended = time.monotonic()
    more = [i for i in range(200, 300)]
    app.enqueue_many([{"task": "rec", "args": [i], "queue": Q} for i in more])
    resumed = wait_for(lambda: any(k >= 200 for k in runs.spans), 10)
    assert time.monotonic() - ended <= 2.0 + 0.5, f"resumed {resumed:.2f} s after BUSY ended"
    wait_for(lambda: set(range(300)) <= set(runs.spans), 60)
    for w in workers:
        w.stop()
        assert w.error is None
    assert runs.duplicates() == {}  # BUSY (2 s) < lease (6 s): nothing re-ran
    busy_logs = [r for r in caplog.records if "busy" in r.getMessage().lower()]
    assert busy_logs, "BUSY was not logged"
    assert all(r.levelno == logging.WARNING for r in busy_logs)
    assert len(busy_logs) <= 40, f"{len(busy_logs)} BUSY log lines: not rate-limited"
    app.close()
    busy_client.close()
