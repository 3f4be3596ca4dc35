"""The checker (Jepsen ``total-queue`` shape) and the invariant scan I1-I6 of RELIABILITY.md 2.1.

How to use it, after the faults and once the queue is drained (:func:`wait_drained`)::

    snap = Snapshot.take(r)                         # job hashes, BEFORE retention deletes them
    report = check(hist, snap, stale_reported=fleet.stale_count())
    report.assert_ok(context=f"seed={seed} history={hist.dir}")
    assert_invariants(r)                            # I1-I6 over the live keyspace

:func:`check` computes, from the history (outside Redis) and the Redis snapshot:

- **lost** = enqueue_ok jobs that neither completed nor are dead. "Completed" = ``done`` in Redis,
  or (when retention already deleted the hash) an ``ok`` end in the history. A job still in
  ready/scheduled/active after the drain is lost too. Must be empty.
- **unexpected** = jobs that ran or exist in Redis but were never enqueued (or whose enqueue was
  refused). Must be empty.
- **recovered** = enqueue_unknown jobs that completed anyway (allowed, reported).
- **duplicates** = jobs with >= 2 recorded starts. Each start after the first must be explained
  by a planned failure of an earlier attempt (an ``error``/``timeout`` end) or by a reap (the
  job hash's ``reaped`` counter, which the reap script increments each time it takes a job back
  from a node whose lease expired); with ``allow_release=True`` also by a release (a graceful
  shutdown gave it back unfinished); ``explained={job_id: n}`` adds re-runs the test knows are
  planned but the task could not record (a sync task timed out while stuck in a system call has
  no end record). Anything else is an **unexplained duplicate**: a violation.
- **stale**: ``non_winner_ok`` = successful runs whose result is not the stored one (their ack
  must have been refused or never sent), ``cancelled`` = async runs cancelled after losing the
  lease; with ``stale_reported`` the test compares these with what the nodes counted. A stored
  result from another run than the job's last owner is a violation (a stale ack overwrote it).

The invariant scan reads every structure of every queue in one MULTI (a consistent view; the
key list itself comes from a SCAN just before) and returns a list of violations.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from jobq import codec
from tests.harness.history import ENQUEUE_ERROR, ENQUEUE_OK, ENQUEUE_UNKNOWN, Attempt, History

FAILED_OUTCOMES = frozenset({"error", "timeout", "retry"})


# -- Redis snapshot of the jobs -----------------------------------------------------------------
@dataclass
class JobState:
    queue: str
    state: str
    attempts: int
    max_attempts: int
    reaped: int
    node: str | None
    error: str | None
    result: Any = None
    ttl_ms: int = -1


@dataclass
class Snapshot:
    """Every job hash of every queue (plus dead-letter membership), read at one moment."""

    jobs: dict[str, JobState]
    dead_ids: set[str]
    taken_at: float

    @classmethod
    def take(cls, r: redis.Redis, prefix: str = "jobq") -> Snapshot:
        rx = re.compile(rf"^{re.escape(prefix)}:\{{([^}}]*)\}}:job:(.+)$")
        keys = [k.decode() for k in r.scan_iter(match=f"{prefix}:{{*}}:job:*", count=1000)]
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, "state", "attempts", "max_attempts", "reaped", "node", "error", "result")
            pipe.pttl(k)
        raw = pipe.execute()
        jobs: dict[str, JobState] = {}
        for i, k in enumerate(keys):
            m = rx.match(k)
            f, ttl = raw[2 * i], raw[2 * i + 1]
            if m is None or f[0] is None:
                continue
            result = None
            if f[6]:
                try:
                    result = codec.decode(f[6])
                except Exception:
                    result = "<undecodable>"
            jobs[m.group(2)] = JobState(
                queue=m.group(1),
                state=f[0].decode(),
                attempts=int(f[1] or 0),
                max_attempts=int(f[2] or 1),
                reaped=int(f[3] or 0),
                node=f[4].decode() if f[4] else None,
                error=f[5].decode(errors="replace") if f[5] else None,
                result=result,
                ttl_ms=int(ttl),
            )
        dead: set[str] = set()
        for k in r.scan_iter(match=f"{prefix}:{{*}}:dead", count=1000):
            dead.update(m.decode() for m in r.zrange(k, 0, -1))
        return cls(jobs, dead, time.time())


# -- the history checker ------------------------------------------------------------------------
@dataclass
class Report:
    enqueued_ok: int = 0
    enqueue_error: int = 0
    enqueue_unknown: int = 0
    completed: int = 0
    dead: dict[str, str] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    unexplained_duplicates: dict[str, str] = field(default_factory=dict)
    reaped_jobs: int = 0
    non_winner_ok: int = 0
    cancelled: int = 0
    stale_reported: int | None = None
    overwritten: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.unexplained_duplicates or self.overwritten)

    def summary(self) -> str:
        return (
            f"enqueued ok={self.enqueued_ok} error={self.enqueue_error} unknown={self.enqueue_unknown}; "
            f"completed={self.completed} dead={len(self.dead)} lost={len(self.lost)} "
            f"unexpected={len(self.unexpected)} recovered={len(self.recovered)} "
            f"duplicates={len(self.duplicates)} (unexplained {len(self.unexplained_duplicates)}, "
            f"jobs reaped {self.reaped_jobs}) non_winner_ok={self.non_winner_ok} "
            f"cancelled={self.cancelled} stale_reported={self.stale_reported} "
            f"overwritten={len(self.overwritten)}"
        )

    def assert_ok(self, context: str = "") -> None:
        if self.ok:
            return
        detail = [self.summary()]
        if self.lost:
            detail.append(f"lost: {self.lost[:20]}")
        if self.unexpected:
            detail.append(f"unexpected: {self.unexpected[:20]}")
        for jid, why in list(self.unexplained_duplicates.items())[:20]:
            detail.append(f"unexplained duplicate {jid}: {why}")
        if self.overwritten:
            detail.append(f"result overwritten by a stale run: {self.overwritten[:20]}")
        raise AssertionError(f"{context}\n" + "\n".join(detail))


def check(
    history: History,
    snapshot: Snapshot,
    *,
    stale_reported: int | None = None,
    allow_release: bool = False,
    explained: dict[str, int] | None = None,
) -> Report:
    """Compare what was enqueued, what ran (history) and where each job ended (snapshot)."""
    rep = Report(stale_reported=stale_reported)
    status: dict[str, set[str]] = {}
    for e in history.enqueues():
        status.setdefault(e.job_id, set()).add(e.status)
    ok_ids = {j for j, s in status.items() if ENQUEUE_OK in s}
    unknown_ids = {j for j, s in status.items() if ENQUEUE_UNKNOWN in s and ENQUEUE_OK not in s}
    error_ids = {j for j, s in status.items() if s == {ENQUEUE_ERROR}}
    rep.enqueued_ok, rep.enqueue_unknown, rep.enqueue_error = len(ok_ids), len(unknown_ids), len(error_ids)

    by_job: dict[str, list[Attempt]] = {}
    for a in history.attempts():
        by_job.setdefault(a.job_id, []).append(a)
    hist_ok = {j for j, runs in by_job.items() if any(a.outcome == "ok" for a in runs)}

    def completed(jid: str) -> bool:
        js = snapshot.jobs.get(jid)
        if js is not None:
            return js.state == "done"
        return jid in hist_ok

    def is_dead(jid: str) -> bool:
        js = snapshot.jobs.get(jid)
        return (js is not None and js.state == "dead") or jid in snapshot.dead_ids

    for jid in sorted(ok_ids | unknown_ids):
        if is_dead(jid):
            js = snapshot.jobs.get(jid)
            rep.dead[jid] = (js.error or "") if js else ""
        elif completed(jid):
            rep.completed += 1
            if jid in unknown_ids:
                rep.recovered.append(jid)
        elif jid in ok_ids:
            rep.lost.append(jid)

    seen = set(by_job) | {j for j in snapshot.jobs}
    rep.unexpected = sorted(seen - ok_ids - unknown_ids)
    rep.unexpected += sorted(j for j in error_ids if j in seen and j not in rep.unexpected)

    for jid, runs in by_job.items():
        js = snapshot.jobs.get(jid)
        reaped = js.reaped if js is not None else 0
        if reaped:
            rep.reaped_jobs += 1
        rep.cancelled += sum(1 for a in runs if a.outcome == "cancelled")
        oks = [a for a in runs if a.outcome == "ok"]
        winner = _winner(js, oks)
        rep.non_winner_ok += len(oks) - (1 if winner is not None else 0)
        if js is not None and js.state == "done" and js.result is not None and winner is None and oks:
            rep.overwritten.append(jid)
        if len(runs) < 2:
            continue
        rep.duplicates[jid] = len(runs)
        failed = sum(1 for a in runs[:-1] if a.outcome in FAILED_OUTCOMES)
        unfinished = sum(1 for a in runs[:-1] if a.outcome is None or a.outcome == "cancelled")
        allowed = failed + reaped + (unfinished if allow_release else 0) + (explained or {}).get(jid, 0)
        if len(runs) - 1 > allowed:
            if js is None:
                why = "job hash gone (take the snapshot before retention ends)"
            else:
                why = f"reaped={reaped}"
            rep.unexplained_duplicates[jid] = (
                f"{len(runs)} starts, {failed} planned failures, {why}; runs: "
                + ", ".join(f"{a.node}/a{a.attempt}:{a.outcome}" for a in runs)
            )
    return rep


def _winner(js: JobState | None, oks: list[Attempt]) -> Attempt | None:
    """The ok run whose result Redis stored (None if the job has no stored result)."""
    if js is None or js.state != "done" or not isinstance(js.result, dict):
        return oks[-1] if oks and (js is None or js.state == "done") else None
    for a in oks:
        if (
            a.node == js.result.get("node")
            and a.pid == js.result.get("pid")
            and a.attempt == js.result.get("attempt")
        ):
            return a
    return None


# -- waiting --------------------------------------------------------------------------------------
def pending(r: redis.Redis, queues: Iterable[str], prefix: str = "jobq") -> int:
    """Jobs still to run: ready + scheduled + leased (active) in ``queues``. Each queue is read
    in one transaction of its own (a Redis Cluster transaction stays inside one slot)."""
    total = 0
    for q in queues:
        pipe = r.pipeline(transaction=True)
        pipe.zcard(f"{prefix}:{{{q}}}:ready")
        pipe.zcard(f"{prefix}:{{{q}}}:scheduled")
        pipe.zcard(f"{prefix}:{{{q}}}:leases")
        total += int(sum(pipe.execute()))
    return total


def wait_drained(
    r: redis.Redis, queues: Iterable[str], timeout: float, *, prefix: str = "jobq", settle: float = 0.0
) -> float:
    """Wait until nothing is ready, scheduled or leased in ``queues``; return the seconds waited.
    Raises ``TimeoutError`` with the counts left. ``settle``: the state must stay drained this long."""
    qs = list(queues)
    t0 = time.monotonic()
    drained_since: float | None = None
    while True:
        left = pending(r, qs, prefix)
        now = time.monotonic()
        if left == 0:
            drained_since = drained_since or now
            if now - drained_since >= settle:
                return now - t0
        else:
            drained_since = None
        if now - t0 > timeout:
            raise TimeoutError(f"{left} job(s) still ready/scheduled/leased after {timeout:.0f} s")
        time.sleep(0.05)


# -- the invariant scan I1-I6 -------------------------------------------------------------------
#: "idle": the wake-up tokens, one per idle node at most (a dead node's is popped by the next job
#: made ready, or dropped by the reaper with the node).
#: Per-queue keys without a TTL by design (``events``: the lifecycle stream, capped by length).
_PERMANENT_SUFFIXES = (
    "ready",
    "scheduled",
    "leases",
    "dead",
    "nodes",
    "seq",
    "paused",
    "epoch",
    "idle",
    "events",
)


@dataclass
class _QueueData:
    """One queue's structures as read in the scan's MULTI."""

    name: str
    prefix: str
    zsets: dict[str, dict[str, float]] = field(default_factory=dict)
    active: dict[str, list[str]] = field(default_factory=dict)
    jobs: dict[str, list[str | None]] = field(default_factory=dict)
    unique: dict[str, str | None] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)

    @property
    def qp(self) -> str:
        return f"{self.prefix}:{{{self.name}}}:"


@dataclass
class _ScanCtx:
    now: int
    ttls: dict[str, int]
    types: dict[str, str]
    reap_interval_ms: int
    node_ttl_ms: int
    reapers_running: bool
    slack_ms: int


_STATE_PLACE = {
    "ready": "ready",
    "scheduled": "scheduled",
    "done": "finished",
    "cancelled": "finished",
    "dead": "dead",
}


def _drop_gone(
    keys: list[str],
    ctx: _ScanCtx,
    queues: dict[str, _QueueData],
    globals_: list[str],
    queue_rx: re.Pattern[str],
) -> list[str]:
    """A key the SCAN listed may be gone by the MULTI (a reap lock or a finished job expiring in
    between): it is not part of the view the checks judge. Drops it; returns the global keys left."""
    gone = {k for k in keys if ctx.types[k] == "none"}
    for k in gone:
        m = queue_rx.match(k)
        if m is None:
            continue
        qd = queues[m.group(1)]
        kind, _, rest = m.group(2).partition(":")
        qd.keys[kind].remove(k)
        if kind == "job":
            qd.jobs.pop(rest, None)
        elif kind == "active":
            qd.active.pop(rest, None)
        elif kind == "unique":
            qd.unique.pop(k, None)
    return [k for k in globals_ if k not in gone]


def scan_invariants(
    r: redis.Redis,
    *,
    prefix: str = "jobq",
    reap_interval_ms: int = 500,
    node_ttl_ms: int = 4000,
    reapers_running: bool = True,
    slack_ms: int = 1500,
) -> list[str]:
    """Check I1-I6 of RELIABILITY.md 2.1.6 over the whole keyspace; return the violations.

    ``reapers_running=False`` (every node stopped) skips the time-bound parts of I2 and I4,
    which only hold while some node reaps. ``slack_ms`` absorbs scheduling delays."""
    queue_rx = re.compile(rf"^{re.escape(prefix)}:\{{([^}}]*)\}}:(.*)$")
    keys = sorted(k.decode() for k in r.scan_iter(count=1000))
    queues: dict[str, _QueueData] = {}
    globals_: list[str] = []
    for k in keys:
        m = queue_rx.match(k)
        if m:
            qd = queues.setdefault(m.group(1), _QueueData(m.group(1), prefix))
            qd.keys.setdefault(m.group(2).split(":", 1)[0], []).append(k)
        else:
            globals_.append(k)

    pipe = r.pipeline(transaction=True)
    pipe.time()
    for k in keys:
        pipe.type(k)
        pipe.pttl(k)
    plan: list[tuple[_QueueData, str, str]] = []
    for qd in queues.values():
        for kind in ("ready", "scheduled", "finished", "dead", "leases", "nodes"):
            pipe.zrange(qd.qp + kind, 0, -1, withscores=True)
            plan.append((qd, kind, qd.qp + kind))
        for kind in ("active", "job", "unique"):
            for key in qd.keys.get(kind, []):
                if kind == "active":
                    pipe.zrange(key, 0, -1)
                elif kind == "job":
                    pipe.hmget(key, "state", "node")
                else:
                    pipe.get(key)
                plan.append((qd, kind, key))
    pipe.zrange(f"{prefix}:nodes", 0, -1, withscores=True)
    res = pipe.execute(raise_on_error=False)
    sec, usec = res[0]
    ctx = _ScanCtx(
        now=int(sec) * 1000 + int(usec) // 1000,
        types={k: _s(res[1 + 2 * i]) for i, k in enumerate(keys)},
        ttls={k: int(res[2 + 2 * i]) for i, k in enumerate(keys)},
        reap_interval_ms=reap_interval_ms,
        node_ttl_ms=node_ttl_ms,
        reapers_running=reapers_running,
        slack_ms=slack_ms,
    )
    v: list[str] = []
    for (qd, kind, key), reply in zip(plan, res[1 + 2 * len(keys) : -1], strict=True):
        if isinstance(reply, Exception):
            v.append(f"{key}: {reply}")
        elif kind == "active":
            qd.active[key.rsplit(":active:", 1)[1]] = [_s(x) for x in reply]
        elif kind == "job":
            qd.jobs[key.rsplit(":job:", 1)[1]] = [None if x is None else _s(x) for x in reply]
        elif kind == "unique":
            qd.unique[key] = None if reply is None else _s(reply)
        else:
            qd.zsets[kind] = {_s(m): sc for m, sc in reply}
    globals_ = _drop_gone(keys, ctx, queues, globals_, queue_rx)
    for qd in queues.values():
        v += _check_i1(qd, ctx) + _check_i2_i3(qd, ctx) + _check_i4(qd, ctx) + _check_i5(qd, ctx)
    global_nodes = {_s(m): sc for m, sc in res[-1]} if isinstance(res[-1], list) else {}
    v += _check_globals(prefix, globals_, global_nodes, ctx)
    # I6: a job id lives in one queue only.
    seen: dict[str, list[str]] = {}
    for qd in queues.values():
        for jid in qd.jobs:
            seen.setdefault(jid, []).append(qd.name)
    v += [f"I6 {jid}: in queues {qs}" for jid, qs in seen.items() if len(qs) > 1]
    return v


def _check_i1(qd: _QueueData, ctx: _ScanCtx) -> list[str]:
    """I1: each job id in exactly one place, and its state field says the same place."""
    v = []
    places: dict[str, list[str]] = {}
    for kind in ("ready", "scheduled", "finished", "dead"):
        for jid in qd.zsets.get(kind, {}):
            places.setdefault(jid, []).append(kind)
    for node, ids in qd.active.items():
        for jid in ids:
            places.setdefault(jid, []).append(f"active:{node}")
    for jid, (state, node) in qd.jobs.items():
        where = places.get(jid, [])
        if len(where) != 1:
            ttl = ctx.ttls.get(qd.qp + "job:" + jid, -1)
            # A finished hash about to expire may already have left the finished index.
            if not (not where and state in ("done", "cancelled") and 0 <= ttl <= ctx.slack_ms):
                v.append(f"I1 {qd.name}/{jid}: state={state} in {where or 'nowhere'}")
            continue
        want = f"active:{node}" if state == "active" else _STATE_PLACE.get(state or "", "?")
        if where[0] != want:
            v.append(f"I1 {qd.name}/{jid}: state={state} node={node} but in {where[0]}")
    for jid, where in places.items():
        if jid in qd.jobs:
            continue
        if len(where) > 1 or any(w.startswith("active:") or w in ("ready", "scheduled") for w in where):
            v.append(f"I1 {qd.name}/{jid}: no job hash, in {where}")
    return v


def _check_i2_i3(qd: _QueueData, ctx: _ScanCtx) -> list[str]:
    """I2: every active job has a lease, not expired beyond a reap interval (while reaping).
    I3: no lease without its active entry."""
    v = []
    leases = qd.zsets.get("leases", {})
    active_ids = set()
    for node, ids in qd.active.items():
        for jid in ids:
            active_ids.add(jid)
            deadline = leases.get(jid)
            if deadline is None:
                v.append(f"I2 {qd.name}/{jid}: in active:{node} without a lease")
            elif ctx.reapers_running and ctx.now - deadline > ctx.reap_interval_ms + ctx.slack_ms:
                v.append(f"I2 {qd.name}/{jid}: lease expired {ctx.now - int(deadline)} ms ago, not reaped")
    v += [f"I3 {qd.name}/{jid}: lease without an active entry" for jid in leases if jid not in active_ids]
    return v


def _check_i4(qd: _QueueData, ctx: _ScanCtx) -> list[str]:
    """I4: no active list of a node gone from the queue's nodes (or silent) > 2 node TTLs."""
    v = []
    nodes = qd.zsets.get("nodes", {})
    limit = 2 * ctx.node_ttl_ms + ctx.slack_ms
    for node in qd.active:
        hb = nodes.get(node)
        if hb is None:
            v.append(f"I4 {qd.name}: active:{node} exists but {node} is not in {qd.qp}nodes")
        elif ctx.reapers_running and ctx.now - hb > limit:
            v.append(f"I4 {qd.name}: active:{node} kept {ctx.now - int(hb)} ms after its last heartbeat")
    if ctx.reapers_running:
        for node, hb in nodes.items():
            if ctx.now - hb > limit:
                v.append(
                    f"I4 {qd.name}: {node} still in {qd.qp}nodes {ctx.now - int(hb)} ms after its heartbeat"
                )
    return v


