"""A fleet of real ``jobq worker`` processes that a test can kill, stop and restart.

How to use it (the ``worker_fleet`` fixture of tests/fault/conftest.py builds one per test and
kills whatever is left at teardown)::

    fleet = worker_fleet(redis_url, concurrency=5)          # --lease 2s --grace 3s, reap 0.5 s
    a, b, c = fleet.start(3)                                 # nodes "n1".."n3", waits until each
                                                             # heartbeats in Redis
    a.kill()                  # SIGKILL      a.term()  # SIGTERM     a.stop() / a.cont()  # STOP/CONT
    rc = a.wait(5)            # exit code (negative = signal), also in a.exit_codes
    fleet.supervise(a)        # restart it whenever it exits non-zero (a.restarts counts)
    fleet.stale_count()       # stale completions the nodes logged (acks refused / results dropped)
    fleet.grep("pattern")     # matching log lines of every node; a.log_text() one node's log
    fleet.shutdown()          # SIGTERM all, wait, SIGKILL stragglers

Every node is ``python -m jobq worker -A tests.harness.fault_tasks:app --queues ... --node-id
<name> --concurrency N --lease 2s --grace 3s --reap-interval 0.5s --poll-interval ...`` with
``JOBQ_REDIS_URL`` in its environment, its stdout and stderr in ``<dir>/<name>.log`` (appended
across restarts), and the history variables (:meth:`History.env`). Extra environment per node
(e.g. ``JOBQ_CRASH_POINT``) goes in ``spawn(env=...)``. If the ``jobq worker`` command is not
available, the fleet falls back to :mod:`tests.harness.node`, which takes the same options.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobq.storage.clients import sync_client
from tests.harness.history import History

REPO = Path(__file__).resolve().parents[2]
#: The log line the worker writes for every stale completion (its result discarded).
STALE_RE = re.compile(r"stale completion")


def _has_worker_cli() -> bool:
    try:
        from jobq.cli import main

        return "worker" in getattr(main, "commands", {})
    except Exception:
        return False


@dataclass
class Node:
    """One worker process (restarted in place by :meth:`WorkerFleet.restart`)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    restarts: int = 0
    stopped: bool = False
    _rc_recorded: bool = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap (the exit code is recorded)."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def term(self) -> None:
        self.signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGSTOP: the whole process freezes (heartbeat thread included)."""
        self.signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        self.signal(signal.SIGCONT)
        self.stopped = False

    def wait(self, timeout: float) -> int:
        """Wait for the exit; return its code (negative: killed by that signal)."""
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if not self._rc_recorded:
            self._rc_recorded = True
            self.exit_codes.append(rc)
        return rc

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def metrics_port(self, timeout: float = 20.0) -> int:
        """The port of a node started with ``--metrics-port 0``, read from its start-up log line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", self.log_text())
            if m:
                return int(m.group(1))
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no metrics line in its log\n{self.log_text()[-2000:]}")

    def scrape(self, port: int | None = None) -> str:
        """One ``GET /metrics`` of this node (Prometheus text)."""
        url = f"http://127.0.0.1:{port or self.metrics_port()}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def sample(self, name: str, port: int | None = None) -> float | None:
        """The value of an unlabelled sample in this node's ``/metrics``, None when absent."""
        m = re.search(rf"^{re.escape(name)} (\S+)$", self.scrape(port), re.M)
        return float(m.group(1)) if m else None


