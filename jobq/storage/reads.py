"""Plain Redis commands outside the Lua scripts: inspection reads, the queue registry, the pause
flag, a job's fields and the node registry.

Every function takes the client (a synchronous one unless its name ends in ``_async``) and the
:class:`~jobq.storage.keys.Keys` of the app, and returns plain Python values (``str`` for
names). Reading functions send read commands only (ZCARD, ZRANGE, HMGET, ...), so they are safe
on a production Redis at any time; the writing ones are named for what they write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import WatchError

from jobq.storage.calls import AsyncClient, SyncClient
from jobq.storage.keys import Keys
from jobq.util import to_str

#: Priority bands of the ready ZSET: score = (100 - priority) * 2^44 + seq.
PRIO_SPAN = 2**44


# -- the clock and the queue registry ------------------------------------------------------------
def server_time_ms(client: SyncClient) -> int:
    """Now on the Redis clock (TIME)."""
    reply = client.time()
    if isinstance(reply, dict):  # a cluster client may answer per node
        reply = next(iter(reply.values()))
    secs, micros = reply
    return int(secs) * 1000 + int(micros) // 1000


async def server_time_ms_async(client: AsyncClient) -> int:
    """Now on the Redis clock (TIME), from the worker's event loop."""
    sec, usec = await client.time()
    return int(sec) * 1000 + int(usec) // 1000


def queues(client: SyncClient, keys: Keys) -> list[str]:
    """Every queue in the ``jobq:queues`` registry, sorted."""
    return sorted(to_str(q, "replace") for q in client.smembers(keys.queues))


async def queues_async(client: AsyncClient, keys: Keys) -> list[str]:
    """:func:`queues` from an event loop."""
    return sorted(to_str(q, "replace") for q in await client.smembers(keys.queues))


def register_queue(client: SyncClient, keys: Keys, queue: str) -> None:
    """Add ``queue`` to the registry (SADD)."""
    client.sadd(keys.queues, queue)


async def register_queue_async(client: AsyncClient, keys: Keys, queue: str) -> None:
    """Add ``queue`` to the registry (SADD), from the worker's event loop."""
    await client.sadd(keys.queues, queue)


def known_queue(client: SyncClient, keys: Keys, queue: str) -> bool:
    """Is ``queue`` in the registry, served by a node, or paused?"""
    pipe = client.pipeline(transaction=False)
    pipe.sismember(keys.queues, queue)
    pipe.exists(keys.queue_nodes(queue), keys.paused(queue))
    registered, present = pipe.execute()
    return bool(registered) or bool(present)


def pause(client: SyncClient, keys: Keys, queue: str, *, register: bool = False) -> bool:
    """Set the pause flag of ``queue`` (SET NX); with ``register``, add it to the registry too.
    False if it was already set."""
    changed = bool(client.set(keys.paused(queue), "1", nx=True))
    if register:
        client.sadd(keys.queues, queue)
    return changed


def resume(client: SyncClient, keys: Keys, queue: str) -> bool:
    """Clear the pause flag of ``queue`` (DEL). False if it was not set."""
    return bool(client.delete(keys.paused(queue)))


