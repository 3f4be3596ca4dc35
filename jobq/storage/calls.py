"""The only module that speaks to Redis through jobq's Lua scripts.

:class:`Store` builds one typed :class:`Call` per script (keys from :mod:`jobq.storage.keys`, ARGV in the
order of the script's header, a parser for its reply); it does no I/O. :class:`SyncRunner` and
:class:`AsyncRunner` execute calls as a bare EVALSHA (on NOSCRIPT: SCRIPT LOAD and EVALSHA again,
then EVAL of the same shipped text if a SCRIPT FLUSH came in between) and map every Redis error to
the :mod:`jobq.errors` tree in one place.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import hiredis
import redis
import redis.asyncio
import redis.cluster

from jobq import errors
from jobq.storage.keys import Keys
from jobq.storage.scripts import ScriptName, source
from jobq.util import refused, to_str

T = TypeVar("T")
Arg = str | bytes | int | float

# Bounds on every script call, mirrored by the scripts' argument checks: at these maxima, with
# the worst data shape, each script stays within about 10 ms of Redis time (measured in
# tests/integration/test_core_script_bounds.py). Longer work goes on over several calls.
#: Most jobs one enqueue, claim, ack, release or retry-dead call carries.
MAX_BATCH = 500
#: Most expired leases one reap call handles (dead-lettering costs about twice a requeue).
MAX_REAP = 250
#: Most due scheduled jobs one claim call promotes before popping (Limits.promote_limit).
MAX_CLAIM_PROMOTE = 100
#: Most jobs one promote or purge call moves or deletes.
MAX_SCAN = 1000
#: Most leases one extend call renews: the most jobs of one queue a node may hold.
MAX_EXTEND = 5000
#: Most payload (enqueue, claim) or result (ack) bytes one call carries, unless it carries one
#: job only (a larger job goes alone).
MAX_BATCH_BYTES = 2 * 1024 * 1024


def split_batches(items: Sequence[T], size: Callable[[T], int]) -> list[list[T]]:
    """``items`` in consecutive script-call batches: at most MAX_BATCH items and at most
    MAX_BATCH_BYTES of ``size`` each (an item larger than that goes alone)."""
    out: list[list[T]] = []
    cur: list[T] = []
    total = 0
    for it in items:
        n = size(it)
        if cur and (len(cur) >= MAX_BATCH or total + n > MAX_BATCH_BYTES):
            out.append(cur)
            cur, total = [], 0
        cur.append(it)
        total += n
    if cur:
        out.append(cur)
    return out


#: Priority bounds (inclusive); higher runs first.
MIN_PRIORITY, MAX_PRIORITY = -100, 100


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds and retention the scripts enforce, in milliseconds and counts."""

    #: How long a finished (or cancelled) job and its result are kept.
    retention_ms: int = 600_000
    #: Dead-letter list bound by count...
    dead_max: int = 10_000
    #: ... and by age.
    dead_ttl_ms: int = 7 * 24 * 3600 * 1000
    #: Upper bound of one retry backoff delay.
    backoff_cap_ms: int = 3600 * 1000
    #: Due scheduled jobs a claim call promotes before popping.
    promote_limit: int = 100
    #: Most finished (done or cancelled) jobs a queue keeps, 0 = no count bound: past it, the
    #: jobs that expire first are deleted early (bounded per ack call).
    finished_max: int = 100_000
    #: Per-queue overrides of finished_max (a sharded queue's shards each use their queue's).
    finished_max_queues: Mapping[str, int] = field(default_factory=dict)

    #: Length cap of a queue's lifecycle event stream (``XADD MAXLEN ~``), 0 = no events.
    events_max: int = 10_000
    #: Per-queue overrides of events_max (a sharded queue's shards each use their queue's).
    events_max_queues: Mapping[str, int] = field(default_factory=dict)

    def events_cap(self, queue: str) -> int:
        """The event stream length cap of ``queue`` (0 = it writes no events)."""
        return int(self.events_max_queues.get(queue.partition("#")[0], self.events_max))

    def finished_cap(self, queue: str) -> int:
        """The finished-job count bound of ``queue`` (0 = none)."""
        return int(self.finished_max_queues.get(queue.partition("#")[0], self.finished_max))


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job as the enqueue script takes it (already validated by the client)."""

    id: str
    task: str
    payload: bytes
    priority: int = 0
    delay_ms: int | None = None
    run_at_ms: int | None = None
    max_attempts: int = 3
    timeout_ms: int = 0
    backoff_ms: int = 1000
    #: Absolute ms, or "+<ms>" relative to the enqueue time on the Redis clock; "" = none.
    deadline: str = ""
    unique_key: str = ""
    #: The producer's trace context (``jobq[otel]``, :mod:`jobq.tracing`): a W3C traceparent,
    #: then a space and the tracestate if there is one; "" = none (the field is not sent).
    trace: str = ""


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job leased to this node."""

    id: str
    queue: str
    task: str
    payload: bytes
    attempts: int
    max_attempts: int
    timeout_ms: int
    ready_ms: int
    #: Redis-clock ms by which the job must have started (0 = no deadline): a worker holding it
    #: in its prefetch buffer must not start it later.
    deadline_ms: int = 0
    #: The producer's trace context stored with the job ("" = none; see JobSpec.trace).
    trace: str = ""
    #: The claim's fence token, unique per claim over the job's whole life (base + attempts in
    #: Redis: equal to ``attempts`` unless the job was retried from dead, which resets
    #: ``attempts``). Every completion names it; 0 = not known (a job built by hand): ``fence``
    #: is then the attempt number.
    token: int = 0

    @property
    def fence(self) -> int:
        """The token a completion of this claim names (ack, fail, release, progress)."""
        return self.token or self.attempts


