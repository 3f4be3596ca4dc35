"""Wake-ups on a real Redis Cluster: each queue's channel is subscribed (SSUBSCRIBE) on the
primary that owns the queue's slot, a new job wakes the armed node with SPUBLISH from inside the
enqueue script, and the subscription follows the slot within seconds when it moves to another
primary or its primary fails over to a replica."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from redis.cluster import key_slot

from jobq import JobQ
from jobq.storage.wakeups import CLUSTER_DOWN_CHECK_INTERVAL, WakeSubscriber
from tests.fault.test_cluster_faults import migrate_slot
from tests.harness.cluster import RedisClusterHarness
from tests.harness.redis_server import RedisServer
from tests.redis_setups.test_cluster import node_of, queues_on_distinct_nodes

pytestmark = pytest.mark.integration


class WakeLog:
    """A :class:`WakeSubscriber` of node ``n1`` on a thread of its own, and what it heard."""

    def __init__(self, url: str, app: JobQ, queues: list[str]) -> None:
        self.heard: list[str] = []
        self.live: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.sub = WakeSubscriber(
            url, app.keys, "n1", queues, on_wake=self.heard.append, on_live=self._on_live
        )
        self.task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_live(self, q: str, live: bool) -> None:
        (self.live.add if live else self.live.discard)(q)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(self.sub.run())
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(lambda: self.task.cancel() if self.task else None)
        self.thread.join(10)
        self.loop.close()


def wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - t0


def shard_subscribers(nodes: list[RedisServer], channel: str) -> dict[str, int]:
    """``PUBSUB SHARDNUMSUB`` of ``channel`` on every live node that has a subscriber."""
    out = {}
    for n in nodes:
        c = n.admin_client()
        try:
            [(_, k)] = c.pubsub_shardnumsub(channel)
            if k:
                out[f"127.0.0.1:{n.port}"] = int(k)
        finally:
            c.close()
    return out


def arm_and_wake(app: JobQ, w: WakeLog, q: str, timeout: float = 5.0) -> None:
    """Arm n1's token for ``q``, enqueue a job there: n1 hears it."""
    before = w.heard.count(q)
    assert app.run(app.store.idle(q, "n1", "arm")) == 0
    app.enqueue("t", queue=q)
    wait(lambda: w.heard.count(q) > before, timeout, f"a wake-up for {q}")
    app.run(app.store.claim(q, "c", 10, 10_000))  # leave the queue empty for the next arm


def test_wake_ups_stay_on_the_shard_that_owns_each_queue(cluster: RedisClusterHarness, capp: JobQ) -> None:
    qs = queues_on_distinct_nodes(cluster, capp)
    w = WakeLog(cluster.url, capp, qs)
    try:
        wait(lambda: w.live == set(qs), 10, "subscriptions on 3 shards")
        for q in qs:
            owner = node_of(cluster, capp.keys.ready(q))
            assert shard_subscribers(cluster.nodes, capp.keys.wake(q, "n1")) == {owner: 1}
        for q in qs:
            arm_and_wake(capp, w, q)
        assert sorted(w.heard) == qs
    finally:
        w.close()


def newest_client_ids(nodes: list[RedisServer]) -> dict[int, int]:
    """The highest client id on each node (ids only grow: a larger one is a newer connection)."""
    out = {}
    for n in nodes:
        c = n.admin_client()
        try:
            out[n.port] = int(c.client_id())
        finally:
            c.close()
    return out


def connections_since(nodes: list[RedisServer], since: dict[int, int]) -> dict[int, list[str]]:
    """The flags of each node's connections opened after ``since`` (the asking one left out)."""
    out: dict[int, list[str]] = {}
    for n in nodes:
        c = n.admin_client()
        try:
            me = int(c.client_id())
            rows = c.client_list()
        finally:
            c.close()
        out[n.port] = sorted(str(row["flags"]) for row in rows if since[n.port] < int(row["id"]) != me)
    return out


def test_the_subscriber_holds_one_connection_per_shard_and_closes_every_one(
    cluster: RedisClusterHarness, capp: JobQ
) -> None:
    """Between two looks at the slot map the subscriber holds exactly its subscription
    connection on each shard (P: pub/sub), nothing else: the slot map is read on a connection
    closed at once, not through a cluster client's pools (whose replaced node connections were
    left to the garbage collector: a ResourceWarning, an error in this suite, at a later test).
    Once it stops, none is left, and a garbage collection finds nothing to close."""
    qs = queues_on_distinct_nodes(cluster, capp)
    since = newest_client_ids(cluster.nodes)
    one_each = {n.port: ["P"] for n in cluster.nodes}
    w = WakeLog(cluster.url, capp, qs)
    try:
        wait(lambda: w.live == set(qs), 10, "subscriptions on 3 shards")
        wait(lambda: connections_since(cluster.nodes, since) == one_each, 5, "one connection per shard")
        for _ in range(3):  # the slot map read again (as after a failed connection)
            w.loop.call_soon_threadsafe(w.sub._refresh.set)
            time.sleep(0.2)
            wait(lambda: connections_since(cluster.nodes, since) == one_each, 5, "only the subscriptions")
        assert w.live == set(qs)  # the same owners: nothing resubscribed
    finally:
        w.close()
    wait(lambda: not any(connections_since(cluster.nodes, since).values()), 5, "every connection closed")
    gc.collect()  # a connection left to the collector would warn here (an error in this suite)