class WorkerFleet:
    """Spawns and controls worker nodes; see the module docstring."""

    def __init__(
        self,
        redis_url: str,
        workdir: Path,
        *,
        history: History | None = None,
        app: str = "tests.harness.fault_tasks:app",
        queues: str = "fault",
        concurrency: int = 5,
        lease: float = 2.0,
        grace: float = 3.0,
        reap_interval: float = 0.5,
        poll_interval: float = 0.5,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.history = history
        self.app = app
        self.queues = queues
        self.concurrency = concurrency
        self.lease = lease
        self.grace = grace
        self.reap_interval = reap_interval
        self.poll_interval = poll_interval
        self.extra_args = extra_args or []
        self.env = env or {}
        self.nodes: dict[str, Node] = {}
        self.use_cli = _has_worker_cli()
        self._supervised: set[str] = set()
        self._sup_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()

    # -- spawning -------------------------------------------------------------------------------
    def command(
        self, name: str, *, concurrency: int | None = None, extra: list[str] | None = None
    ) -> list[str]:
        head = (
            [sys.executable, "-m", "jobq", "worker"]
            if self.use_cli
            else [sys.executable, "-m", "tests.harness.node"]
        )
        return [
            *head,
            "-A",
            self.app,
            "--queues",
            self.queues,
            "--node-id",
            name,
            "--concurrency",
            str(concurrency or self.concurrency),
            "--lease",
            f"{self.lease:g}s",
            "--grace",
            f"{self.grace:g}s",
            "--reap-interval",
            f"{self.reap_interval:g}s",
            "--poll-interval",
            f"{self.poll_interval:g}s",
            *self.extra_args,
            *(extra or []),
        ]

    def spawn(
        self,
        name: str | None = None,
        *,
        env: dict[str, str] | None = None,
        concurrency: int | None = None,
        extra: list[str] | None = None,
        wait: bool = True,
    ) -> Node:
        """Start one node (named ``n<k>`` by default); wait until it heartbeats unless told not to."""
        name = name or f"n{len(self.nodes) + 1}"
        full_env = {
            **os.environ,
            "JOBQ_REDIS_URL": self.redis_url,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
            **(self.history.env(name) if self.history is not None else {}),
            **self.env,
            **(env or {}),
        }
        node = Node(
            name, self.command(name, concurrency=concurrency, extra=extra), full_env, self.dir / f"{name}.log"
        )
        self.nodes[name] = node
        self._launch(node)
        if wait:
            self.wait_registered([node])
        return node

    def _launch(self, node: Node) -> None:
        with node.log_path.open("ab") as log:
            log.write(f"--- start {node.name} at {time.time():.3f}: {' '.join(node.args)}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                node.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=node.env,
                cwd=REPO,
                start_new_session=True,
            )
        node.started_at = time.monotonic()
        node._rc_recorded = False

    def start(self, n: int, **kw: Any) -> list[Node]:
        """Start ``n`` nodes at once and wait until all of them heartbeat."""
        nodes = [self.spawn(wait=False, **kw) for _ in range(n)]
        self.wait_registered(nodes)
        return nodes

    def restart(self, node: Node, *, wait: bool = True) -> Node:
        """Start ``node`` again under the same name (after it exited)."""
        if node.alive():
            raise RuntimeError(f"{node.name} is still running")
        if node.proc is not None:
            node.wait(1)
        node.restarts += 1
        self._launch(node)
        if wait:
            self.wait_registered([node])
        return node

    def wait_registered(self, nodes: list[Node], timeout: float = 30.0) -> None:
        """Wait until every node's heartbeat is in ``jobq:nodes`` with a time after its start."""
        client = sync_client(self.redis_url, socket_timeout=5)  # standalone or cluster
        t0 = client.time()
        since_ms = t0[0] * 1000 + t0[1] // 1000 - 50
        deadline = time.monotonic() + timeout
        try:
            for node in nodes:
                while True:
                    score = client.zscore("jobq:nodes", node.name)
                    if score is not None and score >= since_ms and node.alive():
                        break
                    if not node.alive():
                        raise RuntimeError(f"node {node.name} exited at start:\n{node.log_text()[-3000:]}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"node {node.name} did not register:\n{node.log_text()[-3000:]}")
                    time.sleep(0.05)
        finally:
            client.close()

    # -- supervision ----------------------------------------------------------------------------
    def supervise(self, node: Node, *, max_restarts: int = 100) -> None:
        """Restart ``node`` whenever it exits with a non-zero code (a process supervisor)."""
        with self._lock:
            self._supervised.add(node.name)
            node.env = {**node.env}
            self._max_restarts = max_restarts
        if self._sup_thread is None:
            self._sup_thread = threading.Thread(target=self._supervise_loop, daemon=True, name="fleet-sup")
            self._sup_thread.start()

    def unsupervise(self, node: Node) -> None:
        with self._lock:
            self._supervised.discard(node.name)

    def _supervise_loop(self) -> None:
        while not self._closing.wait(0.1):
            with self._lock:
                names = list(self._supervised)
            for name in names:
                node = self.nodes[name]
                if node.proc is None or node.proc.poll() is None:
                    continue
                rc = node.wait(1)
                if rc != 0 and node.restarts < self._max_restarts and not self._closing.is_set():
                    self.restart(node, wait=False)

    # -- logs -----------------------------------------------------------------------------------
    def grep(self, pattern: str | re.Pattern[str]) -> list[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [line for n in self.nodes.values() for line in n.log_text().splitlines() if rx.search(line)]

    def stale_count(self) -> int:
        """Stale completions the nodes reported: results dropped because the lease was lost
        (the worker logs one line per job; jobq_stale_completions_total counts the same)."""
        return len(self.grep(STALE_RE))

    def crashes(self) -> list[str]:
        """Tracebacks of unexpected crashes in any node's log."""
        return self.grep(r"^Traceback|Fatal Python error")

    # -- teardown -------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM (after SIGCONT) every live node, wait, SIGKILL stragglers; return exit codes."""
        self._closing.set()
        for node in self.nodes.values():
            if node.alive():
                node.cont()
                node.term()
        deadline = time.monotonic() + timeout
        out: dict[str, int | None] = {}
        for node in self.nodes.values():
            if node.proc is None:
                continue
            try:
                out[node.name] = node.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.signal(signal.SIGKILL)
                out[node.name] = node.wait(5)
        return out

    def kill_all(self) -> None:
        self._closing.set()
        for node in self.nodes.values():
            if node.alive():
                node.signal(signal.SIGKILL)
                node.cont()
                node.wait(5)
