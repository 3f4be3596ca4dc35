"""The fetcher: claims up to the number of free slots per script call, in strict queue order or
by weight, plus a few jobs ahead (the *prefetch buffer*); when nothing is runnable it arms the
node's wake-up tokens (:mod:`jobq.worker.wakeups`: one new job wakes one idle node) and waits for
a wake-up, the next scheduled run time, or the poll interval, whichever comes first.

Prefetch: a slot that frees up starts its next job from a small local buffer of claimed, not yet
started jobs in the same loop turn, instead of waiting for a claim round trip; the fetcher refills
the buffer when it falls below half. Buffered jobs are in the node's active list, leased and
renewed by the heartbeat like running ones. The buffer holds only as many jobs as the node expects
to start within :data:`PREFETCH_HORIZON` seconds (from its recent run times; at most
``concurrency``, none while that is unknown), and a job left in it for :data:`PREFETCH_MAX_WAIT`
seconds goes back to ready, so a buffered job waits milliseconds, not the run time of a slow job,
and other nodes can still take the work. A job's timeout starts when it starts. A deadline is
checked by the claim, so a buffered job may start up to its buffer wait after its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from jobq import _fault_injection as faults
from jobq.backoff import Backoff, worth_a_line
from jobq.errors import JobqError, RedisBusy, RedisUnavailable
from jobq.storage.calls import MAX_BATCH, AsyncRunner, ClaimedJob
from jobq.worker.context import Context, NodeState
from jobq.worker.held import HeldJobs
from jobq.worker.outcomes import Outcomes
from jobq.worker.slots import SlotBackoff

log = logging.getLogger("jobq.worker")

#: Seconds of work a node claims ahead of its free slots: the prefetch buffer holds at most the
#: jobs it expects to start within this time (concurrency x horizon / mean run time).
PREFETCH_HORIZON = 0.02
#: Seconds a claimed job may wait in the prefetch buffer before it goes back to ready (release:
#: attempt not counted, old place in the ready order).
PREFETCH_MAX_WAIT = 0.5
#: Seconds between a claim that started jobs and the arm call that follows it: sent at once, the
#: call's Python work held the GIL the new jobs' threads were waiting for (+0.4 ms pickup p50).
ARM_DELAY = 0.002


class Waiter(Protocol):
    """What the fetcher waits on (:class:`jobq.worker.wakeups.Wakeups`): ``woken`` says a poke
    came since the last wait; clearing it makes the next wait a real one. ``arm`` arms the
    node's wake-up tokens after a short claim (True = work came in: claim again); ``armed``
    holds the queues armed; ``idle_base`` is the longest idle wait."""

    woken: bool
    armed: set[str]

    async def wait(self, timeout: float) -> bool: ...

    async def arm(self, known_due_ms: int | None = None) -> bool: ...

    def all_armed(self) -> bool: ...

    def idle_base(self) -> float: ...


def queue_order(queues: list[str], weights: dict[str, int], weighted: bool) -> list[str]:
    """The order to claim from: ``queues`` as given, or (``weighted``) a random order where a
    queue's chance of going first is its weight share."""
    if not weighted or len(queues) == 1:
        return queues
    left = list(queues)
    order = []
    while left:
        pick = random.choices(left, weights=[weights[q] for q in left])[0]
        order.append(pick)
        left.remove(pick)
    return order


