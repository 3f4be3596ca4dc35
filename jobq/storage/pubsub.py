"""Pub/sub subscriptions (the queues' wake-up channels): the only place that subscribes."""

from __future__ import annotations

import contextlib
from typing import Any

from jobq.storage import clients


class Subscriber:
    """One subscription to ``channels`` on its own connection (a plain connection on a cluster:
    every node hears every ``PUBLISH``). :meth:`open` subscribes; :meth:`get_message` returns a
    message (a dict with its ``type``) or None after ``timeout`` seconds; :meth:`close` ends it."""

    def __init__(self, url: str, channels: list[str]) -> None:
        self.url = url
        self.channels = channels
        self._client: Any = None
        self._pubsub: Any = None

    async def open(self) -> None:
        self._client = clients.async_pubsub_client(self.url, socket_timeout=None, retry_refused=False)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(*self.channels)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        msg: dict[str, Any] | None = await self._pubsub.get_message(timeout=timeout)
        return msg

    async def ping(self) -> None:
        """Probe the connection: the PONG arrives as a message of type ``pong``."""
        await self._pubsub.ping()

    async def close(self) -> None:
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