@dataclass(frozen=True, slots=True)
class ClaimResult:
    now_ms: int
    next_due_ms: int | None
    jobs: list[ClaimedJob]
    #: (job id, reason) of jobs dead-lettered instead of claimed.
    dead: list[tuple[str, str]]
    #: Dead letters deleted because the queue's list was over ``dead_max``.
    dead_trimmed: int = 0


@dataclass(frozen=True, slots=True)
class FailResult:
    #: "retry", "dead", "lease_lost" (refused: another attempt holds the job) or "missing"
    outcome: str
    run_at_ms: int
    #: This attempt's failure was already recorded by an earlier send of the same call (its
    #: reply was lost); ``outcome`` tells what that send did.
    repeated: bool = False
    #: Dead letters deleted because the queue's list was over ``dead_max``.
    dead_trimmed: int = 0


@dataclass(frozen=True, slots=True)
class ReapResult:
    requeued: list[str]
    dead: list[str]
    skipped: bool = False
    #: Dead letters deleted because the queue's list was over ``dead_max``.
    dead_trimmed: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    #: Jobs put back in ready...
    released: int
    #: ... of which this many had started (an interruption counted on each).
    interrupted: int = 0
    #: (job id, reason) of jobs dead-lettered instead: interrupted too often, or no usable hash.
    dead: list[tuple[str, str]] = field(default_factory=list)
    #: Dead letters deleted because the queue's list was over ``dead_max``.
    dead_trimmed: int = 0


@dataclass(frozen=True, slots=True)
class ExtendResult:
    now_ms: int
    owned: list[str]
    #: This node's jobs cancelled while they ran, since its last renewal (cancel.lua).
    cancelled: list[str] = field(default_factory=list)
    #: The fence token of each owned id's claim, in the order of ``owned`` (empty: not known).
    #: An entry converted from an older jobq's active list has none (0, or the conversion time:
    #: only a stopped node's list is converted, so no run of this process is judged by it).
    tokens: list[int] = field(default_factory=list)

    def owned_tokens(self) -> dict[str, int]:
        """Owned id -> the fence token of the claim that holds it (0 = not known)."""
        if len(self.tokens) != len(self.owned):
            return dict.fromkeys(self.owned, 0)
        return dict(zip(self.owned, self.tokens, strict=True))


