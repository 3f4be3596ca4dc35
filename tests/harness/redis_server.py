"""A real redis-server for tests: started on a free loopback port in a temp dir, killable and
restartable, with the persistence, memory, ACL and TLS options the fault tests need."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """One redis-server process. ``persistence``: "none", "aof-everysec" or "aof-always"."""

    persistence: str = "none"
    maxmemory: str | None = None
    maxmemory_policy: str = "noeviction"
    password: str | None = None
    acl_lines: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    port: int = 0
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="jobq-redis-")))
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()

    # -- lifecycle ---------------------------------------------------------------------------
    def args(self) -> list[str]:
        a = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            "--enable-debug-command",
            "local",
            "--maxmemory-policy",
            self.maxmemory_policy,
        ]
        if self.persistence == "none":
            a += ["--appendonly", "no"]
        else:
            fsync = "always" if self.persistence == "aof-always" else "everysec"
            a += ["--appendonly", "yes", "--appendfsync", fsync]
        if self.maxmemory:
            a += ["--maxmemory", self.maxmemory]
        if self.password:
            a += ["--requirepass", self.password]
        if self.acl_lines:
            aclfile = self.dir / "users.acl"
            aclfile.write_text("\n".join(self.acl_lines) + "\n")
            a += ["--aclfile", str(aclfile)]
        return a + self.extra

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                c = self.admin_client()
                c.ping()
                # Wait for an AOF to be loaded, too.
                if c.info("persistence").get("loading", 0) == 0:
                    c.close()
                    return
                c.close()
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                pass
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited: {self.proc.returncode}\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} not ready")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, wipe: bool = False) -> None:
        self.kill()
        if wipe:
            for p in self.dir.iterdir():
                if p.name != "redis.log" and p.name != "users.acl":
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server (it stops answering, sockets stay open)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def url_for(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def admin_client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5, **kw)
