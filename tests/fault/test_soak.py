"""Scale and soak (RELIABILITY.md 2.5): S1 soak, S2 node churn, S3 thundering herd, S4 reconnect
storm, S5 wake-up fan-out.

The ``ci`` tier runs short versions of S1 (4 nodes x 5 concurrency, 60 s), S2 and S5. The
``nightly`` tier (``scripts/nightly``: ``JOBQ_NIGHTLY=1``) runs S1 at 10 x 20 for 10 minutes,
S2 with 1,000 nodes over 10 minutes, S3 (1,000,000 jobs due at the same ms) and S4 (Redis
restarted under 200 worker connections), and S5 with 100 nodes x 1,000 jobs. Every test prints a
``FIGURES`` line (and appends it to ``$JOBQ_RESULTS_FILE``) with its measurements.
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import threading
import time
from typing import Any

import pytest
import redis

from jobq import JobQ
from jobq.storage.scripts import ScriptName, source
from tests.fault.conftest import NIGHTLY, tier
from tests.harness.checker import Snapshot, assert_invariants, check, wait_drained
from tests.harness.history import History, Producer
from tests.harness.redis_server import RedisServer

pytestmark = [pytest.mark.fault]

LEASE, REAP, GRACE = 2.0, 0.5, 3.0
NODE_TTL = 2 * LEASE
Q = "fault"


def ctx(seed: int, history: History) -> str:
    return f"seed={seed} (replay: JOBQ_SEED={seed}) history={history.dir}"


def sha(name: ScriptName) -> str:
    return hashlib.sha1(source(name).encode()).hexdigest()


def slow_scripts(r: redis.Redis, over_us: int) -> dict[str, int]:
    """jobq script calls in the slowlog slower than ``over_us``, by script name."""
    names = {sha(n): n.value for n in ScriptName}
    out: dict[str, int] = {}
    for e in r.slowlog_get(1024):
        cmd = e["command"]
        parts = cmd.split() if isinstance(cmd, bytes) else str(cmd).split()
        if len(parts) < 2 or parts[0].lower() not in (b"evalsha", "evalsha"):
            continue
        key = parts[1].decode() if isinstance(parts[1], bytes) else parts[1]
        if e["duration"] > over_us and key in names:
            out[names[key]] = out.get(names[key], 0) + 1
    return out


def script_durations(r: redis.Redis, name: ScriptName) -> list[int]:
    """Durations (µs) of the slowlog's calls of one script."""
    key = sha(name)
    out = []
    for e in r.slowlog_get(100_000):
        cmd = e["command"]
        if key in (cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)):
            out.append(int(e["duration"]))
    return out


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def start_latencies(history: History) -> list[float]:
    first: dict[str, float] = {}
    for a in history.attempts():
        first.setdefault(a.job_id, a.t_start)
    return [first[e.job_id] - e.t for e in history.enqueues() if e.job_id in first]


