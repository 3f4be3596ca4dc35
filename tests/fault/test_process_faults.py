"""Process faults (RELIABILITY.md 2.2): real ``jobq worker`` processes killed, stopped, crashed.

Test configuration (RELIABILITY 2.1.3): lease 2 s, reap interval 0.5 s, grace 3 s, so a dead
node's jobs must start again within lease + reap interval + 1 s = 3.5 s. Every test logs its seed
(``JOBQ_SEED=<n>`` replays it) and, on failure, the history directory. The ``ci`` tier runs a few
trials of each; ``scripts/nightly`` (``JOBQ_NIGHTLY=1``) runs the 100-trial versions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from jobq import JobQ
from jobq.faults import CRASH_EXIT_CODE
from tests.fault.conftest import tier
from tests.harness.checker import Snapshot, assert_invariants, check, wait_drained
from tests.harness.fleet import Node, WorkerFleet
from tests.harness.history import History, Producer

pytestmark = [pytest.mark.fault]

LEASE, REAP, GRACE = 2.0, 0.5, 3.0
#: G3 in test configuration: lease + reap interval + 1 s.
RECOVERY = LEASE + REAP + 1.0
NODE_TTL = 2 * LEASE
Q = "fault"


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - t0


def active_key(node: Node | str, q: str = Q) -> str:
    return f"jobq:{{{q}}}:active:{node if isinstance(node, str) else node.name}"


def ctx(seed: int, history: History) -> str:
    return f"seed={seed} (replay: JOBQ_SEED={seed}) history={history.dir}"


def claim_all_on(
    victim: Node, helpers: list[Node], r: redis.Redis, enqueue: Callable[[], list[str]], n: int
) -> list[str]:
    """Enqueue with the helpers frozen so that ``victim`` claims all ``n`` jobs; thaw them."""
    for h in helpers:
        h.stop()
    try:
        ids = enqueue()
        wait_until(lambda: r.llen(active_key(victim)) >= n or not victim.alive(), 10, "victim claims all")
    finally:
        for h in helpers:
            h.cont()
    return ids


# -- F1: SIGKILL with 20 in flight, and the named crash points -------------------------------------
CRASH_SPECS = {
    "after_claim": "after_claim:1",
    # The timer fires 0.3 s after the first job starts: all 20 run (0.5-1.5 s each).
    "mid_execute": "mid_execute:1:0.3",
    "before_ack": "before_ack:1",
    "after_ack_sent": "after_ack_sent:1",
}


def run_f1(
    fleet: WorkerFleet,
    history: History,
    app: JobQ,
    r: redis.Redis,
    seed: int,
    points: list[str | None],
) -> dict[str, Any]:
    rng = random.Random(seed)
    prod = Producer(app, history)
    helpers = fleet.start(2, concurrency=10)
    trials: list[dict[str, Any]] = []
    for i, point in enumerate(points):
        env = {"JOBQ_CRASH_POINT": CRASH_SPECS[point], "JOBQ_CRASH_SEED": str(seed + i)} if point else {}
        victim = fleet.spawn(f"v{i}", concurrency=20, env=env)
        durations = [rng.uniform(0.5, 1.5) for _ in range(20)]
        ids = claim_all_on(
            victim,
            helpers,
            r,
            lambda d=durations: prod.enqueue_batch(  # type: ignore[misc]
                20, per_job=[{"sleep": x} for x in d], options={"max_attempts": 5}
            ),
            20,
        )
        assert len(ids) == 20
        if point is None:
            delay = rng.uniform(0.05, 0.45)  # before the shortest job ends: 20 in flight
            time.sleep(delay)
            assert r.llen(active_key(victim)) == 20
            t_kill = time.time()
            victim.kill()
        else:
            rc = victim.wait(15)
            t_kill = time.time()
            assert rc == CRASH_EXIT_CODE, f"{point}: exit code {rc}\n{victim.log_text()[-2000:]}"
            assert f"crash point {point}" in victim.log_text()
        wait_drained(r, [Q], timeout=30)
        trials.append({"victim": victim.name, "point": point, "t_kill": t_kill, "ids": ids})
    return {"helpers": helpers, "trials": trials}


def check_f1(
    run: dict[str, Any],
    history: History,
    r: redis.Redis,
    seed: int,
    fleet: WorkerFleet,
    figures: Any,
    test_id: str,
) -> None:
    snap = Snapshot.take(r)
    rep = check(history, snap)
    rep.assert_ok(ctx(seed, history))
    assert not rep.lost and not rep.dead
    by_job = history.by_job()
    recoveries: list[float] = []
    rerun_total = 0
    for t in run["trials"]:
        rerun = []
        for jid in t["ids"]:
            js = snap.jobs[jid]
            assert js.state == "done", (jid, js)
            # Attempts: one per claim. The killed claim counted once, the re-run once: +1 exactly.
            assert js.attempts == 1 + js.reaped, (jid, js, ctx(seed, history))
            helper_runs = [a for a in by_job.get(jid, []) if a.node != t["victim"]]
            if helper_runs:
                rerun.append(jid)
                assert js.reaped == 1, (jid, js.reaped, ctx(seed, history))
                recoveries.append(helper_runs[0].t_start - t["t_kill"])
        rerun_total += len(rerun)
        if t["point"] in (None, "after_claim", "mid_execute", "before_ack"):
            assert len(rerun) == 20, (t["point"], len(rerun), ctx(seed, history))
        else:
            assert rerun, (t["point"], "no job was in flight at the crash")
    worst = max(recoveries)
    assert worst <= RECOVERY, f"recovery {worst:.2f} s > {RECOVERY} s; {ctx(seed, history)}"
    # The dead nodes' active lists and node entries are gone within 2 x node TTL.
    last_kill = run["trials"][-1]["t_kill"]
    victims = [t["victim"] for t in run["trials"]]

    def cleaned() -> bool:
        pipe = r.pipeline()
        for v in victims:
            pipe.exists(active_key(v))
            pipe.zscore(f"jobq:{{{Q}}}:nodes", v)
            pipe.exists(f"jobq:node:{v}")
        return not any(pipe.execute())

    wait_until(cleaned, max(0.1, last_kill + 2 * NODE_TTL + 1.0 - time.time()), "dead node cleanup")
    assert_invariants(
        r, ctx(seed, history), reap_interval_ms=int(REAP * 1000), node_ttl_ms=int(NODE_TTL * 1000)
    )
    assert not fleet.crashes(), fleet.crashes()
    figures(
        test_id,
        trials=len(run["trials"]),
        jobs=rep.enqueued_ok,
        lost=len(rep.lost),
        rerun=rerun_total,
        unexplained_duplicates=len(rep.unexplained_duplicates),
        recovery_max_s=round(worst, 2),
        recovery_bound_s=RECOVERY,
        seed=seed,
    )


def test_f1_sigkill_with_20_in_flight(
    worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    run = run_f1(fleet, history, app, r, seed, [None] * tier(3, 100))
    check_f1(run, history, r, seed, fleet, figures, "F1")


@pytest.mark.parametrize("point", list(CRASH_SPECS))
def test_f1_crash_points(
    point: str, worker_fleet: Any, history: History, app: JobQ, r: redis.Redis, seed: int, figures: Any
) -> None:
    fleet = worker_fleet(lease=LEASE, grace=GRACE, reap_interval=REAP)
    run = run_f1(fleet, history, app, r, seed, [point] * tier(1, 10))
    check_f1(run, history, r, seed, fleet, figures, f"F1-{point}")
