"""The wake-up protocol on a real redis-server (lua/idle.lua, wake_idle in lua/lib/common.lua):
an idle node arms a token per queue, and every job made ready wakes one armed node on its own
shard channel, never the others; a token whose node no longer listens is skipped; arming is
refused while work is waiting, so no wake-up is lost between a short claim and the arm."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

import jobq

pytestmark = pytest.mark.integration

Q = "wk"


@pytest.fixture
def fapp(redis_url: str, clock: jobq.FakeClock) -> Iterator[jobq.JobQ]:
    a = jobq.JobQ(redis_url, clock=clock)
    yield a
    a.close()


class Listener:
    """Shard-channel subscriptions of some nodes of queue Q, as a node's own would be."""

    def __init__(self, app: jobq.JobQ, r: redis.Redis, nodes: list[str]) -> None:
        self.app, self.r = app, r
        self.ps = r.pubsub()
        self.channels = {app.keys.wake(Q, n): n for n in nodes}
        self.ps.ssubscribe(*self.channels)
        for _ in self.channels:  # subscribed before anything is published
            msg = self.ps.get_sharded_message(timeout=10)
            assert msg is not None and msg["type"] == "ssubscribe"

    def heard(self) -> list[tuple[str, bytes]]:
        """(node, message) in order, up to a marker published last on the first channel."""
        first = next(iter(self.channels))
        self.r.execute_command("SPUBLISH", first, b"marker")
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = self.ps.get_sharded_message(timeout=1)
            if msg is None or msg["type"] != "smessage":
                continue
            if msg["data"] == b"marker":
                return got
            got.append((self.channels[msg["channel"].decode()], msg["data"]))
        raise AssertionError(f"marker not seen; got {got}")

    def close(self) -> None:
        self.ps.close()


def arm(app: jobq.JobQ, node: str, known_due_ms: int | None = None) -> int:
    return int(app.run(app.store.idle(Q, node, "arm", now_ms=app.now_ms(), known_due_ms=known_due_ms)))


def tokens(app: jobq.JobQ, r: redis.Redis) -> list[str]:
    return [m.decode() for m in r.zrange(app.keys.idle(Q), 0, -1)]


def claim(app: jobq.JobQ, n: int = 10) -> int:
    return len(app.run(app.store.claim(Q, "c", n, 10_000, now_ms=app.now_ms())).jobs)


