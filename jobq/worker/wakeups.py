"""Wake-ups: what ends the fetcher's wait. A poke (work announced on pub/sub, room freed, a
stop, a fence), else the poll interval or the next due time: pub/sub is only a hint, the
timeout is the fallback that needs no subscription."""

from __future__ import annotations

import asyncio
import logging
import time

from jobq.backoff import Backoff
from jobq.storage.pubsub import Subscriber

log = logging.getLogger("jobq.worker")

#: Seconds of pub/sub silence before the subscription is probed with a PING (and given up on when
#: the PONG does not come within as long again).
PUBSUB_PING_INTERVAL = 5.0


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Wakeups:
    """The fetcher waits here (:meth:`wait`); anyone pokes (:meth:`poke`); :meth:`listen` pokes
    on every announcement on ``channels``."""

    def __init__(self, url: str, channels: list[str], poll_interval: float) -> None:
        self.url = url
        self.channels = channels
        self.poll_interval = poll_interval
        #: Poked since the fetcher last looked.
        self.woken = False
        #: The future the fetcher waits on, if it waits.
        self._waiter: asyncio.Future[None] | None = None
        #: The subscription is up (the metrics read it from their own thread).
        self.connected = False

    def poke(self) -> None:
        self.woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until poked, or ``timeout`` seconds; a poke since the last wait returns at once."""
        if not self.woken:
            loop = asyncio.get_running_loop()
            self._waiter = fut = loop.create_future()
            timer = loop.call_later(timeout, _wake_up, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self._waiter = None
        self.woken = False

    async def listen(self) -> None:
        """Subscribe to the wake-up channels and poke on each message, until cancelled; a lost
        or silent subscription is retried with backoff (the fetcher polls meanwhile)."""
        backoff = Backoff(0.1, 5.0)
        while True:
            sub = Subscriber(self.url, self.channels)
            try:
                await sub.open()
                self.connected = True
                backoff.reset()
                self.poke()  # anything announced while we were away: look now
                heard = time.monotonic()
                ping_sent: float | None = None
                while True:
                    msg = await sub.get_message(self.poll_interval)
                    now = time.monotonic()
                    if msg is not None:
                        heard, ping_sent = now, None
                        if msg.get("type") != "pong":
                            self.poke()
                        continue
                    # A silently dead connection (a partition) raises nothing: probe it.
                    if ping_sent is not None and now - ping_sent > PUBSUB_PING_INTERVAL:
                        raise ConnectionError("pub/sub connection silent: ping unanswered")
                    if ping_sent is None and now - heard > PUBSUB_PING_INTERVAL:
                        await sub.ping()
                        ping_sent = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("pub/sub connection lost (%s); polling until it is back", exc)
                self.connected = False
                await asyncio.sleep(backoff.next())
            finally:
                self.connected = False
                await sub.close()
