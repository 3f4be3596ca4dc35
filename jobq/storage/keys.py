"""Every Redis key and channel name jobq uses is built here, and only here.

Key-space map (prefix ``jobq``, configurable with ``JobQ(prefix=...)``). Every key of one queue
carries the hash tag ``{<queue>}`` so that the whole queue lives in one Redis Cluster slot and each
Lua script of that queue runs on one node.

=================================  ======  ===============================================  =========
key                                type    holds                                            lifetime
=================================  ======  ===============================================  =========
``jobq:{q}:ready``                 ZSET    runnable job ids; score = (100 - priority)       permanent
                                           * 2^44 + seq, so higher priority first, FIFO
                                           within a priority, exact integers < 2^53
``jobq:{q}:scheduled``             ZSET    delayed and retry-backoff job ids;               permanent
                                           score = run-at, ms of the Redis clock
``jobq:{q}:job:<id>``              HASH    one job: task, payload (msgpack, opaque to       until
                                           Lua), priority, attempts, max_attempts,          finished
                                           timeout, deadline, state, node, timestamps,      + retention
                                           last error, result
``jobq:{q}:active:<node>``         ZSET    the job ids node ``<node>`` has claimed ->       while the
                                           claim time, ms (a ZSET: removing one id is       node lives
                                           O(log n), where a LIST's LREM was O(n))
``jobq:{q}:cancels:<node>``        SET     a node's jobs cancelled while they ran, until    1 day
                                           ran; emptied by its next lease renewal           renewal, 1 d
``jobq:{q}:leases``                ZSET    job id -> lease deadline, ms of the Redis        permanent
                                           clock; the reaper's index
``jobq:{q}:finished``              ZSET    finished (done or cancelled) job ids ->          PEXPIRE
                                           expiry ms; trimmed as jobs expire                = retention
``jobq:{q}:dead``                  ZSET    dead-letter job ids -> time of death, ms;        permanent
                                           bounded by count and age
``jobq:{q}:nodes``                 ZSET    nodes serving this queue -> last heartbeat ms    permanent
``jobq:{q}:seq``                   STRING  the queue's FIFO sequence counter                permanent
``jobq:{q}:unique:<key>``          STRING  an idempotency key -> the job id holding it      until the
                                                                                            job ends
``jobq:{q}:paused``                STRING  present while the queue is paused                by admin
``jobq:{q}:cron:<name>``           STRING  the last cron tick fired for entry <name>, ms    permanent
``jobq:{q}:epoch``                 STRING  random value set once by the workers serving q;  permanent
                                           a change means q's shard lost its data (the
                                           dataset epoch, checked per queue, so per shard)
``jobq:{q}:reap-lock``             STRING  once-per-interval guard for the reaper (load     PX
                                           saving only; reap is safe without it)
``jobq:{q}:events``                STREAM  lifecycle events (enqueued, started, progress,   MAXLEN ~
                                           retried, done, dead, cancelled, reaped, ...):    events_max
                                           type, id, t, task, attempt, ...; written by
                                           the scripts that change the state
``jobq:{q}:slot-guard``            none    never created: the last declared key of every    never
                                           queue script that builds keys itself, so Redis   exists
                                           Cluster refuses those scripts (TRYAGAIN) while
                                           the queue's slot is half moved
``jobq:queues``                    SET     every queue ever enqueued to (inspection; best   permanent
                                           effort: written after the job is stored, repaired
                                           by the heartbeats of the queue's workers)
``jobq:nodes``                     ZSET    every live node -> last heartbeat ms             permanent
``jobq:node:<node>``               HASH    a node's queues, concurrency, in-flight count    PX 3 leases
``jobq:epoch``                     STRING  no longer written (the epoch is per queue now)   permanent
``jobq:{q}:idle``                  ZSET    idle nodes' wake-up tokens: node id -> when it   popped by
                                           armed, ms (lua/idle.lua, lib wake_idle)          a wake-up
shard channel                      pubsub  "new work" for one node of queue q, or "cancel   n/a
``jobq:{q}:wake:<node>``                   <id>" (SPUBLISH: on the queue's shard)
channel ``jobq:{q}:wake``          pubsub  "new work" from producers of earlier versions    n/a
                                           (PUBLISH to every idle node); still heard
``jobq:{q}:cancels:<node>``       SET     ids of the node's jobs cancelled while they ran,  1 day
                                           its next lease renewal hears them (cancel.lua)
=================================  ======  ===============================================  =========

Lua scripts receive the queue's key prefix (``jobq:{q}:``) as an argument and build the per-job
keys (``job:<id>``, ``active:<node>``, ``unique:<key>``) from it. Those keys are always inside the
queue's hash tag, so they live in the same cluster slot as the declared keys. Those scripts
also declare the slot guard, a key that never exists: while the slot moves between primaries a
declared key is missing on both sides, and Redis refuses the script instead of running it where
only some of its per-job keys are (see lua/lib/common.lua).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobq.errors import InvalidQueueName, InvalidTaskName

#: Queue names: letters, digits and ``. _ - /``; no braces (hash tags), colons (key
#: separators), whitespace or control characters. ``#`` appears only in a shard suffix ``#N``
#: (``hot#0`` .. ``hot#2`` are the shards of ``JobQ(shards={"hot": 3})``).
_QUEUE_RE = re.compile(r"^[A-Za-z0-9._\-/]{1,128}(#[0-9]{1,4})?$")
#: Task names: printable, no whitespace or control characters; dotted paths and ``module:attr``.
_TASK_RE = re.compile(r"^[A-Za-z0-9._\-:/<>]{1,200}$")
#: Node ids: as queue names, up to 128 characters.
_NODE_RE = re.compile(r"^[A-Za-z0-9._\-/]{1,128}$")

MAX_QUEUE_NAME = 128


def validate_queue(name: object) -> str:
    """Return ``name`` if it is a valid queue name, else raise :class:`InvalidQueueName`."""
    if not isinstance(name, str):
        raise InvalidQueueName(f"queue: must be a string, got {type(name).__name__}")
    if not _QUEUE_RE.fullmatch(name):  # fullmatch: "$" would accept a trailing newline
        raise InvalidQueueName(
            f"queue: {name[:140]!r} is not a valid queue name (1-{MAX_QUEUE_NAME} characters of "
            "A-Z a-z 0-9 . _ - /, optionally a shard suffix #N; no braces, colons, spaces or "
            "control characters)"
        )
    return name


def validate_task_name(name: object) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`InvalidTaskName`."""
    if not isinstance(name, str):
        raise InvalidTaskName(f"task: must be a string, got {type(name).__name__}")
    if not _TASK_RE.fullmatch(name):
        raise InvalidTaskName(
            f"task: {name[:210]!r} is not a valid task name (1-200 characters of "
            "A-Z a-z 0-9 . _ - : / < >; no spaces or control characters)"
        )
    return name