@pytest.fixture
def own_cluster(request: pytest.FixtureRequest) -> Iterator[RedisClusterHarness]:
    """A cluster of this test's own (its layout changes): ``replicas`` per primary."""
    c = RedisClusterHarness(primaries=3, replicas=getattr(request, "param", 0)).start()
    yield c
    c.cleanup()


def test_the_subscription_follows_a_moved_slot(own_cluster: RedisClusterHarness) -> None:
    app = JobQ(own_cluster.url)
    q = "moving"
    w = WakeLog(own_cluster.url, app, [q])
    try:
        wait(lambda: q in w.live, 10, "subscribed")
        arm_and_wake(app, w, q)
        slot = key_slot(app.keys.ready(q).encode())
        src_addr = node_of(own_cluster, app.keys.ready(q))
        src = next(n for n in own_cluster.nodes if f"127.0.0.1:{n.port}" == src_addr)
        dst = next(n for n in own_cluster.nodes if n is not src)
        migrate_slot(own_cluster, slot, src, dst, batch=100, pause=0.0)
        t_moved = time.monotonic()
        channel = app.keys.wake(q, "n1")
        wait(
            lambda: shard_subscribers(own_cluster.nodes, channel) == {f"127.0.0.1:{dst.port}": 1},
            5,
            "resubscribed",
        )
        took = time.monotonic() - t_moved
        wait(lambda: q in w.live, 5, "live again")
        arm_and_wake(app, w, q)
        print(f"wake-up subscription on the new owner {took:.2f} s after the slot moved")
    finally:
        w.close()
        app.close()


def _node_id(n: RedisServer) -> str:
    c = n.admin_client()
    try:
        out = c.execute_command("CLUSTER MYID")
        return out.decode() if isinstance(out, bytes) else str(out)
    finally:
        c.close()


def replica_of(cluster: RedisClusterHarness, primary: RedisServer) -> RedisServer:
    """A replica of ``primary``, in sync: one the cluster has, else a primary without slots made
    one (a freshly created cluster does not always end up with every replica it was asked for)."""
    pid = _node_id(primary)
    c = primary.admin_client()
    try:
        nodes = c.cluster("nodes")
    finally:
        c.close()
    by_port = {n.port: n for n in cluster.nodes}
    mine = [a for a, v in nodes.items() if v["master_id"] == pid and "slave" in v["flags"]]
    if mine:
        rep = by_port[int(mine[0].rsplit(":", 1)[1])]
    else:
        spare = [a for a, v in nodes.items() if "master" in v["flags"] and not v["slots"]]
        assert spare, nodes
        rep = by_port[int(spare[0].rsplit(":", 1)[1])]
        rc = rep.admin_client()
        try:
            rc.execute_command("CLUSTER REPLICATE", pid)
        finally:
            rc.close()

    def synced() -> bool:
        rc = rep.admin_client()
        try:
            info = rc.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"
        finally:
            rc.close()

    wait(synced, 20, "the replica in sync")
    return rep


@pytest.mark.parametrize("how", ["kill", "manual"])
@pytest.mark.parametrize("own_cluster", [1], indirect=True)
def test_the_subscription_follows_a_failover(own_cluster: RedisClusterHarness, how: str) -> None:
    """The queue's primary is killed (its replica takes over after the node timeout), or hands
    over with CLUSTER FAILOVER and lives on as a replica: within seconds of the promotion the
    node listens on the new primary, and a new job wakes it again."""
    app = JobQ(own_cluster.url)
    q = "failing"
    w = WakeLog(own_cluster.url, app, [q])
    try:
        wait(lambda: q in w.live, 10, "subscribed")
        arm_and_wake(app, w, q)
        victim_addr = node_of(own_cluster, app.keys.ready(q))
        victim = next(n for n in own_cluster.nodes if f"127.0.0.1:{n.port}" == victim_addr)
        rep = replica_of(own_cluster, victim)
        if how == "kill":
            victim.kill()
        else:
            rc = rep.admin_client()
            try:
                rc.execute_command("CLUSTER FAILOVER")
            finally:
                rc.close()

        def promoted() -> bool:
            rc = rep.admin_client()
            try:
                return rc.info("replication").get("role") == "master"
            finally:
                rc.close()

        wait(promoted, 30, "the replica promoted")
        t_promoted = time.monotonic()
        new = f"127.0.0.1:{rep.port}"
        channel = app.keys.wake(q, "n1")
        alive = [n for n in own_cluster.nodes if n is not victim or how == "manual"]
        wait(lambda: q in w.live and shard_subscribers(alive, channel) == {new: 1}, 10, "resubscribed")
        took = time.monotonic() - t_promoted
        deadline = time.monotonic() + 10
        while True:  # the producer's own client may need a moment to learn the new primary
            try:
                arm_and_wake(app, w, q)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        print(f"{how}: wake-up subscription on the promoted replica {took:.2f} s after the promotion")
        assert took < CLUSTER_DOWN_CHECK_INTERVAL + 2  # the map is read every second while down
    finally:
        w.close()
        app.close()
