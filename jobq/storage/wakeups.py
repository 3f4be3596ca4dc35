"""A node's wake-up subscriptions: one shard channel per queue, on the node that owns the queue.

How a job wakes one idle node (lua/idle.lua, ``wake_idle`` in lua/lib/common.lua): a node with
free slots whose claim came back short arms a token for each queue (its id in the queue's ZSET
``jobq:{q}:idle``), atomically with a look at the queue, so work that arrived in between is
claimed at once instead. Every script that makes jobs ready pops one token per job and tells that
node ``r`` on its own channel ``jobq:{q}:wake:<node>`` with ``SPUBLISH``; a reply of 0 receivers
means the node is gone, and the next token is tried. Nothing is sent when no node is idle.

A token is worth arming only while the node listens on its channel, so :class:`WakeSubscriber`
reports which queues are *live* (their ``SSUBSCRIBE`` confirmed on the connection that hears
them). A queue stops being live when its connection fails or Redis drops the subscription (it
sends ``sunsubscribe`` when the queue's slot leaves that node); the subscriber then reconnects
to the queue's current owner and reports the queue live again, and the worker looks at the queue
and arms again, since anything published meanwhile reached nobody.

On Redis Cluster the channel of a queue lives on the shard that owns the queue's slot (the
channel name carries the queue's hash tag), so the subscriber holds one connection per primary
that owns some of the node's queues, re-reads the slot map whenever a connection fails or a
subscription is dropped, and checks it every :data:`CLUSTER_CHECK_INTERVAL` seconds (a failover
that leaves the old primary alive as a replica), every :data:`CLUSTER_DOWN_CHECK_INTERVAL` while
a subscription is down (a dead primary's replica is followed once it is promoted). Elsewhere
one connection carries every channel.

The slot map is read with ``CLUSTER SLOTS`` on one short-lived plain connection to the first
node that answers (the node that answered last, then the URL's seeds, then every node the last
map named), and each queue's slot is computed here (``redis.crc.key_slot`` of its channel). No
``RedisCluster`` client is involved: its topology refresh replaces node objects whose
connections it leaves to the garbage collector, and every connection here is closed by the code
that opened it.

Each connection also subscribes to the classic channel ``jobq:{q}:wake`` that producers of jobq
versions before the tokens ``PUBLISH`` to, so a rolling upgrade loses no wake-ups.

The connections are plain ``redis-py`` asyncio connections used directly (``SSUBSCRIBE`` and
``PING`` sent, replies read with a timeout), which behaves alike on every supported ``redis-py``
version and needs no cluster pub/sub support from the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import redis.exceptions
from redis.crc import key_slot

from jobq.storage import clients
from jobq.storage.keys import Keys
from jobq.util import to_str

#: Seconds of silence after which a subscription connection is probed with a PING (a partition
#: raises nothing); a probe unanswered for as long fails the connection. Part of an idle node's
#: cost (S5); a wake-up lost meanwhile is made up by the worker's armed poll.
PING_INTERVAL = 10.0
#: Seconds between two looks at the cluster's slot map while nothing failed.
CLUSTER_CHECK_INTERVAL = 5.0
#: Seconds between two looks while a queue's subscription is down (its primary died, say): its
#: replica's promotion is seen within this, not at the failed connection's next retry (which
#: backs off to 5 s while the primary stays dead).
CLUSTER_DOWN_CHECK_INTERVAL = 1.0
#: Seconds one node may take to answer ``CLUSTER SLOTS`` (connecting included) before the next
#: node is asked: a partitioned node must not hold up the failover of the others.
SLOT_MAP_TIMEOUT = 2.0

#: ``(host, port)`` of a cluster node.
Addr = tuple[str, int]
#: One range of slots of ``CLUSTER SLOTS``: first slot, last slot, the nodes that serve it (the
#: primary first, then its replicas).
SlotRange = tuple[int, int, list[Addr]]

log = logging.getLogger("jobq.worker")


class WakeSubscriber:
    """Listens on ``node``'s wake-up channels of ``queues`` until cancelled (:meth:`run`).

    ``on_wake(queue)``: a wake-up for ``queue`` arrived (the node's token was popped).
    ``on_live(queue, live)``: the subscription of ``queue`` was confirmed (True), or lost (False).
    ``on_cancel(queue, job_id)``: a job this node runs was cancelled (cancel.lua sends
    ``cancel <id>`` on the same channel). All are called on the event loop :meth:`run` runs on."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        node: str,
        queues: Sequence[str],
        *,
        on_wake: Callable[[str], None],
        on_live: Callable[[str, bool], None] | None = None,
        on_cancel: Callable[[str, str], None] | None = None,
    ) -> None:
        self.url = url
        self.node = node
        self.queues = list(queues)
        self.channels = {keys.wake(q, node): q for q in self.queues}
        self._by_queue = {q: ch for ch, q in self.channels.items()}
        #: The classic channels producers of earlier jobq versions PUBLISH to (an upgrade).
        self.legacy = {keys.wake_all(q): q for q in self.queues}
        self._on_wake = on_wake
        self._on_live = on_live
        self._on_cancel = on_cancel
        self._live: set[str] = set()
        self._cluster = clients.parse_url(url).kind == "cluster"
        #: Where each queue's channel is served now (cluster: its slot's primary), or "" (one
        #: connection for all).
        self._owner: dict[str, str] = {}
        self._refresh = asyncio.Event()
        #: Cluster: each queue's slot (its channel's hash tag), the URL's seed nodes, the node
        #: that gave the last slot map, and every node that map named.
        self._slots = {q: key_slot(ch.encode()) for q, ch in self._by_queue.items()}
        self._seeds: list[Addr] = list(clients.parse_url(url).hosts) if self._cluster else []
        self._answered: list[Addr] = []
        self._known: list[Addr] = []

    def live(self, queue: str) -> bool:
        """Is ``queue``'s wake-up channel subscribed (a token armed now will be heard)?"""
        return queue in self._live

    @property
    def all_live(self) -> bool:
        return len(self._live) == len(self.queues)

    def _set_live(self, queue: str, live: bool) -> None:
        if live == (queue in self._live):
            return
        if live:
            self._live.add(queue)
        else:
            self._live.discard(queue)
        if self._on_live is not None:
            self._on_live(queue, live)

    # -- the supervisor ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Subscribe, and keep every queue subscribed on its current owner, until cancelled."""
        if not self._cluster:
            await self._serve_forever("", self.queues)
            return
        tasks: dict[str, asyncio.Task[None]] = {}
        backoff = 0.1
        try:
            while True:
                try:
                    owners = await self._read_owners()
                    backoff = 0.1
                except Exception as exc:
                    log.warning("wake-ups: cannot read the cluster's slot map (%s); retrying", exc)
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(5.0, backoff * 2)
                    continue
                if owners != self._owner:
                    self._regroup(owners, tasks)
                self._refresh.clear()
                every = CLUSTER_CHECK_INTERVAL if self.all_live else CLUSTER_DOWN_CHECK_INTERVAL
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._refresh.wait(), every)
        finally:
            for t in tasks.values():
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)

    def _candidates(self) -> list[Addr]:
        """The nodes to ask for the slot map, in order: the one that answered last, the URL's
        seeds, then every node the last map named (a seed may be the primary that died)."""
        out: list[Addr] = []
        for addr in [*self._answered, *self._seeds, *self._known]:
            if addr not in out:
                out.append(addr)
        return out

    async def _read_owners(self) -> dict[str, str]:
        """Each queue's primary now (``host:port``), as the first node that answers says."""
        failures: list[str] = []
        for addr in self._candidates():
            try:
                shards = await asyncio.wait_for(_cluster_slots(self.url, addr), SLOT_MAP_TIMEOUT)
                owners = _owners(shards, self._slots)
            except Exception as exc:
                failures.append(f"{addr[0]}:{addr[1]}: {str(exc) or type(exc).__name__}")
                continue
            self._answered = [addr]
            self._known = [a for _, _, nodes in shards for a in nodes]
            return owners
        raise ConnectionError("no cluster node gave a slot map: " + "; ".join(failures))

    def _regroup(self, owners: dict[str, str], tasks: dict[str, asyncio.Task[None]]) -> None:
        """Restart the connections of the queues whose owner changed (cluster)."""
        moved = {q for q in self.queues if owners.get(q) != self._owner.get(q)}
        if self._owner:
            log.info("wake-ups: %d queue(s) follow their slot to a new owner", len(moved))
        self._owner = owners
        groups: dict[str, list[str]] = {}
        for q, addr in owners.items():
            groups.setdefault(addr, []).append(q)
        for addr in list(tasks):
            if addr not in groups or any(q in moved for q in groups[addr]) or tasks[addr].done():
                tasks.pop(addr).cancel()
        for addr, qs in groups.items():
            if addr not in tasks:
                for q in qs:
                    self._set_live(q, False)
                tasks[addr] = asyncio.create_task(self._serve_forever(addr, qs), name=f"jobq-wake-{addr}")

    # -- one connection ---------------------------------------------------------------------------
    async def _serve_forever(self, addr: str, queues: list[str]) -> None:
        """Keep ``queues`` subscribed on ``addr`` ("" = the URL's server); on a cluster, a failure
        asks the supervisor to look at the slot map again."""
        backoff = 0.1
        warned = False
        while True:
            try:
                await self._serve(addr, queues)
                backoff = 0.1  # Redis dropped a subscription (a slot moved): resubscribe soon
            except asyncio.CancelledError:
                for q in queues:
                    self._set_live(q, False)
                raise
            except Exception as exc:
                was_live = any(q in self._live for q in queues)
                if not warned or was_live:
                    log.warning("wake-up subscription lost (%s); polling until it is back", exc)
                    warned = True
                if was_live:
                    backoff = 0.1  # it was up: try again soon
            for q in queues:
                self._set_live(q, False)
            if self._cluster:
                self._refresh.set()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(5.0, backoff * 2)

    def _dispatch(self, msg: Any, legacy: dict[str, str]) -> str:
        """Act on one message from a wake-up connection; returns its kind ("" if none)."""
        if isinstance(msg, Exception):
            raise msg
        if not isinstance(msg, list) or len(msg) < 2:
            return ""  # PONG
        kind, channel = to_str(msg[0]).lower(), to_str(msg[1])
        q = self.channels.get(channel)
        if q is None:
            if kind == "message" and channel in legacy:
                self._on_wake(legacy[channel])
            return kind
        if kind == "smessage":
            data = to_str(msg[2]) if len(msg) > 2 else ""
            if data.startswith("cancel "):
                if self._on_cancel is not None:
                    self._on_cancel(q, data[len("cancel ") :])
            else:
                self._on_wake(q)
        elif kind == "ssubscribe":
            self._set_live(q, True)
        return kind

    async def _serve(self, addr: str, queues: list[str]) -> None:
        """Subscribe ``queues`` on one connection and dispatch what arrives; returns when Redis
        drops a subscription, raises when the connection fails."""
        node: Addr | None = None
        if addr:
            host, _, port = addr.rpartition(":")
            node = (host, int(port))
        async with _connection(self.url, node, None) as conn:
            # RESP3 (redis-py's default from 8.0) delivers messages as pushes: ask for them.
            resp3 = str(getattr(conn, "protocol", 2)) == "3"
            channels = [self._by_queue[q] for q in queues]
            await conn.send_command("SSUBSCRIBE", *channels)
            legacy = {ch: q for ch, q in self.legacy.items() if q in queues}
            await conn.send_command("SUBSCRIBE", *legacy)
            heard = time.monotonic()
            ping_sent: float | None = None
            confirmed = 0
            while True:
                try:
                    msg = await conn.read_response(timeout=PING_INTERVAL, push_request=resp3)
                except redis.exceptions.ResponseError as exc:
                    if confirmed < len(channels):
                        raise  # SSUBSCRIBE refused (an ACL without it): no wake-ups here
                    # The classic channel's SUBSCRIBE refused: only earlier producers go unheard.
                    log.info("wake-ups: not listening on the classic channel (%s)", exc)
                    continue
                now = time.monotonic()
                if msg is None:
                    if ping_sent is not None and now - ping_sent >= PING_INTERVAL:
                        raise ConnectionError("wake-up connection silent: ping unanswered")
                    if ping_sent is None and now - heard >= PING_INTERVAL:
                        await conn.send_command("PING")
                        ping_sent = now
                    continue
                heard, ping_sent = now, None
                kind = self._dispatch(msg, legacy)
                if kind == "ssubscribe":
                    confirmed += 1
                elif kind == "sunsubscribe":
                    return  # the slot left this node: subscribe again where it is now


