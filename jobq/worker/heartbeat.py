"""The heartbeat: renews this node's leases on its own thread and its own connection.

It runs apart from the event loop so that a task blocking the loop cannot make the node lose its
leases. Every ``lease / 3`` it calls ``extend`` once per queue (pipelined), records the node in the
registry, and checks the dataset epoch. It reports back to the worker:

- jobs the worker runs that are no longer in the node's active list (the lease was reaped: the job
  is lost to this node and will never be acked here);
- jobs in the active list the worker does not know (a claim whose reply was lost), which are
  released after two beats;
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
from dataclasses import dataclass
from importlib import metadata

from jobq.backoff import worth_a_line
from jobq.errors import JobqError, RedisBusy, RedisUnavailable
from jobq.storage import reads
from jobq.storage.calls import SyncRunner
from jobq.worker.context import Context
from jobq.worker.slots import SlotBackoff

log = logging.getLogger("jobq.heartbeat")


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
    ) -> None:
        self.app = app
        self.runner = runner
        self.node = node
        self.queues = queues
        self.lease_ms = lease_ms
        self.interval = lease_ms / 3000
        self._known = known
        self._on_beat = on_beat
        self._on_fence = on_fence
        self._info = info
        self._on_epoch_change = on_epoch_change
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
        self.epoch: bytes | None = None
        #: Redis time of the first beat (node clocks are never read for shared time).
        self.started_ms: int | None = None

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
        calls = [
            self.app.store.extend(q, self.node, self.lease_ms, now_ms=self.app.now_ms()) for q in self.queues
        ]
        # Redis ran the renewal at some time after this: measuring silence from here is safe.
        sent = time.monotonic()
        try:
            # With several queues, each renewal's error comes back in its place: in a Redis
            # Cluster one queue's slot can be moving while the others answer.
            results = self.runner.run_many(calls, return_exceptions=len(calls) > 1)
            errs = [r for r in results if isinstance(r, BaseException)]
            if errs and (len(errs) == len(results) or not all(_slot_only(e) for e in errs)):
                raise next((e for e in errs if not _slot_only(e)), errs[0])
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
        lost: dict[str, set[str]] = {}
        unknown: dict[str, set[str]] = {}
        for q, res in zip(self.queues, results, strict=True):
            if isinstance(res, BaseException):
                # Only this queue's slot refused (moving to another primary). Nothing can take
                # its jobs meanwhile: its reaper and claims are refused alike (the slot guard).
                # So the node is not fenced for it; it renews the leases when the move is done.
                self.slots.refused(q, res)
                continue
            self.slots.ok(q)
            owned = set(res.owned)
            # Lost: known before and after the call, yet not owned. A job acked meanwhile has
            # left `known` by the time we look again.
            gone = (known_before.get(q, set()) & known_after.get(q, set())) - owned
            if gone:
                lost[q] = gone
            strange = owned - known_before.get(q, set()) - known_after.get(q, set())
            # Unknown twice in a row: not a claim reply still on its way. Release it.
            confirmed = strange & self._unknown_prev.get(q, set())
            if confirmed:
                unknown[q] = confirmed
            self._unknown_prev[q] = strange - confirmed
        self._register(now_ms)
        result = BeatResult(now_ms, lost, unknown)
        self._on_beat(result)
        return result

    def _register(self, now_ms: int) -> None:
        """The node registry for operators (jobq nodes) and the epoch check."""
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
            epoch = reads.register_node(
                self.runner.client, k, self.node, info, now_ms=now_ms, ttl_ms=self.lease_ms * 3
            )
        except Exception as exc:
            log.debug("node registry update failed: %s", exc)
            return
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            self.epoch = epoch
            log.critical("Redis dataset lost (epoch changed): jobs stored before it are gone")
            if self._on_epoch_change is not None:
                self._on_epoch_change()

    def _check_fence(self) -> None:
        with self._fence_lock:
            self._check_fence_locked()

    def _check_fence_locked(self) -> None:
        silent = time.monotonic() - self.last_ok
        # Fence before the lease can run out: others may take the jobs once it has.
        margin = min(self.interval, self.lease_ms / 1000 / 6)
        should_fence = silent > self.lease_ms / 1000 - margin
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

    def deregister(self) -> None:
        """Remove this node from the registries on a clean exit."""
        k = self.app.keys
        try:
            reads.deregister_node(self.runner.client, k, self.node, self.queues)
        except Exception as exc:
            log.debug("node deregistration failed: %s", exc)


def _slot_only(exc: BaseException) -> bool:
    """An error of one queue's Redis Cluster slot alone (moving, or without a primary)."""
    return isinstance(exc, RedisUnavailable) and exc.slot