@dataclass(frozen=True, slots=True)
class PromoteResult:
    promoted: int
    next_due_ms: int | None
    now_ms: int


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One script invocation: which script, its KEYS and ARGV, and how to read its reply."""

    script: ScriptName
    keys: list[str]
    args: list[Arg]
    parse: Callable[[Any], T]
    #: The queue the call is about, for error messages.
    queue: str = field(default="")
    #: Durable mode: (replicas, timeout ms) the runner waits for with ``WAIT`` on the same
    #: connection right after the script; (0, 0) = do not wait.
    wait: tuple[int, int] = field(default=(0, 0))


def _now(now_ms: int | None) -> Arg:
    return "" if now_ms is None else int(now_ms)


def _due(v: Any) -> int | None:
    n = int(v)
    return None if n < 0 else n


class Store:
    """Builds script calls for one key prefix. Pure: no I/O."""

    def __init__(self, keys: Keys, limits: Limits | None = None) -> None:
        self.keys = keys
        self.limits = limits or Limits()
        #: Durable mode (``JobQ(durable=True)``): enqueue and ack calls wait for this many
        #: replicas, up to ``wait_timeout_ms``.
        self.wait_replicas = 0
        self.wait_timeout_ms = 1000

    def with_keys(self, keys: Keys) -> Store:
        """The same calls under other key names: the limits and the durable mode carry over."""
        store = Store(keys, self.limits)
        store.wait_replicas, store.wait_timeout_ms = self.wait_replicas, self.wait_timeout_ms
        return store

    # -- producer -------------------------------------------------------------------------------
    def enqueue(
        self,
        queue: str,
        jobs: Sequence[JobSpec],
        *,
        now_ms: int | None = None,
        max_depth: int = 0,
        cron_name: str = "",
        cron_tick_ms: int = 0,
    ) -> Call[list[str]]:
        k = self.keys
        if not 1 <= len(jobs) <= MAX_BATCH:
            raise ValueError(f"enqueue takes 1..{MAX_BATCH} jobs per call")
        if len(split_batches(jobs, lambda j: len(j.payload))) > 1:
            raise ValueError(f"enqueue takes at most {MAX_BATCH_BYTES} payload bytes per call")
        args: list[Arg] = [
            k.queue_prefix(queue),
            _now(now_ms),
            max_depth,
            cron_name,
            cron_tick_ms,
            len(jobs),
        ]
        # A 12th field per job, the trace context, only when a job of the call has one: an
        # untraced call is the 11 fields it always was (enqueue.lua takes either).
        traced = any(j.trace for j in jobs)
        for j in jobs:
            args += (
                j.id,
                j.task,
                j.payload,
                j.priority,
                "" if j.delay_ms is None else j.delay_ms,
                "" if j.run_at_ms is None else j.run_at_ms,
                j.max_attempts,
                j.timeout_ms,
                j.backoff_ms,
                j.deadline,
                j.unique_key,
            )
            if traced:
                args.append(j.trace)
        args.append(self.limits.events_cap(queue))

        def parse(raw: Any) -> list[str]:
            if raw and isinstance(raw[0], int) and raw[0] == errors.ErrorCode.QUEUE_FULL:
                raise errors.QueueFull(queue, int(raw[1]), max_depth)
            return [to_str(x) for x in raw]

        return Call(
            ScriptName.ENQUEUE,
            [k.ready(queue), k.scheduled(queue), k.seq(queue), k.events(queue), k.slot_guard(queue)],
            args,
            parse,
            queue,
            (self.wait_replicas, self.wait_timeout_ms),
        )

    # -- worker ---------------------------------------------------------------------------------
    def claim(
        self, queue: str, node: str, max_jobs: int, lease_ms: int, *, now_ms: int | None = None
    ) -> Call[ClaimResult]:
        k, lim = self.keys, self.limits
        keys = [
            k.ready(queue),
            k.scheduled(queue),
            k.active(queue, node),
            k.leases(queue),
            k.dead(queue),
            k.paused(queue),
            k.seq(queue),
            k.events(queue),
            k.slot_guard(queue),
        ]
        args: list[Arg] = [
            k.queue_prefix(queue),
            node,
            _now(now_ms),
            lease_ms,
            max_jobs,
            lim.promote_limit,
            lim.dead_max,
            lim.dead_ttl_ms,
            lim.events_cap(queue),
        ]

        def parse(raw: Any) -> ClaimResult:
            n_claimed, n_dead = int(raw[2]), int(raw[3])
            jobs = []
            pos = 4
            for _ in range(n_claimed):
                r = raw[pos : pos + 10]
                pos += 10
                jobs.append(
                    ClaimedJob(
                        r[0].decode(),
                        queue,
                        r[1].decode(),
                        r[2],
                        int(r[3]),
                        int(r[4]),
                        int(r[5]),
                        int(r[6]),
                        int(r[7]),
                        to_str(r[8]) if r[8] else "",
                        int(r[9]),
                    )
                )
            dead = [(to_str(raw[pos + 2 * i]), to_str(raw[pos + 2 * i + 1])) for i in range(n_dead)]
            pos += 2 * n_dead
            trimmed = int(raw[pos]) if len(raw) > pos else 0
            return ClaimResult(int(raw[0]), _due(raw[1]), jobs, dead, trimmed)

        return Call(ScriptName.CLAIM, keys, args, parse, queue)

    def ack(
        self,
        queue: str,
        node: str,
        items: Sequence[tuple[str, bytes]],
        *,
        attempts: Sequence[int | None] | None = None,
        now_ms: int | None = None,
    ) -> Call[list[int]]:
        """Finish jobs: ``items`` are (job id, encoded result or b""), one batch of
        :func:`split_batches`; ``attempts`` the fence token each job's claim returned
        (:attr:`ClaimedJob.fence`: the attempt number unless the job was retried from dead), in
        the same order (the per-claim fence; None = the claim this node holds). Codes: 1
        finished, 0 already finished by this claim (a repeated call), -1 no such job, -2 refused
        (stale: another claim holds the job).

        The call carries a random id, the same in every send of it, so that Redis tells a call
        re-sent after a lost reply from a new one even when the finished job was deleted at once
        (retention 0)."""
        k = self.keys
        if attempts is not None and len(attempts) != len(items):
            raise ValueError("ack: one attempt per item")
        args: list[Arg] = [
            k.queue_prefix(queue),
            node,
            _now(now_ms),
            self.limits.retention_ms,
            self.limits.finished_cap(queue),
            len(items),
            os.urandom(8).hex(),
        ]
        for i, (job_id, result) in enumerate(items):
            attempt = None if attempts is None else attempts[i]
            args += (job_id, "" if attempt is None else attempt, result)
        args.append(self.limits.events_cap(queue))
        keys = [
            k.active(queue, node),
            k.leases(queue),
            k.finished(queue),
            k.events(queue),
            k.slot_guard(queue),
        ]
        return Call(
            ScriptName.ACK,
            keys,
            args,
            lambda raw: [int(x) for x in raw],
            queue,
            (self.wait_replicas, self.wait_timeout_ms),
        )

    def fail(
        self,
        queue: str,
        node: str,
        job_id: str,
        error: str,
        *,
        dead: bool = False,
        delay_ms: int | None = None,
        jitter: float | None = None,
        attempt: int | None = None,
        count_reap: bool = False,
        now_ms: int | None = None,
    ) -> Call[FailResult]:
        """Record a failed attempt; ``attempt`` is the fence token the claim returned
        (:attr:`ClaimedJob.fence`; None = the claim this node holds). ``count_reap``: a retry also
        counts a reap on the job, in the same script (a node recovering its earlier run's jobs)."""
        k, lim = self.keys, self.limits
        keys = [
            k.active(queue, node),
            k.leases(queue),
            k.scheduled(queue),
            k.dead(queue),
            k.ready(queue),
            k.seq(queue),
            k.events(queue),
            k.slot_guard(queue),
        ]
        args: list[Arg] = [
            k.queue_prefix(queue),
            node,
            _now(now_ms),
            job_id,
            error[:4000],
            "dead" if dead else "retry",
            "" if delay_ms is None else delay_ms,
            round(random.random() if jitter is None else jitter, 6),
            lim.backoff_cap_ms,
            lim.dead_max,
            lim.dead_ttl_ms,
            "" if attempt is None else attempt,
            "1" if count_reap else "",
            lim.events_cap(queue),
        ]
        outcomes = {
            1: "retry",
            2: "dead",
            errors.ErrorCode.LEASE_LOST: "lease_lost",
            errors.ErrorCode.JOB_NOT_FOUND: "missing",
        }
        return Call(
            ScriptName.FAIL,
            keys,
            args,
            lambda raw: FailResult(outcomes[int(raw[0])], int(raw[1]), bool(int(raw[2])), int(raw[3])),
            queue,
        )

    def extend(
        self,
        queue: str,
        node: str,
        lease_ms: int,
        *,
        limit: int = MAX_EXTEND,
        now_ms: int | None = None,
        seen_cancels: Sequence[str] = (),
    ) -> Call[ExtendResult]:
        """Renew the node's leases; ``seen_cancels``: the cancelled ids an earlier reply carried
        (their marks are removed, so a lost reply loses none)."""
        k = self.keys
        keys = [k.active(queue, node), k.leases(queue), k.queue_nodes(queue), k.cancels(queue, node)]
        args: list[Arg] = [node, _now(now_ms), lease_ms, limit, " ".join(seen_cancels)]
        return Call(
            ScriptName.EXTEND,
            keys,
            args,
            lambda raw: ExtendResult(
                int(raw[0]),
                [to_str(x) for x in raw[1][::2]],
                [to_str(x) for x in raw[2]],
                [int(float(x)) for x in raw[1][1::2]],
            ),
            queue,
        )

    def release(
        self,
        queue: str,
        node: str,
        job_ids: Sequence[str] | None = None,
        *,
        attempts: Sequence[int | None] | None = None,
        max_interruptions: Sequence[int] | None = None,
        now_ms: int | None = None,
    ) -> Call[ReleaseResult]:
        """Give jobs back to ready; ``None`` = all the node holds (up to MAX_BATCH per call), as
        never started. Per job (same order as ``job_ids``): ``attempts``, the fence token its
        claim returned (:attr:`ClaimedJob.fence`; None = the claim this node holds);
        ``max_interruptions``, 0 for a job that never started (its attempt is given back; the
        default), else the job started: it keeps its attempt, counts an interruption, and is
        dead-lettered (``interrupted``) at this many."""
        k, lim = self.keys, self.limits
        ids = list(job_ids or [])
        if attempts is not None and len(attempts) != len(ids):
            raise ValueError("release: one attempt per job id")
        if max_interruptions is not None and len(max_interruptions) != len(ids):
            raise ValueError("release: one max_interruptions per job id")
        keys = [
            k.active(queue, node),
            k.leases(queue),
            k.ready(queue),
            k.seq(queue),
            k.dead(queue),
            k.events(queue),
            k.slot_guard(queue),
        ]
        args: list[Arg] = [k.queue_prefix(queue), node, _now(now_ms), len(ids), lim.dead_max, lim.dead_ttl_ms]
        for i, job_id in enumerate(ids):
            attempt = None if attempts is None else attempts[i]
            limit = 0 if max_interruptions is None else max_interruptions[i]
            args += (job_id, "" if attempt is None else attempt, limit)
        args.append(lim.events_cap(queue))

        def parse(raw: Any) -> ReleaseResult:
            n_dead = int(raw[2])
            dead = [(to_str(raw[4 + 2 * i]), to_str(raw[5 + 2 * i])) for i in range(n_dead)]
            return ReleaseResult(int(raw[0]), int(raw[1]), dead, int(raw[3]))

        return Call(ScriptName.RELEASE, keys, args, parse, queue)

    # -- maintenance ------------------------------------------------------------------------------
    def reap(
        self,
        queue: str,
        *,
        node_ttl_ms: int,
        limit: int = MAX_REAP,
        guard_ms: int = 0,
        now_ms: int | None = None,
    ) -> Call[ReapResult]:
        k, lim = self.keys, self.limits
        keys = [
            k.leases(queue),
            k.ready(queue),
            k.dead(queue),
            k.queue_nodes(queue),
            k.seq(queue),
            k.reap_lock(queue),
            k.events(queue),
            k.slot_guard(queue),
        ]
        args: list[Arg] = [
            k.queue_prefix(queue),
            _now(now_ms),
            limit,
            node_ttl_ms,
            lim.dead_max,
            lim.dead_ttl_ms,
            guard_ms,
            lim.events_cap(queue),
        ]

        def parse(raw: Any) -> ReapResult:
            if int(raw[0]) < 0:
                return ReapResult([], [], skipped=True)
            n_req, n_dead = int(raw[0]), int(raw[1])
            ids = [to_str(x) for x in raw[2 : 2 + n_req + n_dead]]
            end = 2 + n_req + n_dead
            trimmed = int(raw[end]) if len(raw) > end else 0
            return ReapResult(ids[:n_req], ids[n_req:], dead_trimmed=trimmed)

        return Call(ScriptName.REAP, keys, args, parse, queue)

    def promote(self, queue: str, *, limit: int = MAX_SCAN, now_ms: int | None = None) -> Call[PromoteResult]:
        k = self.keys
        keys = [k.scheduled(queue), k.ready(queue), k.seq(queue), k.events(queue), k.slot_guard(queue)]
        args: list[Arg] = [k.queue_prefix(queue), _now(now_ms), limit, self.limits.events_cap(queue)]
        return Call(
            ScriptName.PROMOTE,
            keys,
            args,
            lambda raw: PromoteResult(int(raw[0]), _due(raw[1]), int(raw[2])),
            queue,
        )

    def progress(
        self,
        queue: str,
        node: str,
        job_id: str,
        attempt: int,
        fraction: float,
        message: str | None = None,
        *,
        now_ms: int | None = None,
    ) -> Call[int]:
        """Record a running job's progress (1), unless the claim whose fence token ``attempt``
        names (:attr:`ClaimedJob.fence`) is no longer this node's (-2)."""
        k = self.keys
        keys = [k.active(queue, node), k.events(queue), k.slot_guard(queue)]
        args: list[Arg] = [
            k.queue_prefix(queue),
            node,
            _now(now_ms),
            job_id,
            attempt,
            repr(float(fraction)),
            message or "",
            self.limits.events_cap(queue),
        ]
        return Call(ScriptName.PROGRESS, keys, args, int, queue)

    def idle(
        self,
        queue: str,
        node: str,
        mode: str = "arm",
        *,
        now_ms: int | None = None,
        known_due_ms: int | None = None,
    ) -> Call[int]:
        """A node's wake-up token for ``queue`` (lua/idle.lua). ``arm``: 1 = work is waiting, or
        a job is scheduled earlier than ``known_due_ms`` (the earliest run time the node's last
        claim reported; None = it knows of none): claim again; 0 = the token is registered and
        the next job made ready wakes this node; ``pass``: wake the next idle node while ready
        work is left (the number woken); ``leave``: drop the token."""
        k = self.keys
        keys = [k.ready(queue), k.scheduled(queue), k.idle(queue), k.paused(queue), k.slot_guard(queue)]
        known = -1 if known_due_ms is None else known_due_ms
        args: list[Arg] = [k.queue_prefix(queue), node, _now(now_ms), mode, known]
        return Call(ScriptName.IDLE, keys, args, int, queue)

    # -- admin ----------------------------------------------------------------------------------
    def cancel(self, queue: str, job_id: str, *, now_ms: int | None = None) -> Call[int]:
        k = self.keys
        keys = [
            k.ready(queue),
            k.scheduled(queue),
            k.dead(queue),
            k.finished(queue),
            k.leases(queue),
            k.events(queue),
            k.slot_guard(queue),
        ]
        args: list[Arg] = [
            k.queue_prefix(queue),
            job_id,
            _now(now_ms),
            self.limits.retention_ms,
            self.limits.events_cap(queue),
        ]
        return Call(ScriptName.CANCEL, keys, args, int, queue)

    def retry_dead(
        self,
        queue: str,
        job_ids: Sequence[str] | None = None,
        *,
        limit: int = MAX_BATCH,
        now_ms: int | None = None,
    ) -> Call[int]:
        k = self.keys
        ids = list(job_ids or [])
        keys = [k.dead(queue), k.ready(queue), k.seq(queue), k.events(queue), k.slot_guard(queue)]
        args: list[Arg] = [
            k.queue_prefix(queue),
            _now(now_ms),
            limit,
            len(ids),
            *ids,
            self.limits.events_cap(queue),
        ]
        return Call(ScriptName.RETRY_DEAD, keys, args, int, queue)

    def purge(self, queue: str, which: str, *, limit: int = MAX_SCAN) -> Call[int]:
        """Delete up to ``limit`` jobs of ``which`` in {ready, scheduled, dead, finished}."""
        k = self.keys
        sets = {
            "ready": k.ready(queue),
            "scheduled": k.scheduled(queue),
            "dead": k.dead(queue),
            "finished": k.finished(queue),
        }
        if which not in sets:
            raise errors.InvalidInput(f"state: cannot purge {which!r}", "state")
        return Call(
            ScriptName.PURGE, [sets[which], k.slot_guard(queue)], [k.queue_prefix(queue), limit], int, queue
        )


# -- error mapping -------------------------------------------------------------------------------
_BADARG_ERRORS: dict[str, type[errors.InvalidInput]] = {
    "priority": errors.InvalidPriority,
    "delay": errors.InvalidDelay,
    "retry_backoff": errors.InvalidRetryBackoff,
    "run_at": errors.InvalidRunAt,
    "deadline": errors.InvalidDeadline,
    "max_attempts": errors.InvalidMaxAttempts,
    "timeout": errors.InvalidTimeout,
    "unique_key": errors.InvalidUniqueKey,
    "id": errors.InvalidJobId,
    "task": errors.InvalidTaskName,
}


def _script_command(script: str, msg: str) -> str:
    """The command on the script line a Redis error names (``@user_script:40`` -> ``'TIME'``)."""
    m = re.search(r"@user_script:(\d+)", msg)
    try:
        line = source(ScriptName(script)).splitlines()[int(m.group(1)) - 1] if m else ""
    except (ValueError, IndexError):
        line = ""
    cmd = re.search(r"(?:rcall|redis\.p?call)\(\s*['\"]([A-Za-z]+)['\"]", line)
    return f"'{cmd.group(1).lower()}'" if cmd else "a command (or key/channel) it needs"


def map_error(exc: BaseException, script: str = "", queue: str = "") -> BaseException:
    """Turn a redis-py exception into the matching :mod:`jobq.errors` exception."""
    where = f"{script} on queue {queue!r}" if queue else script or "redis call"
    msg = str(exc)
    if isinstance(exc, errors.JobqError):
        return exc
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or msg.startswith("OOM"):
        return errors.RedisOutOfMemory(f"{where}: Redis is out of memory (maxmemory); not written")
    if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError)):
        return errors.RedisAuthError(f"{where}: {msg}")
    if isinstance(exc, redis.exceptions.AuthorizationError) or msg.startswith(
        ("NOAUTH", "WRONGPASS", "NOPERM")
    ):
        return errors.RedisAuthError(f"{where}: {msg}")
    if "user executing the script can't" in msg:
        return errors.RedisAuthError(
            f"{where}: NOPERM: the Redis ACL user has no permission to run {_script_command(script, msg)} "
            "inside the script (grant the commands of the jobq ACL: docs/redis.md)"
        )
    if isinstance(exc, redis.exceptions.BusyLoadingError) or msg.startswith("BUSY"):
        return errors.RedisBusy(f"{where}: Redis is busy: {msg}")
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)):
        return errors.RedisUnavailable(f"{where}: Redis unavailable: {msg}", refused=refused(exc))
    if isinstance(exc, redis.exceptions.RedisClusterException) and "cannot be connected" in msg:
        # No seed node (nor any node learnt from them) answers: as a standalone server that is
        # down, the caller retries until the cluster answers.
        return errors.RedisUnavailable(f"{where}: Redis Cluster unreachable: {msg}", refused=refused(exc))
    if isinstance(exc, redis.exceptions.ResponseError) and "BADARG" in msg:
        detail = msg[msg.index("BADARG") + 7 :]
        fld = detail.split(" ", 1)[0]
        cls = _BADARG_ERRORS.get(fld)
        if cls is not None:
            return cls(f"{fld}: {detail.split(' ', 1)[-1]}")
        return errors.ScriptError(f"{where}: refused its arguments: {detail}")
    if _slot_unavailable(exc, msg):
        return errors.RedisUnavailable(
            f"{where}: the queue's Redis Cluster slot is moving or down, try again: "
            f"{type(exc).__name__}: {msg}",
            refused=True,  # for every client of the queue alike, as when Redis is down
            slot=True,
        )
    if isinstance(exc, redis.exceptions.RedisError):
        return errors.ScriptError(f"{where}: {type(exc).__name__}: {msg}")
    return exc


