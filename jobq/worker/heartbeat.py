"""The heartbeat: renews this node's leases on its own thread and its own connection.

It runs apart from the event loop so that a task blocking the loop cannot make the node lose its
leases. Every ``lease / 3`` it calls ``extend`` once per queue (pipelined), records the node in the
registry, and checks the dataset epoch. It reports back to the worker:

- jobs the worker runs that are no longer in the node's active list (the lease was reaped: the job
  is lost to this node and will never be acked here);
- jobs in the active list the worker does not know (a claim whose reply was lost), which are
  released after two beats;
- jobs cancelled while they ran here (``extend`` returns the ids ``cancel`` marked for this node:
  the fallback of the cancel notice, which a node cut off from Redis misses);
- self-fencing: when no renewal succeeded for ``lease - margin`` (partition), the node must stop
  claiming and treat its running jobs as lost before other nodes may take them. The fence says
  whether Redis itself is down (the last renewal was refused, or Redis answered LOADING/BUSY):
  then no other node can take the jobs either, and the reaper grace after the outage lets this
  node renew before anyone reaps, so running jobs need not be stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

from jobq.backoff import worth_a_line
from jobq.errors import JobqError, RedisBusy, RedisUnavailable
from jobq.storage import reads
from jobq.storage.calls import SyncRunner
from jobq.worker.context import Context
from jobq.worker.slots import SlotBackoff

log = logging.getLogger("jobq.heartbeat")

#: One registry update in this many (the first one included) also drops the entries of nodes
#: that died without deregistering and re-adds this node's queues to the queue registry: both
#: are repairs that need not run at every beat, and an idle node's commands per second count.
HOUSEKEEPING_EVERY = 6


def _installed_version() -> str:
    try:
        return metadata.version("jobq")
    except metadata.PackageNotFoundError:  # pragma: no cover - a tree never installed
        return "0+unknown"


#: The jobq version this node runs, recorded in its registry entry (the dashboard's nodes page
#: and ``jobq nodes`` show it: a fleet half-way through an upgrade is visible).
VERSION = _installed_version()


@dataclass
class BeatResult:
    """One beat's findings, per physical queue."""

    now_ms: int
    lost: dict[str, set[str]]
    unknown: dict[str, set[str]]
    #: Jobs of this node cancelled while they ran (not counted as lost).
    cancelled: dict[str, set[str]] = field(default_factory=dict)
    #: Lost id -> the fence token of the held run judged lost (when known): a run of a newer
    #: claim that replaced it meanwhile is not the one lost.
    fences: dict[str, int] = field(default_factory=dict)


