"""Redis URLs (cluster, sentinel, TLS options, refusals) and the minimum-version check at first
use, against real servers and a fake one that claims an old version."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import BinaryIO

import pytest

import jobq
from jobq import JobQ
from jobq.storage import clients
from tests.harness.redis_server import RedisServer

pytestmark = pytest.mark.integration


# -- URLs ---------------------------------------------------------------------------------------
def test_cluster_and_sentinel_urls_parse() -> None:
    t = clients.parse_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001")
    assert (t.kind, t.hosts, t.username, t.password) == (
        "cluster",
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        "u",
        "p@ss",
    )
    t = clients.parse_url("redis+sentinel://h1:26379,h2:26380/mymaster/2?sentinel_password=x")
    assert (t.kind, t.service, t.db, t.options["sentinel_password"]) == ("sentinel", "mymaster", 2, "x")
    t = clients.parse_url("rediss://h:6380/1?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    assert (t.kind, t.tls, t.db, t.options["ssl_ca_certs"]) == ("standalone", True, 1, "/ca.pem")
    t = clients.parse_url("unix:///run/redis.sock?db=3")
    assert (t.kind, t.path, t.db) == ("unix", "/run/redis.sock", 3)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://h:1", "scheme"),
        ("redis://h:1/0?bogus=1", "unknown parameter 'bogus'"),
        ("redis://h:1/0?ssl_ca_certs=/x", "need a rediss://"),
        ("redis+cluster://h:1/3", "only database 0"),
        ("redis+sentinel://h:1", "mastername"),
        ("redis://h:1,h:2/0", "one host:port only"),
        ("redis://user:topsecret@h:notaport/0", "not host:port"),
    ],
)
def test_bad_urls_are_refused_naming_the_problem_not_the_password(url: str, why: str) -> None:
    with pytest.raises(jobq.InvalidInput) as e:
        clients.sync_client(url)
    assert e.value.field == "url" and why in str(e.value) and "topsecret" not in str(e.value)


def test_redact_url_hides_every_password() -> None:
    url = "redis+sentinel://u:pw1@h:1/m?sentinel_password=pw2"
    red = clients.redact_url(url)
    assert "pw1" not in red and "pw2" not in red and red.startswith("redis+sentinel://u:***@h:1/m")


# -- the version check ---------------------------------------------------------------------------
def test_current_server_passes_the_version_check(redis_url: str) -> None:
    c = clients.sync_client(redis_url)
    try:
        assert c.ping()
    finally:
        c.close()


def test_too_old_server_is_refused_at_first_use(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients, "MIN_REDIS_VERSION", (99, 0, 0))
    app = JobQ(redis_url)  # no I/O yet
    try:
        with pytest.raises(
            jobq.RedisVersionError, match=r"Redis 7\.\d+\.\d+ is too old; jobq needs Redis >= 99\.0\.0"
        ):
            app.enqueue("t")
    finally:
        app.close()

    async def async_use() -> None:
        c = clients.async_client(redis_url)
        try:
            await c.ping()
        finally:
            await c.aclose()

    with pytest.raises(jobq.RedisVersionError):
        asyncio.run(async_use())


class FakeOldRedis:
    """A one-connection-at-a-time RESP server that answers like an old Redis: ``HELLO`` either
    with ``version`` 6.2.14 or (Redis 5) as an unknown command, and ``INFO`` with 5.0.7."""

    def __init__(self, hello: bool) -> None:
        self.hello = hello
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                while True:
                    args = self._read_command(f)
                    if args is None:
                        break
                    name = args[0].upper()
                    if name == b"HELLO":
                        conn.sendall(self._hello_reply(resp3=args[1:2] == [b"3"]))
                    elif name == b"INFO":
                        body = b"# Server\r\nredis_version:5.0.7\r\n"
                        conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                    else:
                        conn.sendall(b"+OK\r\n")

    @staticmethod
    def _read_command(f: BinaryIO) -> list[bytes] | None:
        """One RESP command (an array of bulk strings), or None when the client hung up. Clients
        pipeline their handshake (redis-py sends both CLIENT SETINFO calls in one write), so every
        command gets its own reply."""
        head = f.readline()
        if not head.startswith(b"*"):
            return None
        args = []
        for _ in range(int(head[1:])):
            size = int(f.readline()[1:])
            args.append(f.read(size + 2)[:-2])
        return args

    def _hello_reply(self, resp3: bool) -> bytes:
        if not self.hello:
            return b"-ERR unknown command 'HELLO'\r\n"
        fields = [b"server", b"redis", b"version", b"6.2.14"]
        bulk = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields)
        if resp3:
            return b"%3\r\n" + bulk + b"$5\r\nproto\r\n:3\r\n"
        return b"*6\r\n" + bulk + b"$5\r\nproto\r\n:2\r\n"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=[True, False], ids=["hello-6.2", "no-hello-5.0"])
def old_redis(request: pytest.FixtureRequest) -> Iterator[FakeOldRedis]:
    srv = FakeOldRedis(hello=request.param)
    yield srv
    srv.close()


def test_an_old_server_reply_gives_a_clear_version_error(old_redis: FakeOldRedis) -> None:
    c = clients.sync_client(f"redis://127.0.0.1:{old_redis.port}/0", socket_timeout=2)
    try:
        with pytest.raises(jobq.RedisVersionError) as e:
            c.ping()
    finally:
        c.close()
    if old_redis.hello:
        assert "Redis 6.2.14 is too old" in str(e.value)
    else:
        # redis-py < 8.2 raises on the refused HELLO; 8.2 falls back to RESP2 and the check reads
        # the version from INFO instead. Either way the error names the problem.
        assert "does not know HELLO" in str(e.value) or "Redis 5.0.7 is too old" in str(e.value)
    assert "jobq needs Redis >= 7.0.0" in str(e.value)


def test_version_check_on_every_cluster_node(cluster_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients, "MIN_REDIS_VERSION", (99, 0, 0))
    app = JobQ(cluster_url)
    try:
        with pytest.raises(jobq.RedisVersionError):
            app.enqueue("t")
    finally:
        app.close()


def test_readme_states_the_minimum_version() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    need = ".".join(map(str, clients.MIN_REDIS_VERSION))
    assert f"Redis >= {need}" in readme or f"Redis {need}" in readme


def test_wrong_password_on_a_password_server(fresh_server: RedisServer) -> None:
    fresh_server.password = "right-one"
    fresh_server.start()
    app = JobQ(f"redis://:wrong-one@127.0.0.1:{fresh_server.port}/0")
    try:
        with pytest.raises(jobq.RedisAuthError) as e:
            app.enqueue("t")
    finally:
        app.close()
    assert "wrong-one" not in str(e.value) and "right-one" not in str(e.value)
