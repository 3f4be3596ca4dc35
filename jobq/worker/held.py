"""The jobs a node holds: job id -> its claim (attempt, lease clock, run handle), the prefetch
buffer of claimed jobs not started yet, and the concurrency slots in use.

This is the bottom of the worker: it imports no other worker module. What happens when room
frees up is a callback (``on_room``) the node wires to the fetcher's wake-up, so no arrow points
back up. Pure bookkeeping: no Redis, no event loop calls, no clock of its own (callers pass the
monotonic time), which is what lets ``tests/unit/test_held.py`` test it alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from jobq.current import CurrentJob
from jobq.storage.calls import ClaimedJob

#: Weight of the newest run time in the table's moving mean.
RUN_TIME_ALPHA = 0.1


@dataclass(slots=True)
class Held:
    """One claimed job on this node."""

    job: ClaimedJob
    #: monotonic time it was claimed, then the time it started.
    started: float
    #: The Redis clock when it was claimed (ms).
    now_ms: int = 0
    task: asyncio.Task[None] | None = None
    #: Claimed ahead of a free slot and not started yet (in the prefetch buffer).
    buffered: bool = False
    #: The heartbeat found the job no longer ours: never ack it.
    lost: bool = False
    #: An ack or fail for it is on its way: the heartbeat must not call it lost.
    finishing: bool = False
    #: Its concurrency slot was given back.
    freed: bool = False
    #: The node fenced itself while this sync job ran (a thread cannot be stopped): its ack or
    #: fail is still sent, and Redis accepts it only if the job is still this node's.
    fenced: bool = False
    #: A sync job given up (timeout) whose thread still runs: it keeps its slot until it returns,
    #: so the node never runs more threads than its concurrency nor claims work it cannot start.
    zombie: bool = False
    #: Cancelled while held (cancel.lua took it from this node): never ack it.
    cancelled: bool = False
    #: What the task sees as ``jobq.current_job()`` (set when it starts).
    current: CurrentJob | None = None


def _nothing() -> None:
    return None


class HeldJobs:
    """The table of held jobs. ``on_room()`` is called when a slot frees up and fewer than
    :attr:`room_below` jobs are held (the fetcher sets it while it waits for room)."""

    def __init__(self, on_room: Callable[[], None] = _nothing) -> None:
        self.jobs: dict[str, Held] = {}
        #: Claimed jobs not started yet, oldest first.
        self.buffer: deque[Held] = deque()
        #: Concurrency slots in use (jobs running; not those waiting for their ack).
        self.busy = 0
        #: Call ``on_room`` once a freed slot leaves fewer than this many jobs held (0: never).
        self.room_below = 0
        #: Moving mean of a job's run time on this node (s); None until a job has run.
        self.run_time: float | None = None
        self.on_room = on_room

    def __len__(self) -> int:
        return len(self.jobs)

    def get(self, job_id: str) -> Held | None:
        return self.jobs.get(job_id)

    def values(self) -> list[Held]:
        """A copy (safe to read from another thread, and to change the table while iterating)."""
        return list(self.jobs.values())

    @property
    def held(self) -> int:
        """Jobs running plus jobs buffered (what the fetcher sizes its claims by)."""
        return self.busy + len(self.buffer)

    def add(self, job: ClaimedJob, now: float, now_ms: int) -> Held:
        """A new claim; replaces any entry of the same id (the caller deals with the old one)."""
        run = Held(job, now, now_ms)
        self.jobs[job.id] = run
        return run

    def forget(self, run: Held) -> None:
        """Drop ``run`` (only if it is still the table's entry for its id: a newer attempt of the
        same job may have replaced it)."""
        if self.jobs.get(run.job.id) is run:
            del self.jobs[run.job.id]

    def of_queue(self, queue: str) -> list[Held]:
        """The jobs of ``queue`` still ours (not lost)."""
        return [r for r in self.values() if r.job.queue == queue and not r.lost]

    def known(self) -> dict[str, set[str]]:
        """queue -> ids of the jobs still ours, for the heartbeat (on its own thread). A job whose
        ack or fail is on its way is still ours (and must stay leased) until Redis confirms."""
        out: dict[str, set[str]] = {}
        for run in self.values():
            if not run.lost:
                out.setdefault(run.job.queue, set()).add(run.job.id)
        return out

    def fences(self) -> dict[str, int]:
        """id -> the fence token of the claim each job still ours belongs to, for the heartbeat
        (a run whose token is not the one Redis holds is an older claim's: lost)."""
        return {run.job.id: run.job.fence for run in self.values() if not run.lost}

    # -- the prefetch buffer -------------------------------------------------------------------
    def push_buffered(self, run: Held) -> None:
        run.buffered = True
        self.buffer.append(run)

    def pop_buffered(self) -> Held | None:
        """The oldest buffered job, out of the buffer (None if it is empty)."""
        if not self.buffer:
            return None
        run = self.buffer.popleft()
        run.buffered = False
        return run

    def unbuffer(self, run: Held) -> None:
        """Take ``run`` out of the buffer, wherever it is."""
        if run.buffered:
            run.buffered = False
            self.buffer.remove(run)

    def drain_buffer(self) -> dict[str, list[Held]]:
        """Empty the buffer: queue -> its buffered jobs, oldest first."""
        by_queue: dict[str, list[Held]] = {}
        while (run := self.pop_buffered()) is not None:
            by_queue.setdefault(run.job.queue, []).append(run)
        return by_queue

    def oldest_buffered(self) -> float | None:
        """When the oldest buffered job was claimed (monotonic), None if none is."""
        return self.buffer[0].started if self.buffer else None

    # -- concurrency slots ---------------------------------------------------------------------
    def take_slot(self, run: Held, now: float) -> None:
        run.started = now
        self.busy += 1

    def free_slot(self, run: Held, now: float) -> bool:
        """Give ``run``'s slot back (once; a zombie keeps it) and fold its run time into the
        mean. False if there was nothing to give back."""
        if run.task is None or run.freed or run.zombie:
            return False
        run.freed = True
        self.busy -= 1
        took = now - run.started
        mean = self.run_time
        self.run_time = took if mean is None else mean + (took - mean) * RUN_TIME_ALPHA
        return True

    def check_room(self) -> None:
        """Call ``on_room`` if the fetcher waits for room and the table has it now."""
        if self.held < self.room_below:
            self.on_room()