# -- queue depths ------------------------------------------------------------------------------------
def queue_depths(
    client: SyncClient, keys: Keys, queues: Sequence[str], *, live_since_ms: int
) -> list[tuple[int, int, int, int, int, int, int]]:
    """Per queue, in one pipeline: ready, scheduled, active, dead and finished counts, the pause
    flag (0 or 1) and the number of nodes serving it with a heartbeat since ``live_since_ms``."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.zcard(keys.ready(q))
        pipe.zcard(keys.scheduled(q))
        pipe.zcard(keys.leases(q))
        pipe.zcard(keys.dead(q))
        pipe.zcard(keys.finished(q))
        pipe.exists(keys.paused(q))
        pipe.zcount(keys.queue_nodes(q), live_since_ms, "+inf")
    raw = pipe.execute()
    out = []
    for i in range(len(queues)):
        a, b, c, d, e, f, g = (int(x) for x in raw[i * 7 : i * 7 + 7])
        out.append((a, b, c, d, e, f, g))
    return out


def oldest_ready_ms(client: SyncClient, keys: Keys, queue: str, sample: int) -> int | None:
    """The smallest ``ready_ms`` among the first ``sample`` ids of each priority band of the ready
    ZSET: one ZRANGE per band present (at most 201) and one HGET per sampled id, pipelined."""
    key = keys.ready(queue)
    heads: list[str] = []
    start: str | float = "-inf"
    for _ in range(202):
        rows = client.zrangebyscore(key, start, "+inf", start=0, num=sample, withscores=True)
        if not rows:
            break
        band = int(rows[0][1]) // PRIO_SPAN
        heads.extend(to_str(m, "replace") for m, score in rows if int(score) // PRIO_SPAN == band)
        start = (band + 1) * PRIO_SPAN
    if not heads:
        return None
    pipe = client.pipeline(transaction=False)
    for job_id in heads:
        # A job ready since its enqueue stores no ready_ms: it is its enqueued_ms.
        pipe.hmget(keys.job(queue, job_id), ["ready_ms", "enqueued_ms"])
    times = [int(a if a is not None else b) for a, b in pipe.execute() if a is not None or b is not None]
    return min(times) if times else None


# -- jobs --------------------------------------------------------------------------------------------
def job_ids(client: SyncClient, keys: Keys, queue: str, state: str, limit: int, *, scan: int) -> list[str]:
    """Ids of ``queue``'s jobs in ``state``, at most ``limit``: ready in run order, scheduled by run
    time, active by lease deadline, dead most recent first; done and cancelled (which share the
    finished ZSET) most recent first among the newest ``scan`` finished jobs."""
    if state == "ready":
        raw = client.zrange(keys.ready(queue), 0, limit - 1)
    elif state == "scheduled":
        raw = client.zrange(keys.scheduled(queue), 0, limit - 1)
    elif state == "active":
        raw = client.zrange(keys.leases(queue), 0, limit - 1)
    elif state == "dead":
        raw = client.zrevrange(keys.dead(queue), 0, limit - 1)  # most recent first
    else:
        ids = [to_str(x, "replace") for x in client.zrevrange(keys.finished(queue), 0, scan - 1)]
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(queue, job_id), "state")
        states = pipe.execute() if ids else []
        found = [
            i for i, st in zip(ids, states, strict=True) if st is not None and to_str(st, "replace") == state
        ]
        return found[:limit]
    return [to_str(x, "replace") for x in raw]


def job_fields(client: SyncClient, keys: Keys, queue: str, job_id: str, fields: Sequence[str]) -> list[Any]:
    """HMGET of a job's hash: the raw values (``bytes`` or None) in the order of ``fields``.

    ``"payload"`` is the whole payload: enqueue stores one longer than 64 bytes in parts
    (``"payload"``, ``"p2"`` .. ``"p<k>"``, ``"parts"`` = k, so the hash keeps Redis's
    compact encoding); a job stored whole (short, or from before parts existed) has no ``"parts"``."""
    key = keys.job(queue, job_id)
    names = list(fields)
    if "payload" not in names:
        return list(client.hmget(key, names))
    raw = list(client.hmget(key, [*names, "parts"]))
    parts = _int(raw.pop())
    at = names.index("payload")
    if parts is not None and parts > 1 and raw[at] is not None:
        rest = client.hmget(key, [f"p{i}" for i in range(2, parts + 1)])
        # A part gone between the two reads: the job was deleted meanwhile.
        raw[at] = None if None in rest else b"".join([raw[at], *rest])
    return raw


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


async def job_fields_async(
    client: AsyncClient, keys: Keys, queue: str, job_id: str, fields: Sequence[str]
) -> list[Any]:
    """:func:`job_fields` from an event loop (``"payload"`` whole, from its parts)."""
    key = keys.job(queue, job_id)
    names = list(fields)
    if "payload" not in names:
        return list(await client.hmget(key, names))
    raw = list(await client.hmget(key, [*names, "parts"]))
    parts = _int(raw.pop())
    at = names.index("payload")
    if parts is not None and parts > 1 and raw[at] is not None:
        rest = await client.hmget(key, [f"p{i}" for i in range(2, parts + 1)])
        raw[at] = None if None in rest else b"".join([raw[at], *rest])
    return raw


async def wait_mark_and_fields_async(
    client: AsyncClient, keys: Keys, queue: str, job_id: str, fields: Sequence[str], ttl_ms: int
) -> list[Any]:
    """Mark the job as waited for (its :meth:`~jobq.storage.keys.Keys.waiter` key, expiring
    after ``ttl_ms``: ack and fail then publish its id on the queue's ``done`` channel), then
    HMGET its fields; one pipelined round trip (both keys share the queue's hash tag)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.waiter(queue, job_id), b"1", px=ttl_ms)
        pipe.hmget(keys.job(queue, job_id), list(fields))
        _, values = await pipe.execute()
    return list(values)


def job_queue(client: SyncClient, keys: Keys, job_id: str, queues: Sequence[str]) -> str | None:
    """The first of ``queues`` that holds a job ``job_id`` (EXISTS per queue, pipelined)."""
    if not queues:
        return None
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.exists(keys.job(q, job_id))
    for q, hit in zip(queues, pipe.execute(), strict=True):
        if hit:
            return q
    return None


# -- the node registry -------------------------------------------------------------------------------
def nodes(client: SyncClient, keys: Keys, limit: int) -> list[tuple[str, int, dict[str, str]]]:
    """The registry's nodes, most recent heartbeat first: (node, heartbeat ms, its hash as text;
    empty once the hash expired)."""
    rows = client.zrevrange(keys.nodes, 0, limit - 1, withscores=True)
    pipe = client.pipeline(transaction=False)
    for node, _ in rows:
        pipe.hgetall(keys.node(to_str(node, "replace")))
    hashes = pipe.execute() if rows else []
    return [
        (
            to_str(node, "replace"),
            int(score),
            {to_str(k, "replace"): to_str(v, "replace") for k, v in h.items()},
        )
        for (node, score), h in zip(rows, hashes, strict=True)
    ]


def live_node_count(client: SyncClient, keys: Keys, since_ms: int) -> int:
    """Nodes with a heartbeat since ``since_ms`` (one ZCOUNT)."""
    return int(client.zcount(keys.nodes, since_ms, "+inf"))


def register_node(
    client: SyncClient,
    keys: Keys,
    node: str,
    info: Mapping[str, Any],
    *,
    now_ms: int,
    ttl_ms: int,
    queues: Sequence[str] = (),
    housekeeping: bool = True,
) -> None:
    """One heartbeat of the node registry, in one pipeline: the node's score and hash (expiring
    after ``ttl_ms``); with ``housekeeping``, also entries older than ``ttl_ms`` dropped (killed
    nodes never deregister) and the node's ``queues`` added to the queue registry (which
    repairs a registration an enqueue could not make). Best effort for the caller: on a Redis
    Cluster these global keys live in one slot, and nothing on the claim path waits for them."""
    pipe = client.pipeline(transaction=False)
    pipe.zadd(keys.nodes, {node: now_ms})
    pipe.hset(keys.node(node), mapping=dict(info))
    pipe.pexpire(keys.node(node), ttl_ms)
    if housekeeping:
        pipe.zremrangebyscore(keys.nodes, "-inf", now_ms - ttl_ms)
        if queues:
            pipe.sadd(keys.queues, *queues)
    pipe.execute()


def queue_epochs(client: SyncClient, keys: Keys, queues: Sequence[str]) -> dict[str, bytes | Exception]:
    """The dataset epoch of each queue's shard: ``SET jobq:{q}:epoch <random> NX GET``, the old
    value, or the one just set when there was none (a new queue, or the shard lost its data).
    One pipeline; on a Redis Cluster where it fails (a primary is down), one command per queue,
    so each queue gets its own answer or its own error."""
    fresh = {q: os.urandom(8).hex().encode() for q in queues}

    def one(q: str) -> bytes | Exception:
        try:
            old = client.set(keys.queue_epoch(q), fresh[q], nx=True, get=True)
        except Exception as exc:
            return exc
        return fresh[q] if old is None else bytes(old)

    if len(queues) > 1:
        pipe = client.pipeline(transaction=False)
        for q in queues:
            pipe.set(keys.queue_epoch(q), fresh[q], nx=True, get=True)
        try:
            raw = pipe.execute(raise_on_error=False)
        except Exception:
            return {q: one(q) for q in queues}
        out: dict[str, bytes | Exception] = {}
        for q, old in zip(queues, raw, strict=True):
            out[q] = old if isinstance(old, Exception) else fresh[q] if old is None else bytes(old)
        return out
    return {q: one(q) for q in queues}


def deregister_node(client: SyncClient, keys: Keys, node: str, queues: Sequence[str]) -> None:
    """Remove ``node`` from the registry and from each queue's node set (a clean exit)."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(keys.nodes, node)
    pipe.delete(keys.node(node))
    pipe.execute()
    for q in queues:
        client.zrem(keys.queue_nodes(q), node)


# -- a node's own active set ---------------------------------------------------------------------------
async def active_ids_async(client: AsyncClient, keys: Keys, queue: str, node: str, limit: int) -> list[str]:
    """The first ``limit`` ids of ``node``'s active set in ``queue``. An active set left as a LIST
    by a jobq from before the active ZSET is converted first (the reap script does the same): the
    ZSET is built beside it (same hash tag) and renamed over it in one step."""
    akey = keys.active(queue, node)
    if await client.type(akey) in (b"list", "list"):
        ids = await client.lrange(akey, 0, -1)
        if ids:
            tmp = keys.active_upgrade(queue, node)
            await client.zadd(tmp, dict.fromkeys(ids, 0))
            await client.rename(tmp, akey)
    return [to_str(raw) for raw in await client.zrange(akey, 0, limit - 1)]


def delete_dead(client: SyncClient, keys: Keys, queue: str, job_ids: Sequence[str]) -> int:
    """Delete the given dead letters of ``queue`` (the job hash, its dead-list entry and its unique
    key when that still names it); ids that are not dead letters (any more) are left alone.
    Returns how many were deleted. Each job is one optimistic transaction (WATCH the dead list,
    the job and its unique key; MULTI; retried on a concurrent change), so a retry of the same job
    racing with the delete wins or loses whole. Every key is in the queue's hash slot."""
    deleted = 0
    for job_id in job_ids:
        jkey, dkey = keys.job(queue, job_id), keys.dead(queue)
        for _ in range(10):
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(dkey, jkey)
                    if pipe.zscore(dkey, job_id) is None:
                        break
                    state, unique = pipe.hmget(jkey, "state", "unique")
                    if state is not None and to_str(state, "replace") != "dead":
                        break
                    ukey = keys.unique(queue, to_str(unique, "replace")) if unique else None
                    if ukey is not None:
                        pipe.watch(ukey)
                    owns_unique = ukey is not None and to_str(pipe.get(ukey) or b"", "replace") == job_id
                    pipe.multi()
                    pipe.zrem(dkey, job_id)
                    pipe.delete(jkey)
                    if owns_unique and ukey is not None:
                        pipe.delete(ukey)
                    pipe.execute()
                    deleted += 1
                    break
                except WatchError:
                    continue
    return deleted


def page_ids(
    client: SyncClient, keys: Keys, queue: str, state: str, offset: int, limit: int
) -> tuple[list[str], int]:
    """One page of the ids of ``queue``'s jobs in ``state`` (ready, scheduled, active or dead; dead
    most recent first) from ``offset``, and how many the state holds: a ZRANGE by index and a
    ZCARD, O(log N + page)."""
    key = {
        "ready": keys.ready(queue),
        "scheduled": keys.scheduled(queue),
        "active": keys.leases(queue),
        "dead": keys.dead(queue),
    }[state]
    pipe = client.pipeline(transaction=False)
    if state == "dead":
        pipe.zrevrange(key, offset, offset + limit - 1)
    else:
        pipe.zrange(key, offset, offset + limit - 1)
    pipe.zcard(key)
    raw, total = pipe.execute()
    return [to_str(x, "replace") for x in raw], int(total)


def activity(
    client: SyncClient, keys: Keys, queues: Sequence[str], since: Mapping[str, float], sample: int
) -> list[tuple[int, float | None, int, list[tuple[int | None, int | None]]]]:
    """What each queue did since a watermark, for the dashboard's charts. Per queue: the FIFO
    sequence counter (every job made ready takes one number: enqueued, or due after a delay or
    a retry backoff); the newest score of the finished index (its new watermark, None when it
    is empty); how many finished entries score above ``since[queue]`` up to that one (none on
    a queue without a watermark yet); and, for up to ``sample`` of the newest of them, the job's
    ``(ready_ms, started_ms)``. The finished index is scored by expiry (finish time plus the
    retention), so with one retention its order is the order of finishing."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.get(keys.seq(q))
        lo = since.get(q)
        if lo is None:
            pipe.zrevrange(keys.finished(q), 0, 0, withscores=True)
        else:
            pipe.zrevrangebyscore(keys.finished(q), "+inf", f"({lo!r}", start=0, num=sample, withscores=True)
    raw = pipe.execute()
    heads: list[tuple[int, float | None, list[str]]] = []
    for i, q in enumerate(queues):
        seq, newest = raw[2 * i], raw[2 * i + 1]
        top = float(newest[0][1]) if newest else since.get(q)
        ids = [to_str(m, "replace") for m, _ in newest] if q in since else []
        heads.append((int(seq or 0), top, ids))
    pipe = client.pipeline(transaction=False)
    counted: list[bool] = []
    for q, (_, top, ids) in zip(queues, heads, strict=True):
        lo = since.get(q)
        counted.append(lo is not None and top is not None and top > lo)
        if counted[-1]:
            pipe.zcount(keys.finished(q), f"({lo!r}", repr(top))
        for job_id in ids:
            # A job ready since its enqueue stores no ready_ms: it is its enqueued_ms.
            pipe.hmget(keys.job(q, job_id), "ready_ms", "enqueued_ms", "started_ms")
    raw = pipe.execute()
    out = []
    pos = 0
    for (seq, top, ids), has_count in zip(heads, counted, strict=True):
        count = 0
        if has_count:
            count = int(raw[pos])
            pos += 1
        times = [(_int_or_none(r or e), _int_or_none(b)) for r, e, b in raw[pos : pos + len(ids)]]
        pos += len(ids)
        out.append((seq, top, count, times))
    return out


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# -- a Redis Cluster with a primary down (jobq stats; RELIABILITY F19) -----------------------------------
def shard_of(client: SyncClient, key: str) -> str:
    """``host:port`` of the primary serving ``key``'s slot, as the cluster client routes it now
    (``slot N`` when it cannot tell)."""
    from redis.crc import key_slot

    slot = key_slot(key.encode())
    try:
        node = client.jobq_connect().nodes_manager.get_node_from_slot(slot)
        return f"{node.host}:{node.port}"
    except Exception:
        return f"slot {slot}"


def cluster_time_ms(client: SyncClient) -> int:
    """Now on the Redis clock, from the first primary of the cluster that answers."""
    from jobq.errors import RedisUnavailable

    last: Exception | None = None
    for node in client.jobq_connect().get_primaries():
        try:
            secs, micros = node.redis_connection.time()
            return int(secs) * 1000 + int(micros) // 1000
        except Exception as exc:
            last = exc
    raise RedisUnavailable(f"no Redis Cluster primary answers: {last}", refused=True)


def scan_queues(client: SyncClient, keys: Keys, limit: int) -> list[str]:
    """The queues of the cluster's primaries that answer, found by their FIFO counters (``SCAN
    MATCH jobq:{*}:seq``: a permanent key of every queue enqueued to), for when the queue
    registry is unreachable. At most ``limit``; a primary that does not answer is skipped."""
    found: set[str] = set()
    head = f"{keys.prefix}:{{"
    for node in client.jobq_connect().get_primaries():
        try:
            for raw in node.redis_connection.scan_iter(match=f"{keys.prefix}:{{*}}:seq", count=1000):
                key = to_str(raw, "replace")
                if key.startswith(head) and key.endswith("}:seq"):
                    found.add(key[len(head) : -len("}:seq")])
                if len(found) >= limit:
                    return sorted(found)
        except Exception:
            continue
    return sorted(found)


# -- lifecycle event streams (docs/events.md) --------------------------------------------------------
#: One stream entry: (queue, entry id, fields), names and values decoded (UTF-8, replacing).
StreamEntry = tuple[str, str, dict[str, str]]


def _entries(queue: str, raw: Any) -> list[StreamEntry]:
    out: list[StreamEntry] = []
    for entry_id, fields in raw or []:
        decoded = {to_str(k, "replace"): to_str(v, "replace") for k, v in (fields or {}).items()}
        out.append((queue, to_str(entry_id), decoded))
    return out


def _xread_reply(by_key: Mapping[str, str], reply: Any) -> list[StreamEntry]:
    """XREAD's reply (a dict in RESP3, a list of [key, entries] in RESP2) as entries."""
    resp3 = isinstance(reply, dict)
    out: list[StreamEntry] = []
    for key, entries in reply.items() if resp3 else (reply or []):
        if resp3 and entries and isinstance(entries[0], list):
            entries = entries[0]  # redis-py wraps RESP3's entry list in a list
        out += _entries(by_key[to_str(key)], entries)
    return out


def last_events(
    client: SyncClient, keys: Keys, queues: Sequence[str], n: int
) -> dict[str, list[StreamEntry]]:
    """Per queue, its newest ``n`` events, oldest first (XREVRANGE; one pipeline, which a
    cluster client splits by node). ``n = 1`` gives each stream's position."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.xrevrange(keys.events(q), "+", "-", count=n)
    return {q: _entries(q, list(reversed(raw))) for q, raw in zip(queues, pipe.execute(), strict=True)}


async def last_events_async(
    client: AsyncClient, keys: Keys, queues: Sequence[str], n: int
) -> dict[str, list[StreamEntry]]:
    """:func:`last_events` from an event loop."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        pipe.xrevrange(keys.events(q), "+", "-", count=n)
    return {q: _entries(q, list(reversed(raw))) for q, raw in zip(queues, await pipe.execute(), strict=True)}


def _multi_key(client: Any, cursors: Mapping[str, str]) -> bool:
    """Can one XREAD name every stream? On Redis Cluster only when there is one (each queue is
    its own hash tag, so its own slot)."""
    from jobq.storage.clients import is_cluster_client

    return len(cursors) == 1 or not is_cluster_client(client)


def read_events(
    client: SyncClient, keys: Keys, cursors: Mapping[str, str], *, count: int, block_ms: int | None
) -> list[StreamEntry]:
    """The events after each queue's cursor (queue -> entry id), at most ``count`` per queue.
    Standalone and Sentinel: one XREAD over every stream, waiting up to ``block_ms`` for the
    first new entry (None = no wait). Redis Cluster with several queues: one XREAD per queue in
    a pipeline (split by node) and no wait; the caller polls."""
    by_key = {keys.events(q): q for q in cursors}
    streams = {keys.events(q): c for q, c in cursors.items()}
    if _multi_key(client, cursors):
        return _xread_reply(by_key, client.xread(streams, count=count, block=block_ms))
    pipe = client.pipeline(transaction=False)
    for key, cur in streams.items():
        pipe.xread({key: cur}, count=count)
    out: list[StreamEntry] = []
    for reply in pipe.execute():
        out += _xread_reply(by_key, reply)
    return out


async def read_events_async(
    client: AsyncClient, keys: Keys, cursors: Mapping[str, str], *, count: int, block_ms: int | None
) -> list[StreamEntry]:
    """:func:`read_events` from an event loop."""
    by_key = {keys.events(q): q for q in cursors}
    streams = {keys.events(q): c for q, c in cursors.items()}
    if _multi_key(client, cursors):
        return _xread_reply(by_key, await client.xread(streams, count=count, block=block_ms))
    pipe = client.pipeline(transaction=False)
    for key, cur in streams.items():
        pipe.xread({key: cur}, count=count)
    out: list[StreamEntry] = []
    for reply in await pipe.execute():
        out += _xread_reply(by_key, reply)
    return out
