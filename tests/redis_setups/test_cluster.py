"""jobq on a real 3-primary Redis Cluster: cluster clients from ``redis+cluster://`` URLs, every
script on one slot, queues spread over nodes, sharded hot queues (wake-ups: test_cluster_wakeups.py)."""

from __future__ import annotations

import asyncio
import collections

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from jobq import JobQ, JobState, errors
from jobq.storage import clients
from tests.harness.cluster import RedisClusterHarness
from tests.redis_setups.conftest import burst

pytestmark = pytest.mark.integration


def node_of(cluster: RedisClusterHarness, key: str) -> str:
    c = cluster.admin_client()
    try:
        return str(c.get_node_from_key(key).name)
    finally:
        c.close()


def queues_on_distinct_nodes(cluster: RedisClusterHarness, app: JobQ, n: int = 3) -> list[str]:
    """Queue names whose keys live on ``n`` different primaries."""
    picked: dict[str, str] = {}
    for i in range(200):
        q = f"q{i}"
        picked.setdefault(node_of(cluster, app.keys.ready(q)), q)
        if len(picked) == n:
            return sorted(picked.values())
    raise AssertionError("could not find queues on distinct nodes")


def test_cluster_url_gives_cluster_clients(cluster_url: str) -> None:
    c = clients.sync_client(cluster_url)
    try:
        # Built at first use (a cluster whose seeds are down is retried, not fatal).
        assert clients.is_cluster_client(c)
        assert c.ping()
        assert isinstance(c.jobq_connect(), redis.cluster.RedisCluster)
    finally:
        c.close()

    async def check() -> None:
        ac = clients.async_client(cluster_url)
        try:
            assert isinstance(ac, redis.asyncio.cluster.RedisCluster)
            assert await ac.ping()
        finally:
            await ac.aclose()

    asyncio.run(check())


def test_core_operations_on_queues_of_three_nodes(cluster: RedisClusterHarness, capp: JobQ) -> None:
    qs = queues_on_distinct_nodes(cluster, capp)
    jobs = [capp.enqueue("t", [i], queue=q) for i, q in enumerate(qs)]
    batch = capp.enqueue_many([{"task": "t", "args": [i], "queue": qs[i % 3]} for i in range(30)])
    assert len(batch) == 30 and all(j.status() is JobState.READY for j in batch)
    assert {q.decode() for q in capp.client.smembers(capp.keys.queues)} == set(qs)
    # claim / ack / fail / reap on each node, through the scripts
    for q in qs:
        res = capp.run(capp.store.claim(q, "n1", 100, 30_000))
        assert len(res.jobs) == 11
        ids = [j.id for j in res.jobs]
        assert capp.run(capp.store.ack(q, "n1", [(ids[0], b"")])) == [1]
        assert capp.run(capp.store.fail(q, "n1", ids[1], "boom", dead=True)).outcome == "dead"
        now = res.now_ms
        reaped = capp.run(capp.store.reap(q, node_ttl_ms=60_000, now_ms=now + 60_000))
        assert sorted(reaped.requeued) == sorted(ids[2:])
    assert [j.status() for j in jobs] == [JobState.DONE] * 3  # each queue's first job was acked
    assert capp.job(batch[5].id).queue == batch[5].queue  # find_job_queue pipelines over slots


def test_every_script_touches_one_slot(cluster: RedisClusterHarness, capp: JobQ) -> None:
    """A script whose keys cross slots is refused by Redis Cluster: run one of each with a queue
    name, and check every key a script was given shares the queue's slot."""
    st = capp.store
    calls = [
        st.enqueue("x", [capp.prepare(capp_request("x"))[1]]),
        st.claim("x", "n", 1, 1000),
        st.ack("x", "n", [("id", b"")]),
        st.fail("x", "n", "id", "e"),
        st.extend("x", "n", 1000),
        st.release("x", "n"),
        st.reap("x", node_ttl_ms=1000),
        st.promote("x"),
        st.cancel("x", "id"),
        st.retry_dead("x"),
        st.purge("x", "dead"),
    ]
    c = cluster.admin_client()
    try:
        slot = c.keyslot(capp.keys.ready("x"))
        for call in calls:
            assert {c.keyslot(k) for k in call.keys} == {slot}, call.script
            capp.run(call)  # and the cluster runs it (no CROSSSLOT, no non-local key error)
    finally:
        c.close()


def capp_request(queue: str) -> object:
    from jobq.app import EnqueueRequest

    return EnqueueRequest("t", queue=queue)


