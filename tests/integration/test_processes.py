"""Real ``jobq worker`` processes against a real redis-server.

Executions are recorded outside Redis by the tasks in :mod:`tests.integration.worker_tasks`
(one file per process), so "exactly once" is checked against what actually ran.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobq import JobQ, JobState
from tests.harness.cluster import owner_client
from tests.harness.redis_server import RedisServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TASKS = "tests.integration.worker_tasks"
Q = "proc"


def task(name: str) -> str:
    return f"{TASKS}.{name}"


class Fleet:
    """Worker processes of one test, their logs, and the executions they recorded."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.records = tmp / "records"
        self.records.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JOBQ_REDIS_URL=self.redis_url,
            JOBQ_TEST_RECORD_DIR=str(self.records),
            PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        env.update(extra)
        return env

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "jobq", "worker", "-A", TASKS, "--queues", Q, *args]
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {name} did not exit within {timeout} s:\n{self.log(name)[-3000:]}")

    def executions(self) -> list[tuple[str, int, int, float]]:
        """(kind "S"/"F", key, pid, wall time) of every recorded start and finish."""
        out = []
        for f in self.records.glob("*.log"):
            for line in f.read_text().splitlines():
                kind, key, pid, t = line.split()
                out.append((kind, int(key), int(pid), float(t)))
        return out

    def counts(self, kind: str) -> collections.Counter[int]:
        return collections.Counter(k for kd, k, _, _ in self.executions() if kd == kind)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def fleet(redis_url: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_url, tmp_path)
    yield f
    f.stop_all()


@pytest.fixture
def qapp(redis_url: str) -> Iterator[JobQ]:
    a = JobQ(redis_url)
    yield a
    a.close()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, fleet: Fleet | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = ""
            if fleet is not None:
                logs = "\n".join(f"--- {n}\n{fleet.log(n)[-2000:]}" for n in fleet.procs)
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
        time.sleep(0.01)


def node_ids(r: redis.Redis, app: JobQ) -> set[str]:
    return {n.decode() for n in r.zrange(app.keys.nodes, 0, -1)}


def test_four_processes_run_20000_jobs_exactly_once(fleet: Fleet, qapp: JobQ, r: redis.Redis) -> None:
    n_jobs = 20_000
    for i in range(4):
        fleet.start(f"w{i}", "--concurrency", "20", "--node-id", f"w{i}")
    wait_until(lambda: len(node_ids(r, qapp)) == 4, 20, "4 nodes registered", fleet)

    # Enqueued while the nodes run: pub/sub wakes them, batch claims spread the work.
    for start in range(0, n_jobs, 2000):
        qapp.enqueue_many(
            [{"task": task("record"), "args": [k], "queue": Q} for k in range(start, start + 2000)]
        )
    wait_until(lambda: r.zcard(qapp.keys.finished(Q)) >= n_jobs, 150, "all jobs finished", fleet)
    for i in range(4):
        fleet.signal(f"w{i}", signal.SIGTERM)
    for i in range(4):
        assert fleet.wait_exit(f"w{i}", 15) == 0, fleet.log(f"w{i}")

    # Every job ran exactly once, and every node took part.
    starts, finishes = fleet.counts("S"), fleet.counts("F")
    assert set(starts) == set(range(n_jobs)) and set(starts.values()) == {1}
    assert finishes == starts
    pids = {pid for _, _, pid, _ in fleet.executions()}
    assert len(pids) == 4

    # Nothing is left in Redis but finished-job retention (and the permanent registries).
    leftover: collections.Counter[str] = collections.Counter()
    for key in r.scan_iter(count=5000):
        k = key.decode()
        if k.startswith(f"jobq:{{{Q}}}:job:"):
            leftover["job"] += 1
        else:
            leftover[k] += 1
    assert leftover.pop("job") == n_jobs
    assert set(leftover) <= {
        qapp.keys.finished(Q),
        qapp.keys.queues,
        qapp.keys.queue_epoch(Q),
        qapp.keys.seq(Q),
        qapp.keys.reap_lock(Q),
        qapp.keys.events(Q),  # the lifecycle events, capped
    }, leftover
    assert r.zcard(qapp.keys.finished(Q)) == n_jobs
    # Every retained job is done, ran once, and expires.
    pipe = r.pipeline(transaction=False)
    ids = [m.decode() for m in r.zrange(qapp.keys.finished(Q), 0, -1)]
    for job_id in ids:
        pipe.hmget(qapp.keys.job(Q, job_id), "state", "attempts")
        pipe.pttl(qapp.keys.job(Q, job_id))
    res = pipe.execute()
    assert {tuple(res[i]) for i in range(0, len(res), 2)} == {(b"done", b"1")}
    assert min(res[1::2]) > 0


