"""A real Redis Cluster for tests: N primaries (and optional replicas) on free loopback ports,
each a :class:`RedisServer` with ``--cluster-enabled yes``, joined by ``redis-cli --cluster create``.

For the failure tests (RELIABILITY F19): ``RedisClusterHarness(primaries=3, replicas=1)`` is 3
primaries + 3 replicas; :meth:`primary_for` and :meth:`replica_of` name the servers of a key's
slot, :meth:`kill` is ``kill -9``, :meth:`wait_promoted` waits until a replica took over a slot,
and ``full_coverage=False`` starts every node with ``cluster-require-full-coverage no`` (the
other slots are served while one has no primary)."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster, key_slot

from tests.harness.redis_server import RedisServer, free_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


class AdminCluster(RedisCluster):
    """A cluster client for tests whose key-space commands see every primary (redis-py sends
    ``KEYS`` and ``DBSIZE`` to one random node by default)."""

    def keys(self, pattern: Any = "*", **kw: Any) -> Any:
        kw.setdefault("target_nodes", RedisCluster.PRIMARIES)
        out = super().keys(pattern, **kw)
        return [k for ks in out.values() for k in ks] if isinstance(out, dict) else out

    def dbsize(self, **kw: Any) -> Any:
        kw.setdefault("target_nodes", RedisCluster.PRIMARIES)
        out = super().dbsize(**kw)
        return sum(out.values()) if isinstance(out, dict) else out

    def flushall(self, *args: Any, **kw: Any) -> Any:
        kw.setdefault("target_nodes", RedisCluster.PRIMARIES)
        return super().flushall(*args, **kw)


def owner_client(r: redis.Redis | RedisCluster, key: str) -> redis.Redis:
    """A client on the server that serves ``key``'s slot, for what must be sent there: sharded
    pub/sub (``SSUBSCRIBE``) and ``PUBSUB SHARDNUMSUB``. On a standalone server it is ``r``
    itself; on a cluster, the cluster client's own client of the slot's primary (``r`` closes it
    when it closes)."""
    if isinstance(r, RedisCluster):
        node = r.get_node_from_key(key)
        assert node is not None and node.redis_connection is not None, f"no node serves {key!r}"
        client: redis.Redis = node.redis_connection
        return client
    return r


@dataclass
class RedisClusterHarness:
    """``primaries`` primaries, ``replicas`` replicas per primary; ``url`` is the jobq cluster URL."""

    primaries: int = 3
    replicas: int = 0
    node_timeout_ms: int = 2000
    full_coverage: bool = True
    extra: list[str] = field(default_factory=list)
    nodes: list[RedisServer] = field(default_factory=list)

    def start(self) -> RedisClusterHarness:
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> RedisClusterHarness:
        for _ in range(self.primaries * (1 + self.replicas)):
            srv = RedisServer(
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    "--cluster-port",
                    str(free_port()),
                    "--cluster-require-full-coverage",
                    "yes" if self.full_coverage else "no",
                    *self.extra,
                ]
            )
            srv.extra += ["--cluster-config-file", str(srv.dir / "nodes.conf")]
            self.nodes.append(srv.start())
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *addrs,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()
        if self.replicas:
            self.wait_replicas_synced()
        return self

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every replica has its link to its primary up and its first sync done (a
        replica that never synced refuses to fail over: its data is too old)."""
        deadline = time.monotonic() + timeout
        while True:
            synced = 0
            for n in self.nodes:
                c = n.admin_client()
                try:
                    info = c.info("replication")
                    if info.get("role") == "slave" and info.get("master_link_status") == "up":
                        synced += 1
                except redis.exceptions.RedisError:
                    pass
                finally:
                    c.close()
            if synced == self.primaries * self.replicas:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{synced} of {self.primaries * self.replicas} replicas synced")
            time.sleep(0.05)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports ``cluster_state:ok`` and knows every node."""
        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for n in self.nodes:
                c = n.admin_client()
                try:
                    info = c.cluster("info")
                    if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(
                        self.nodes
                    ):
                        ok = False
                except redis.exceptions.RedisError:
                    ok = False
                finally:
                    c.close()
            if ok:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.primaries])

    def seed_url(self, *servers: RedisServer) -> str:
        """A jobq cluster URL whose only seeds are ``servers``."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in servers)

    def admin_client(self, **kw: Any) -> AdminCluster:
        return AdminCluster(
            startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes if self.alive(n)],
            socket_timeout=5,
            **kw,
        )

    # -- failures ----------------------------------------------------------------------------------
    @staticmethod
    def alive(server: RedisServer) -> bool:
        return server.proc is not None and server.proc.poll() is None

    def _topology(self) -> list[list[str]]:
        """``CLUSTER NODES`` lines (split) as a live node sees them."""
        for n in self.nodes:
            if not self.alive(n):
                continue
            c = n.admin_client()
            try:
                raw = c.execute_command("CLUSTER NODES")
            except redis.exceptions.RedisError:
                continue
            finally:
                c.close()
            text = raw.decode() if isinstance(raw, bytes) else raw if isinstance(raw, str) else ""
            if not text:  # redis-py may parse the reply into a dict
                text = "\n".join(f"{v['node_id']} {k} {v['flags']} {v['master_id']}" for k, v in raw.items())
            return [line.split() for line in text.splitlines() if line.strip()]
        raise RuntimeError("no live cluster node")

    def _server(self, addr: str) -> RedisServer:
        port = int(addr.split("@")[0].rsplit(":", 1)[1])
        return next(n for n in self.nodes if n.port == port)

    def primary_for(self, key: str) -> RedisServer:
        """The server whose primary serves ``key``'s slot now."""
        c = self.admin_client()
        try:
            port = c.nodes_manager.get_node_from_slot(key_slot(key.encode())).port
        finally:
            c.close()
        return next(n for n in self.nodes if n.port == port)

    def replica_of(self, primary: RedisServer, timeout: float = 15.0) -> RedisServer:
        """A replica of ``primary`` (waits until the topology shows one: a replica attached by
        ``--cluster create`` is announced by gossip)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self._topology()
            pid = next(r[0] for r in rows if self._server(r[1]) is primary)
            found = [self._server(r[1]) for r in rows if len(r) > 3 and r[3] == pid]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica of port {primary.port} in {rows}")
            time.sleep(0.05)

    def is_primary(self, server: RedisServer) -> bool:
        rows = self._topology()
        row = next(r for r in rows if self._server(r[1]) is server)
        return "master" in row[2].split(",") and "fail" not in row[2]

    def kill(self, server: RedisServer) -> None:
        """``kill -9``."""
        server.kill()

    def wait_promoted(self, replica: RedisServer, timeout: float = 30.0) -> float:
        """Until ``replica`` says it is a primary; returns that moment (time.monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = replica.admin_client()
            try:
                if c.info("replication").get("role") == "master":
                    return time.monotonic()
            except redis.exceptions.RedisError:
                pass
            finally:
                c.close()
            time.sleep(0.02)
        raise TimeoutError(f"replica on port {replica.port} not promoted within {timeout} s")

    def flush(self) -> None:
        """Empty every primary and drop its scripts."""
        for n in self.nodes:
            c = n.admin_client()
            try:
                if c.info("replication").get("role") == "master":
                    c.flushall()
                c.script_flush()
            finally:
                c.close()

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()