#: Replies of a Redis Cluster whose slot is being migrated or has no serving primary. redis-py
#: follows MOVED and ASK and retries TRYAGAIN itself; these reach jobq when it gave up ("TTL
#: exhausted") or a script met a key already moved. Transient: the call may be sent again.
_CLUSTER_REPLIES = ("TRYAGAIN ", "CLUSTERDOWN ", "MOVED ", "ASK ")
_CLUSTER_ERRORS = (redis.exceptions.ClusterError, redis.exceptions.TryAgainError, redis.exceptions.AskError)


def _slot_unavailable(exc: BaseException, msg: str) -> bool:
    if isinstance(exc, _CLUSTER_ERRORS):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and (
        msg.startswith(_CLUSTER_REPLIES) or "Script attempted to access a non local key" in msg
    )


# -- execution -----------------------------------------------------------------------------------
def _check_replicated(call: Call[Any], acked: Any) -> None:
    """Durable mode: an enqueue no replica acknowledged raises (the caller may retry it with the
    same job id); an ack only logs, since the job has run and must not run again for it."""
    want, timeout_ms = call.wait
    got = acked if isinstance(acked, int) else -1
    if got >= want:
        return
    msg = (
        f"{call.script.value} on queue {call.queue!r}: written to the primary but acknowledged by "
        f"{max(got, 0)} of {want} replica(s) within {timeout_ms} ms; a failover now may lose it"
    )
    if call.script is ScriptName.ENQUEUE:
        raise errors.NotReplicated(msg)
    logging.getLogger("jobq.storage.calls").warning("%s", msg)


