"""A Sentinel-managed Redis for tests: one primary, replicas and three sentinels on free loopback
ports, tuned to fail over within a few seconds (``down-after-milliseconds`` 500)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.harness.redis_server import REDIS_SERVER, RedisServer, free_port

MASTER = "jobqmaster"


@dataclass
class SentinelProcess:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, primary_port: int, down_after_ms: int, failover_timeout_ms: int) -> None:
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self.proc = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, decode_responses=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class SentinelGroup:
    replicas: int = 1
    sentinels: int = 3
    down_after_ms: int = 500
    failover_timeout_ms: int = 2000
    #: The port replicas replicate from (a chaos proxy in front of the primary); 0 = the primary.
    replica_upstream: int = 0
    primary: RedisServer = field(default_factory=RedisServer)
    replica_servers: list[RedisServer] = field(default_factory=list)
    sentinel_procs: list[SentinelProcess] = field(default_factory=list)

    def start(self) -> SentinelGroup:
        try:
            self.primary.start()
            for _ in range(self.replicas):
                upstream = self.replica_upstream or self.primary.port
                rep = RedisServer(extra=["--replicaof", "127.0.0.1", str(upstream)])
                self.replica_servers.append(rep.start())
            self.wait_replicas_in_sync()
            for _ in range(self.sentinels):
                s = SentinelProcess(free_port(), Path(tempfile.mkdtemp(prefix="jobq-sentinel-")))
                s.start(self.primary.port, self.down_after_ms, self.failover_timeout_ms)
                self.sentinel_procs.append(s)
            self.wait_sentinels_ready()
        except BaseException:
            self.cleanup()
            raise
        return self

    def wait_replicas_in_sync(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for rep in self.replica_servers:
            while True:
                c = rep.admin_client()
                try:
                    if c.info("replication").get("master_link_status") == "up":
                        break
                except redis.exceptions.RedisError:
                    pass
                finally:
                    c.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("replica did not sync")
                time.sleep(0.05)

    def wait_sentinels_ready(self, timeout: float = 20.0) -> None:
        """Until every sentinel knows the primary, its replicas and the other sentinels."""
        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for s in self.sentinel_procs:
                try:
                    c = s.client()
                    m = c.sentinel_master(MASTER)
                    c.close()
                    if int(m.get("num-other-sentinels", 0)) < self.sentinels - 1 or int(
                        m.get("num-slaves", 0)
                    ) < len(self.replica_servers):
                        ok = False
                except redis.exceptions.RedisError:
                    ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("sentinels did not discover each other")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinel_procs)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def master_port(self) -> int:
        c = self.sentinel_procs[0].client()
        try:
            _, port = c.sentinel_get_master_addr_by_name(MASTER)
            return int(port)
        finally:
            c.close()

    def server_on(self, port: int) -> RedisServer:
        for s in [self.primary, *self.replica_servers]:
            if s.port == port:
                return s
        raise KeyError(port)

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until every sentinel names the same new primary and it accepts writes; its port.

        Every sentinel, not one: a sentinel that still names the old primary converts the new
        one back into its replica once the old one answers again (sentinel's
        "+convert-to-slave"), and a test that restarts the old primary empty would then see
        the new one resync from it and lose its whole dataset."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ports = set()
                for s in self.sentinel_procs:
                    c = s.client()
                    try:
                        ports.add(int(c.sentinel_get_master_addr_by_name(MASTER)[1]))
                    finally:
                        c.close()
                port = ports.pop() if len(ports) == 1 else old_port
                if port != old_port:
                    c = self.server_on(port).admin_client()
                    try:
                        if c.info("replication").get("role") == "master":
                            return port
                    finally:
                        c.close()
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("no failover")
            time.sleep(0.05)

    def cleanup(self) -> None:
        for s in self.sentinel_procs:
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)
        for r in [*self.replica_servers, self.primary]:
            r.cleanup()
