"""Completion notices: one pub/sub connection per app and event loop that hears, for every queue
a caller waits on, the ids the ack and fail scripts publish on the queue's ``done`` channel.

A caller waiting for a job (:meth:`jobq.Job.aresult`) first subscribes here (the subscription
confirmed by Redis), then marks the job as waited for and reads its state: a job that finishes
after the read is announced to a subscribed connection, so no completion falls between the two.
Waiters for any number of jobs share the one connection. The connection is never needed for
correctness: a caller also reads the job again on a slower poll, and when the connection fails
every waiter is woken to read at once and polls until it is back.

Subscriptions are kept for the listener's lifetime (one per queue waited on; no ``UNSUBSCRIBE``,
which the documented least-privilege ACL does not grant).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from jobq.storage import clients
from jobq.util import to_str

log = logging.getLogger("jobq.notify")

#: Seconds the listener waits for Redis to confirm a subscription before the caller polls.
SUBSCRIBE_TIMEOUT = 2.0
#: Seconds after a failed connection before the listener tries again (callers poll meanwhile).
RETRY_AFTER = 1.0


def retry_after() -> float:
    """Seconds a caller without a notice connection polls before it asks for one again."""
    return RETRY_AFTER


class Watch:
    """One caller's wait for one job: ``event`` is set when the job is announced (``notice``
    then holds what followed its id in the message: ``b"d"`` + the encoded result of a done job
    whose result is small, else ``b""``), or when the connection is lost (``notice`` None)."""

    __slots__ = ("event", "notice")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.notice: bytes | None = None


class CompletionListener:
    """Completion notices for one event loop (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._subscribed: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._waiters: dict[tuple[str, str], set[Watch]] = {}
        self._retry_at = 0.0
        self._closed = False

    def subscribed(self, channel: str) -> bool:
        return channel in self._subscribed

    @property
    def waiting(self) -> int:
        """Jobs being waited for (for tests and metrics)."""
        return len(self._waiters)

    async def watch(self, channel: str, job_id: str) -> Watch | None:
        """A :class:`Watch` whose event is set when ``job_id`` is announced on ``channel``, or
        when the connection is lost (the caller then reads the job and watches again). Returns
        once the subscription is confirmed; None when there is no working subscription (the
        caller polls)."""
        ev = Watch()
        key = (channel, job_id)
        self._waiters.setdefault(key, set()).add(ev)
        try:
            ok = await self._ensure(channel)
        except BaseException:
            self.unwatch(channel, job_id, ev)
            raise
        if not ok:
            self.unwatch(channel, job_id, ev)
            return None
        return ev

    def unwatch(self, channel: str, job_id: str, ev: Watch) -> None:
        key = (channel, job_id)
        evs = self._waiters.get(key)
        if evs is not None:
            evs.discard(ev)
            if not evs:
                del self._waiters[key]

    async def _ensure(self, channel: str) -> bool:
        if channel in self._subscribed:
            return True
        if self._closed or time.monotonic() < self._retry_at:
            return False
        fut = self._pending.get(channel)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._pending[channel] = fut
            try:
                async with self._lock:
                    if self._pubsub is None:
                        self._client = await self._new_client()
                        self._pubsub = self._client.pubsub()
                    await self._pubsub.subscribe(channel)
                    if self._reader is None or self._reader.done():
                        self._reader = asyncio.create_task(self._read(self._pubsub), name="jobq-results")
            except asyncio.CancelledError:
                self._pending.pop(channel, None)
                if not fut.done():  # others awaiting this subscription poll instead
                    fut.set_exception(ConnectionError("subscription interrupted"))
                    fut.exception()
                raise
            except Exception as exc:
                self._broken(exc)
                return False
        try:
            await asyncio.wait_for(asyncio.shield(fut), SUBSCRIBE_TIMEOUT)
        except Exception:  # not confirmed in time, or the connection failed: poll
            return False
        return True

    async def _new_client(self) -> Any:
        kind = clients.parse_url(self.url).kind
        if kind in ("sentinel", "cluster"):
            # Asking the sentinels for the primary, or probing the seed nodes, is blocking I/O.
            return await asyncio.to_thread(
                clients.async_pubsub_client, self.url, socket_timeout=None, retry_refused=False
            )
        return clients.async_pubsub_client(self.url, socket_timeout=None, retry_refused=False)

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(timeout=None)
                if msg is None:
                    continue
                kind = msg.get("type")
                channel = to_str(msg.get("channel") or b"", "replace")
                if kind == "message":
                    data = msg.get("data") or b""
                    if isinstance(data, str):
                        data = data.encode()
                    job_id, _, notice = data.partition(b" ")
                    for w in self._waiters.get((channel, to_str(job_id, "replace")), ()):
                        w.notice = notice
                        w.event.set()
                elif kind == "subscribe":
                    if channel in self._subscribed:
                        # Subscribed again: redis-py reconnected and resubscribed on its own, and
                        # notices sent in between are lost. Every waiter on it reads its job again.
                        for (ch, _), ws in self._waiters.items():
                            if ch == channel:
                                for w in ws:
                                    w.notice = None
                                    w.event.set()
                    self._subscribed.add(channel)
                    fut = self._pending.pop(channel, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        """The connection failed: wake every waiter (each reads its job and polls), drop the
        connection, and try a new one after :data:`RETRY_AFTER`."""
        if not self._closed:
            log.warning("result notices unavailable (%s); waiting callers poll", clients.redact(str(exc)))
        self._retry_at = time.monotonic() + RETRY_AFTER
        self._subscribed.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("result notices unavailable"))
                fut.exception()  # retrieved: no "never retrieved" warning when nobody awaits it
        self._pending.clear()
        for evs in self._waiters.values():
            for ev in evs:
                ev.event.set()
        self._waiters.clear()
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        if pubsub is not None or client is not None:
            asyncio.get_running_loop().create_task(_close(pubsub, client))

    async def aclose(self) -> None:
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        for evs in self._waiters.values():
            for ev in evs:
                ev.event.set()
        self._waiters.clear()
        self._subscribed.clear()
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        await _close(pubsub, client)


async def _close(pubsub: Any, client: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
    if client is not None:
        with contextlib.suppress(Exception):
            await client.aclose()
