"""Memory per job: a payload over 64 bytes is stored in 64-byte parts, so the job hash keeps
Redis's compact listpack encoding on a default-configured Redis (hash-max-listpack-value 64);
the parts read back whole through claim and Job.info, and a job stored whole by an earlier jobq
(one long "payload" field, no "parts") still reads and runs."""

from __future__ import annotations

import os
import re

import pytest
import redis

import jobq
from jobq import codec
from jobq.storage.calls import JobSpec, Limits, Store, SyncRunner
from jobq.storage.keys import Keys
from tests.harness.redis_server import RedisServer
from tests.integration.conftest import T0

pytestmark = pytest.mark.integration

Q = "mem"
#: Bytes per queued job with a 100-byte payload: 502 measured on Redis 7.0 (1,182 before the
#: payload parts and the derived fields left out). The issue's target is 400, which this layout
#: cannot reach (docs/performance.md); this bound keeps what was won.
QUEUED_100_BOUND = 530
#: Bytes per entry of the lifecycle event stream (an "enqueued" event: type, a 24-character id,
#: time, task): 76 measured on Redis 7.0 (MEMORY USAGE). The stream is capped (events_max), so
#: this is bounded per queue, not per job: the default 10,000 events cost about 0.8 MB.
EVENT_BOUND = 90


def test_a_queued_job_with_a_100_byte_payload_stays_compact_on_a_default_redis() -> None:
    server = RedisServer(persistence="none")  # no hash-* settings: Redis's defaults
    server.start()
    try:
        r = server.admin_client()
        assert r.config_get("hash-max-listpack-value")["hash-max-listpack-value"] == "64"
        # The job alone: events off (their stream is capped per queue; measured below).
        store, run = Store(Keys(), Limits(events_max=0)), SyncRunner(redis.Redis.from_url(server.url))
        run.run(store.enqueue(Q, [JobSpec("warm", "t", b"x")]))  # the queue's own keys first
        n = 5_000
        before = int(r.info("memory")["used_memory"])
        specs = [JobSpec(os.urandom(12).hex(), "bench.incr", os.urandom(100)) for _ in range(n)]
        for i in range(0, n, 250):
            run.run(store.enqueue(Q, specs[i : i + 250]))
        per_job = (int(r.info("memory")["used_memory"]) - before) / n
        assert r.object("encoding", store.keys.job(Q, specs[0].id)) == b"listpack"
        assert per_job <= QUEUED_100_BOUND, per_job
        got = run.run(store.claim(Q, "n1", 3, 60_000)).jobs
        assert [j.payload for j in got if j.id != "warm"] == [s.payload for s in specs[: len(got) - 1]]
        # The same jobs with events on: the stream's bytes per event (MEMORY USAGE, all nodes).
        evstore = Store(Keys(), Limits(events_max=100_000))
        specs = [JobSpec(os.urandom(12).hex(), "bench.incr", os.urandom(100)) for _ in range(n)]
        for i in range(0, n, 250):
            run.run(evstore.enqueue("mem2", specs[i : i + 250]))
        assert r.xlen(evstore.keys.events("mem2")) == n
        per_event = r.memory_usage(evstore.keys.events("mem2"), samples=0) / n
        assert per_event <= EVENT_BOUND, per_event
        run.client.close()
        r.close()
    finally:
        server.cleanup()


@pytest.mark.parametrize("size", [0, 63, 64, 65, 100, 1000, 4096, 4097, 20_000])
def test_a_payload_reads_back_whole_through_claim_and_info(
    fapp: jobq.JobQ, r: redis.Redis, size: int
) -> None:
    arg = "y" * size
    job = fapp.enqueue("t", [arg], queue=Q)
    payload = codec.encode_payload((arg,), {}, 1 << 20)
    parts = r.hget(job.key, "parts")
    if 64 < len(payload) <= 64 * 64:
        assert int(parts or 0) == -(-len(payload) // 64)
        assert r.object("encoding", job.key) == b"listpack"
    else:
        assert parts is None  # short, or long enough to be stored whole
    assert job.info().args == [arg]
    (claimed,) = fapp.run(fapp.store.claim(Q, "n1", 5, 30_000, now_ms=fapp.now_ms())).jobs
    assert claimed.payload == payload


def test_a_job_stored_by_an_earlier_version_still_reads_and_runs(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    arg = "z" * 300
    job = fapp.enqueue("t", [arg], queue=Q)
    payload = codec.encode_payload((arg,), {}, 1 << 20)
    # What the previous layout stored: the payload whole in one field, no parts, and every field
    # written (attempts 0, run_at_ms and ready_ms), here with times unlike enqueued_ms.
    fields = {k.decode(): v for k, v in r.hgetall(job.key).items()}
    for k in [k for k in fields if k == "parts" or re.fullmatch(r"p\d+", k)]:
        r.hdel(job.key, k)
    r.hset(job.key, mapping={"payload": payload, "attempts": 0, "run_at_ms": T0 - 5, "ready_ms": T0 - 7})
    info = job.info()
    assert (info.args, info.attempts, info.run_at_ms, info.enqueued_ms) == ([arg], 0, T0 - 5, T0)
    clock.advance(1)
    (claimed,) = fapp.run(fapp.store.claim(Q, "n1", 5, 30_000, now_ms=fapp.now_ms())).jobs
    assert (claimed.payload, claimed.attempts, claimed.ready_ms) == (payload, 1, T0 - 7)
    codes = fapp.run(fapp.store.ack(Q, "n1", [(job.id, b"")], attempts=[1], now_ms=fapp.now_ms()))
    assert codes == [1]
    assert job.info().state == jobq.JobState.DONE


def test_a_job_never_claimed_is_refused_by_ack_and_fail_as_before(fapp: jobq.JobQ) -> None:
    """No attempts field until the first claim: ack and fail still refuse a job this node does not
    hold (-2), not "no such job"."""
    job = fapp.enqueue("t", queue=Q)
    assert fapp.run(fapp.store.ack(Q, "n1", [(job.id, b"")], now_ms=fapp.now_ms())) == [-2]
    assert fapp.run(fapp.store.ack(Q, "n1", [(job.id, b"")], attempts=[1], now_ms=fapp.now_ms())) == [-2]
    res = fapp.run(fapp.store.fail(Q, "n1", job.id, "boom", now_ms=fapp.now_ms()))
    assert res.outcome == "lease_lost"
    assert job.info().state == jobq.JobState.READY
