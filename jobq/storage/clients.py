"""Building Redis clients from a URL, in one place, and keeping passwords out of sight.

Supported URLs (``user:password@`` is optional everywhere)::

    redis://[user:password@]host:port[/db]               one Redis
    rediss://...                                          one Redis over TLS
    unix://[user:password@]/path/to/redis.sock[?db=N]     one Redis on a Unix socket
    redis+cluster://[user:password@]host:port[,host:port...]           Redis Cluster
    rediss+cluster://...                                                Redis Cluster over TLS
    redis+sentinel://[user:password@]host:port[,host:port...]/mastername[/db]   Sentinel
    rediss+sentinel://...                                 Sentinel; TLS to the Redis servers

Query parameters (all optional): ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (paths),
``ssl_cert_reqs`` (``required`` (default), ``optional``, ``none``), ``ssl_check_hostname``
(``true``/``false``), ``socket_timeout`` and ``socket_connect_timeout`` (seconds), ``db``, and
for Sentinel ``sentinel_username`` / ``sentinel_password`` (when the sentinels themselves ask
for a password) and ``sentinel_tls`` (``true``: TLS to the sentinels too). Without query
parameters the TLS paths come from ``JOBQ_REDIS_SSL_CA_CERTS``, ``JOBQ_REDIS_SSL_CERTFILE`` and
``JOBQ_REDIS_SSL_KEYFILE``. Any other parameter is refused with :class:`jobq.errors.InvalidInput`.

Every client gets socket timeouts so no call can hang on a dead peer, and a bounded retry with
jittered backoff on connection errors (a retried script call is safe: enqueue is idempotent by
job id, ack and fail are fenced by ownership). Every new connection checks, with ``HELLO`` (which
needs no ACL permission), that the server is at least :data:`MIN_REDIS_VERSION`, and raises
:class:`jobq.errors.RedisVersionError` otherwise: the check runs at first use and again after
every reconnect, so a failover to an older replica is caught too.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.utils import check_protocol_version

from jobq import errors
from jobq.util import refused, to_str

# redis-py's Sentinel classes were untyped before redis-py 8.2 and are typed since: through Any,
# the calls type-check the same against either.
_SyncSentinel: Any = redis.sentinel.Sentinel
_AsyncSentinel: Any = redis.asyncio.sentinel.Sentinel

#: The URL used when none is given and ``JOBQ_REDIS_URL`` is unset.
DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Minimum Redis version: script flags (``#!lua flags=allow-oom``) need 7.0.
MIN_REDIS_VERSION = (7, 0, 0)

_PASSWORD_RE = re.compile(r"(?<=://)([^:@/]*):([^@/]*)@")
_SCHEMES = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("unix", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_TLS_ENV = {
    "ssl_ca_certs": "JOBQ_REDIS_SSL_CA_CERTS",
    "ssl_certfile": "JOBQ_REDIS_SSL_CERTFILE",
    "ssl_keyfile": "JOBQ_REDIS_SSL_KEYFILE",
}
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def default_url() -> str:
    return os.environ.get("JOBQ_REDIS_URL", DEFAULT_URL)


def redact(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    text = _PASSWORD_RE.sub(lambda m: f"{m.group(1)}:***@", text)
    return re.sub(r"(sentinel_password=)[^&\s]*", r"\1***", text)


#: Characters a user name or password must percent-encode in a URL; unencoded, they end the
#: user info early, and the rest of the password would be taken for the host, path or fragment.
_USERINFO_SPECIALS = "/?#[]@"


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0`` (and any
    ``sentinel_password`` query parameter). Does not parse the URL, so a malformed one is
    masked too: everything up to the last ``@`` is user info, of which only a plain user name
    is kept (a password holding an unencoded ``/`` or ``#`` is still masked whole)."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return redact(url)
    cred, tail = rest[:at], rest[at + 1 :]
    user, colon, _ = cred.partition(":")
    if any(c in user for c in _USERINFO_SPECIALS):
        shown = "***"
    elif colon:
        shown = f"{user}:***"
    else:
        shown = user
    return redact(f"{scheme}://{shown}@{tail}")


# -- URL parsing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RedisTarget:
    """What a jobq Redis URL points at (see the module docstring)."""

    kind: str  # "standalone", "unix", "cluster" or "sentinel"
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""
    db: int = 0
    service: str = ""
    username: str | None = None
    password: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _bad(url: str, why: str) -> errors.InvalidInput:
    return errors.InvalidInput(f"url: {redact_url(url)!r}: {why}", "url")


def _hosts(url: str, netloc: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(url, f"{item!r} is not host:port")
        out.append((host, int(port)))
    return tuple(out)


def _options(url: str, query: str, tls: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "sentinel_username", "sentinel_password"):
            opts[name] = value
        elif name in ("ssl_check_hostname", "sentinel_tls"):
            if value.lower() not in _BOOL:
                raise _bad(url, f"{name} must be true or false")
            opts[name] = _BOOL[value.lower()]
        elif name == "ssl_cert_reqs":
            if value not in ("required", "optional", "none"):
                raise _bad(url, "ssl_cert_reqs must be required, optional or none")
            opts[name] = value
        elif name in ("socket_timeout", "socket_connect_timeout"):
            try:
                opts[name] = float(value)
            except ValueError:
                raise _bad(url, f"{name} must be a number of seconds") from None
        elif name == "db":
            if not value.isdigit():
                raise _bad(url, "db must be a number")
            opts[name] = int(value)
        else:
            raise _bad(url, f"unknown parameter {name!r}")
    if tls:
        for name, env in _TLS_ENV.items():
            if name not in opts and os.environ.get(env):
                opts[name] = os.environ[env]
    elif any(k.startswith("ssl_") for k in opts):
        raise _bad(url, "ssl_* parameters need a rediss:// URL")
    return opts


def _split(url: str, scheme: str, rest: str, kind: str) -> SplitResult:
    """``urlsplit`` of the part after the scheme, refusing what it would misread: user info with
    an unencoded ``/ ? # [ ] @`` (the password would run into the host or path, so such a URL is
    never echoed), a fragment, and unbalanced IPv6 brackets (``urlsplit`` raises)."""
    at = rest.rfind("@")
    if at >= 0 and not (kind == "unix" and rest.startswith("/")):
        if any(c in rest[:at] for c in _USERINFO_SPECIALS):
            raise errors.InvalidInput(
                f"url: {scheme}://***: the user name or password holds a character that must be "
                "percent-encoded (/ as %2F, ? as %3F, # as %23, @ as %40, [ as %5B, ] as %5D); "
                "so does an '@' in a query parameter",
                "url",
            )
    elif "#" in rest:
        raise _bad(url, "'#' is not allowed (percent-encode it as %23)")
    try:
        return urlsplit("x://" + rest)
    except ValueError as exc:  # unbalanced brackets of an IPv6 host
        raise _bad(url, f"not a valid URL ({exc}; an IPv6 host is written [::1]:6379)") from None


def parse_url(url: str) -> RedisTarget:
    """Parse a jobq Redis URL; raises :class:`jobq.errors.InvalidInput` (field ``url``)."""
    if not isinstance(url, str):
        raise errors.InvalidInput(f"url: must be a string, got {type(url).__name__}", "url")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise _bad(url, f"scheme must be one of {', '.join(s + '://' for s in _SCHEMES)}")
    kind, tls = _SCHEMES[scheme.lower()]
    parts = _split(url, scheme, rest, kind)
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, has_pw, pw = cred.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if has_pw else None
    opts = _options(url, parts.query, tls)
    db = int(opts.pop("db", 0))
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if kind == "unix":
        if not parts.path:
            raise _bad(url, "unix:// needs a socket path")
        return RedisTarget(
            kind, tls, path=unquote(parts.path), db=db, username=username, password=password, options=opts
        )
    if not netloc:
        raise _bad(url, "no host:port")
    hosts = _hosts(url, netloc)
    service = ""
    if kind == "standalone":
        if len(hosts) != 1:
            raise _bad(url, "one host:port only (use redis+cluster:// or redis+sentinel:// for several)")
        if segments:
            if len(segments) != 1 or not segments[0].isdigit():
                raise _bad(url, "the path must be a database number")
            db = int(segments[0])
    elif kind == "cluster":
        if (segments and segments != ["0"]) or db:
            raise _bad(url, "Redis Cluster has only database 0")
    else:
        if not segments or len(segments) > 2:
            raise _bad(url, "sentinel URLs are redis+sentinel://host:port[,host:port]/mastername[/db]")
        service = segments[0]
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise _bad(url, "the database must be a number")
            db = int(segments[1])
    return RedisTarget(
        kind, tls, hosts, db=db, service=service, username=username, password=password, options=opts
    )


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("redis+cluster", "rediss+cluster")


# -- the version check -------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _hello_version(reply: Any) -> str | None:
    """The ``version`` field of a ``HELLO`` reply (a flat list in RESP2, a map in RESP3)."""
    if isinstance(reply, dict):
        v = reply.get(b"version", reply.get("version"))
    elif isinstance(reply, (list, tuple)):
        items = list(reply)
        v = None
        for k, val in zip(items[::2], items[1::2], strict=False):
            if k in (b"version", "version"):
                v = val
                break
    else:
        return None
    if v is None:
        return None
    return to_str(v)


def check_version(version: str | None, where: str) -> None:
    """Raise :class:`jobq.errors.RedisVersionError` if ``version`` is older than the minimum."""
    need = ".".join(map(str, MIN_REDIS_VERSION))
    if version is None:
        raise errors.RedisVersionError(
            f"{where}: could not read the Redis version; jobq needs Redis >= {need}"
        )
    if parse_version(version) < MIN_REDIS_VERSION:
        raise errors.RedisVersionError(
            f"{where}: Redis {version} is too old; jobq needs Redis >= {need} (script flags, ACL v2)"
        )


def _where(conn: Any) -> str:
    path = getattr(conn, "path", None)
    if path:
        return f"redis at {path}"
    return f"redis at {getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"


def _hello_args(conn: Any) -> tuple[str, str]:
    return ("HELLO", "3" if check_protocol_version(getattr(conn, "protocol", None), 3) else "2")


def _old_server(conn: Any, exc: Exception) -> errors.RedisVersionError:
    need = ".".join(map(str, MIN_REDIS_VERSION))
    return errors.RedisVersionError(
        f"{_where(conn)}: the server does not know HELLO ({exc}), so it is older than Redis 6; "
        f"jobq needs Redis >= {need}"
    )


def _sync_check(conn: Any) -> None:
    # redis-py's own RESP3 handshake already holds the HELLO reply; else ask (HELLO needs no
    # ACL permission), and fall back to INFO for servers without HELLO.
    version = _hello_version(getattr(conn, "handshake_metadata", None))
    if version is None:
        try:
            conn.send_command(*_hello_args(conn))
            version = _hello_version(conn.read_response())
        except redis.exceptions.ResponseError:
            try:
                conn.send_command("INFO", "server")
                version = _info_version(conn.read_response())
            except redis.exceptions.ResponseError:
                version = None
    if version is None or parse_version(version) < MIN_REDIS_VERSION:
        conn.disconnect()
        check_version(version, _where(conn))


async def _async_check(conn: Any) -> None:
    version = _hello_version(getattr(conn, "handshake_metadata", None))
    if version is None:
        try:
            await conn.send_command(*_hello_args(conn))
            version = _hello_version(await conn.read_response())
        except redis.exceptions.ResponseError:
            try:
                await conn.send_command("INFO", "server")
                version = _info_version(await conn.read_response())
            except redis.exceptions.ResponseError:
                version = None
    if version is None or parse_version(version) < MIN_REDIS_VERSION:
        await conn.disconnect()
        check_version(version, _where(conn))


def _info_version(info: Any) -> str | None:
    if isinstance(info, bytes):
        info = info.decode("utf-8", "replace")
    if isinstance(info, dict):
        v = info.get("redis_version")
        return None if v is None else str(v)
    if isinstance(info, str):
        m = re.search(r"redis_version:([^\r\n]+)", info)
        return m.group(1) if m else None
    return None


def _no_hello(exc: Exception) -> bool:
    return "unknown command" in str(exc).lower() and "hello" in str(exc).lower()


class _SyncVersionCheck:
    def on_connect_check_health(self, check_health: bool = True) -> None:
        try:
            super().on_connect_check_health(check_health)  # type: ignore[misc]
        except redis.exceptions.ResponseError as exc:
            if not _no_hello(exc):
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise _old_server(self, exc) from None
        _sync_check(self)


class _AsyncVersionCheck:
    async def on_connect_check_health(self, check_health: bool = True) -> None:
        try:
            await super().on_connect_check_health(check_health)  # type: ignore[misc]
        except redis.exceptions.ResponseError as exc:
            if not _no_hello(exc):
                raise
            await self.disconnect()  # type: ignore[attr-defined]
            raise _old_server(self, exc) from None
        await _async_check(self)


class Connection(_SyncVersionCheck, redis.connection.Connection):
    pass


class SSLConnection(_SyncVersionCheck, redis.connection.SSLConnection):
    pass


class UnixConnection(_SyncVersionCheck, redis.connection.UnixDomainSocketConnection):
    pass


class SentinelConnection(_SyncVersionCheck, redis.sentinel.SentinelManagedConnection):
    pass


class SentinelSSLConnection(_SyncVersionCheck, redis.sentinel.SentinelManagedSSLConnection):
    pass


class AsyncConnection(_AsyncVersionCheck, redis.asyncio.connection.Connection):
    pass


class AsyncSSLConnection(_AsyncVersionCheck, redis.asyncio.connection.SSLConnection):
    pass


class AsyncUnixConnection(_AsyncVersionCheck, redis.asyncio.connection.UnixDomainSocketConnection):
    pass


class AsyncSentinelConnection(_AsyncVersionCheck, redis.asyncio.sentinel.SentinelManagedConnection):
    pass


class AsyncSentinelSSLConnection(_AsyncVersionCheck, redis.asyncio.sentinel.SentinelManagedSSLConnection):
    pass


def _cluster_version_error(exc: Exception) -> Exception:
    """redis-py reports a node it could not initialise as ``RedisClusterException``; when the
    cause was jobq's version check, raise that instead."""
    msg = str(exc)
    if "jobq needs Redis >=" in msg and isinstance(exc, redis.exceptions.RedisClusterException):
        return errors.RedisVersionError(msg[msg.find("redis at ") :] if "redis at " in msg else msg)
    return exc


