"""A TCP chaos proxy between jobq clients and Redis (RELIABILITY.md 2.1 item 2).

One proxy per worker: the worker connects to ``proxy.url(server.url)`` and the test switches the
proxy's mode to fake network faults while the worker runs. The proxy runs an asyncio loop on a
daemon thread; every control method is thread-safe and takes effect for connections already
open as well as new ones.

Modes:

- ``pass``: bytes flow both ways unchanged.
- ``blackhole``: nothing passes either way and nothing is refused: the client's sockets stay
  open and silent, as in a network partition. Bytes sent meanwhile are *held* and delivered when
  the mode leaves blackhole, as TCP retransmission would after the partition heals (so a command
  sent during the partition may still run on Redis later, its reply going nowhere). A client that
  gave up and closed its socket has its close delivered after the heal too.
- ``rst``: every open connection is reset (RST, not FIN), and new ones are reset at once.
- ``delay(ms)``: every chunk, either way, is forwarded ``ms`` later (order kept).
- ``drop_next_reply(n)``: the next ``n`` chunks from Redis to a client are dropped, and the
  connection that would have carried each is reset: the command ran on Redis, its reply is lost
  (the Jepsen "unknown" case). The mode falls back to ``pass`` after each drop.

``stats`` counts connections accepted, reset, and replies dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

PASS, BLACKHOLE, RST, DELAY = "pass", "blackhole", "rst", "delay"


@dataclass
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    dropped_replies: int = 0
    #: Bytes held in blackhole mode and delivered after the heal.
    held_bytes: int = 0


class _Conn:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False

    def abort(self) -> None:
        """Reset both sides (RST: SO_LINGER 0, then close)."""
        if self.closed:
            return
        self.closed = True
        for w in (self.client, self.upstream):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()


class ChaosProxy:
    """``ChaosProxy(redis_port).start()``; then ``.blackhole()``, ``.heal()``, ``.rst()``, ..."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.stats = ProxyStats()
        self._mode = PASS
        self._delay_s = 0.0
        self._drop = 0
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._healed: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> ChaosProxy:
        self._thread = threading.Thread(target=self._run, name=f"chaos-proxy-{self.target_port}")
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("chaos proxy did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._healed = asyncio.Event()
        self._healed.set()
        self._server = loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for c in list(self._conns):
                c.abort()
            # Let the aborted transports and their pumps finish before the loop closes.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for c in list(self._conns):
                c.abort()
            await self._server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, redis_url: str) -> str:
        """``redis_url`` with host and port replaced by this proxy's."""
        parts = urlsplit(redis_url)
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{self.port}"))

    # -- control (thread-safe) -------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    def _call(self, fn: object, *args: object) -> None:
        loop = self._loop
        assert loop is not None, "proxy not started"
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)  # type: ignore[operator]
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        done.wait(5)

    def _set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        assert self._healed is not None
        self._mode = mode
        self._delay_s = delay_s
        if mode == BLACKHOLE:
            self._healed.clear()
        else:
            self._healed.set()
        if mode == RST:
            for c in list(self._conns):
                self._reset(c)

    def pass_(self) -> None:
        self._call(self._set_mode, PASS)

    heal = pass_

    def blackhole(self) -> None:
        self._call(self._set_mode, BLACKHOLE)

    def rst(self) -> None:
        """Reset every connection, now and until the mode changes."""
        self._call(self._set_mode, RST)

    def reset_all(self) -> None:
        """Reset the connections open now, and stay in the current mode."""
        self._call(lambda: [self._reset(c) for c in list(self._conns)])

    def delay(self, ms: float) -> None:
        self._call(self._set_mode, DELAY, ms / 1000)

    def drop_next_reply(self, n: int = 1) -> None:
        def arm() -> None:
            self._drop = n

        self._call(arm)

    @contextlib.contextmanager
    def partition(self) -> Iterator[None]:
        """``with proxy.partition(): ...``: blackhole for the block, then heal."""
        self.blackhole()
        try:
            yield
        finally:
            self.heal()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- data path -------------------------------------------------------------------------------
    def _reset(self, conn: _Conn) -> None:
        if not conn.closed:
            self.stats.reset += 1
        conn.abort()
        self._conns.discard(conn)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self._mode == RST:
            _Conn(writer, writer).abort()
            self.stats.reset += 1
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _Conn(writer, writer).abort()
            return
        conn = _Conn(writer, up_writer)
        self._conns.add(conn)
        try:
            await asyncio.gather(
                self._pump(conn, reader, up_writer, reply=False),
                self._pump(conn, up_reader, writer, reply=True),
            )
        except asyncio.CancelledError:
            # Proxy shutdown: the connection is aborted below.
            pass
        finally:
            self._conns.discard(conn)
            if not conn.closed:
                conn.closed = True
                writer.close()
                up_writer.close()

    async def _pump(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, reply: bool
    ) -> None:
        assert self._healed is not None
        try:
            while not conn.closed:
                data = await reader.read(65536)
                if self._mode == BLACKHOLE:
                    self.stats.held_bytes += len(data)
                    await self._healed.wait()
                if conn.closed:
                    return
                if not data:
                    # EOF: pass the half-close on.
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                    return
                if self._mode == RST:
                    self._reset(conn)
                    return
                if reply and self._drop > 0:
                    self._drop -= 1
                    self.stats.dropped_replies += 1
                    self._reset(conn)
                    return
                if self._mode == DELAY and self._delay_s > 0:
                    await asyncio.sleep(self._delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            self._reset(conn)