def test_async_pubsub_client_subscribes_on_a_cluster(cluster_url: str) -> None:
    async def run() -> None:
        c = clients.async_pubsub_client(cluster_url, socket_timeout=None)
        try:
            ps = c.pubsub(ignore_subscribe_messages=True)
            await ps.subscribe("jobq:{z}:wake")
            await ps.aclose()
        finally:
            await c.aclose()

    asyncio.run(run())


def test_burst_worker_drains_queues_on_every_node(cluster: RedisClusterHarness, capp: JobQ) -> None:
    qs = queues_on_distinct_nodes(cluster, capp)
    seen: list[int] = []

    @capp.task(name="add")
    def add(a: int, b: int) -> int:
        seen.append(a)
        return a + b

    jobs = capp.enqueue_many([{"task": "add", "args": [i, 1], "queue": qs[i % 3]} for i in range(60)])
    w = burst(capp, queues=[(q, 1) for q in qs], concurrency=8)
    assert w.stats["completed"] == 60
    assert sorted(seen) == list(range(60))
    assert [j.result(timeout=5) for j in jobs[:3]] == [1, 2, 3]


# -- sharded hot queues ------------------------------------------------------------------------
def test_shard_declaration_is_validated(cluster_url: str) -> None:
    with pytest.raises(errors.InvalidInput) as e:
        JobQ(cluster_url, shards={"hot": 0})
    assert e.value.field == "shards"
    with pytest.raises(errors.InvalidQueueName):
        JobQ(cluster_url, shards={"hot#1": 2})
    with pytest.raises(errors.InvalidQueueName):
        JobQ(cluster_url).enqueue("t", queue="hot#x")
    with pytest.raises(errors.InvalidInput) as e:
        JobQ(cluster_url, durable=True)  # WAIT per slot owner is not offered on a cluster
    assert e.value.field == "durable"


def test_sharded_queue_spreads_jobs_over_nodes_and_one_worker_drains_all(
    cluster: RedisClusterHarness, cluster_url: str
) -> None:
    app = JobQ(cluster_url, shards={"hot": 3})
    try:
        assert app.queue_shards("hot") == ["hot#0", "hot#1", "hot#2"]
        assert app.queue_shards("cold") == ["cold"]
        jobs = app.enqueue_many([{"task": "t", "args": [i], "queue": "hot"} for i in range(300)])
        per_shard = collections.Counter(j.queue for j in jobs)
        assert set(per_shard) == {"hot#0", "hot#1", "hot#2"}
        assert min(per_shard.values()) > 60  # a hash of random ids: roughly 100 each
        nodes = {node_of(cluster, app.keys.ready(s)) for s in app.queue_shards("hot")}
        assert len(nodes) >= 2  # separate hash tags: the shards are not pinned to one node
        # a retried enqueue with the same job id lands on the same shard: still a no-op
        again = app.enqueue("t", [0], queue="hot", job_id=jobs[0].id)
        assert again == jobs[0]
        # a unique key holds across shards
        u1 = app.enqueue("t", queue="hot", unique_key="only-once")
        u2 = app.enqueue("t", queue="hot", unique_key="only-once")
        assert u1 == u2

        done: list[int] = []

        @app.task(name="t")
        def t(i: int = -1) -> None:
            done.append(i)

        w = burst(app, queues=[("hot", 1)], concurrency=10)
        assert w.stats["completed"] == 301
        assert sorted(x for x in done if x >= 0) == list(range(300))
    finally:
        app.close()


def test_priority_holds_within_a_shard_and_claim_rounds_rotate(cluster_url: str) -> None:
    app = JobQ(cluster_url, shards={"hot": 3})
    try:
        for i in range(30):
            app.enqueue("t", [i], queue="hot", priority=i % 5)
        # rotation: successive claim rounds start at the next shard
        firsts = [app.rotate_shards(["a", "hot#0", "hot#1", "hot#2", "z"]) for _ in range(3)]
        assert [f[1] for f in firsts] == ["hot#1", "hot#2", "hot#0"]
        assert all(f[0] == "a" and f[-1] == "z" for f in firsts)
        for shard in app.queue_shards("hot"):
            res = app.run(app.store.claim(shard, "n1", 100, 30_000))
            prios = [int(app.client.hget(app.keys.job(shard, j.id), "priority")) for j in res.jobs]
            assert prios == sorted(prios, reverse=True)  # higher first within a shard
    finally:
        app.close()