class RedisCluster(redis.cluster.RedisCluster):
    """A cluster client whose every new node connection checks the server version."""

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[no-untyped-call]
        _sync_check(connection)


class AsyncRedisCluster(redis.asyncio.cluster.RedisCluster):
    """The asyncio cluster client, with the version check on every new node connection."""

    async def on_connect(self, connection: Any) -> None:
        await super().on_connect(connection)
        await _async_check(connection)

    async def _refresh_topology(self, *args: Any, **kw: Any) -> None:
        """redis-py reads the command table from the first primary of the slot map, and a
        first initialization fails while that one is down, though the others answer (a killed
        primary of a cluster without failover, ``cluster-require-full-coverage no``): read it
        from the first primary that answers, which also becomes the node of keyless commands."""
        try:
            await super()._refresh_topology(*args, **kw)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            parser = self.commands_parser
            if parser.commands:
                raise
            for node in self.nodes_manager.get_nodes_by_server_type("primary"):
                try:
                    await parser.initialize(node)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    continue
                self.nodes_manager.default_node = node
                return
            raise

    async def initialize(self, *args: Any, **kw: Any) -> AsyncRedisCluster:
        try:
            await super().initialize(*args, **kw)
        except redis.exceptions.RedisClusterException as exc:
            err = _cluster_version_error(exc)
            if err is exc and "cannot be connected" in str(exc):
                # No node answers (the asyncio client connects at its first command): retried
                # by the caller like a standalone server that is down.
                raise errors.RedisUnavailable(f"redis cluster: {exc}", refused=refused(exc)) from None
            raise err from None
        return self