class Fetcher:
    """The claim loop of one node (:meth:`run`, until the node stops or a burst drains)."""

    def __init__(
        self,
        ctx: Context,
        state: NodeState,
        held: HeldJobs,
        wake: Waiter,
        *,
        node: str,
        queues: list[str],
        weights: dict[str, int],
        weighted: bool,
        rotate: Callable[[list[str]], list[str]],
        take: Callable[[list[ClaimedJob], int], None],
        release_buffered: Callable[[], None],
        concurrency: int,
        prefetch: int | None,
        lease_ms: int,
        lease: float,
        poll_interval: float,
        burst: bool,
        outcomes: Outcomes,
    ) -> None:
        self.ctx = ctx
        self.state = state
        self.held = held
        self.wake = wake
        self.node = node
        self.queues = queues
        self.weights = weights
        self.weighted = weighted
        self.rotate = rotate
        self.take = take
        self.release_buffered = release_buffered
        self.concurrency = concurrency
        self.lease_ms = lease_ms
        self.lease = lease
        self.poll_interval = poll_interval
        self.burst = burst
        self.outcomes = outcomes
        #: Most jobs the buffer may hold (WorkerConfig.prefetch, at most concurrency and 1,000).
        self.prefetch_max = min(concurrency, 1000, concurrency if prefetch is None else max(0, prefetch))
        self._next_due_ms: int | None = None
        self._last_now_ms: int | None = None
        #: time.monotonic() when the claim that reported ``_last_now_ms`` was sent.
        self._last_now_at = 0.0
        #: Queues whose Redis Cluster slot refused the last claim (moving, or without a primary),
        #: each left alone for a backoff of its own.
        # Cap 1 s: a queue whose primary failed over is tried again within 1 s of the promotion
        # (RELIABILITY F19: resumed <= 2 s after it).
        self._claim_slots = SlotBackoff("claim", cap=1.0, logger=log)
        self._claim_more = False

    @property
    def runner(self) -> AsyncRunner:
        assert self.state.runner is not None
        return self.state.runner

    def queue_order(self) -> list[str]:
        return queue_order(self.queues, self.weights, self.weighted)

    def _prefetch_target(self) -> int:
        """How many claimed jobs to keep ready for slots that free up (see the module docstring)."""
        mean = self.held.run_time
        if mean is None or self.prefetch_max == 0:
            return 0
        return min(self.prefetch_max, int(self.concurrency * PREFETCH_HORIZON / max(mean, 1e-6)))

    def _claim_size(self) -> tuple[int, int]:
        """(jobs to claim now, 0 = none; the number of held jobs below which to claim): free
        slots plus the buffer's room, once the buffer is below half its target."""
        target = self._prefetch_target()
        held = self.held.held
        below = self.concurrency + (target + 1) // 2
        if held >= below:
            return 0, below
        return min(MAX_BATCH, self.concurrency + target - held), below

    def can_claim(self) -> bool:
        """A free slot (or room in the buffer), not stopping, not fenced."""
        return not self.state.stopping and not self.state.fenced and self._claim_size()[0] > 0

    async def run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        errors = 0
        state = self.state
        rearmed = False
        while not state.stopping:
            if state.fenced:
                self.wake.woken = False
                await self._wait(self._buffer_timeout(self.poll_interval))
                self._expire_buffer()  # claimed while the fence came: never started late
                continue
            free, below = self._claim_size()
            if free <= 0:
                # Every slot busy and the buffer full enough: a slot freeing up pokes us once the
                # buffer runs low (or the oldest buffered job has waited too long).
                self.wake.woken = False
                await self._wait(self._buffer_timeout(self.poll_interval), room_below=below)
                self._expire_buffer()
                continue
            try:
                got = await self._claim(free)
                backoff.reset()
                if errors:
                    log.warning("claims succeed again after %d failure(s)", errors)
            except (RedisUnavailable, RedisBusy) as exc:
                errors += 1
                if worth_a_line(errors):
                    log.warning("claim failed (%d in a row): %s; retrying", errors, exc)
                state.reap_not_before = time.monotonic() + self.lease
                await self._wait(backoff.next())
                continue
            except JobqError as exc:
                # Not a connection problem (permissions revoked, a script error): keep trying,
                # but with one traceback, then a line every few tries.
                errors += 1
                if errors == 1:
                    log.exception("claim failed")
                elif errors % 20 == 0:
                    log.error("claim still failing (%d tries): %s", errors, exc)
                await self._wait(backoff.next())
                continue
            errors = 0
            if got >= free or self._claim_more:
                # Let completions of this loop turn land, so the next claim takes them together.
                await asyncio.sleep(0)
                continue
            # A short claim: every queue is empty. Arm the wake-up tokens and wait for a wake-up
            # (S5: one node per new job, one claim per wake-up).
            # Burst: done when nothing runs, no ack or fail is still on its way (a Retry(0) puts
            # its job straight back to ready), and nothing is due.
            if self.burst and self.held.busy == 0 and not len(self.held) and self._nothing_due():
                return
            if got:
                rearmed = False
                if not self.burst:
                    # The jobs just started need the GIL first: arm a moment later (a job
                    # enqueued meanwhile wakes another node, or the arm call finds it).
                    await asyncio.sleep(ARM_DELAY)
            if await self.wake.arm(self._next_due_ms):
                if not rearmed:
                    rearmed = True  # work came in before the token was armed: claim it
                    continue
                # Work the claims do not get (a queue whose slot is moving): poll for it.
            else:
                rearmed = False
            await self._idle_wait()

    async def _idle_wait(self) -> None:
        """Wait for a wake-up (or the poll interval, or the next due time). With every token
        armed, the backstop when the time runs out is to arm again (a token may have gone with
        a message lost in a dropped connection), and to claim only if work is waiting."""
        while True:
            armed = self.wake.all_armed()
            timeout = self._idle_timeout()
            poked = await self._wait(self._buffer_timeout(timeout))
            self._expire_buffer()
            # Cut short by the next due time: the earliest scheduled job this node saw is due.
            cut = timeout < self.wake.idle_base()
            if poked or not armed or cut or self.state.stopping or self.held.oldest_buffered() is not None:
                return
            self.wake.armed.clear()
            if await self.wake.arm(self._next_due_ms) or not self.wake.all_armed():
                return

    async def _wait(self, timeout: float, *, room_below: int = 0) -> bool:
        """Until woken, or ``timeout`` seconds. ``room_below``: also wake once fewer jobs than
        this are held (slots freed up); else a freed slot does not wake the fetcher (it waits
        for work, not for room)."""
        self.held.room_below = room_below
        try:
            return await self.wake.wait(timeout)
        finally:
            self.held.room_below = 0

    def _nothing_due(self) -> bool:
        if self._next_due_ms is None or self._last_now_ms is None:
            return True
        # Burst mode waits for due-now jobs only; future scheduled ones are left for later.
        return self._next_due_ms > self._last_now_ms

    def _idle_timeout(self) -> float:
        timeout = self.wake.idle_base()
        if self._next_due_ms is not None and self._last_now_ms is not None:
            # Less the time since that claim: an armed node that re-arms without claiming
            # (its backstop ran out) still wakes at the due time, not a backstop later.
            until_due = (self._next_due_ms - self._last_now_ms) / 1000
            until_due -= time.monotonic() - self._last_now_at
            timeout = min(timeout, max(0.001, until_due))
        if self.burst:
            timeout = min(timeout, 0.05)
        return timeout

    def _buffer_timeout(self, timeout: float) -> float:
        """``timeout``, cut short to when the oldest buffered job has waited its limit."""
        oldest = self.held.oldest_buffered()
        if oldest is not None:
            timeout = min(timeout, oldest + PREFETCH_MAX_WAIT - time.monotonic())
        return max(0.001, timeout)

    def _expire_buffer(self) -> None:
        """Hand back buffered jobs that waited :data:`PREFETCH_MAX_WAIT` (the running jobs are
        slower than the run times the buffer was sized for): no more prefetch until jobs end."""
        oldest = self.held.oldest_buffered()
        if oldest is None or oldest + PREFETCH_MAX_WAIT > time.monotonic():
            return
        n = len(self.held.buffer)
        log.info("%d prefetched job(s) waited %g s for a slot: releasing them", n, PREFETCH_MAX_WAIT)
        self.held.run_time = max(self.held.run_time or 0.0, 2 * PREFETCH_HORIZON * self.concurrency)
        self.release_buffered()

    async def _claim(self, free: int) -> int:
        got = 0
        visited = 0
        self._claim_more = False
        next_due: int | None = None
        slot_errors: list[RedisUnavailable] = []
        for q in self.rotate(self.queue_order()):
            want = free - got
            if want <= 0:
                break
            if self._claim_slots and self._claim_slots.waiting(q):
                continue
            if q in self.state.fenced_queues:
                continue  # its shard's renewals fail (jobq.worker.heartbeat): no claims from it
            visited += 1
            sent_at = time.monotonic()
            try:
                res = await self.runner.run(
                    self.ctx.store.claim(q, self.node, want, self.lease_ms, now_ms=self.ctx.now_ms())
                )
            except RedisUnavailable as exc:
                if not exc.shard:
                    raise  # Redis itself: every queue fails alike
                # Only this queue's cluster shard (its slot moving, its primary down): serve the
                # others, and try this one again after a backoff of its own.
                self._claim_slots.refused(q, exc)
                slot_errors.append(exc)
                continue
            self._claim_slots.ok(q)
            self.state.last_ok = time.monotonic()
            self._last_now_ms, self._last_now_at = res.now_ms, sent_at
            if res.next_due_ms is not None and (next_due is None or res.next_due_ms < next_due):
                next_due = res.next_due_ms
            for job_id, reason in res.dead:
                self.outcomes.dead_lettered(q, job_id, reason, "claim")
            self.outcomes.dead_trimmed(q, res.dead_trimmed)
            if res.jobs:
                if faults.ACTIVE:
                    faults.crash_point("after_claim")
                self.take(res.jobs, res.now_ms)
            got += len(res.jobs)
            if res.dead and len(res.jobs) + len(res.dead) >= want:
                self._claim_more = True  # dead-lettered entries filled the batch: look again
        if slot_errors and len(slot_errors) == visited:
            raise slot_errors[-1]  # no queue answered: back off as for any claim failure
        if visited == len(self.queues) and not slot_errors:
            self.state.promoted_at = time.monotonic()  # claim promoted every queue's due jobs
        self._next_due_ms = next_due
        return got