def _is_cluster(client: Any) -> bool:
    from jobq.storage.clients import is_cluster_client

    return is_cluster_client(client)


def map_client_error(client: Any, exc: BaseException, script: str, queue: str) -> BaseException:
    """:func:`map_error` of an error raised by ``client`` for ``queue``: on a Redis Cluster
    client a connection error is the queue's shard's alone (``RedisUnavailable.shard``)."""
    return _shard_error(_is_cluster(client), exc, script, queue)


def _shard_error(cluster: bool, exc: BaseException, script: str, queue: str) -> BaseException:
    """:func:`map_error`; on a Redis Cluster client, a connection error is the error of the one
    primary the call went to (``RedisUnavailable(shard=True)``): other queues may be served."""
    mapped = map_error(exc, script, queue)
    if cluster and isinstance(mapped, errors.RedisUnavailable) and queue:
        mapped.shard = True
    return mapped


SyncClient = Any  # redis.Redis | redis.cluster.RedisCluster
AsyncClient = Any  # redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


class SyncRunner:
    """Runs calls on a synchronous redis-py client (standalone or cluster).

    A call is one bare ``EVALSHA`` through ``execute_command`` (routed by its keys on a cluster),
    without redis-py's ``Script`` wrapper in the way. NOSCRIPT means the call did not run: the
    script is loaded and the EVALSHA sent again; if a SCRIPT FLUSH lands between the two, EVAL of
    the same static file's text cannot miss."""

    def __init__(self, client: SyncClient) -> None:
        self.client = client
        self._cluster = _is_cluster(client)
        self._scripts = {n: client.register_script(source(n)) for n in ScriptName}
        self._shas: dict[ScriptName, str] = {n: str(s.sha) for n, s in self._scripts.items()}
        #: A standalone (or Sentinel) client on a connection pool: calls go straight to a pooled
        #: connection (:meth:`_send_all`), skipping redis-py's per-command machinery.
        self._direct = isinstance(client, redis.Redis) and getattr(client, "connection", None) is None
        #: Connections this runner took from the pool and keeps between calls (see :meth:`_conn`).
        self._idle: list[Any] = []
        self._idle_pid = os.getpid()

    def _map(self, exc: BaseException, script: str = "", queue: str = "") -> BaseException:
        return _shard_error(self._cluster, exc, script, queue)

    def sha(self, name: ScriptName) -> str:
        """The EVALSHA digest this runner sends for ``name``."""
        return self._shas[name]

    def run(self, call: Call[T]) -> T:
        if call.wait[0] > 0:
            return self._run_wait(call)
        if self._direct:
            try:
                raw = self._send_all([call])[0][0]
                if isinstance(raw, redis.exceptions.NoScriptError):
                    raw = self._reload_and_run(call)  # did not run: loaded, then run once
            except Exception as exc:
                raise self._map(exc, call.script.value, call.queue) from None
            if isinstance(raw, Exception):
                raise self._map(raw, call.script.value, call.queue) from None
            return call.parse(raw)
        try:
            raw = self.client.execute_command(
                "EVALSHA", self._shas[call.script], len(call.keys), *call.keys, *call.args
            )
        except redis.exceptions.NoScriptError:
            try:
                raw = self._reload_and_run(call)
            except Exception as exc:
                raise self._map(exc, call.script.value, call.queue) from None
        except Exception as exc:
            raise self._map(exc, call.script.value, call.queue) from None
        return call.parse(raw)

    def _load(self, name: ScriptName) -> None:
        self.client.script_load(self._scripts[name].script)

    def _reload_and_run(self, call: Call[Any]) -> Any:
        if self._cluster:
            # SCRIPT LOAD on a cluster goes to every primary, and fails while one is down: EVAL
            # goes to the queue's own primary only (and caches the script there, like a load).
            script = self._scripts[call.script]
            return self.client.eval(script.script, len(call.keys), *call.keys, *call.args)
        self._load(call.script)
        try:
            return self.client.execute_command(
                "EVALSHA", self._shas[call.script], len(call.keys), *call.keys, *call.args
            )
        except redis.exceptions.NoScriptError:
            # SCRIPT FLUSH between the load and the retry: EVAL (the same static file's text)
            # cannot miss. NOSCRIPT means the call did not run.
            script = self._scripts[call.script]
            return self.client.eval(script.script, len(call.keys), *call.keys, *call.args)

    def _call(self, call: Call[Any]) -> Any:
        """One call, raw reply, redis-py exceptions unmapped."""
        try:
            return self.client.execute_command(
                "EVALSHA", self._shas[call.script], len(call.keys), *call.keys, *call.args
            )
        except redis.exceptions.NoScriptError:
            return self._reload_and_run(call)

    def _run_wait(self, call: Call[T]) -> T:
        """The script and ``WAIT`` pipelined on one connection (``WAIT`` counts the replicas
        that have every write of *its* connection)."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                self._scripts[call.script](keys=call.keys, args=call.args, client=pipe)
                pipe.execute_command("WAIT", *call.wait)
                raw, acked = pipe.execute(raise_on_error=False)
        except Exception as exc:
            raise self._map(exc, call.script.value, call.queue) from None
        if isinstance(raw, Exception):
            raise self._map(raw, call.script.value, call.queue)
        out = call.parse(raw)
        _check_replicated(call, acked)
        return out

    def run_many(self, calls: Sequence[Call[Any]], *, return_exceptions: bool = False) -> list[Any]:
        """Run calls in one pipelined round trip (not a transaction: each script is atomic on
        its own). Raises the first error after every call has run, or with
        ``return_exceptions`` puts each call's (mapped) error in its place in the result.

        The pipeline carries bare EVALSHAs: redis-py's pipelined ``Script`` would first send a
        ``SCRIPT EXISTS`` round trip. A call answered NOSCRIPT did not run, so only those calls
        are sent again, through ``Script`` (which loads the script)."""
        if len(calls) == 1 and not return_exceptions:
            return [self.run(calls[0])]
        try:
            pipe = self.client.pipeline(transaction=False)
            for c in calls:
                # execute_command, not pipe.evalsha(): redis-py's cluster pipeline blocks the latter
                # by name but routes a plain EVALSHA by its keys like any keyed command.
                pipe.execute_command("EVALSHA", self._scripts[c.script].sha, len(c.keys), *c.keys, *c.args)
            raws = pipe.execute(raise_on_error=False)
        except Exception as exc:
            first = self._map(exc, calls[0].script.value, calls[0].queue)
            if not (self._cluster and return_exceptions and isinstance(first, errors.RedisUnavailable)):
                raise first from None
            # One primary of the cluster failed the whole pipeline: each call on its own, so the
            # queues of the other primaries get their results (re-sending is safe: enqueue is
            # idempotent by job id, ack and fail are fenced by ownership).
            return [self._run_caught(c) for c in calls]
        out = []
        for c, raw in zip(calls, raws, strict=True):
            if isinstance(raw, redis.exceptions.NoScriptError):
                try:
                    raw = self._call(c)
                except Exception as exc:
                    raw = exc
            if isinstance(raw, Exception):
                mapped = self._map(raw, c.script.value, c.queue)
                if not return_exceptions:
                    raise mapped
                out.append(mapped)
                continue
            try:
                out.append(c.parse(raw))
            except errors.JobqError as exc:  # a reply that means an error (QueueFull)
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    def _run_caught(self, call: Call[Any]) -> Any:
        try:
            return self.run(call)
        except errors.JobqError as exc:
            return exc

    def run_batch(self, calls: Iterable[Call[Any]]) -> list[Any]:
        """Run calls in one pipelined round trip, written to the connection in one send and
        packed by hiredis directly (redis-py's pipeline first walks every argument in Python).
        Each result is the parsed reply or the call's (mapped) exception, in order. Not a
        transaction: each script is atomic on its own.

        Durable mode: one ``WAIT`` after the last call covers them all (it counts the replicas
        that have every write of this connection); an enqueue no replica acknowledged raises
        :class:`jobq.errors.NotReplicated` after the results are in.

        A connection error is retried like a redis-py pipeline: everything is sent again (safe
        for enqueue: a stored job id is a no-op). A Redis Cluster client takes the pipelined
        path of :meth:`run_many` instead (its pipeline routes each call to its node)."""
        calls = list(calls)
        if not self._direct:
            return self.run_many(calls, return_exceptions=True)
        try:
            raws, acked = self._send_all(calls)
        except Exception as exc:
            raise self._map(exc, calls[0].script.value, calls[0].queue) from None
        out: list[Any] = []
        for c, raw in zip(calls, raws, strict=True):
            if isinstance(raw, redis.exceptions.NoScriptError):
                try:
                    raw = self._call(c)  # did not run: loaded, then run once
                except Exception as exc:
                    raw = exc
            if isinstance(raw, Exception):
                out.append(self._map(raw, c.script.value, c.queue))
                continue
            try:
                out.append(c.parse(raw))
            except errors.JobqError as exc:  # a reply that means an error (QueueFull)
                out.append(exc)
        if acked is not None:
            waited = next(c for c in calls if c.wait[0] > 0)
            _check_replicated(waited, acked)
        return out

    def _send_all(self, calls: list[Call[Any]]) -> tuple[list[Any], Any]:
        shas = self._shas
        wait = max((c.wait for c in calls), default=(0, 0))
        packed: list[bytes] = []
        for c in calls:
            packed.append(_pack("EVALSHA", shas[c.script], len(c.keys), *c.keys, *c.args))
        if wait[0] > 0:
            packed.append(_pack("WAIT", *wait))
        data = [b"".join(packed)]
        conn = self._conn()

        def read() -> Any:
            try:
                return conn.read_response()
            except redis.exceptions.ResponseError as exc:
                return exc

        def attempt() -> tuple[list[Any], Any]:
            conn.send_packed_command(data)
            raws = [read() for _ in calls]
            return raws, (read() if wait[0] > 0 else None)

        done = False
        try:
            result: tuple[list[Any], Any] = conn.retry.call_with_retry(
                attempt, lambda _err: conn.disconnect()
            )
            done = True
            return result
        finally:
            if not done:
                conn.disconnect()  # replies may be unread: it reconnects before its next use
            self._idle.append(conn)

    def _conn(self) -> Any:
        """A connection for one call: one this runner used before, else a new one from the pool.

        redis-py's pool costs about 10 us per checkout and return (a lock, pid check,
        observability counters, events): a tenth of a whole enqueue on loopback. The runner
        keeps the connections it took instead (``list.pop``/``append`` are atomic, so threads
        may share the runner; each call holds its connection alone) and checks each one as the
        pool would before handing it out (:func:`_ready`).
        The pool still owns them: closing the client disconnects them, and a forked child
        drops its parent's."""
        if self._idle_pid != os.getpid():
            self._idle, self._idle_pid = [], os.getpid()
        pool = self.client.connection_pool
        try:
            conn = self._idle.pop()
        except IndexError:
            return pool.get_connection()
        try:
            _ready(conn)
        except BaseException:
            conn.disconnect()
            self._idle.append(conn)
            raise
        return conn


