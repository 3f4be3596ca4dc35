"""A hypothesis state machine drives enqueue, claim, ack, fail, extend, reap, release, cancel,
promote and retry_dead against a real redis-server and a Python model of the queue, with three
nodes and a fake clock (every script gets an explicit now_ms, so leases expire exactly when the
model says).

After every step the whole queue is read back from Redis and compared with the model: the ready
order (priority, then FIFO), the scheduled set, each node's active set, the leases, the dead and
finished sets, each job's state and attempt count, and the unique keys. The invariants of
RELIABILITY.md are checked on the raw Redis data as well: I1 each job id in exactly one place,
I2/I3 leases exactly cover the active sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import jobq
from tests.harness.redis_server import RedisServer
from tests.integration.core_support import check_invariants, read_places

pytestmark = pytest.mark.integration

QUEUE = "sm"
NODES = ("n1", "n2", "n3")
LEASE_MS = 30_000
T0 = 1_700_000_000_000
BACKOFF_MS = 1000
RETENTION_S = 86_400


@dataclass
class MJob:
    id: str
    prio: int
    max_attempts: int
    unique: str | None
    deadline: int  # 0 = none
    place: str = "ready"  # ready | scheduled | active | dead | finished
    seq: int = 0
    run_at: int = 0
    attempts: int = 0
    node: str | None = None
    lease: int = 0
    state: str = "ready"  # the job hash's state field
    finisher: str | None = None
    #: (node, attempt) of the last recorded failure: a repeated fail of it is told apart.
    failed_by: tuple[str, int] | None = None


class QueueMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.r = redis.Redis.from_url(self.url)
        self.r.flushall()
        self.clock = jobq.FakeClock(T0)
        self.app = jobq.JobQ(self.url, clock=self.clock, result_ttl=RETENTION_S)
        self.app.task(name="t", queue=QUEUE, retry_backoff=BACKOFF_MS / 1000)(lambda: None)
        self.jobs: dict[str, MJob] = {}
        self.active: dict[str, list[str]] = {n: [] for n in NODES}
        self.uniques: dict[str, str] = {}
        self.seq = 0
        self.n = 0

    def teardown(self) -> None:
        self.app.close()
        self.r.close()

    # -- model helpers ------------------------------------------------------------------------
    @property
    def now(self) -> int:
        v = self.clock.redis_now_ms()
        assert v is not None
        return v

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def to_ready(self, j: MJob, *, new_seq: bool) -> None:
        if new_seq:
            j.seq = self.next_seq()
        j.place, j.state, j.node, j.lease = "ready", "ready", None, 0

    def leave_active(self, j: MJob) -> None:
        assert j.node is not None
        self.active[j.node].remove(j.id)
        j.node, j.lease = None, 0

    def free_unique(self, j: MJob) -> None:
        if j.unique is not None and self.uniques.get(j.unique) == j.id:
            del self.uniques[j.unique]

    def to_dead(self, j: MJob) -> None:
        self.free_unique(j)
        j.place, j.state, j.node, j.lease = "dead", "dead", None, 0

    def ready_order(self) -> list[str]:
        ready = [j for j in self.jobs.values() if j.place == "ready"]
        return [j.id for j in sorted(ready, key=lambda j: (-j.prio, j.seq))]

    def pick(self, idx: int) -> MJob:
        ids = sorted(self.jobs)
        return self.jobs[ids[idx % len(ids)]]

    # -- rules --------------------------------------------------------------------------------
    @rule(
        prio=st.sampled_from([-100, -1, 0, 0, 3, 100]),
        delay=st.sampled_from([None, None, 0, 1_000, 45_000]),
        max_attempts=st.integers(1, 3),
        unique=st.sampled_from([None, None, "u1", "u2"]),
        deadline=st.sampled_from([None, None, 5_000, 120_000]),
    )
    def enqueue(
        self, prio: int, delay: int | None, max_attempts: int, unique: str | None, deadline: int | None
    ) -> None:
        if deadline is not None and delay is not None and deadline < delay:
            deadline = None
        self.n += 1
        jid = f"j{self.n:05d}"
        job = self.app.enqueue(
            "t",
            queue=QUEUE,
            job_id=jid,
            priority=prio,
            delay=None if delay is None else delay / 1000,
            max_attempts=max_attempts,
            unique_key=unique,
            deadline=None if deadline is None else timedelta(milliseconds=deadline),
        )
        if unique is not None and unique in self.uniques:
            assert job.id == self.uniques[unique]
            return
        assert job.id == jid
        j = MJob(jid, prio, max_attempts, unique, 0 if deadline is None else self.now + deadline)
        if unique is not None:
            self.uniques[unique] = jid
        if delay:
            j.place = j.state = "scheduled"
            j.run_at = self.now + delay
        else:
            j.seq = self.next_seq()
        self.jobs[jid] = j

    @rule(node=st.sampled_from(NODES), n=st.integers(0, 4))
    def claim(self, node: str, n: int) -> None:
        res = self.app.run(self.app.store.claim(QUEUE, node, n, LEASE_MS, now_ms=self.now))
        assert res.now_ms == self.now
        due = sorted(
            (j for j in self.jobs.values() if j.place == "scheduled" and j.run_at <= self.now),
            key=lambda j: (j.run_at, j.id),
        )
        for j in due[:100]:
            self.to_ready(j, new_seq=True)
        want_claimed, want_dead = [], []
        for jid in self.ready_order()[:n]:
            j = self.jobs[jid]
            if j.deadline and self.now > j.deadline:
                self.to_dead(j)
                want_dead.append((jid, "expired"))
            else:
                j.place, j.state, j.node, j.lease = "active", "active", node, self.now + LEASE_MS
                j.attempts += 1
                self.active[node].append(jid)
                want_claimed.append((jid, j.attempts))
        assert [(c.id, c.attempts) for c in res.jobs] == want_claimed
        assert res.dead == want_dead
        sched = [j.run_at for j in self.jobs.values() if j.place == "scheduled"]
        assert res.next_due_ms == (min(sched) if sched else None)

    @precondition(lambda self: self.jobs)
    @rule(node=st.sampled_from(NODES), idx=st.integers(min_value=0))
    def ack(self, node: str, idx: int) -> None:
        j = self.pick(idx)
        codes = self.app.run(self.app.store.ack(QUEUE, node, [(j.id, b"\x01")], now_ms=self.now))
        if j.place == "active" and j.node == node:
            self.leave_active(j)
            self.free_unique(j)
            j.place, j.state, j.finisher = "finished", "done", node
            assert codes == [1]
        elif j.state == "done" and j.finisher == node:
            assert codes == [0]  # a retried ack of the same node is a no-op
        else:
            assert codes == [-2]  # refused: not this node's job (any more)

    @precondition(lambda self: any(self.active.values()))
    @rule(idx=st.integers(min_value=0))
    def ack_owned(self, idx: int) -> None:
        """An ack by the node that holds the job (random picks rarely hit one)."""
        held = sorted((jid, n) for n, ids in self.active.items() for jid in ids)
        jid, node = held[idx % len(held)]
        self.ack(node, sorted(self.jobs).index(jid))

    @precondition(lambda self: self.jobs)
    @rule(node=st.sampled_from(NODES), idx=st.integers(min_value=0))
    def ack_batch(self, node: str, idx: int) -> None:
        """One ack call for everything the node holds, plus one job picked at random (often not
        the node's: refused in the same call without disturbing the others)."""
        ids = [*self.active[node], self.pick(idx).id]
        codes = self.app.run(self.app.store.ack(QUEUE, node, [(i, b"") for i in ids], now_ms=self.now))
        want = []
        for jid in ids:
            j = self.jobs[jid]
            if j.place == "active" and j.node == node:
                self.leave_active(j)
                self.free_unique(j)
                j.place, j.state, j.finisher = "finished", "done", node
                want.append(1)
            elif j.state == "done" and j.finisher == node:
                want.append(0)
            else:
                want.append(-2)
        assert codes == want

    @precondition(lambda self: any(self.active.values()))
    @rule(idx=st.integers(min_value=0), dead=st.booleans(), delay=st.sampled_from([None, 0, 2_000]))
    def fail_owned(self, idx: int, dead: bool, delay: int | None) -> None:
        held = sorted((jid, n) for n, ids in self.active.items() for jid in ids)
        jid, node = held[idx % len(held)]
        self.fail(node, sorted(self.jobs).index(jid), dead, delay)

    @precondition(lambda self: self.jobs)
    @rule(
        node=st.sampled_from(NODES),
        idx=st.integers(min_value=0),
        dead=st.booleans(),
        delay=st.sampled_from([None, 0, 2_000]),
    )
    def fail(self, node: str, idx: int, dead: bool, delay: int | None) -> None:
        j = self.pick(idx)
        res = self.app.run(
            self.app.store.fail(
                QUEUE, node, j.id, f"boom {j.id}", dead=dead, delay_ms=delay, jitter=0.5, now_ms=self.now
            )
        )
        if not (j.place == "active" and j.node == node):
            if j.failed_by == (node, j.attempts) and j.state != "done":
                # The same attempt's failure again (a re-sent call): nothing changes.
                assert res.repeated and res.outcome == ("dead" if j.state == "dead" else "retry")
            else:
                assert res.outcome == "lease_lost" and not res.repeated
            return
        self.leave_active(j)
        j.failed_by = (node, j.attempts)
        if dead or j.attempts >= j.max_attempts:
            self.to_dead(j)
            assert res.outcome == "dead"
            return
        assert res.outcome == "retry"
        if delay is None:
            delay = BACKOFF_MS * 2 ** (j.attempts - 1)  # jitter 0.5 = factor 1.0
        if delay == 0:
            self.to_ready(j, new_seq=True)
            assert res.run_at_ms == self.now
        else:
            j.place = j.state = "scheduled"
            j.node, j.run_at = None, self.now + delay
            assert res.run_at_ms == j.run_at

    @rule(node=st.sampled_from(NODES))
    def extend(self, node: str) -> None:
        res = self.app.run(self.app.store.extend(QUEUE, node, LEASE_MS, now_ms=self.now))
        assert sorted(res.owned) == sorted(self.active[node])
        for jid in self.active[node]:
            self.jobs[jid].lease = self.now + LEASE_MS

    @rule()
    def reap(self) -> None:
        res = self.app.run(
            self.app.store.reap(QUEUE, node_ttl_ms=10**12, limit=jobq.storage.calls.MAX_REAP, now_ms=self.now)
        )
        want_req, want_dead = set(), set()
        for j in self.jobs.values():
            if j.place == "active" and j.lease < self.now:
                self.leave_active(j)
                if j.attempts >= j.max_attempts:
                    self.to_dead(j)
                    want_dead.add(j.id)
                else:
                    self.to_ready(j, new_seq=False)  # back to its old place
                    want_req.add(j.id)
        assert (set(res.requeued), set(res.dead)) == (want_req, want_dead)
        assert len(res.requeued) == len(want_req) and len(res.dead) == len(want_dead)

    @rule(node=st.sampled_from(NODES), everything=st.booleans(), idx=st.integers(min_value=0))
    def release(self, node: str, everything: bool, idx: int) -> None:
        if everything or not self.jobs:
            ids = None
            chosen = list(self.active[node])
        else:
            chosen = [self.pick(idx).id]
            ids = chosen
        n = self.app.run(self.app.store.release(QUEUE, node, ids, now_ms=self.now)).released
        released = 0
        for jid in chosen:
            j = self.jobs[jid]
            if j.place == "active" and j.node == node:
                self.leave_active(j)
                j.attempts -= 1  # a released attempt does not count
                self.to_ready(j, new_seq=False)
                released += 1
        assert n == released

    @precondition(lambda self: self.jobs)
    @rule(idx=st.integers(min_value=0))
    def cancel(self, idx: int) -> None:
        j = self.pick(idx)
        job = self.app.job(j.id, QUEUE)
        if j.place == "active":
            with pytest.raises(jobq.JobNotCancellable):
                job.cancel()
        elif j.place == "finished":
            with pytest.raises(jobq.JobNotCancellable):
                job.cancel()
        else:
            job.cancel()
            self.free_unique(j)
            j.place, j.state = "finished", "cancelled"

    @rule(limit=st.integers(1, 3))
    def promote(self, limit: int) -> None:
        res = self.app.run(self.app.store.promote(QUEUE, limit=limit, now_ms=self.now))
        due = sorted(
            (j for j in self.jobs.values() if j.place == "scheduled" and j.run_at <= self.now),
            key=lambda j: (j.run_at, j.id),
        )
        for j in due[:limit]:
            self.to_ready(j, new_seq=True)
        assert res.promoted == len(due[:limit])

    @precondition(lambda self: any(j.place == "dead" for j in self.jobs.values()))
    @rule(idx=st.integers(min_value=0))
    def retry_dead(self, idx: int) -> None:
        dead = sorted(j.id for j in self.jobs.values() if j.place == "dead")
        j = self.jobs[dead[idx % len(dead)]]
        assert self.app.run(self.app.store.retry_dead(QUEUE, [j.id], now_ms=self.now)) == 1
        j.attempts = 0
        j.failed_by = None
        self.to_ready(j, new_seq=True)
        if j.unique is not None and j.unique not in self.uniques:
            self.uniques[j.unique] = j.id

    @rule(ms=st.sampled_from([500, 10_000, LEASE_MS, LEASE_MS + 1]))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms / 1000)

    # -- the check after every step -----------------------------------------------------------
    @invariant()
    def matches_model(self) -> None:
        k = self.app.keys
        places = read_places(self.r, k, QUEUE, NODES)
        where = check_invariants(places, self.jobs)
        for jid, j in self.jobs.items():
            want = f"active:{j.node}" if j.place == "active" else j.place
            assert where[jid] == want, (jid, where[jid], want)
        assert places.ready == self.ready_order()
        # Each node's active set (a ZSET by claim time; ids of one ms in id order).
        assert {n: sorted(ids) for n, ids in places.active.items()} == {
            n: sorted(ids) for n, ids in self.active.items()
        }
        assert places.leases == {j.id: j.lease for j in self.jobs.values() if j.place == "active"}
        sched_scores = dict(
            (m.decode(), int(s)) for m, s in self.r.zrange(k.scheduled(QUEUE), 0, -1, withscores=True)
        )
        assert sched_scores == {j.id: j.run_at for j in self.jobs.values() if j.place == "scheduled"}
        pipe = self.r.pipeline(transaction=False)
        ids = sorted(self.jobs)
        for jid in ids:
            pipe.hmget(k.job(QUEUE, jid), "state", "attempts", "node")
        for jid, (state, attempts, node) in zip(ids, pipe.execute(), strict=True):
            j = self.jobs[jid]
            assert state is not None and state.decode() == j.state, (jid, state, j.state)
            assert int(attempts or 0) == j.attempts, (jid, attempts, j.attempts)  # absent = 0
            if j.place == "active":
                assert node is not None and node.decode() == j.node
        for u in ("u1", "u2"):
            held = self.r.get(k.unique(QUEUE, u))
            assert (None if held is None else held.decode()) == self.uniques.get(u), u


def test_queue_state_machine(redis_server: RedisServer) -> None:
    QueueMachine.url = redis_server.url
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(
            max_examples=300,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