def test_kill_9_with_20_jobs_in_flight_they_complete_on_another_node(
    fleet: Fleet, qapp: JobQ, r: redis.Redis
) -> None:
    lease, reap = 2.0, 0.25
    knobs = ["--lease", "2s", "--reap-interval", "250ms", "--poll-interval", "250ms"]
    fleet.start("victim", "--concurrency", "20", "--node-id", "victim", *knobs)
    wait_until(lambda: "victim" in node_ids(r, qapp), 20, "victim registered", fleet)
    jobs = qapp.enqueue_many([{"task": task("sleep_async"), "args": [k, 3.0], "queue": Q} for k in range(20)])
    wait_until(lambda: len(fleet.counts("S")) == 20, 20, "20 jobs in flight on the victim", fleet)
    fleet.start("rescuer", "--concurrency", "20", "--node-id", "rescuer", *knobs)
    wait_until(lambda: "rescuer" in node_ids(r, qapp), 20, "rescuer registered", fleet)
    victim_pid = fleet.procs["victim"].pid

    t_kill = time.time()
    fleet.signal("victim", signal.SIGKILL)
    fleet.wait_exit("victim", 5)
    wait_until(lambda: sum(fleet.counts("S").values()) == 40, 20, "20 restarts", fleet)
    restarts = [t for kind, _, pid, t in fleet.executions() if kind == "S" and pid != victim_pid]
    recovery = max(restarts) - t_kill
    print(f"recovery after kill -9: {recovery:.2f} s (lease {lease} s + reap interval {reap} s)")
    assert recovery <= lease + reap + 1.5  # slack for a loaded 2-core machine

    wait_until(lambda: all(j.status() is JobState.DONE for j in jobs), 20, "jobs done", fleet)
    finishes = [(k, pid) for kind, k, pid, _ in fleet.executions() if kind == "F"]
    assert sorted(k for k, _ in finishes) == list(range(20))  # each finished once...
    assert {pid for _, pid in finishes} == {fleet.procs["rescuer"].pid}  # ...on the rescuer
    for j in jobs:
        info = j.info()
        assert info.attempts == 2 and info.reaped == 1
    assert r.zcard(qapp.keys.active(Q, "victim")) == 0
    fleet.signal("rescuer", signal.SIGTERM)
    assert fleet.wait_exit("rescuer", 10) == 0


def test_sigterm_with_jobs_in_flight_loses_none_runs_none_twice_exits_0(
    fleet: Fleet, qapp: JobQ, r: redis.Redis
) -> None:
    fleet.start("w", "--concurrency", "10", "--grace", "10s", "--node-id", "w")
    wait_until(lambda: "w" in node_ids(r, qapp), 20, "node registered", fleet)
    reqs = [{"task": task("sleep_sync"), "args": [k, 0.5], "queue": Q} for k in range(15)]
    reqs += [{"task": task("sleep_async"), "args": [k, 0.5], "queue": Q} for k in range(15, 30)]
    jobs = qapp.enqueue_many(reqs)
    wait_until(lambda: len(fleet.counts("S")) >= 10, 20, "10 jobs in flight", fleet)

    t0 = time.monotonic()
    fleet.signal("w", signal.SIGTERM)
    assert fleet.wait_exit("w", 10) == 0
    assert time.monotonic() - t0 < 0.5 + 3  # the running jobs' time, not the 10 s grace
    started, finished = fleet.counts("S"), fleet.counts("F")
    assert started == finished  # everything it started, it finished
    ran = set(started)
    for j in jobs:  # the rest is back in ready, its attempt not counted
        info = j.info()
        key = info.args[0]  # type: ignore[index]
        assert (info.state, info.attempts) == ((JobState.DONE, 1) if key in ran else (JobState.READY, 0))
    assert r.zcard(qapp.keys.active(Q, "w")) == 0 and r.zcard(qapp.keys.leases(Q)) == 0

    # Another node finishes the rest: every job ran exactly once.
    fleet.start("drain", "--concurrency", "20", "--burst")
    assert fleet.wait_exit("drain", 30) == 0, fleet.log("drain")
    assert fleet.counts("F") == collections.Counter(range(30))
    assert fleet.counts("S") == collections.Counter(range(30))


def test_sigterm_after_grace_releases_jobs_and_exits_0_even_with_a_stuck_thread(
    fleet: Fleet, qapp: JobQ, r: redis.Redis
) -> None:
    fleet.start("w", "--concurrency", "4", "--grace", "300ms", "--node-id", "w")
    wait_until(lambda: "w" in node_ids(r, qapp), 20, "node registered", fleet)
    jobs = qapp.enqueue_many(
        [
            {"task": task("sleep_sync"), "args": [0, 60], "queue": Q},
            {"task": task("sleep_async"), "args": [1, 60], "queue": Q},
        ]
    )
    wait_until(lambda: len(fleet.counts("S")) == 2, 20, "2 jobs in flight", fleet)
    t0 = time.monotonic()
    fleet.signal("w", signal.SIGTERM)
    assert fleet.wait_exit("w", 10) == 0
    assert time.monotonic() - t0 < 0.3 + 2.5
    for j in jobs:
        # Both had started: each keeps its attempt and counts an interruption.
        assert (j.info().state, j.info().attempts, j.info().interrupted) == (JobState.READY, 1, 1)
    assert r.zcard(qapp.keys.active(Q, "w")) == 0
    assert "released 2 unfinished job(s) back to ready (2 interrupted mid-run)" in fleet.log("w")


