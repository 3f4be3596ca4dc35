"""A node's active jobs are a ZSET (removal O(log n)); a jobq from before kept a LIST. An active
LIST left in Redis by a node that stopped without releasing (SIGKILL, then an upgrade) is still
recovered: reap and a restarted node with the same id convert it in place."""

from __future__ import annotations

import asyncio

import pytest
import redis

import jobq
from jobq.storage.calls import AsyncRunner
from jobq.storage.clients import async_client
from jobq.worker.reaper import recover_inherited

pytestmark = pytest.mark.integration

Q = "upgrade"


def claim_as_old_list(app: jobq.JobQ, r: redis.Redis, node: str, n: int, lease_ms: int) -> list[str]:
    """Claim n jobs, then turn the node's active ZSET into the LIST an older jobq kept."""
    ids = [j.id for j in app.run(app.store.claim(Q, node, n, lease_ms, now_ms=app.now_ms())).jobs]
    key = app.keys.active(Q, node)
    assert r.type(key) == b"zset"  # what claim writes now
    r.delete(key)
    r.rpush(key, *ids)
    return ids


def test_reap_recovers_the_expired_jobs_of_an_old_active_list(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    for _ in range(3):
        fapp.enqueue("t", queue=Q)
    ids = claim_as_old_list(fapp, r, "old-node", 3, 1_000)
    clock.advance(2)
    res = fapp.run(fapp.store.reap(Q, node_ttl_ms=600_000, now_ms=fapp.now_ms()))
    assert sorted(res.requeued) == sorted(ids)
    assert r.type(fapp.keys.active(Q, "old-node")) == b"none"  # converted, then emptied
    assert [j.id for j in fapp.run(fapp.store.claim(Q, "n2", 5, 30_000, now_ms=fapp.now_ms())).jobs] == ids


def test_reap_repairs_a_silent_nodes_old_list_without_leases(
    fapp: jobq.JobQ, clock: jobq.FakeClock, r: redis.Redis
) -> None:
    for _ in range(2):
        fapp.enqueue("t", queue=Q)
    fapp.run(fapp.store.extend(Q, "old-node", 30_000, now_ms=fapp.now_ms()))  # a known node
    ids = claim_as_old_list(fapp, r, "old-node", 2, 30_000)
    r.delete(fapp.keys.leases(Q))
    clock.advance(120)
    res = fapp.run(fapp.store.reap(Q, node_ttl_ms=60_000, now_ms=fapp.now_ms()))
    assert sorted(res.requeued) == sorted(ids)
    assert not r.exists(fapp.keys.active(Q, "old-node"))
    assert r.zscore(fapp.keys.queue_nodes(Q), "old-node") is None


def test_a_restarted_node_recovers_its_old_active_list(
    fapp: jobq.JobQ, redis_url: str, r: redis.Redis
) -> None:
    for _ in range(2):
        fapp.enqueue("t", queue=Q)
    ids = claim_as_old_list(fapp, r, "fixed-id", 2, 30_000)

    async def run() -> int:
        client = async_client(redis_url)
        try:
            return await recover_inherited(fapp, AsyncRunner(client), "fixed-id", [Q])
        finally:
            await client.aclose()

    assert asyncio.run(run()) == 2
    assert r.type(fapp.keys.active(Q, "fixed-id")) == b"none"
    ready: list[bytes] = r.zrange(fapp.keys.ready(Q), 0, -1)  # type: ignore[assignment]
    assert sorted(m.decode() for m in ready) == sorted(ids)