class SentinelRedis(redis.Redis):
    """The client ``master_for`` returns; closing it also closes its connections to the
    sentinels."""

    jobq_sentinel: Any = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.jobq_sentinel is not None:
                for s in self.jobq_sentinel.sentinels:
                    try:
                        s.connection_pool.disconnect()
                        s.close()
                    except Exception:  # best effort, as above
                        pass


class AsyncSentinelRedis(redis.asyncio.Redis):
    """The asyncio client ``master_for`` returns; ``aclose`` also closes the sentinel clients."""

    jobq_sentinel: Any = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.jobq_sentinel is not None:
                for s in self.jobq_sentinel.sentinels:
                    try:  # each one, even if closing another failed (a dead sentinel)
                        await s.connection_pool.disconnect(inuse_connections=True)
                        await s.aclose()
                    except Exception:  # best effort; the socket is gone either way
                        pass


# -- client factories ---------------------------------------------------------------------------------
_RETRIED: tuple[type[redis.exceptions.RedisError], ...] = (redis.exceptions.ConnectionError,)


def _common(socket_timeout: float | None, health_check_interval: int) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": health_check_interval,
        # Retried: connection errors only. A timed-out call is not re-sent: that would block the
        # caller for several socket timeouts on a partitioned link (F6: never past one + 1 s).
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3, _RETRIED),
        "retry_on_error": list(_RETRIED),
    }


