"""The held-jobs table (jobq/worker/held.py) alone: pure bookkeeping, no Redis, no event loop."""

from __future__ import annotations

from typing import Any

import pytest

from jobq.storage.calls import ClaimedJob
from jobq.worker.held import RUN_TIME_ALPHA, HeldJobs


def job(job_id: str, queue: str = "q", attempts: int = 1) -> ClaimedJob:
    return ClaimedJob(job_id, queue, "t", b"", attempts, 3, 0, 0)


class Room:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def started(table: HeldJobs, job_id: str, now: float, **kw: Any) -> Any:
    run = table.add(job(job_id, **kw), now, 0)
    table.take_slot(run, now)
    run.task = object()  # a run handle: any non-None value counts as started
    return run


def test_add_get_forget_and_a_newer_attempt_replaces_the_old() -> None:
    table = HeldJobs()
    first = table.add(job("a"), 1.0, 100)
    assert table.get("a") is first and len(table) == 1
    second = table.add(job("a", attempts=2), 2.0, 200)
    assert table.get("a") is second
    table.forget(first)  # the old attempt's end must not drop the new claim
    assert table.get("a") is second
    table.forget(second)
    assert table.get("a") is None and len(table) == 0


def test_known_lists_the_jobs_still_ours_by_queue_and_of_queue_skips_lost_ones() -> None:
    table = HeldJobs()
    table.add(job("a", "q1"), 0.0, 0)
    table.add(job("b", "q1"), 0.0, 0)
    lost = table.add(job("c", "q2"), 0.0, 0)
    lost.lost = True
    finishing = table.add(job("d", "q2"), 0.0, 0)
    finishing.finishing = True  # an ack on its way: still ours until Redis confirms
    assert table.known() == {"q1": {"a", "b"}, "q2": {"d"}}
    assert [r.job.id for r in table.of_queue("q2")] == ["d"]


def test_the_buffer_is_first_in_first_out_and_drains_by_queue() -> None:
    table = HeldJobs()
    pairs = [("a", "x"), ("b", "y"), ("c", "x")]
    runs = [table.add(job(i, q), float(n), 0) for n, (i, q) in enumerate(pairs)]
    for run in runs:
        table.push_buffered(run)
    assert all(r.buffered for r in runs) and table.held == 3
    assert table.oldest_buffered() == 0.0
    table.unbuffer(runs[1])
    assert not runs[1].buffered and table.held == 2
    first = table.pop_buffered()
    assert first is runs[0] and not first.buffered
    table.push_buffered(first)
    assert {q: [r.job.id for r in rs] for q, rs in table.drain_buffer().items()} == {"x": ["c", "a"]}
    assert table.pop_buffered() is None and table.oldest_buffered() is None


def test_a_slot_is_freed_once_and_a_zombie_keeps_it() -> None:
    table = HeldJobs()
    run = started(table, "a", 10.0)
    assert table.busy == 1
    zombie = started(table, "b", 10.0)
    zombie.zombie = True
    assert not table.free_slot(zombie, 11.0) and table.busy == 2
    assert table.free_slot(run, 12.0) and table.busy == 1
    assert not table.free_slot(run, 13.0) and table.busy == 1
    unstarted = table.add(job("c"), 10.0, 0)
    assert not table.free_slot(unstarted, 11.0)  # never started: held no slot


def test_run_time_is_a_moving_mean_of_freed_slots() -> None:
    table = HeldJobs()
    assert table.run_time is None
    table.free_slot(started(table, "a", 0.0), 2.0)
    assert table.run_time == 2.0
    table.free_slot(started(table, "b", 0.0), 4.0)
    assert table.run_time == pytest.approx(2.0 + (4.0 - 2.0) * RUN_TIME_ALPHA)


def test_on_room_is_called_only_while_the_fetcher_waits_for_room_and_there_is_room() -> None:
    room = Room()
    table = HeldJobs(on_room=room)
    a, b = started(table, "a", 0.0), started(table, "b", 0.0)
    table.check_room()
    assert room.calls == 0  # nobody waits for room
    table.room_below = 2
    table.check_room()
    assert room.calls == 0  # 2 held, not below 2
    table.free_slot(a, 1.0)
    table.check_room()
    assert room.calls == 1
    table.room_below = 0
    table.free_slot(b, 1.0)
    table.check_room()
    assert room.calls == 1