def validate_node(name: str) -> str:
    """Return ``name`` if it is a valid node id, else raise ``ValueError``."""
    if not _NODE_RE.fullmatch(name):
        raise ValueError(f"node id: {name!r} must be 1-128 characters of A-Z a-z 0-9 . _ - /")
    return name


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder bound to one prefix. ``Keys("jobq").ready("emails") == "jobq:{emails}:ready"``."""

    prefix: str = "jobq"

    # -- per-queue keys (all inside the queue's hash tag) ---------------------------------------
    def queue_prefix(self, q: str) -> str:
        """The prefix every key of queue ``q`` starts with; Lua builds per-job keys from it."""
        return f"{self.prefix}:{{{q}}}:"

    def ready(self, q: str) -> str:
        """ZSET of runnable job ids, ordered by priority then FIFO sequence."""
        return f"{self.prefix}:{{{q}}}:ready"

    def scheduled(self, q: str) -> str:
        """ZSET of delayed job ids scored by run-at ms."""
        return f"{self.prefix}:{{{q}}}:scheduled"

    def job(self, q: str, job_id: str) -> str:
        """HASH holding one job."""
        return f"{self.prefix}:{{{q}}}:job:{job_id}"

    def active(self, q: str, node: str) -> str:
        """ZSET of the job ids ``node`` has claimed from ``q`` (score = claim time, ms)."""
        return f"{self.prefix}:{{{q}}}:active:{node}"

    def acked(self, q: str, node: str) -> str:
        """ZSET of ``node``'s recent ack calls on ``q`` whose jobs were deleted at once (retention
        0), so a re-sent call is told from a new one; built by the ack script, kept 60 s."""
        return f"{self.prefix}:{{{q}}}:acked:{node}"

    def active_upgrade(self, q: str, node: str) -> str:
        """A ZSET built from an active LIST of a jobq from before the active ZSET, then renamed
        over it (jobq.worker.reaper.recover_inherited)."""
        return f"{self.prefix}:{{{q}}}:active-upgrade:{node}"

    def leases(self, q: str) -> str:
        """ZSET job id -> lease deadline ms."""
        return f"{self.prefix}:{{{q}}}:leases"

    def finished(self, q: str) -> str:
        """ZSET of finished job ids -> expiry ms."""
        return f"{self.prefix}:{{{q}}}:finished"

    def dead(self, q: str) -> str:
        """ZSET of dead-letter job ids -> time of death ms."""
        return f"{self.prefix}:{{{q}}}:dead"

    def queue_nodes(self, q: str) -> str:
        """ZSET node id -> last heartbeat ms, for nodes serving ``q``."""
        return f"{self.prefix}:{{{q}}}:nodes"

    def seq(self, q: str) -> str:
        """STRING counter giving FIFO order within a priority."""
        return f"{self.prefix}:{{{q}}}:seq"

    def unique(self, q: str, key: str) -> str:
        """STRING idempotency key -> job id."""
        return f"{self.prefix}:{{{q}}}:unique:{key}"

    def paused(self, q: str) -> str:
        """STRING present while ``q`` is paused."""
        return f"{self.prefix}:{{{q}}}:paused"

    def cron(self, q: str, name: str) -> str:
        """STRING: the last tick (ms) fired for cron entry ``name`` into ``q``."""
        return f"{self.prefix}:{{{q}}}:cron:{name}"

    def queue_epoch(self, q: str) -> str:
        """STRING set once per queue; a change means the queue's shard lost its data."""
        return f"{self.prefix}:{{{q}}}:epoch"

    def reap_lock(self, q: str) -> str:
        """STRING once-per-interval reaper guard (saves load; not needed for correctness)."""
        return f"{self.prefix}:{{{q}}}:reap-lock"

    def events(self, q: str) -> str:
        """STREAM of ``q``'s lifecycle events, written by the scripts that change a job's state
        and capped near ``events_max`` entries (``XADD MAXLEN ~``); see docs/events.md."""
        return f"{self.prefix}:{{{q}}}:events"

    def slot_guard(self, q: str) -> str:
        """A key that is never created, declared last by every queue script that builds per-job
        keys: Redis Cluster refuses such a script (TRYAGAIN) while ``q``'s slot is half moved."""
        return f"{self.prefix}:{{{q}}}:slot-guard"

    def idle(self, q: str) -> str:
        """ZSET of the wake-up tokens of ``q``'s idle nodes: node id -> when it armed, ms."""
        return f"{self.prefix}:{{{q}}}:idle"

    def wake_all(self, q: str) -> str:
        """Classic pub/sub channel the scripts of jobq before the wake-up tokens ``PUBLISH`` to
        (every idle node of ``q``): a node still listens, so older producers wake it too."""
        return f"{self.prefix}:{{{q}}}:wake"

    def cancels(self, q: str, node: str) -> str:
        """SET of the ids of ``node``'s jobs cancelled while they ran, until its next renewal."""
        return f"{self.prefix}:{{{q}}}:cancels:{node}"

    def done(self, q: str) -> str:
        """Pub/sub channel on which ack and fail announce the id of a finished job someone
        waits for (one whose :meth:`waiter` key exists)."""
        return f"{self.prefix}:{{{q}}}:done"

    def waiter(self, q: str, job_id: str) -> str:
        """STRING with a TTL: a caller waits for this job's result (``job.result()``), so its
        completion is announced on :meth:`done`. Never set for jobs nobody waits for."""
        return f"{self.prefix}:{{{q}}}:wait:{job_id}"

    def wake(self, q: str, node: str) -> str:
        """Shard pub/sub channel (SSUBSCRIBE/SPUBLISH) telling ``node`` of new work in ``q``;
        inside ``q``'s hash tag, so in a cluster it lives on the shard that owns the queue."""
        return f"{self.prefix}:{{{q}}}:wake:{node}"

    # -- global keys (never touched by a queue script) ------------------------------------------
    @property
    def queues(self) -> str:
        """SET of every queue name enqueued to."""
        return f"{self.prefix}:queues"

    @property
    def nodes(self) -> str:
        """ZSET node id -> last heartbeat ms, across all queues."""
        return f"{self.prefix}:nodes"

    def node(self, node: str) -> str:
        """HASH describing one live node; expires when its heartbeats stop."""
        return f"{self.prefix}:node:{node}"

    @property
    def epoch(self) -> str:
        """STRING of earlier versions, no longer written: the dataset epoch is per queue now
        (:meth:`queue_epoch`), so a Redis Cluster checks each shard on its own."""
        return f"{self.prefix}:epoch"

    def all_queue_keys(self, q: str) -> list[str]:
        """The fixed (non per-job) keys of ``q``, for inspection and tests."""
        return [
            self.ready(q),
            self.scheduled(q),
            self.leases(q),
            self.finished(q),
            self.dead(q),
            self.queue_nodes(q),
            self.seq(q),
            self.paused(q),
            self.idle(q),
            self.events(q),
        ]