def test_processes_option_runs_and_supervises_n_nodes(fleet: Fleet, qapp: JobQ, r: redis.Redis) -> None:
    # Burst: both nodes drain the queue, the supervisor exits 0 when both did.
    qapp.enqueue_many([{"task": task("arecord"), "args": [k], "queue": Q} for k in range(300)])
    fleet.start("burst", "--processes", "2", "--burst", "--node-id", "b")
    assert fleet.wait_exit("burst", 30) == 0, fleet.log("burst")
    assert fleet.counts("F") == collections.Counter(range(300))
    assert "node b-0:" in fleet.log("burst") and "node b-1:" in fleet.log("burst")

    # Long-running: SIGTERM to the supervisor reaches every node; all exit 0.
    sup = fleet.start("sup", "--processes", "2", "--node-id", "s")
    wait_until(lambda: {"s-0", "s-1"} <= node_ids(r, qapp), 20, "2 nodes registered", fleet)

    # A node that dies is restarted (same slot, new process).
    def pid_of(node: str) -> int:
        return int(r.hget(qapp.keys.node(node), "pid") or 0)

    old_pid = pid_of("s-1")
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: pid_of("s-1") not in (0, old_pid), 20, "node s-1 restarted", fleet)
    assert "restarting it" in fleet.log("sup")

    fleet.signal("sup", signal.SIGTERM)
    assert fleet.wait_exit("sup", 10) == 0, fleet.log("sup")
    assert not ({"s-0", "s-1"} & node_ids(r, qapp))  # both deregistered on their way out
    assert sup.returncode == 0

    # A supervisor killed outright takes its nodes down gracefully (they never run orphaned).
    fleet.start("orphans", "--processes", "2", "--node-id", "o")
    wait_until(lambda: {"o-0", "o-1"} <= node_ids(r, qapp), 20, "2 nodes registered", fleet)
    fleet.signal("orphans", signal.SIGKILL)
    wait_until(lambda: not ({"o-0", "o-1"} & node_ids(r, qapp)), 20, "nodes stopped", fleet)


def test_idle_workers_start_a_new_job_quickly(fleet: Fleet, qapp: JobQ, r: redis.Redis) -> None:
    for name in ("a", "b"):
        fleet.start(name, "--concurrency", "20", "--node-id", name)
    wait_until(lambda: {"a", "b"} <= node_ids(r, qapp), 20, "nodes registered", fleet)
    # Wait until both nodes listen on their own wake-up channels.
    channels = [qapp.keys.wake(Q, n) for n in ("a", "b")]
    shard = owner_client(r, channels[0])  # both in queue Q's slot; on a cluster, SHARDNUMSUB goes there
    wait_until(lambda: [n for _, n in shard.pubsub_shardnumsub(*channels)] == [1, 1], 20, "pub/sub")

    sent: dict[int, float] = {}
    for k in range(200):
        sent[k] = time.time()
        job = qapp.enqueue(task("arecord"), (k,), queue=Q)
        job.result(timeout=10, poll_interval=0.002)
    started = {k: t for kind, k, _, t in fleet.executions() if kind == "S"}
    lat = sorted(started[k] - sent[k] for k in sent)
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99) - 1]
    print(f"enqueue -> start latency over 200 jobs: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.25  # the target is 50 ms (measured by the benchmark); loose on a shared machine


def test_password_never_appears_in_worker_output(tmp_path: Path, fresh_server: RedisServer) -> None:
    canary = "CANARY-7f3a-s3cret"
    fresh_server.password = canary
    fresh_server.start()
    fl = Fleet(fresh_server.url, tmp_path)
    try:
        # Good password from the environment: runs; the URL is logged redacted.
        fl.start("env", "--burst")
        assert fl.wait_exit("env", 20) == 0
        assert canary not in fl.log("env") and ":***@" in fl.log("env")
        # Wrong password on argv: warns about argv, stops with a clear error (exit 1), and
        # prints neither password.
        wrong = fresh_server.url.replace(canary, "WRONG-" + canary)
        fl.start("argv", "--redis-url", wrong, env=fl.env(JOBQ_REDIS_URL="redis://127.0.0.1:1/0"))
        assert fl.wait_exit("argv", 20) == 1
        out = fl.log("argv")
        assert canary not in out, out
        assert "command line" in out and "cannot run" in out and "password" in out
    finally:
        fl.stop_all()