@contextlib.asynccontextmanager
async def _connection(url: str, node: Addr | None, timeout: float | None) -> AsyncIterator[Any]:
    """One plain connection, connected, to ``node`` of the cluster ``url`` names (None: the
    server of a standalone, Unix socket or Sentinel URL); ``timeout`` bounds connecting and
    each reply (None: only connecting, the default way). Disconnected on the way out, whatever
    happens: nothing is left to the garbage collector."""
    kw: dict[str, Any] = {"socket_timeout": timeout, "retry_refused": False}
    if timeout is not None:
        kw["socket_connect_timeout"] = timeout
    if node is not None:
        client = clients.async_node_client(url, node[0], node[1], **kw)
    else:
        client = clients.async_pubsub_client(url, **kw)
    # The client only builds the connection: it is used directly, outside the client's pool.
    conn = client.connection_pool.make_connection()
    try:
        await conn.connect()
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.disconnect()
        with contextlib.suppress(Exception):
            await client.aclose()


async def _cluster_slots(url: str, node: Addr) -> list[SlotRange]:
    """``CLUSTER SLOTS`` as ``node`` sees it, on a connection of its own."""
    async with _connection(url, node, SLOT_MAP_TIMEOUT) as conn:
        await conn.send_command("CLUSTER", "SLOTS")
        reply = await conn.read_response()
    return parse_cluster_slots(reply, node[0])