def _tls_kwargs(t: RedisTarget) -> dict[str, Any]:
    if not t.tls:
        return {}
    o = t.options
    out: dict[str, Any] = {"ssl_cert_reqs": o.get("ssl_cert_reqs", "required")}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"):
        if name in o:
            out[name] = o[name]
    return out


def _auth(t: RedisTarget) -> dict[str, Any]:
    return {"username": t.username, "password": t.password}


def _timeouts(t: RedisTarget, opts: dict[str, Any]) -> None:
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in t.options:
            opts[name] = t.options[name]


def _sentinel_kwargs(t: RedisTarget) -> dict[str, Any]:
    out: dict[str, Any] = {
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
        "username": t.options.get("sentinel_username"),
        "password": t.options.get("sentinel_password"),
    }
    if t.options.get("sentinel_tls"):
        out["ssl"] = True
        out.update(_tls_kwargs(t))
    return out


def _client_opts(t: RedisTarget, opts: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    """The options every client kind shares: timeouts, credentials, TLS, then the caller's own."""
    _timeouts(t, opts)
    opts.update(_auth(t))
    opts.update(_tls_kwargs(t))
    if t.kind == "cluster" and t.tls:
        opts["ssl"] = True
    opts.update(kw)
    return opts


def _cluster_opts(opts: dict[str, Any]) -> Any:
    """Cluster clients take the retry policy as their own argument and no retry_on_error: take
    both out of ``opts`` and return the retry."""
    opts.pop("retry_on_error", None)
    return opts.pop("retry")


#: redis-py >= 8.2 rate-limits the slot-map refreshes a connection error asks for (default: one a
#: second). jobq asks for one every 0.2 s at most: after a failover the queues of the promoted
#: replica are routed to it within a fraction of a second (RELIABILITY F19: resumed <= 2 s).
_REFRESH_KW = (
    {"topology_refresh_min_interval": 0.2}
    if "topology_refresh_min_interval" in inspect.signature(redis.cluster.RedisCluster.__init__).parameters
    else {}
)
_AREFRESH_KW = (
    {"topology_refresh_min_interval": 0.2}
    if "topology_refresh_min_interval"
    in inspect.signature(redis.asyncio.cluster.RedisCluster.__init__).parameters
    else {}
)


class LazyRedisCluster:
    """A synchronous cluster client that connects at first use, not when it is built.

    redis-py's ``RedisCluster`` reads the slot map from the seed nodes in its constructor and
    raises when none answers. Built lazily, a producer, the CLI or a worker whose seeds are all
    down gets :class:`jobq.errors.RedisUnavailable` from its first call instead (refused when the
    seeds refuse connections), and retries it as it would a standalone server that is down; the
    next call tries to build the client again. Every attribute is the real client's."""

    def __init__(
        self, url: str, hosts: tuple[tuple[str, int], ...], retry: Any, opts: dict[str, Any]
    ) -> None:
        self._jobq_url = url
        self._jobq_hosts = hosts
        self._jobq_retry = retry
        self._jobq_opts = opts
        self._jobq_client: RedisCluster | None = None
        self._jobq_lock = threading.Lock()

    def jobq_connect(self) -> RedisCluster:
        """The real client, built now if it is not yet (raises ``RedisUnavailable``)."""
        client = self._jobq_client
        if client is not None:
            return client
        with self._jobq_lock:
            if self._jobq_client is None:
                try:
                    self._jobq_client = RedisCluster(
                        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in self._jobq_hosts],  # type: ignore[no-untyped-call]
                        retry=self._jobq_retry,
                        **self._jobq_opts,
                    )
                except redis.exceptions.RedisClusterException as exc:
                    err = _cluster_version_error(exc)
                    if err is exc:
                        raise errors.RedisUnavailable(
                            f"redis cluster {redact_url(self._jobq_url)}: {exc}", refused=refused(exc)
                        ) from None
                    raise err from None
            return self._jobq_client

    def register_script(self, script: str) -> Any:
        """A ``Script`` bound to this client (no round trip: only its digest is computed)."""
        from redis.commands.core import Script

        return Script(self, script)  # type: ignore[arg-type]

    def get_encoder(self) -> Any:
        o = self._jobq_opts
        from redis._parsers.encoders import Encoder

        return Encoder(o.get("encoding", "utf-8"), o.get("encoding_errors", "strict"), False)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._jobq_client is not None:
            self._jobq_client.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_jobq"):
            raise AttributeError(name)
        return getattr(self.jobq_connect(), name)


