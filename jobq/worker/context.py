"""The narrow context the worker's background components need from the app: its key names, its
script-call builder and its clock. :class:`jobq.JobQ` is one; so is any object with these three,
which is how the heartbeat and the reaper avoid depending on the public API; and the state a
node's components share (:class:`NodeState`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from jobq.storage.calls import AsyncRunner, Store
from jobq.storage.keys import Keys


class Context(Protocol):
    """Keys, script calls and the clock (``now_ms()``: the fake clock's time, None for Redis's)."""

    @property
    def keys(self) -> Keys: ...

    @property
    def store(self) -> Store: ...

    def now_ms(self) -> int | None: ...


@dataclass
class NodeState:
    """What a node's components share besides the held-jobs table: the async runner (set once
    the node connects), the stop and fence flags, and the times the maintenance loop reads."""

    runner: AsyncRunner | None = None
    #: No more claims: the node drains and exits.
    stopping: bool = False
    #: Lease renewals are failing: no claims, no new starts (jobq.worker.heartbeat).
    fenced: bool = False
    #: monotonic time of the last successful round trip through a script (health).
    last_ok: float = field(default_factory=time.monotonic)
    #: No reaper pass before this monotonic time (after an outage, live nodes renew first).
    reap_not_before: float = 0.0
    #: monotonic time a claim last promoted every queue's due jobs.
    promoted_at: float = 0.0