def parse_cluster_slots(reply: Any, asked_host: str) -> list[SlotRange]:
    """The ranges of a raw ``CLUSTER SLOTS`` reply (the same arrays in RESP2 and RESP3). A node
    whose endpoint the server does not know (null, ``""`` or ``"?"``) is on the host that was
    asked, as the Redis Cluster specification says."""
    if not isinstance(reply, list):
        raise redis.exceptions.ResponseError(f"CLUSTER SLOTS: unexpected reply {reply!r:.80}")
    out: list[SlotRange] = []
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3:
            raise redis.exceptions.ResponseError(f"CLUSTER SLOTS: unexpected entry {entry!r:.80}")
        nodes: list[Addr] = []
        for node in entry[2:]:
            host = to_str(node[0]) if node[0] is not None else ""
            nodes.append((host if host not in ("", "?") else asked_host, int(node[1])))
        out.append((int(entry[0]), int(entry[1]), nodes))
    return out


def _owners(shards: list[SlotRange], slots: dict[str, int]) -> dict[str, str]:
    """``host:port`` of the primary of each queue's slot (``slots``: queue -> slot); raises when
    the map leaves one out (a slot being moved, seen from a node that has not heard yet)."""
    out: dict[str, str] = {}
    for q, slot in slots.items():
        for first, last, nodes in shards:
            if first <= slot <= last:
                out[q] = f"{nodes[0][0]}:{nodes[0][1]}"
                break
        else:
            raise redis.exceptions.ResponseError(f"slot {slot} (queue {q!r}) is served by no node")
    return out
