"""Lifecycle events: reading the per-queue event streams the Lua scripts write (docs/events.md).

Each queue has one Redis stream, ``jobq:{q}:events``, inside its hash tag. The script that
changes a job's state appends the event in the same atomic call (``lua/lib/common.lua`` emit),
so a change and its event are never apart. The stream is capped near ``events_max`` entries
(``XADD MAXLEN ~``; ``JobQ(events_max=0)`` writes none for a queue). This module reads them:
:meth:`jobq.JobQ.events` (async) and :meth:`jobq.JobQ.iter_events` (sync) are built on
:class:`EventReader`, and so are ``jobq events`` and ``GET /events``.

An event carries the job id, never its arguments; its error and message are masked as
the logs mask them (:func:`jobq.logs.redact`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from jobq import errors
from jobq.logs import redact
from jobq.storage import reads
from jobq.storage.keys import Keys, validate_queue
from jobq.storage.reads import StreamEntry


class EventSource(Protocol):
    """What the reader needs of a :class:`jobq.JobQ` (this module sits below the app)."""

    @property
    def keys(self) -> Keys: ...
    @property
    def client(self) -> Any: ...
    @property
    def aclient(self) -> Any: ...
    def queue_shards(self, queue: str) -> list[str]: ...


#: Every event type the scripts write, in a job's usual order.
EVENT_TYPES = (
    "enqueued",  # enqueue.lua: a new job (run_at_ms when scheduled for later)
    "promoted",  # claim.lua, promote.lua: a scheduled job became ready
    "started",  # claim.lua: a node took the job; attempt counted (node)
    "progress",  # progress.lua: jobq.current_job().progress() (fraction, message)
    "retried",  # fail.lua: the attempt failed, a retry is scheduled (error, run_at_ms)
    "done",  # ack.lua: finished
    "dead",  # fail.lua, claim.lua, reap.lua, release.lua: dead-lettered (error = the reason)
    "cancelled",  # cancel.lua (state = the state it was cancelled from)
    "reaped",  # reap.lua: its node stopped renewing the lease; back to ready (node)
    "released",  # release.lua: given back before it started (the attempt is not counted)
    "interrupted",  # release.lua: given back mid-run by a node shutdown
    "requeued",  # retry_dead.lua: a dead job put back to ready
)
#: Events one read returns at most per queue.
READ_COUNT = 500
#: How long one blocking read waits for a new event while following, ms (a Redis client's
#: socket timeout must stay longer).
BLOCK_MS = 1000
#: Redis Cluster with several queues: each queue is read on its own (its own slot), without a
#: blocking wait; this is the pause between two empty rounds, seconds.
CLUSTER_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class Event:
    """One lifecycle event of one job."""

    #: The stream entry id, ``"<ms>-<seq>"``: a cursor for ``since``.
    id: str
    queue: str
    type: str
    job_id: str
    #: When the change happened: ms of the clock the script used (the Redis clock).
    time_ms: int
    task: str | None = None
    attempt: int | None = None
    #: retried, dead: the error or reason (cut to 200 characters, secrets masked).
    error: str | None = None
    #: progress: 0..1, and the message if one was given.
    fraction: float | None = None
    message: str | None = None
    #: started, reaped: the node.
    node: str | None = None
    #: enqueued (scheduled for later), retried: when it runs.
    run_at_ms: int | None = None
    #: cancelled: the state it was cancelled from.
    state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready values; fields without a value are left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


def _int(v: str | None) -> int | None:
    try:
        return None if v is None else int(v)
    except ValueError:
        return None


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


def event_of(entry: StreamEntry) -> Event:
    """An :class:`Event` from a stream entry (fields as lua/lib/common.lua emit writes them)."""
    queue, entry_id, f = entry
    error, message = f.get("error"), f.get("message")
    return Event(
        id=entry_id,
        queue=queue,
        type=f.get("type", ""),
        job_id=f.get("id", ""),
        time_ms=_int(f.get("t")) or int(entry_id.partition("-")[0] or 0),
        task=f.get("task") or None,
        attempt=_int(f.get("attempt")),
        # The first line: a task's stored error continues with its traceback (cut by the script).
        error=None if error is None else redact(error.partition("\n")[0]),
        fraction=_float(f.get("fraction")),
        message=redact(message) if message else None,
        node=f.get("node") or None,
        run_at_ms=_int(f.get("run_at")),
        state=f.get("state") or None,
    )


def _before(entry_id: str) -> str:
    """The entry id just before ``entry_id`` (XREAD returns the entries after a cursor)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-18446744073709551615" if int(ms) > 0 else "0-0"


