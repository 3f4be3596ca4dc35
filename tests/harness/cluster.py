"""A real Redis Cluster for tests: N primaries (and optional replicas) on free loopback ports,
each a :class:`RedisServer` with ``--cluster-enabled yes``, joined by ``redis-cli --cluster create``."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

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


@dataclass
class RedisClusterHarness:
    """``primaries`` primaries, ``replicas`` replicas per primary; ``url`` is the jobq cluster URL."""

    primaries: int = 3
    replicas: int = 0
    node_timeout_ms: int = 2000
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
                    "yes",
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
        return self

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

    def admin_client(self, **kw: Any) -> AdminCluster:
        return AdminCluster(
            startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes[: self.primaries]],
            socket_timeout=5,
            **kw,
        )

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
