"""Wake-ups: what ends the fetcher's wait, and this node's wake-up tokens (docs/workers.md,
"Wake-ups"). A poke (a wake-up for this node, room freed, a stop, a fence), else the poll
interval or the next due time.

A node with free slots whose claim came back short *arms* a token for each of its queues
(:meth:`Wakeups.arm`, lua/idle.lua): one job made ready there wakes this node and no other.
:class:`jobq.storage.wakeups.WakeSubscriber` listens on the node's own shard channels and says
which queues are heard; a queue is armed only while it is heard. A wake-up that finds no free
slot is handed on to the next idle node. With every token armed and heard, the node's own look at
its queues is a backstop (:data:`ARMED_POLL_FACTOR`); while a subscription is down it polls every
poll interval."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from jobq.errors import JobqError
from jobq.storage.wakeups import WakeSubscriber
from jobq.worker.context import Context, NodeState

log = logging.getLogger("jobq.worker")

#: An idle node whose wake-up token is armed in every queue hears each new job, so it looks at
#: its queues on its own only as a backstop: every this many poll intervals, at most every
#: ARMED_POLL_MAX seconds (or the poll interval, if that is longer). Idle cost (S5).
ARMED_POLL_FACTOR = 10
ARMED_POLL_MAX = 10.0
#: Seconds between a claim that started jobs and the arm call that follows it: sent at once, the
#: call's Python work held the GIL the new jobs' threads were waiting for (+0.4 ms pickup p50).
ARM_DELAY = 0.002


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Wakeups:
    """The fetcher waits here (:meth:`wait`); anyone pokes (:meth:`poke`); :meth:`listen` keeps
    the node's wake-up channels subscribed (not in burst mode) and pokes on each wake-up."""

    def __init__(
        self,
        ctx: Context,
        state: NodeState,
        url: str,
        node: str,
        queues: list[str],
        poll_interval: float,
        *,
        burst: bool,
        on_cancel: Callable[[str, str], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.state = state
        self.node = node
        self.queues = queues
        self.poll_interval = poll_interval
        #: Poked since the fetcher last looked.
        self.woken = False
        #: The future the fetcher waits on, if it waits.
        self._waiter: asyncio.Future[None] | None = None
        self.sub: WakeSubscriber | None = None
        self._listener: asyncio.Task[Any] | None = None
        if not burst:
            self.sub = WakeSubscriber(
                url,
                ctx.keys,
                node,
                queues,
                on_wake=self._on_wake,
                on_live=self._on_live,
                on_cancel=on_cancel,
            )
        #: Queues whose token is armed: one new job there wakes this node.
        self.armed: set[str] = set()
        #: Wake-ups and subscription changes so far (an arm call in flight checks it).
        self._events = 0
        #: Set by the node: can the fetcher claim now (a free slot, not stopping or fenced)?
        self.can_claim: Callable[[], bool] = lambda: True
        #: Set by the node: run a coroutine beside the fetcher (tracked until shutdown).
        self.spawn: Callable[[Coroutine[Any, Any, None]], None] = lambda c: c.close()

    @property
    def connected(self) -> bool:
        """Every queue's wake-up channel is subscribed (the metrics read it from their thread)."""
        return self.sub is not None and self.sub.all_live

    def poke(self) -> None:
        self.woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Until poked, or ``timeout`` seconds; a poke since the last wait returns at once.
        False = the time ran out."""
        if not self.woken:
            loop = asyncio.get_running_loop()
            self._waiter = fut = loop.create_future()
            timer = loop.call_later(timeout, _wake_up, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self._waiter = None
        woken, self.woken = self.woken, False
        return woken

    async def listen(self) -> None:
        """Keep the wake-up channels subscribed until cancelled or :meth:`stop`."""
        if self.sub is not None and self._listener is None:
            self._listener = asyncio.current_task()
            await self.sub.run()

    def stop(self) -> None:
        """A stopping node: it stops listening (publishers then skip its tokens), drops its
        tokens, and the fetcher looks at once."""
        if self._listener is not None:
            self._listener.cancel()
        self.leave()
        self.poke()

    # -- tokens ------------------------------------------------------------------------------------
    def all_armed(self) -> bool:
        """Every queue's token is armed and heard: any new job wakes this node."""
        return self.sub is not None and len(self.armed) == len(self.queues) and self.sub.all_live

    def idle_base(self) -> float:
        """The longest idle wait: the poll interval, longer while every token is armed."""
        timeout = self.poll_interval
        if self.all_armed():
            timeout = max(timeout, min(timeout * ARMED_POLL_FACTOR, ARMED_POLL_MAX))
        return timeout

    async def arm(self, known_due_ms: int | None = None) -> bool:
        """After a short claim: arm the token of each subscribed queue not armed yet. True =
        work arrived in one of them meanwhile, or a job was scheduled earlier than
        ``known_due_ms`` (the earliest run time the claims reported): claim again."""
        sub, state = self.sub, self.state
        if sub is None or state.stopping or state.fenced or state.runner is None:
            return False
        for q in self.queues:
            if q in self.armed or not sub.live(q):
                continue
            events = self._events
            try:
                res = await state.runner.run(
                    self.ctx.store.idle(
                        q, self.node, "arm", now_ms=self.ctx.now_ms(), known_due_ms=known_due_ms
                    )
                )
            except JobqError:
                return False  # the idle poll looks again
            if res == 1:
                return True
            # A wake-up (or a subscription change) that came while the call was on its way may
            # have taken the token already: then it is not armed (the next short claim arms).
            if self._events == events:
                self.armed.add(q)
        return False

    def _on_wake(self, queue: str) -> None:
        """This node's token of ``queue`` was popped for new work: claim, or hand the wake-up on
        to the next idle node when no slot is free."""
        self._events += 1
        self.armed.discard(queue)
        if self.can_claim():
            self.poke()
        else:
            self.spawn(self._call(queue, "pass"))

    def _on_live(self, queue: str, live: bool) -> None:
        # Up: whatever was published while the channel was down reached nobody: look, and arm.
        # Down: look once, then wait no longer than the poll interval.
        self._events += 1
        self.armed.discard(queue)
        self.poke()

    def leave(self) -> None:
        """A stopping node drops its tokens (it stops listening too: publishers skip it)."""
        armed, self.armed = self.armed, set()
        for q in armed:
            self.spawn(self._call(q, "leave"))

    async def _call(self, queue: str, mode: str) -> None:
        runner = self.state.runner
        if runner is None:
            return
        try:
            await runner.run(self.ctx.store.idle(queue, self.node, mode, now_ms=self.ctx.now_ms()))
        except JobqError as exc:
            log.warning("queue %s: wake-up token call %r failed (%s)", queue, mode, exc)