def _order(e: StreamEntry) -> tuple[int, str, int]:
    """Entry-id order across streams: by time, then (within one ms, where the streams' sequence
    numbers say nothing of each other) queue by queue, each in its own order."""
    ms, _, seq = e[1].partition("-")
    return int(ms), e[0], int(seq or 0)


def _entry_id(text: str) -> bool:
    ms, dash, seq = text.partition("-")
    return ms.isdigit() and len(ms) <= 20 and (not dash or (seq.isdigit() and len(seq) <= 20))


def check_since(since: str) -> str:
    """A ``since`` cursor: ``"0"`` (everything kept), ``"$"`` (only new events), a stream entry
    id ``<ms>`` / ``<ms>-<seq>``, or a position ``queue=<id>,queue=<id>`` (:meth:`EventReader.
    position`); else :class:`jobq.errors.InvalidInput`."""
    if since == "$" or _entry_id(since):
        return since
    if "=" in since and len(since) <= 100_000:
        pairs = [p.partition("=") for p in since.split(",")]
        if all(_entry_id(i) and _valid_queue(q) for q, _, i in pairs):
            return since
    raise errors.InvalidInput(
        f"since: {since[:40]!r} is not '0', '$', a stream entry id <ms>-<seq> or queue=<id>,...", "since"
    )


def _valid_queue(name: str) -> bool:
    try:
        validate_queue(name)
    except errors.InvalidInput:
        return False
    return True