def _check_i5(qd: _QueueData, ctx: _ScanCtx) -> list[str]:
    """I5: every per-queue key has a TTL, or is permanent, or lives exactly as long as its job."""
    v = []
    for kind, ks in qd.keys.items():
        for key in ks:
            ttl = ctx.ttls[key]
            if kind in _PERMANENT_SUFFIXES or kind in ("active", "cron"):
                continue
            if kind in ("finished", "reap-lock", "acked"):
                if ttl < 0:
                    v.append(f"I5 {key}: no TTL")
            elif kind == "job":
                state = qd.jobs.get(key.rsplit(":job:", 1)[1], [None])[0]
                if state in ("done", "cancelled") and ttl < 0:
                    v.append(f"I5 {key}: finished ({state}) but no TTL")
            elif kind == "unique":
                holder = qd.unique.get(key)
                st = qd.jobs.get(holder or "", [None])[0]
                if ttl < 0 and st not in ("ready", "scheduled", "active"):
                    v.append(f"I5 {key}: held by {holder} in state {st}, no TTL")
            else:
                v.append(f"I5 {key}: unknown key ({ctx.types[key]})")
    return v


def _check_globals(prefix: str, keys: list[str], nodes: dict[str, float], ctx: _ScanCtx) -> list[str]:
    """I5 for the global keys; I4 for the global node registry."""
    v = []
    for key in keys:
        if key in (f"{prefix}:queues", f"{prefix}:nodes", f"{prefix}:epoch"):
            continue
        if key.startswith(f"{prefix}:node:"):
            if ctx.ttls[key] < 0:
                v.append(f"I5 {key}: node hash without TTL")
            continue
        v.append(f"I5 {key}: unknown key ({ctx.types[key]})")
    if ctx.reapers_running:
        for node, hb in nodes.items():
            if ctx.now - hb > 2 * ctx.node_ttl_ms + ctx.slack_ms:
                v.append(f"I4 {prefix}:nodes: {node} kept {ctx.now - int(hb)} ms after its last heartbeat")
    return v


def assert_invariants(r: redis.Redis, context: str = "", **kw: Any) -> None:
    v = scan_invariants(r, **kw)
    if v:
        counts = Counter(x.split(" ", 1)[0] for x in v)
        raise AssertionError(f"{context}\ninvariants violated {dict(counts)}:\n" + "\n".join(v[:40]))


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