def is_cluster_client(client: Any) -> bool:
    """Is ``client`` a Redis Cluster client of jobq's (sync, lazy or asyncio)?"""
    return isinstance(
        client, (LazyRedisCluster, redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
    )


def sync_client(
    url: str, *, socket_timeout: float | None = 10.0, health_check_interval: int = 0, **kw: Any
) -> Any:
    """A synchronous client for ``url``: a ``redis.Redis``, or for ``redis+cluster://`` URLs a
    :class:`LazyRedisCluster` (a ``redis.cluster.RedisCluster`` built at first use); both speak
    the same commands and scripts."""
    t = parse_url(url)
    opts = _client_opts(t, _common(socket_timeout, health_check_interval), kw)
    if t.kind == "cluster":
        retry = _cluster_opts(opts)
        return LazyRedisCluster(url, t.hosts, retry, {**_REFRESH_KW, **opts})
    if t.kind == "sentinel":
        sentinel = _SyncSentinel(list(t.hosts), sentinel_kwargs=_sentinel_kwargs(t))
        scls = SentinelSSLConnection if t.tls else SentinelConnection
        client = sentinel.master_for(
            t.service, db=t.db, connection_class=scls, redis_class=SentinelRedis, **opts
        )
        client.jobq_sentinel = sentinel
        return client
    if t.kind == "unix":
        opts.pop("socket_keepalive", None)  # a TCP option: Unix socket connections refuse it
        pool = redis.ConnectionPool(connection_class=UnixConnection, path=t.path, db=t.db, **opts)
    else:
        host, port = t.hosts[0]
        cls = SSLConnection if t.tls else Connection
        pool = redis.ConnectionPool(connection_class=cls, host=host, port=port, db=t.db, **opts)
    return redis.Redis.from_pool(pool)


def _not_refused(exc: Exception) -> bool:
    """False for a connection refused (nothing listens on the port), anywhere in the chain."""
    return not refused(exc)


#: redis-py >= 8.2 lets a Retry refine which errors it retries.
_RETRY_REFINES = "is_retryable" in inspect.signature(redis.asyncio.retry.Retry.__init__).parameters


def async_client(
    url: str,
    *,
    socket_timeout: float | None = 10.0,
    health_check_interval: int = 0,
    retry_refused: bool = True,
    **kw: Any,
) -> Any:
    """An asyncio client for ``url``: ``redis.asyncio.Redis``, or
    ``redis.asyncio.cluster.RedisCluster`` for ``redis+cluster://`` URLs.

    ``retry_refused=False``: a refused connection (Redis is not running) raises at once instead
    of being retried within the call. The worker's loops back off on their own, with full jitter;
    retries inside each call on short windows would bring every node back in the same instant
    after a restart (RELIABILITY S4). It needs redis-py >= 8.2; older versions retry as before."""
    t = parse_url(url)
    common = _common(socket_timeout, health_check_interval)
    backoff = ExponentialWithJitterBackoff(base=0.05, cap=1.0)
    if not retry_refused and _RETRY_REFINES:
        common["retry"] = redis.asyncio.retry.Retry(backoff, 3, _RETRIED, is_retryable=_not_refused)
    else:
        common["retry"] = redis.asyncio.retry.Retry(backoff, 3, _RETRIED)
    opts = _client_opts(t, common, kw)
    if t.kind == "cluster":
        retry = _cluster_opts(opts)
        if not retry_refused:
            # redis-py's cluster client retries a failed command itself, sleeping the backoff
            # between attempts, whatever the error (it does not ask ``is_retryable``): 0.3-0.6 s
            # per call to a primary that is down, which would hold up a worker's claims of every
            # other queue. Not retried here: the worker backs off per shard (claims, acks,
            # renewals), and the slot-map refresh the error asked for is run by the next command
            # of any queue, so a failed-over queue is routed to its new primary at its next try.
            retry = redis.asyncio.retry.Retry(backoff, 0)
        return AsyncRedisCluster(
            startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in t.hosts],
            retry=retry,
            **{**_AREFRESH_KW, **opts},
        )
    if t.kind == "sentinel":
        sentinel = _AsyncSentinel(list(t.hosts), sentinel_kwargs=_sentinel_kwargs(t))
        aclient = sentinel.master_for(
            t.service,
            db=t.db,
            connection_class=AsyncSentinelSSLConnection if t.tls else AsyncSentinelConnection,
            redis_class=AsyncSentinelRedis,
            **opts,
        )
        aclient.jobq_sentinel = sentinel
        return aclient
    apool: redis.asyncio.ConnectionPool
    if t.kind == "unix":
        opts.pop("socket_keepalive", None)  # a TCP option: Unix socket connections refuse it
        apool = redis.asyncio.ConnectionPool(
            connection_class=AsyncUnixConnection, path=t.path, db=t.db, **opts
        )
    else:
        host, port = t.hosts[0]
        acls = AsyncSSLConnection if t.tls else AsyncConnection
        apool = redis.asyncio.ConnectionPool(connection_class=acls, host=host, port=port, db=t.db, **opts)
    return redis.asyncio.Redis.from_pool(apool)