class EventReader:
    """Reads the events of several queues in order of their entry ids, from a start (``since``
    cursor, or the ``last`` newest events, or only new ones), and with ``follow`` waits for more.

    The cursors are resolved to entry ids at the start, so no event between two reads is
    missed. Events of different queues are merged by entry id within each read: by time (entry
    ids are the times of the queues' own servers, so across Redis Cluster shards the order is as
    good as their clocks), and within one millisecond queue by queue. A ``since`` entry id is
    applied to every queue's stream (a point in time: for several queues, events of another queue
    in the same millisecond may be skipped); a position (``queue=<id>,...``, :meth:`position`)
    resumes each queue exactly where it was."""

    def __init__(
        self,
        app: EventSource,
        queues: Sequence[str] | None,
        *,
        since: str | None = None,
        last: int | None = None,
        follow: bool = False,
        aclient: Any = None,
    ) -> None:
        if since is not None and last is not None:
            raise errors.InvalidInput("since and last: give one of them", "since")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise errors.InvalidInput("last: must be an integer >= 0", "last")
        self.app = app
        self.explicit = None if queues is None else self._expand([validate_queue(q) for q in queues])
        if since is None and last is None:
            since = "$" if follow else "0"  # following: what comes next; else all that is kept
        self.since = None if since is None else check_since(str(since))
        self.last = last
        self.follow = follow
        #: The asyncio client to read with (default: the app's pool of the running loop).
        self.aclient = aclient
        self.cursors: dict[str, str] = {}
        #: Set to stop a following reader after its current read (at most BLOCK_MS).
        self.closed = False

    def _expand(self, queues: Sequence[str]) -> list[str]:
        """A sharded queue's name stands for its shards' streams."""
        out: list[str] = []
        for q in queues:
            for s in self.app.queue_shards(q) if "#" not in q else [q]:
                if s not in out:
                    out.append(s)
        return out

    # -- the start: which events come first ----------------------------------------------------
    def _start(self, queues: list[str], newest: Mapping[str, list[StreamEntry]]) -> list[StreamEntry]:
        """Set the cursors from each queue's newest events; return the ``last`` ones to yield."""
        if self.since is not None and "=" in self.since:
            at = dict(p.split("=", 1) for p in self.since.split(","))
            self.cursors = {q: at.get(q, "0-0") for q in queues}
            return []
        if self.since is not None and self.since != "$":
            self.cursors = dict.fromkeys(queues, self.since)
            return []
        first: list[StreamEntry] = []
        for q in queues:
            got = newest.get(q, [])
            self.cursors[q] = got[-1][1] if got else "0-0"
            first += got
        first.sort(key=_order)
        n = 0 if self.since == "$" else self.last or 0
        first = first[len(first) - n :] if n else []
        # A queue with events among the first ones starts just before its first one, so that the
        # position stays exact while they are handed out (_advance moves it).
        for q, entry_id, _ in reversed(first):
            self.cursors[q] = _before(entry_id)
        return first

    def _depth(self) -> int:
        return 1 if self.since == "$" or not self.last else self.last

    def _advance(self, got: list[StreamEntry]) -> Iterator[Event]:
        """The events read, in order; each queue's cursor moves as its events are taken, so
        :meth:`position` always names what was handed out."""
        got.sort(key=_order)
        for entry in got:
            self.cursors[entry[0]] = entry[1]
            yield event_of(entry)

    def position(self) -> str:
        """Where the reader is, as ``queue=<entry id>,...`` (queues without events left out): a
        ``since`` that resumes every queue exactly after the last event handed out."""
        return ",".join(f"{q}={c}" for q, c in self.cursors.items() if c not in ("0", "0-0"))

    def _multi_cluster(self, client: Any) -> bool:
        from jobq.storage.clients import is_cluster_client

        return len(self.cursors) > 1 and is_cluster_client(client)

    # -- sync ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Event]:
        app = self.app
        queues = self.explicit if self.explicit is not None else reads.queues(app.client, app.keys)
        newest = (
            {}
            if self.since not in (None, "$")
            else reads.last_events(app.client, app.keys, queues, self._depth())
        )
        yield from self._advance(self._start(queues, newest))
        if not self.cursors:
            return
        poll = self._multi_cluster(app.client)
        while not self.closed:
            block = BLOCK_MS if self.follow and not poll else None
            got = reads.read_events(app.client, app.keys, self.cursors, count=READ_COUNT, block_ms=block)
            if got:
                yield from self._advance(got)
            elif not self.follow:
                return
            elif poll:
                time.sleep(CLUSTER_POLL_S)

    # -- async ---------------------------------------------------------------------------------
    async def __aiter__(self) -> AsyncGenerator[Event, None]:
        app = self.app
        client = self.aclient if self.aclient is not None else app.aclient
        if self.explicit is not None:
            queues = self.explicit
        else:
            queues = await reads.queues_async(client, app.keys)
        newest = (
            {}
            if self.since not in (None, "$")
            else await reads.last_events_async(client, app.keys, queues, self._depth())
        )
        for ev in self._advance(self._start(queues, newest)):
            yield ev
        if not self.cursors:
            return
        poll = self._multi_cluster(client)
        while not self.closed:
            block = BLOCK_MS if self.follow and not poll else None
            got = await reads.read_events_async(
                client, app.keys, self.cursors, count=READ_COUNT, block_ms=block
            )
            if got:
                for ev in self._advance(got):
                    yield ev
            elif not self.follow:
                return
            elif poll:
                await asyncio.sleep(CLUSTER_POLL_S)
