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
that owns some of the node's queues, refreshes the slot map whenever a connection fails or a
subscription is dropped, and checks it every :data:`CLUSTER_CHECK_INTERVAL` seconds (a failover
that leaves the old primary alive as a replica). Elsewhere one connection carries every channel.

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
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions

from jobq.storage import clients
from jobq.storage.keys import Keys
from jobq.util import to_str

#: Seconds of silence after which a subscription connection is probed with a PING (a partition
#: raises nothing); a probe unanswered for as long fails the connection. Part of an idle node's
#: cost (S5); a wake-up lost meanwhile is made up by the worker's armed poll.
PING_INTERVAL = 10.0
#: Seconds between two looks at the cluster's slot map while nothing failed.
CLUSTER_CHECK_INTERVAL = 5.0

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
            await self._serve_forever("", None, self.queues)
            return
        cluster: Any = None
        tasks: dict[str, asyncio.Task[None]] = {}
        backoff = 0.1
        try:
            while True:
                try:
                    if cluster is None:
                        cluster = clients.async_client(self.url, socket_timeout=2.0, retry_refused=False)
                    await _read_slot_map(cluster)
                    owners = {}
                    for q, ch in self._by_queue.items():
                        n = cluster.get_node_from_key(ch)
                        owners[q] = f"{n.host}:{n.port}"
                    backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("wake-ups: cannot read the cluster's slot map (%s); retrying", exc)
                    if cluster is not None:
                        await _close_cluster(cluster)
                        cluster = None
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                    backoff = min(5.0, backoff * 2)
                    continue
                if owners != self._owner:
                    self._regroup(owners, cluster, tasks)
                self._refresh.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._refresh.wait(), CLUSTER_CHECK_INTERVAL)
        finally:
            for t in tasks.values():
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            if cluster is not None:
                await _close_cluster(cluster)

    def _regroup(self, owners: dict[str, str], cluster: Any, tasks: dict[str, asyncio.Task[None]]) -> None:
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
                tasks[addr] = asyncio.create_task(
                    self._serve_forever(addr, cluster, qs), name=f"jobq-wake-{addr}"
                )

    # -- one connection ---------------------------------------------------------------------------
    async def _serve_forever(self, addr: str, cluster: Any, queues: list[str]) -> None:
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
            if cluster is not None:
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
        if addr:
            host, _, port = addr.rpartition(":")
            client = clients.async_node_client(
                self.url, host, int(port), socket_timeout=None, retry_refused=False
            )
        else:
            client = clients.async_pubsub_client(self.url, socket_timeout=None, retry_refused=False)
        conn: Any = None
        try:
            conn = client.connection_pool.make_connection()
            await conn.connect()
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
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            with contextlib.suppress(Exception):
                await client.aclose()


async def _close_cluster(cluster: Any) -> None:
    """Close a cluster client, also one stopped inside ``initialize()`` (a node stopping then):
    redis-py's ``aclose()`` closes nothing before the client has a default node, and the
    startup node's connection would be left open."""
    with contextlib.suppress(Exception):
        await cluster.aclose()
    with contextlib.suppress(Exception):
        await cluster.nodes_manager.aclose("startup_nodes")


async def _read_slot_map(cluster: Any) -> None:
    """(Re)read the slot map. redis-py replaces node objects (the startup nodes it asked, the
    nodes of the previous map) with new ones, and a replaced one keeps its connections open until
    the garbage collector finds it: disconnect those here (also when the read fails or is
    cancelled)."""
    manager = cluster.nodes_manager
    before = [*manager.startup_nodes.values(), *manager.nodes_cache.values()]
    try:
        if manager.default_node is None:
            await cluster.initialize()
        else:
            await manager.initialize()
    finally:
        kept = {id(n) for n in manager.startup_nodes.values()}
        kept |= {id(n) for n in manager.nodes_cache.values()}
        for node in before:
            if id(node) not in kept:
                with contextlib.suppress(Exception):
                    await node.disconnect()