def test_each_new_job_wakes_one_armed_node_and_no_other(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    nodes = ["n1", "n2", "n3"]
    ls = Listener(fapp, r, nodes)
    try:
        for n in nodes:
            assert arm(fapp, n) == 0
            clock.advance(0.001)  # armed in this order: the longest idle is woken first
        assert tokens(fapp, r) == nodes
        assert arm(fapp, "n1") == 0 and tokens(fapp, r) == nodes  # arming twice keeps the place
        fapp.enqueue("t", queue=Q)
        assert ls.heard() == [("n1", b"r")]
        assert tokens(fapp, r) == ["n2", "n3"]
        # A batch of 3 wakes as many armed nodes as there are (2), one message each.
        fapp.enqueue_many([{"task": "t", "queue": Q} for _ in range(3)])
        assert ls.heard() == [("n2", b"r"), ("n3", b"r")]
        # No node idle: nothing is published at all.
        fapp.enqueue("t", queue=Q)
        assert ls.heard() == []
    finally:
        ls.close()


def test_a_token_whose_node_no_longer_listens_is_skipped(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    ls = Listener(fapp, r, ["alive"])
    try:
        assert arm(fapp, "gone") == 0  # armed, then the node died: nobody hears its channel
        clock.advance(0.001)
        assert arm(fapp, "alive") == 0
        fapp.enqueue("t", queue=Q)
        assert ls.heard() == [("alive", b"r")]  # the job still woke a node that listens
        assert tokens(fapp, r) == []
    finally:
        ls.close()


def test_arming_is_refused_while_work_is_waiting(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    fapp.enqueue("t", queue=Q)  # came in after the node's short claim
    assert arm(fapp, "n1") == 1 and tokens(fapp, r) == []  # claim again instead
    assert claim(fapp) == 1
    assert arm(fapp, "n1") == 0 and tokens(fapp, r) == ["n1"]
    # A scheduled job that is due counts as waiting work (a claim promotes it).
    assert fapp.run(fapp.store.idle(Q, "n1", "leave", now_ms=fapp.now_ms())) == 1
    fapp.enqueue("t", queue=Q, delay=5)
    due = fapp.now_ms() + 5000
    assert arm(fapp, "n1", known_due_ms=due) == 0
    r.zrem(fapp.keys.idle(Q), "n1")
    clock.advance(6)
    assert arm(fapp, "n1") == 1
    # A paused queue is not work: the node arms (and does not spin on claims that get nothing).
    r.set(fapp.keys.paused(Q), "1")
    assert arm(fapp, "n1") == 0 and tokens(fapp, r) == ["n1"]


def test_arming_is_refused_while_a_job_is_scheduled_earlier_than_the_node_knows(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    """A scheduled job enqueued between a node's short claim and its arm call finds no token to
    wake (F9 caught it: every node armed with its idle backstop and the job started a second
    late). The arm call compares the queue's earliest run time with the one the node's claim
    reported, and sends the node back to claim when the queue's is earlier."""
    fapp.enqueue("t", queue=Q, delay=5)
    due = fapp.now_ms() + 5000
    assert arm(fapp, "n1") == 1 and tokens(fapp, r) == []  # its claim saw no scheduled job
    assert arm(fapp, "n1", known_due_ms=due + 1000) == 1 and tokens(fapp, r) == []  # a later one
    assert arm(fapp, "n1", known_due_ms=due) == 0 and tokens(fapp, r) == ["n1"]  # knows this one
    assert arm(fapp, "n1", known_due_ms=due - 1000) == 0  # an even earlier one: wakes before it
    # A paused queue's schedule does not send the node back to claim (it would get nothing).
    assert fapp.run(fapp.store.idle(Q, "n1", "leave", now_ms=fapp.now_ms())) == 1
    r.set(fapp.keys.paused(Q), "1")
    assert arm(fapp, "n1") == 0 and tokens(fapp, r) == ["n1"]


def test_scheduled_jobs_wake_one_node_only_for_an_earlier_run_time(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    ls = Listener(fapp, r, ["n1", "n2", "n3"])
    try:
        for n in ("n1", "n2", "n3"):
            arm(fapp, n)
            clock.advance(0.001)
        fapp.enqueue("t", queue=Q, delay=60)  # the first scheduled job
        fapp.enqueue("t", queue=Q, delay=120)  # later than the earliest: the waiters wake before it
        fapp.enqueue("t", queue=Q, delay=30)  # earlier
        assert ls.heard() == [("n1", b"s"), ("n2", b"s")]
        # Ready work wins: one "r" for a mixed batch with one ready job.
        fapp.enqueue_many([{"task": "t", "queue": Q, "delay": 1}, {"task": "t", "queue": Q}])
        assert ls.heard() == [("n3", b"r")]
    finally:
        ls.close()


def test_a_full_node_passes_its_wake_up_on_and_a_stopping_one_leaves(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    ls = Listener(fapp, r, ["n1", "n2"])
    try:
        arm(fapp, "n1")
        clock.advance(0.001)
        arm(fapp, "n2")
        fapp.enqueue("t", queue=Q)
        assert ls.heard() == [("n1", b"r")]
        # n1 has no free slot: it hands the wake-up to the next idle node.
        assert fapp.run(fapp.store.idle(Q, "n1", "pass", now_ms=fapp.now_ms())) == 1
        assert ls.heard() == [("n2", b"r")]
        # Nothing left to run: passing wakes nobody.
        assert claim(fapp) == 1
        arm(fapp, "n2")
        assert fapp.run(fapp.store.idle(Q, "n1", "pass", now_ms=fapp.now_ms())) == 0
        assert ls.heard() == [] and tokens(fapp, r) == ["n2"]
        assert fapp.run(fapp.store.idle(Q, "n2", "leave", now_ms=fapp.now_ms())) == 1
        fapp.enqueue("t", queue=Q)
        assert ls.heard() == [] and tokens(fapp, r) == []
    finally:
        ls.close()


def test_jobs_made_ready_by_fail_promote_and_release_wake_one_node_each(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    ls = Listener(fapp, r, ["n1", "n2", "n3"])
    try:
        job = fapp.enqueue("t", queue=Q, retry_backoff=0)
        later = fapp.enqueue("t", queue=Q, delay=5)
        later_due = fapp.now_ms() + 5000  # the nodes' claims reported it
        assert len(fapp.run(fapp.store.claim(Q, "w", 1, 10_000, now_ms=fapp.now_ms())).jobs) == 1
        for n in ("n1", "n2", "n3"):
            assert arm(fapp, n, known_due_ms=later_due) == 0
            clock.advance(0.001)
        fapp.run(fapp.store.fail(Q, "w", job.id, "boom", jitter=0.5, now_ms=fapp.now_ms()))  # back to ready
        assert ls.heard() == [("n1", b"r")]
        clock.advance(10)
        res = fapp.run(fapp.store.promote(Q, now_ms=fapp.now_ms()))
        assert res.promoted == 1 and later.status() is jobq.JobState.READY
        assert ls.heard() == [("n2", b"r")]
        assert len(fapp.run(fapp.store.claim(Q, "w", 2, 10_000, now_ms=fapp.now_ms())).jobs) == 2
        fapp.run(fapp.store.release(Q, "w", None, now_ms=fapp.now_ms()))
        assert ls.heard() == [("n3", b"r")]  # two jobs, one node left to wake
    finally:
        ls.close()


def test_the_reaper_drops_the_token_of_a_node_it_forgets(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    fapp.run(fapp.store.extend(Q, "gone", 10_000, now_ms=fapp.now_ms()))  # a heartbeat of "gone"
    assert arm(fapp, "gone") == 0 and tokens(fapp, r) == ["gone"]
    clock.advance(60)  # silent for longer than the node TTL
    fapp.run(fapp.store.reap(Q, node_ttl_ms=20_000, now_ms=fapp.now_ms()))
    assert r.zscore(fapp.keys.queue_nodes(Q), "gone") is None
    assert tokens(fapp, r) == []


def test_resuming_a_paused_queue_wakes_one_armed_node_per_waiting_job(
    fapp: jobq.JobQ, r: redis.Redis, clock: jobq.FakeClock
) -> None:
    from jobq import admin

    ls = Listener(fapp, r, ["n1", "n2", "n3"])
    try:
        fapp.enqueue("t", queue=Q)  # registers the queue
        claim(fapp)
        admin.pause(fapp, Q)
        fapp.enqueue_many([{"task": "t", "queue": Q} for _ in range(2)])
        for n in ("n1", "n2", "n3"):
            assert arm(fapp, n) == 0  # paused: nothing to claim, so each node arms
            clock.advance(0.001)
        assert admin.resume(fapp, Q)
        assert ls.heard() == [("n1", b"r"), ("n2", b"r")]  # two jobs wait: two nodes
        assert tokens(fapp, r) == ["n3"]
    finally:
        ls.close()