def _ready(conn: Any) -> None:
    """Make a kept connection ready to send, as redis-py's pool does at checkout: connected,
    with no unread data and not closed by the server (either makes it readable), else
    reconnected."""
    conn.connect()  # a no-op when connected; a failed connect raises (it is not tried twice)
    try:
        if not conn.can_read():
            return
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        pass
    conn.disconnect()
    conn.connect()


def _pack(*args: Any) -> bytes:
    """One command in the Redis protocol (hiredis; str, bytes, int and float arguments)."""
    try:
        return bytes(hiredis.pack_command(args))
    except TypeError as exc:
        raise errors.ScriptError(f"cannot send argument: {exc}") from None


class AsyncRunner:
    """Runs calls on an asyncio redis-py client (standalone or cluster); bare EVALSHA with the
    NOSCRIPT handling of :class:`SyncRunner`."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._cluster = _is_cluster(client)
        self._scripts = {n: client.register_script(source(n)) for n in ScriptName}
        self._shas: dict[ScriptName, str] = {n: str(s.sha) for n, s in self._scripts.items()}

    def _map(self, exc: BaseException, script: str = "", queue: str = "") -> BaseException:
        return _shard_error(self._cluster, exc, script, queue)

    def sha(self, name: ScriptName) -> str:
        return self._shas[name]

    async def run(self, call: Call[T]) -> T:
        if call.wait[0] > 0:
            return await self._run_wait(call)
        try:
            raw = await self.client.execute_command(
                "EVALSHA", self._shas[call.script], len(call.keys), *call.keys, *call.args
            )
        except redis.exceptions.NoScriptError:
            try:
                raw = await self._reload_and_run(call)
            except Exception as exc:
                raise self._map(exc, call.script.value, call.queue) from None
        except Exception as exc:
            raise self._map(exc, call.script.value, call.queue) from None
        return call.parse(raw)

    async def _reload_and_run(self, call: Call[Any]) -> Any:
        script = self._scripts[call.script]
        if self._cluster:
            # See SyncRunner._reload_and_run: SCRIPT LOAD would go to every primary.
            return await self.client.eval(script.script, len(call.keys), *call.keys, *call.args)
        await self.client.script_load(script.script)
        try:
            return await self.client.execute_command(
                "EVALSHA", self._shas[call.script], len(call.keys), *call.keys, *call.args
            )
        except redis.exceptions.NoScriptError:
            # See SyncRunner._reload_and_run: flushed between the load and the retry.
            return await self.client.eval(script.script, len(call.keys), *call.keys, *call.args)

    async def _call(self, call: Call[Any]) -> Any:
        """One call, raw reply, redis-py exceptions unmapped."""
        try:
            return await self.client.execute_command(
                "EVALSHA", self._shas[call.script], len(call.keys), *call.keys, *call.args
            )
        except redis.exceptions.NoScriptError:
            return await self._reload_and_run(call)

    async def _run_wait(self, call: Call[T]) -> T:
        try:
            # ``async with``: the pipeline gives its connection back even when execute raises
            async with self.client.pipeline(transaction=False) as pipe:
                await self._scripts[call.script](keys=call.keys, args=call.args, client=pipe)
                pipe.execute_command("WAIT", *call.wait)
                raw, acked = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            raise self._map(exc, call.script.value, call.queue) from None
        if isinstance(raw, Exception):
            raise self._map(raw, call.script.value, call.queue)
        out = call.parse(raw)
        _check_replicated(call, acked)
        return out

    async def run_batch(self, calls: Iterable[Call[Any]]) -> list[Any]:
        """:meth:`SyncRunner.run_batch` from an event loop: the calls pipelined in one round
        trip (on a cluster, one per node), each result the parsed reply or the call's (mapped)
        exception, in order; durable mode adds one ``WAIT`` after the last call."""
        calls = list(calls)
        wait = max((c.wait for c in calls), default=(0, 0))
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for c in calls:
                    pipe.execute_command("EVALSHA", self._shas[c.script], len(c.keys), *c.keys, *c.args)
                if wait[0] > 0:
                    pipe.execute_command("WAIT", *wait)
                raws = list(await pipe.execute(raise_on_error=False))
        except Exception as exc:
            raise map_error(exc, calls[0].script.value, calls[0].queue) from None
        acked = raws.pop() if wait[0] > 0 else None
        out: list[Any] = []
        for c, raw in zip(calls, raws, strict=True):
            if isinstance(raw, redis.exceptions.NoScriptError):
                try:
                    raw = await self._call(c)  # did not run: loaded, then run once
                except Exception as exc:
                    raw = exc
            if isinstance(raw, Exception):
                out.append(map_error(raw, c.script.value, c.queue))
                continue
            try:
                out.append(c.parse(raw))
            except errors.JobqError as exc:  # a reply that means an error (QueueFull)
                out.append(exc)
        if wait[0] > 0:
            waited = next(c for c in calls if c.wait[0] > 0)
            _check_replicated(waited, acked)
        return out