class Heartbeat:
    """Runs :meth:`beat` every ``interval`` seconds on a daemon thread."""

    def __init__(
        self,
        app: Context,
        runner: SyncRunner,
        node: str,
        queues: list[str],
        lease_ms: int,
        *,
        known: Callable[[], dict[str, set[str]]],
        on_beat: Callable[[BeatResult], None],
        on_fence: Callable[[bool, bool], None],
        info: Callable[[], dict[str, str | int]],
        on_epoch_change: Callable[[], None] | None = None,
        on_queue_fence: Callable[[str, bool, bool], None] | None = None,
        fences: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.app = app
        self.runner = runner
        self.node = node
        self.queues = queues
        self.lease_ms = lease_ms
        self.interval = lease_ms / 3000
        self._known = known
        #: id -> the fence token of the claim each held run belongs to (ClaimedJob.fence).
        self._fences = fences or dict
        self._on_beat = on_beat
        self._on_fence = on_fence
        self._info = info
        self._on_epoch_change = on_epoch_change
        self._on_queue_fence = on_queue_fence
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: monotonic time of the last beat where every queue renewed.
        self.last_ok = time.monotonic()
        self.fenced = False
        #: Renewals refused in a row, per queue, because the queue's cluster slot was moving.
        self.slots = SlotBackoff("lease renewal", logger=log, recovered_level=logging.INFO)
        #: The fence is up because Redis is down for every client (see ``redis_down``).
        self.fenced_redis_down = False
        #: The last renewal failed in a way every client sees alike: connection refused (the
        #: server is not running) or LOADING/BUSY. False after a success or any other failure.
        self.redis_down = False
        self._fence_lock = threading.Lock()
        self.failures = 0
        self._unknown_prev: dict[str, set[str]] = {}
        #: queue -> the cancelled ids the last reply carried: named in the next renewal, which
        #: removes their marks (a reply lost on the way removes none).
        self._seen: dict[str, list[str]] = {}
        #: Per queue: the dataset epoch of its shard, as first seen (see _check_epochs).
        self.epochs: dict[str, bytes] = {}
        #: Per queue: monotonic time of its last renewal that succeeded, and, while its shard
        #: fails, whether the last failure was a refusal (down for every client alike).
        self.queue_last_ok: dict[str, float] = dict.fromkeys(queues, self.last_ok)
        self.queue_refused: dict[str, bool] = {}
        #: Queues fenced on their own (their shard failed while the others renewed) -> whether
        #: their shard refused (then running jobs go on, as when all of Redis is down).
        self.queue_fenced: dict[str, bool] = {}
        #: Redis time of the first beat (node clocks are never read for shared time).
        self.started_ms: int | None = None
        #: Registry updates made so far: every HOUSEKEEPING_EVERY-th also drops dead nodes'
        #: entries and repairs the queue registry (an idle node's cost: RELIABILITY S5).
        self._registrations = 0

    # -- thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"jobq-heartbeat-{self.node}")
        self._thread.daemon = True
        self._thread.start()
        # The fence must not wait for a renewal call stuck on a dead link (it can block for the
        # whole socket timeout, longer than the lease): a watchdog checks the clock on its own.
        watch = threading.Thread(target=self._watch, name=f"jobq-fence-{self.node}", daemon=True)
        watch.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.interval / 4)):
            self._check_fence()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.beat()
            except Exception:  # never let the heartbeat thread die
                log.exception("heartbeat failed")
            self._check_fence()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    # -- one beat -------------------------------------------------------------------------------
    def beat(self) -> BeatResult | None:
        """Renew every lease this node holds; return what was lost and what is unknown."""
        known_before = self._known()
        fences_before = self._fences()
        calls = [
            self.app.store.extend(
                q, self.node, self.lease_ms, now_ms=self.app.now_ms(), seen_cancels=self._seen.get(q, ())
            )
            for q in self.queues
        ]
        # Redis ran the renewal at some time after this: measuring silence from here is safe.
        sent = time.monotonic()
        try:
            # With several queues, each renewal's error comes back in its place: in a Redis
            # Cluster one queue's slot can be moving while the others answer.
            results = self.runner.run_many(calls, return_exceptions=len(calls) > 1)
            errs = [r for r in results if isinstance(r, BaseException)]
            if errs and (len(errs) == len(results) or not all(_shard_only(e) for e in errs)):
                raise next((e for e in errs if not _shard_only(e)), errs[0])
        except JobqError as exc:
            self.failures += 1
            self.redis_down = isinstance(exc, RedisBusy) or (
                isinstance(exc, RedisUnavailable) and exc.refused
            )
            if worth_a_line(self.failures):
                log.warning("lease renewal failed (%d in a row): %s", self.failures, exc)
            return None
        if self.failures:
            log.info("lease renewal recovered after %d failure(s)", self.failures)
        self.failures = 0
        self.redis_down = False
        self.last_ok = sent
        now_ms = next((r.now_ms for r in results if not isinstance(r, BaseException)), 0)
        known_after = self._known()
        fences_after = self._fences()
        lost: dict[str, set[str]] = {}
        lost_fences: dict[str, int] = {}
        unknown: dict[str, set[str]] = {}
        cancelled: dict[str, set[str]] = {}
        for q, res in zip(self.queues, results, strict=True):
            if isinstance(res, BaseException):
                # Only this queue's shard failed: its slot is moving (nothing can take its jobs
                # meanwhile: its reaper and claims are refused alike, the slot guard), or the
                # primary serving it is down or out of reach. The other queues go on; this one
                # is fenced on its own once its renewals stay silent too long (_check_fence).
                self.slots.refused(q, res)
                if not (isinstance(res, RedisUnavailable) and res.slot):
                    self.queue_refused[q] = isinstance(res, RedisUnavailable) and res.refused
                continue
            self.slots.ok(q)
            self.queue_last_ok[q] = sent
            self.queue_refused.pop(q, None)
            owned = set(res.owned)
            marked = set(res.cancelled)
            self._seen[q] = sorted(marked)
            if marked:
                cancelled[q] = marked
            # Lost: known before and after the call, yet not owned (nor cancelled). A job acked
            # meanwhile has left `known` by the time we look again.
            gone = (known_before.get(q, set()) & known_after.get(q, set())) - owned - marked
            # Owned, but by another claim than the one held (a newer claim of the job, whose reply
            # this node never saw): the held run is an older claim's, its lease is not its own.
            tokens = res.owned_tokens()
            older = {
                i
                for i in known_before.get(q, set()) & known_after.get(q, set()) & owned
                if tokens[i]
                and i in fences_before
                # The same run before and after the call (a claim replacing it meanwhile is
                # judged at the next beat), and not the claim Redis holds.
                and fences_before[i] == fences_after.get(i)
                and fences_before[i] != tokens[i]
            }
            if gone or older:
                lost[q] = gone | older
                lost_fences.update((i, fences_before[i]) for i in lost[q] if i in fences_before)
            strange = owned - known_before.get(q, set()) - known_after.get(q, set())
            # Unknown twice in a row: not a claim reply still on its way. Release it.
            confirmed = strange & self._unknown_prev.get(q, set())
            if confirmed:
                unknown[q] = confirmed
            self._unknown_prev[q] = strange - confirmed
        self._register(now_ms)
        self._check_epochs(
            [q for q, r in zip(self.queues, results, strict=True) if not isinstance(r, BaseException)]
        )
        result = BeatResult(now_ms, lost, unknown, cancelled, lost_fences)
        self._on_beat(result)
        return result

    def _register(self, now_ms: int) -> None:
        """The node registry for operators (jobq nodes), and this node's queues in the queue
        registry. Best effort: on a Redis Cluster these keys live in one slot, whose primary may
        be down while this node's queues are served."""
        k = self.app.keys
        if self.started_ms is None:
            self.started_ms = now_ms
        try:
            info = {
                "queues": ",".join(self.queues),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_ms": self.started_ms,
                "heartbeat_ms": now_ms,
                "version": VERSION,
                **self._info(),
            }
            # Killed nodes never deregister: entries as old as an expired node hash are dropped.
            reads.register_node(
                self.runner.client,
                k,
                self.node,
                info,
                now_ms=now_ms,
                ttl_ms=self.lease_ms * 3,
                queues=self.queues,
                housekeeping=self._registrations % HOUSEKEEPING_EVERY == 0,
            )
            self._registrations += 1
        except Exception as exc:
            log.debug("node registry update failed: %s", exc)

    def _check_epochs(self, queues: list[str]) -> None:
        """The dataset epoch, per queue (so per Redis Cluster shard): a queue whose epoch changed
        lives on a Redis that lost its data. One CRITICAL line per beat that finds any."""
        if not queues:
            return
        try:
            found = reads.queue_epochs(self.runner.client, self.app.keys, queues)
        except Exception as exc:
            log.debug("epoch check failed: %s", exc)
            return
        changed = []
        for q, epoch in found.items():
            if isinstance(epoch, Exception):
                continue
            before = self.epochs.get(q)
            self.epochs[q] = epoch
            if before is not None and before != epoch:
                changed.append(q)
        if changed:
            log.critical(
                "Redis dataset lost (epoch changed) for queue(s) %s: jobs stored before it are gone",
                ",".join(changed),
            )
            if self._on_epoch_change is not None:
                self._on_epoch_change()

    def _check_fence(self) -> None:
        with self._fence_lock:
            self._check_fence_locked()

    def _check_fence_locked(self) -> None:
        now = time.monotonic()
        silent = now - self.last_ok
        # Fence before the lease can run out: others may take the jobs once it has.
        margin = min(self.interval, self.lease_ms / 1000 / 6)
        should_fence = silent > self.lease_ms / 1000 - margin
        self._check_queue_fences(now, self.lease_ms / 1000 - margin)
        if should_fence and self.fenced and self.fenced_redis_down and not self.redis_down:
            # Redis was down, and now the failures are this node's own (a timeout, a reset):
            # harden the fence, as others may reach Redis and take the jobs.
            self.fenced_redis_down = False
            log.error("lease renewals now time out or drop, not refused: running jobs are treated as lost")
            self._on_fence(True, False)
        if should_fence != self.fenced:
            self.fenced = should_fence
            self.fenced_redis_down = should_fence and self.redis_down
            if should_fence and self.fenced_redis_down:
                log.error(
                    "no lease renewal for %.1f s, Redis refuses connections or is loading: fencing "
                    "this node (no claims; running jobs go on, their outcome kept only if Redis "
                    "still says they are this node's)",
                    silent,
                )
            elif should_fence:
                log.error(
                    "no lease renewal for %.1f s: fencing this node (no claims; running jobs "
                    "are treated as lost)",
                    silent,
                )
            else:
                log.warning("lease renewals succeed again: unfencing")
            self._on_fence(should_fence, self.fenced_redis_down)

    def _check_queue_fences(self, now: float, limit: float) -> None:
        """Per queue, on a Redis Cluster: a queue whose shard failed its renewals for ``limit``
        seconds while the other queues renewed is fenced alone (its claims stop, its running jobs
        are treated as lost, or go on when its shard refuses connections: nobody can take them
        then). A shard whose slot is only moving never fences (see beat)."""
        for q in self.queues:
            refused = self.queue_refused.get(q)
            fence = refused is not None and now - self.queue_last_ok.get(q, now) > limit
            was = self.queue_fenced.get(q)
            if fence and (was is None or (was and not refused)):
                self.queue_fenced[q] = bool(refused)
                if refused:
                    log.error(
                        "queue %s: no lease renewal for %.1f s, its Redis shard refuses connections: "
                        "fencing the queue (no claims from it; its running jobs go on, their outcome "
                        "kept only if Redis still says they are this node's); the other queues go on",
                        q,
                        now - self.queue_last_ok.get(q, now),
                    )
                else:
                    log.error(
                        "queue %s: no lease renewal for %.1f s: fencing the queue (no claims from it; "
                        "its running jobs are treated as lost); the other queues go on",
                        q,
                        now - self.queue_last_ok.get(q, now),
                    )
                if self._on_queue_fence is not None:
                    self._on_queue_fence(q, True, bool(refused))
            elif not fence and was is not None:
                del self.queue_fenced[q]
                log.warning("queue %s: lease renewals succeed again: unfencing the queue", q)
                if self._on_queue_fence is not None:
                    self._on_queue_fence(q, False, False)

    def deregister(self) -> None:
        """Remove this node from the registries on a clean exit."""
        k = self.app.keys
        try:
            reads.deregister_node(self.runner.client, k, self.node, self.queues)
        except Exception as exc:
            log.debug("node deregistration failed: %s", exc)


def _shard_only(exc: BaseException) -> bool:
    """An error of one queue's Redis Cluster shard alone (its slot moving or without a primary,
    or the primary serving it down or out of reach)."""
    return isinstance(exc, RedisUnavailable) and exc.shard