def commands_processed(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# -- S1: soak ---------------------------------------------------------------------------------------
def test_s1_soak(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """Mixed load: 70 % 5 ms, 25 % 200 ms, 5 % failing once then retried. 0 lost, 0
    unexplained duplicates, keyspace back to baseline after retention, no slow scripts."""
    rng = random.Random(seed)
    nodes_n, conc = (10, 20) if NIGHTLY else (4, 5)
    duration = float(os.environ.get("JOBQ_S1_SECONDS", 600 if NIGHTLY else 60))
    rate = float(os.environ.get("JOBQ_S1_RATE", 150 if NIGHTLY else 60))  # jobs/s, about 50 % load
    retention = 60.0 if NIGHTLY else 5.0
    history.fsync = not NIGHTLY  # write() alone survives SIGKILL; fsync only guards power loss
    fleet = worker_fleet(
        lease=LEASE, grace=GRACE, reap_interval=REAP, env={"JOBQ_FAULT_RESULT_TTL": str(retention)}
    )
    fleet.start(nodes_n, concurrency=conc)
    time.sleep(LEASE)  # registries settled
    baseline = r.dbsize()
    r.config_set("slowlog-log-slower-than", 10000)
    r.slowlog_reset()
    prod = Producer(app, history)
    memory: list[tuple[float, int]] = []
    t0 = time.monotonic()
    tick = 0.05
    sent = 0
    while (now := time.monotonic()) - t0 < duration:
        due = int((now - t0) * rate) - sent
        if due > 0:
            per_job = []
            for _ in range(due):
                x = rng.random()
                if x < 0.70:
                    per_job.append({"sleep": 0.005})
                elif x < 0.95:
                    per_job.append({"sleep": 0.2})
                else:
                    per_job.append({"sleep": 0.005, "mode": "fail_first", "fail_until": 1})
            prod.enqueue_batch(due, per_job=per_job, options={"retry_backoff": 0.1})
            sent += due
        if not memory or now - memory[-1][0] >= 5:
            memory.append((now, int(r.info("memory")["used_memory"])))
        time.sleep(tick)
    wait_drained(r, [Q], timeout=120)
    snap = Snapshot.take(r)
    rep = check(history, snap, stale_reported=fleet.stale_count())
    rep.assert_ok(ctx(seed, history))
    assert not rep.dead and rep.completed == sent, rep.summary()
    lat = start_latencies(history)
    slow = slow_scripts(r, 10_000)
    # Memory slope over the last part of the run (5 min nightly, 30 s ci), % of the mean per min.
    window = 300 if NIGHTLY else 30
    tail = [(t, m) for t, m in memory if t >= memory[-1][0] - window]
    slope = 0.0
    if len(tail) >= 3:
        ts, ms = [t for t, _ in tail], [m for _, m in tail]
        mt, mm = statistics.fmean(ts), statistics.fmean(ms)
        cov = sum((a - mt) * (b - mm) for a, b in zip(ts, ms, strict=True))
        slope = cov / sum((a - mt) ** 2 for a in ts) * 60 / mm * 100
    # Keys back to baseline after retention + one reap interval.
    time.sleep(retention + REAP + 0.5)
    after = r.dbsize()
    slow50 = slow_scripts(r, 50_000)
    figures(
        "S1",
        nodes=nodes_n,
        concurrency=conc,
        seconds=duration,
        rate_per_s=rate,
        jobs=sent,
        lost=len(rep.lost),
        unexplained_duplicates=len(rep.unexplained_duplicates),
        duplicates=len(rep.duplicates),
        dbsize_baseline=baseline,
        dbsize_after=after,
        dbsize_bound=baseline + 2 * nodes_n,
        slow_scripts_over_10ms=sum(slow.values()),
        slow_scripts_over_50ms=sum(slow50.values()),
        memory_slope_pct_per_min=round(slope, 2),
        start_latency_p50_ms=round(percentile(lat, 50) * 1000, 1),
        start_latency_p99_ms=round(percentile(lat, 99) * 1000, 1),
        seed=seed,
    )
    assert_invariants(
        r, ctx(seed, history), reap_interval_ms=int(REAP * 1000), node_ttl_ms=int(NODE_TTL * 1000)
    )
    assert after <= baseline + 2 * nodes_n, (baseline, after, sorted(k.decode() for k in r.keys())[:50])
    # The slowlog measures wall time: on 2 shared cores under this load Redis is descheduled
    # now and then, so slow calls are reported, not asserted here. Bounded work per call is
    # asserted by S3's probe at a 1M backlog on an otherwise idle machine.
    assert not fleet.crashes(), fleet.crashes()[:5]


# -- S2: node churn -----------------------------------------------------------------------------------
def test_s2_node_churn(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """Short-lived nodes with random ids come and go (SIGKILL or SIGTERM) under a light load."""
    rng = random.Random(seed)
    churn = tier(16, 1000)
    window = 600.0 if NIGHTLY else 20.0
    history.fsync = not NIGHTLY
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    stable = fleet.start(2, concurrency=5)
    prod = Producer(app, history)
    live: list[Any] = []
    t0 = time.monotonic()
    interval = window / churn
    killed = termed = 0
    for i in range(churn):
        prod.enqueue_batch(5, sleep=rng.uniform(0.01, 0.3))
        node = fleet.spawn(f"c{i}-{rng.getrandbits(32):08x}", concurrency=3, wait=False)
        live.append((node, time.monotonic() + rng.uniform(0.5, 3.0)))
        # End the nodes whose time has come.
        for n, until in list(live):
            if time.monotonic() >= until:
                if rng.random() < 0.5:
                    n.kill()
                    killed += 1
                else:
                    n.term()
                    termed += 1
                live.remove((n, until))
        time.sleep(max(0.0, t0 + (i + 1) * interval - time.monotonic()))
    for n, _ in live:
        n.kill()
        killed += 1
    t_end = time.monotonic()
    wait_drained(r, [Q], timeout=60)
    for n in fleet.nodes.values():
        if n not in stable and n.proc is not None:
            n.wait(GRACE + 5)
    # Within 2 x node TTL: the registries hold the live nodes only, no orphan active lists.
    live_names = {n.name for n in stable}

    def settled() -> bool:
        qnodes = {m.decode() for m in r.zrange(f"jobq:{{{Q}}}:nodes", 0, -1)}
        gnodes = {m.decode() for m in r.zrange("jobq:nodes", 0, -1)}
        orphans = [
            k
            for k in r.scan_iter(match=f"jobq:{{{Q}}}:active:*")
            if k.decode().rsplit(":", 1)[1] not in live_names
        ]
        return qnodes <= live_names and gnodes <= live_names and not orphans

    deadline = t_end + 2 * NODE_TTL + 1.0
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.1)
    settle_s = time.monotonic() - t_end
    assert settled(), (
        sorted(m.decode() for m in r.zrange(f"jobq:{{{Q}}}:nodes", 0, -1)),
        sorted(m.decode() for m in r.zrange("jobq:nodes", 0, -1)),
    )
    snap = Snapshot.take(r)
    rep = check(history, snap, allow_release=True)
    rep.assert_ok(ctx(seed, history))
    assert_invariants(
        r, ctx(seed, history), reap_interval_ms=int(REAP * 1000), node_ttl_ms=int(NODE_TTL * 1000)
    )
    figures(
        "S2",
        nodes=churn,
        killed=killed,
        terminated=termed,
        jobs=rep.enqueued_ok,
        lost=len(rep.lost),
        registry_settled_s=round(settle_s, 2),
        bound_s=2 * NODE_TTL,
        seed=seed,
    )


# -- S5: wake-up fan-out -------------------------------------------------------------------------------
#: Idle cost bound per node: the target (1 command/s) plus the error of counting events that
#: come every 5 or 10 s (heartbeat, reaper, ping, armed poll) in a window of 30 s.
S5_IDLE_BOUND = 1.1


def test_s5_wakeup_fanout(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    """Idle nodes (default lease and poll interval); one job at a time: each job wakes one node,
    so claim calls per job stay <= 2 whatever the number of nodes (RELIABILITY S5); each job
    starts once; idle pickup latency; Redis stays cool; idle cost per node <= 1 command/s."""
    n_nodes, n_jobs = tier(8, 100), tier(100, 1000)
    fleet = worker_fleet(lease=30.0, grace=GRACE, reap_interval=5.0, poll_interval=1.0)
    fleet.start(n_nodes, concurrency=2)
    claim_sha, idle_sha = sha(ScriptName.CLAIM), sha(ScriptName.IDLE)
    counts = {"claims": 0, "arms": 0, "client_cmds": 0}
    stop = threading.Event()

    def monitor() -> None:
        client = redis.Redis.from_url(app.url, socket_timeout=3600)
        with client.monitor() as m:
            for cmd in m.listen():
                if stop.is_set():
                    break
                if cmd["client_type"] == "lua":  # a command a script ran: part of one call
                    continue
                counts["client_cmds"] += 1
                if claim_sha in cmd["command"]:
                    counts["claims"] += 1
                elif idle_sha in cmd["command"]:
                    counts["arms"] += 1
        client.close()

    # Every node idle: its wake-up token armed (the first claim found nothing).
    deadline = time.monotonic() + 60
    while r.zcard(f"jobq:{{{Q}}}:idle") < n_nodes:
        assert time.monotonic() < deadline, "the nodes did not arm their wake-up tokens"
        time.sleep(0.05)
    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    time.sleep(0.5)
    # Idle cost: commands each node sends per second with nothing to do.
    c0, t0 = counts["client_cmds"], time.monotonic()
    time.sleep(30.0)
    idle_rate = (counts["client_cmds"] - c0) / (time.monotonic() - t0) / n_nodes
    prod = Producer(app, history)
    cpu0, w0 = redis_cpu(r), time.monotonic()
    claims0, arms0 = counts["claims"], counts["arms"]
    sent: dict[str, float] = {}
    for i in range(n_jobs):
        jid = f"s5-{seed}-{i}"
        sent[jid] = time.time()
        assert prod.enqueue(jid) == "enqueue_ok"
        while r.hget(f"jobq:{{{Q}}}:job:{jid}", "state") != b"done":
            time.sleep(0.002)
    elapsed = time.monotonic() - w0
    cpu = (redis_cpu(r) - cpu0) / elapsed * 100
    stop.set()
    r.ping()  # wakes the monitor loop
    # Every claim while the jobs ran, background polling included (an armed idle node polls
    # with an arm call, not a claim).
    claims, arms = counts["claims"] - claims0, counts["arms"] - arms0
    per_job = claims / n_jobs
    snap = Snapshot.take(r)
    rep = check(history, snap)
    rep.assert_ok(ctx(seed, history))
    assert not rep.duplicates
    starts: dict[str, float] = {}
    for a in history.attempts():
        starts.setdefault(a.job_id, a.t_start)
    lat = [starts[j] - t for j, t in sent.items()]
    p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
    figures(
        "S5",
        nodes=n_nodes,
        jobs=n_jobs,
        claim_calls=claims,
        claims_per_job=round(per_job, 2),
        claims_bound=2,
        arm_calls_per_job=round(arms / n_jobs, 2),
        pickup_p50_ms=round(p50, 2),
        pickup_p99_ms=round(p99, 2),
        pickup_max_ms=round(max(lat) * 1000, 1),
        redis_cpu_pct=round(cpu, 1),
        idle_cmds_per_node_s=round(idle_rate, 2),
        idle_bound=S5_IDLE_BOUND,
        seed=seed,
    )
    assert per_job <= 2, (per_job, claims)
    assert cpu < 50, cpu
    assert idle_rate <= S5_IDLE_BOUND, idle_rate
    # The pickup targets (p50 0.8 ms, p99 1.5 ms) are reported above; on a shared machine only
    # bounds that a herd (p50) or a missed wake-up (a poll: 1 s or more) would break are asserted.
    assert p50 <= 5 and max(lat) < 1.0, (p50, p99, max(lat))


# -- S3: thundering herd (nightly) -------------------------------------------------------------------
@pytest.mark.nightly
def test_s3_thundering_herd(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    n = int(os.environ.get("JOBQ_S3_JOBS", 1_000_000))
    history.fsync = False
    now_ms = int(r.time()[0]) * 1000
    due = now_ms + 5000 + n * 1000 // 15_000  # after the enqueue is done (~25k jobs/s here)
    prod = Producer(app, history)
    t_enq = time.monotonic()
    ok = prod.enqueue_batch(n, options={"run_at": due / 1000})
    t_enq = time.monotonic() - t_enq
    assert len(ok) == n
    assert int(r.time()[0]) * 1000 < due, "the enqueue took longer than planned: jobs became due early"
    while int(r.time()[0]) * 1000 < due:
        time.sleep(0.2)
    # Bounded work at a 1M backlog, timed by Redis before the fleet starts: 50 claim calls,
    # each promoting 100 of the 1M due jobs and popping 20 (then released unrun). Wall time on
    # a shared machine: 90 % must be <= 10 ms; the median and the maximum are reported.
    r.config_set("slowlog-log-slower-than", 0)
    r.config_set("slowlog-max-len", 100_000)  # commands inside scripts are logged too
    r.slowlog_reset()
    for _ in range(50):
        app.run(app.store.claim(Q, "probe", 20, 60_000))
    probe_us = script_durations(r, ScriptName.CLAIM)
    while app.run(app.store.release(Q, "probe")).released:
        pass
    r.config_set("slowlog-log-slower-than", 10000)
    r.config_set("slowlog-max-len", 1024)
    r.slowlog_reset()
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    nodes = fleet.start(10, concurrency=20)
    t0 = time.monotonic()
    wait_drained(r, [Q], timeout=3600)
    took = time.monotonic() - t0
    slow10 = slow_scripts(r, 10_000)
    slow50 = slow_scripts(r, 50_000)
    snap = Snapshot.take(r)
    rep = check(history, snap)
    starts: dict[str, int] = {}
    for a in history.attempts():
        starts[a.node] = starts.get(a.node, 0) + 1
    mean = statistics.fmean(starts.values())
    spread = max(abs(v - mean) / mean for v in starts.values()) * 100
    figures(
        "S3",
        jobs=n,
        nodes=len(nodes),
        enqueue_s=round(t_enq, 1),
        run_s=round(took, 1),
        jobs_per_s=round(n / took),
        lost=len(rep.lost),
        probe_claim_median_ms=round(statistics.median(probe_us) / 1000, 2),
        probe_claim_p90_ms=round(percentile([float(x) for x in probe_us], 90) / 1000, 2),
        probe_claim_max_ms=round(max(probe_us) / 1000, 2),
        under_load_over_10ms=slow10,
        under_load_over_50ms=sum(slow50.values()),
        node_share_max_dev_pct=round(spread, 1),
        seed=seed,
    )
    rep.assert_ok(ctx(seed, history))
    assert len(probe_us) >= 50 and percentile([float(x) for x in probe_us], 90) <= 10_000, probe_us
    assert spread <= 30, starts


# -- S4: reconnect storm (nightly) ---------------------------------------------------------------------
@pytest.mark.nightly
def test_s4_reconnect_storm(
    worker_fleet: Any, history: History, fresh_server: RedisServer, seed: int, figures: Any
) -> None:
    """Redis is killed and restarted (AOF) under ~200 worker connections."""
    fresh_server.persistence = "aof-everysec"
    fresh_server.extra = ["--maxclients", "2000"]
    fresh_server.start()
    admin = fresh_server.admin_client()
    app = JobQ(fresh_server.url)
    n_nodes = int(os.environ.get("JOBQ_S4_NODES", 35))  # about 6 connections each: ~200
    # Default lease (30 s): heartbeats every 10 s spread the reconnects; a 2 s test lease would
    # force every heartbeat to reconnect within 0.7 s.
    fleet = worker_fleet(fresh_server.url, lease=30.0, grace=GRACE, reap_interval=5.0, poll_interval=1.0)
    fleet.start(n_nodes, concurrency=2)
    prod = Producer(app, history)
    prod.enqueue_batch(200, sleep=0.05)
    wait_drained(admin, [Q], timeout=60)
    time.sleep(1.0)
    steady = int(admin.info("clients")["connected_clients"]) - 1
    admin.close()
    fresh_server.kill()
    time.sleep(1.0)
    fresh_server.start()
    t_up = time.monotonic()
    admin = fresh_server.admin_client()
    up_ms = int(admin.time()[0]) * 1000
    samples: list[tuple[float, int]] = []
    while time.monotonic() - t_up < 10:
        samples.append((time.monotonic() - t_up, int(admin.info("clients")["connected_clients"]) - 1))
        time.sleep(0.02)
    at_500 = max((c for t, c in samples if t <= 0.5), default=0)
    after = max(c for _, c in samples)
    # Full recovery: new work runs, every node heartbeats again.
    t_r = time.monotonic()
    ids = prod.enqueue_batch(100, sleep=0.01)
    wait_drained(admin, [Q], timeout=30)
    recovery = time.monotonic() - t_r
    # Every node heartbeats again (one heartbeat interval, lease / 3 = 10 s, after the restart).
    while time.monotonic() - t_up < 12:
        fresh = sum(1 for _, s in admin.zrange("jobq:nodes", 0, -1, withscores=True) if s >= up_ms)
        if fresh == n_nodes:
            break
        time.sleep(0.2)
    snap = Snapshot.take(admin)
    rep = check(history, snap)
    figures(
        "S4",
        nodes=n_nodes,
        connections_before=steady,
        connections_after=after,
        reconnected_in_first_500ms=at_500,
        share_first_500ms_pct=round(100 * at_500 / max(1, after), 1),
        recovery_s=round(recovery, 2),
        nodes_heartbeating=fresh,
        jobs_after=len(ids),
        lost=len(rep.lost),
        seed=seed,
    )
    rep.assert_ok(ctx(seed, history))
    assert fresh == n_nodes
    assert recovery <= 10
    assert at_500 <= 0.5 * after, samples[:30]
    admin.close()