def async_pubsub_client(url: str, **kw: Any) -> Any:
    """An asyncio client whose ``.pubsub()`` works for every URL kind. On a cluster it is a plain
    client on the first reachable node (for channels that are not sharded: Redis Cluster
    forwards every ``PUBLISH`` to all nodes); wake-ups use :mod:`jobq.storage.wakeups`, which
    follows each queue's shard."""
    t = parse_url(url)
    if t.kind == "sentinel":
        # Pub/sub needs no failover handling of its own (the worker re-creates its listener after
        # any error): ask the sentinels once, then hold one plain connection to the primary, so
        # a listener cancelled mid-failover cannot leave sentinel connections behind.
        return async_client(_sentinel_primary_url(url, t), **kw)
    if t.kind != "cluster":
        return async_client(url, **kw)
    host, port = _first_reachable(t)
    return async_node_client(url, host, port, **kw)


def async_node_client(url: str, host: str, port: int, **kw: Any) -> Any:
    """A plain asyncio client on one node of the cluster ``url`` names (its credentials and TLS
    options, database 0)."""
    t = parse_url(url)
    scheme = "rediss" if t.tls else "redis"
    cred = ""
    if t.username or t.password:
        from urllib.parse import quote

        cred = f"{quote(t.username or '', safe='')}:{quote(t.password or '', safe='')}@"
    from urllib.parse import urlencode

    query = urlencode({k: v for k, v in t.options.items() if k.startswith("ssl_")})
    single = f"{scheme}://{cred}{host}:{port}/0" + (f"?{query}" if query else "")
    return async_client(single, **kw)


def _sentinel_primary_url(url: str, t: RedisTarget) -> str:
    """A ``redis://`` URL of the primary the sentinels name now (asked with 1 s timeouts)."""
    sentinel = _SyncSentinel(list(t.hosts), sentinel_kwargs=_sentinel_kwargs(t))
    try:
        host, port = sentinel.discover_master(t.service)
    except redis.exceptions.RedisError as exc:
        raise errors.RedisUnavailable(f"{redact_url(url)}: {exc}") from None
    finally:
        for s in sentinel.sentinels:
            s.close()
    from urllib.parse import quote, urlencode

    cred = ""
    if t.username or t.password:
        cred = f"{quote(t.username or '', safe='')}:{quote(t.password or '', safe='')}@"
    query = urlencode({k: v for k, v in t.options.items() if k.startswith("ssl_")})
    scheme = "rediss" if t.tls else "redis"
    return f"{scheme}://{cred}{host}:{port}/{t.db}" + (f"?{query}" if query else "")


def _first_reachable(t: RedisTarget) -> tuple[str, int]:
    """The first seed node that accepts a TCP connection (cheap; the pub/sub client retries)."""
    import socket

    for host, port in t.hosts:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return host, port
        except OSError:
            continue
    return t.hosts[0]
