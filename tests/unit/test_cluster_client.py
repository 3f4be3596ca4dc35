"""A Redis Cluster whose seeds are all down is retried like a standalone server (RELIABILITY F19).

redis-py's cluster client reads the slot map in its constructor and raises when no seed answers;
jobq builds it at first use instead, so a producer, the CLI or a worker gets
``RedisUnavailable`` (refused) from a call and retries, and the next call tries the seeds again.
Nothing listens on the ports used here (they are bound, then closed): a real refusal, no server
needed. The fault test F19 kills a real primary.
"""

from __future__ import annotations

import socket

import pytest
import redis

import jobq
from jobq.errors import RedisUnavailable
from jobq.storage import clients
from jobq.storage.calls import SyncRunner, _shard_error, map_error


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_cluster_client_does_not_connect_when_built() -> None:
    url = f"redis+cluster://127.0.0.1:{_dead_port()},127.0.0.1:{_dead_port()}"
    client = clients.sync_client(url)  # no seed answers: no error yet
    assert clients.is_cluster_client(client)
    runner = SyncRunner(client)  # scripts registered without a round trip
    assert len(runner.sha(jobq.storage.calls.ScriptName.ENQUEUE)) == 40
    with pytest.raises(RedisUnavailable) as info:
        client.ping()
    assert info.value.refused
    client.close()


def test_enqueue_to_an_unreachable_cluster_raises_redis_unavailable_every_time() -> None:
    app = jobq.JobQ(f"redis+cluster://user:s3cret@127.0.0.1:{_dead_port()}")
    try:
        for _ in range(2):  # the second call tries the seeds again
            with pytest.raises(RedisUnavailable) as info:
                app.enqueue("t", queue="q")
            assert info.value.refused
            assert "s3cret" not in str(info.value)
    finally:
        app.close()


def test_async_cluster_client_unreachable_is_redis_unavailable() -> None:
    import asyncio

    async def main() -> None:
        client = clients.async_client(f"redis+cluster://127.0.0.1:{_dead_port()}")
        try:
            with pytest.raises(RedisUnavailable):
                await client.ping()
        finally:
            await client.aclose()

    asyncio.run(main())


def test_cluster_unreachable_message_maps_to_redis_unavailable() -> None:
    exc = redis.exceptions.RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at least one reachable node: refused"
    )
    mapped = map_error(exc, "claim", "q")
    assert isinstance(mapped, RedisUnavailable)


def test_a_connection_error_on_a_cluster_is_the_queues_shard_alone() -> None:
    down = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:7000. Connection refused.")
    on_cluster = _shard_error(True, down, "claim", "q")
    assert isinstance(on_cluster, RedisUnavailable) and on_cluster.shard and not on_cluster.slot
    standalone = _shard_error(False, down, "claim", "q")
    assert isinstance(standalone, RedisUnavailable) and not standalone.shard
    # A slot that moves is a shard error too.
    moving = map_error(redis.exceptions.TryAgainError("rehashing"), "claim", "q")
    assert isinstance(moving, RedisUnavailable) and moving.slot and moving.shard


# -- the wake-up subscriber's slot map (jobq.storage.wakeups) -------------------------------------
def test_cluster_slots_reply_is_read_with_unknown_endpoints_on_the_asked_host() -> None:
    from jobq.storage.wakeups import _owners, parse_cluster_slots

    reply = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
        [5461, 10922, [b"", 7001, b"id2"]],  # endpoint not known to the server: the one asked
        [10923, 16383, [None, 7002, b"id3", {}]],
    ]
    shards = parse_cluster_slots(reply, "seed.example")
    assert shards == [
        (0, 5460, [("10.0.0.1", 7000), ("10.0.0.4", 7003)]),
        (5461, 10922, [("seed.example", 7001)]),
        (10923, 16383, [("seed.example", 7002)]),
    ]
    assert _owners(shards, {"a": 0, "b": 10922, "c": 16383}) == {
        "a": "10.0.0.1:7000",
        "b": "seed.example:7001",
        "c": "seed.example:7002",
    }
    with pytest.raises(redis.exceptions.ResponseError, match="slot 100"):
        _owners(shards[1:], {"a": 100})  # a slot no node serves is an error, not a guess
    with pytest.raises(redis.exceptions.ResponseError):
        parse_cluster_slots(b"ERR", "seed.example")


def test_wake_subscriber_names_every_node_it_asked_when_none_answers() -> None:
    import asyncio

    from jobq.storage.keys import Keys
    from jobq.storage.wakeups import WakeSubscriber

    ports = [_dead_port(), _dead_port()]
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    sub = WakeSubscriber(url, Keys(), "n1", ["q"], on_wake=lambda q: None)
    with pytest.raises(ConnectionError) as info:
        asyncio.run(sub._read_owners())
    assert all(f"127.0.0.1:{p}" in str(info.value) for p in ports)
