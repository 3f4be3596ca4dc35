"""Inspection and repair of queues, jobs and nodes: what ``jobq stats/jobs/dead/queue/nodes``,
the HTTP API and the per-queue metrics share.

Reading functions (:func:`queue_stats`, :func:`list_jobs`, :func:`nodes`, :func:`job_info`) use
plain read commands only (ZCARD, ZRANGE, HMGET, ...): they never write, so they are safe on a
production Redis at any time. The repairing functions (:func:`pause`, :func:`resume`,
:func:`purge`, :func:`retry_dead`, :func:`cancel`) go through the admin Lua scripts where a job
moves, and loop in bounded calls so that no call blocks Redis for long.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from jobq import errors, requests
from jobq.app import JobInfo, JobQ
from jobq.storage import reads
from jobq.storage.calls import MAX_BATCH, MAX_SCAN
from jobq.storage.keys import validate_queue

#: Priority bands of the ready ZSET: score = (100 - priority) * 2^44 + seq.
PRIO_SPAN = reads.PRIO_SPAN
#: Job ids read per priority band when looking for the oldest ready job (see queue_stats).
OLDEST_SAMPLE = 8
#: Most queues one stats call reports (the registry could be large; the rest are skipped).
MAX_QUEUES = 1000
#: Most jobs one list call returns.
MAX_LIST = 1000

#: States ``list_jobs`` accepts: where to look, newest or oldest first.
LIST_STATES = ("ready", "scheduled", "active", "dead", "done", "cancelled")
#: What ``purge`` can empty.
PURGE_STATES = ("ready", "scheduled", "dead", "finished")


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue's depths, read in one moment (a pipeline) from Redis."""

    queue: str
    #: Jobs runnable now.
    ready: int
    #: Delayed and retry-backoff jobs.
    scheduled: int
    #: Jobs claimed by a node (their leases).
    active: int
    #: Jobs in the dead-letter list.
    dead: int
    #: Finished (done or cancelled) jobs still kept for their retention time.
    finished: int
    paused: bool
    #: Nodes serving this queue whose last heartbeat is within ``node_ttl``.
    nodes: int
    #: Seconds the oldest ready job has waited since it became ready (0 when none); see
    #: :func:`queue_stats` for how it is measured.
    oldest_ready_age_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A worker node as its heartbeat last recorded it."""

    node: str
    #: The node's hash is present (it expires three leases after the last heartbeat).
    live: bool
    heartbeat_ms: int
    heartbeat_age_s: float
    queues: list[str] = field(default_factory=list)
    host: str | None = None
    pid: int | None = None
    concurrency: int | None = None
    inflight: int | None = None
    busy: int | None = None
    started_ms: int | None = None
    #: The jobq version the node runs (None for a node of a jobq that did not record it).
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def server_now_ms(app: JobQ) -> int:
    """Now on the Redis clock (or the app's fake clock in tests)."""
    fake = app.now_ms()
    if fake is not None:
        return fake
    return reads.server_time_ms(app.client)


def queues(app: JobQ) -> list[str]:
    """Every queue ever enqueued to (the ``jobq:queues`` registry), sorted."""
    return reads.queues(app.client, app.keys)


def _oldest_ready_ms(app: JobQ, queue: str) -> int | None:
    """The smallest ``ready_ms`` among the heads of each priority band of the ready ZSET.

    The ready ZSET orders by priority first, so its first member is the next to run, not the
    one waiting longest: a low-priority job may have waited far longer. Within one priority the
    order is FIFO, so the oldest job of each band is at (or, for a job the reaper or a release
    put back in its old place with a fresh ``ready_ms``, near) the head of its band. This reads
    the first ``OLDEST_SAMPLE`` ids of each band present: one ZRANGE per band present (at most
    201) and one HMGET per sampled id, pipelined. Plain reads only.
    """
    return reads.oldest_ready_ms(app.client, app.keys, queue, OLDEST_SAMPLE)


def queue_stats(
    app: JobQ, names: Iterable[str] | None = None, *, node_ttl_s: float = 60.0
) -> list[QueueStats]:
    """Depths of ``names`` (default: every registered queue, at most ``MAX_QUEUES``).

    ``oldest_ready_age_s`` is Redis time now minus the oldest ``ready_ms`` (the moment a job
    last became runnable: enqueued, promoted from scheduled, retried without delay, released or
    reaped) among the heads of the ready ZSET's priority bands (see :func:`_oldest_ready_ms`).
    """
    qs = [validate_queue(q) for q in names] if names is not None else queues(app)
    qs = qs[:MAX_QUEUES]
    if not qs:
        return []
    now = server_now_ms(app)
    depths = reads.queue_depths(app.client, app.keys, qs, live_since_ms=now - int(node_ttl_s * 1000))
    out = []
    for q, (ready, sched, active, dead, finished, paused, n_nodes) in zip(qs, depths, strict=True):
        oldest = _oldest_ready_ms(app, q) if ready else None
        age = 0.0 if oldest is None else max(0, now - oldest) / 1000
        out.append(QueueStats(q, ready, sched, active, dead, finished, bool(paused), n_nodes, age))
    return out


@dataclass(frozen=True, slots=True)
class ShardDown:
    """A Redis Cluster shard ``jobq stats`` could not read: the node serving the slot(s), the
    queues (or ``jobq:queues`` / ``jobq:nodes`` registries) it holds, and the error."""

    shard: str
    queues: list[str]
    error: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StatsReport:
    """What ``jobq stats`` and ``GET /stats`` show: the queues that answered, the live node
    count (None when its registry could not be read), and the shards that did not answer."""

    queues: list[QueueStats]
    nodes: int | None
    unreachable: list[ShardDown] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": [s.to_dict() for s in self.queues],
            "totals": totals(self.queues),
            "nodes": self.nodes,
            "unreachable": [u.to_dict() for u in self.unreachable],
        }


def stats_report(app: JobQ, names: Iterable[str] | None = None, *, node_ttl_s: float = 60.0) -> StatsReport:
    """:func:`queue_stats` and :func:`live_node_count` that do not fail for one shard: on a Redis
    Cluster with a primary down (and its slots not yet taken over), every queue and registry
    of the other primaries is read and the missing ones are named in ``unreachable``. Without a
    cluster, or with every primary down, it raises as :func:`queue_stats` does."""
    from jobq.storage.clients import is_cluster_client

    if not is_cluster_client(app.client):
        return StatsReport(
            queue_stats(app, names, node_ttl_s=node_ttl_s), live_node_count(app, node_ttl_s=node_ttl_s)
        )
    down: dict[str, ShardDown] = {}

    def miss(key: str, what: str, exc: BaseException) -> None:
        shard = _shard_name(app, key)
        d = down.setdefault(shard, ShardDown(shard, [], _short(exc)))
        d.queues.append(what)

    now = _cluster_now_ms(app)
    if names is not None:
        qs = [validate_queue(q) for q in names]
    else:
        try:
            qs = queues(app)
        except Exception as exc:
            if not isinstance(_mapped(exc, ""), errors.RedisUnavailable):
                raise
            miss(app.keys.queues, app.keys.queues, exc)
            qs = _scan_queues(app)
    out = []
    for q in qs[:MAX_QUEUES]:
        try:
            [(ready, sched, active, dead, finished, paused, n_nodes)] = reads.queue_depths(
                app.client, app.keys, [q], live_since_ms=now - int(node_ttl_s * 1000)
            )
            oldest = _oldest_ready_ms(app, q) if ready else None
        except Exception as exc:
            if not isinstance(_mapped(exc, q), errors.RedisUnavailable):
                raise
            miss(app.keys.ready(q), q, exc)
            continue
        age = 0.0 if oldest is None else max(0, now - oldest) / 1000
        out.append(QueueStats(q, ready, sched, active, dead, finished, bool(paused), n_nodes, age))
    live: int | None
    try:
        live = reads.live_node_count(app.client, app.keys, now - int(node_ttl_s * 1000))
    except Exception as exc:
        if not isinstance(_mapped(exc, ""), errors.RedisUnavailable):
            raise
        miss(app.keys.nodes, app.keys.nodes, exc)
        live = None
    return StatsReport(out, live, sorted(down.values(), key=lambda d: d.shard))


def _mapped(exc: BaseException, queue: str) -> BaseException:
    from jobq.storage.calls import map_error

    return map_error(exc, "stats", queue)


def _short(exc: BaseException) -> str:
    from jobq.storage.clients import redact

    return redact(f"{type(exc).__name__}: {exc}")[:300]


def _shard_name(app: JobQ, key: str) -> str:
    return reads.shard_of(app.client, key)


def _cluster_now_ms(app: JobQ) -> int:
    fake = app.now_ms()
    return fake if fake is not None else reads.cluster_time_ms(app.client)


def _scan_queues(app: JobQ) -> list[str]:
    return reads.scan_queues(app.client, app.keys, MAX_QUEUES)


def totals(stats: Sequence[QueueStats]) -> dict[str, int]:
    keys = ("ready", "scheduled", "active", "dead", "finished")
    return {name: sum(getattr(s, name) for s in stats) for name in keys}


# -- jobs -------------------------------------------------------------------------------------------
def job_info(app: JobQ, job_id: str, queue: str | None = None, *, with_args: bool = True) -> JobInfo:
    """One job's stored fields. Raises :class:`jobq.errors.JobNotFound`."""
    requests.validate_job_id(job_id)
    info = app.job(job_id, queue).info(with_args=with_args)
    if info.state.value == "unknown":
        raise errors.JobNotFound(f"no job {job_id!r} in queue {info.queue!r}")
    return info


def _ids(app: JobQ, queue: str, state: str, limit: int) -> list[str]:
    return reads.job_ids(app.client, app.keys, queue, state, limit, scan=MAX_LIST * 4)


def list_jobs(
    app: JobQ,
    queue: str | None = None,
    state: str | None = None,
    *,
    limit: int = 100,
    with_args: bool = False,
) -> list[JobInfo]:
    """Jobs of ``queue`` (default: every queue) in ``state`` (default: every state, in the
    order of ``LIST_STATES``), at most ``limit``. Ready jobs come in run order, scheduled ones by
    run time, active ones by lease deadline, dead and finished ones most recent first."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
        raise errors.InvalidInput(f"limit: must be an integer 1..{MAX_LIST}, got {limit!r}", "limit")
    if state is not None and state not in LIST_STATES:
        raise errors.InvalidInput(f"state: must be one of {', '.join(LIST_STATES)}, got {state!r}", "state")
    qs = [validate_queue(queue)] if queue is not None else queues(app)
    states = [state] if state is not None else list(LIST_STATES)
    out: list[JobInfo] = []
    for q in qs:
        for st in states:
            for job_id in _ids(app, q, st, limit - len(out)):
                info = app.job(job_id, q).info(with_args=with_args)
                if st in ("done", "cancelled") and info.state.value != st:
                    continue
                if info.state.value == "unknown":
                    continue
                out.append(info)
                if len(out) >= limit:
                    return out
    return out


#: States :func:`page_jobs` pages by index (the ZSETs; done and cancelled share one, filtered).
PAGED_STATES = ("ready", "scheduled", "active", "dead")


def page_jobs(
    app: JobQ, queue: str, state: str, *, offset: int = 0, limit: int = 50, with_args: bool = False
) -> tuple[list[JobInfo], int]:
    """One page of ``queue``'s jobs in ``state`` (one of ``PAGED_STATES``), in the order of
    :func:`list_jobs`, from ``offset``; and how many jobs the state holds. A ZRANGE by index
    and a ZCARD (O(log N + page)), then one read per job: as fast at a million jobs as at ten."""
    q = validate_queue(queue)
    if state not in PAGED_STATES:
        raise errors.InvalidInput(f"state: must be one of {', '.join(PAGED_STATES)}, got {state!r}", "state")
    if not 1 <= limit <= MAX_LIST or offset < 0:
        raise errors.InvalidInput(f"limit: must be 1..{MAX_LIST} with offset >= 0", "limit")
    raw, total = reads.page_ids(app.client, app.keys, q, state, offset, limit)
    infos = [app.job(job_id, q).info(with_args=with_args) for job_id in raw]
    return [i for i in infos if i.state.value != "unknown"], int(total)


# -- nodes ------------------------------------------------------------------------------------------
def nodes(app: JobQ, *, include_gone: bool = False, limit: int = 1000) -> list[NodeInfo]:
    """Nodes in the ``jobq:nodes`` registry, most recent heartbeat first. A node is ``live`` while
    its hash exists (it expires three leases after its last heartbeat); gone nodes are listed
    only with ``include_gone`` (a clean exit removes the node from the registry)."""
    now = server_now_ms(app)
    out = []
    for node, score, d in reads.nodes(app.client, app.keys, limit):
        if not d and not include_gone:
            continue

        def num(name: str, d: dict[str, str] = d) -> int | None:
            v = d.get(name)
            return int(v) if v is not None and v.lstrip("-").isdigit() else None

        out.append(
            NodeInfo(
                node=node,
                live=bool(d),
                heartbeat_ms=score,
                heartbeat_age_s=max(0, now - score) / 1000,
                queues=[q for q in d.get("queues", "").split(",") if q],
                host=d.get("host"),
                pid=num("pid"),
                concurrency=num("concurrency"),
                inflight=num("inflight"),
                busy=num("busy"),
                started_ms=num("started_ms"),
                version=d.get("version"),
            )
        )
    return out


def live_node_count(app: JobQ, *, node_ttl_s: float = 60.0) -> int:
    """Nodes whose last heartbeat is within ``node_ttl_s`` (one ZCOUNT)."""
    now = server_now_ms(app)
    return reads.live_node_count(app.client, app.keys, now - int(node_ttl_s * 1000))


# -- repair -----------------------------------------------------------------------------------------
def known_queue(app: JobQ, queue: str) -> bool:
    """Is ``queue`` one jobq knows: in the registry (something was enqueued to it, or a cron
    entry fired into it), served by a node, or paused? Plain reads."""
    q = validate_queue(queue)
    return reads.known_queue(app.client, app.keys, q)


def _unknown(app: JobQ, queue: str, verb: str) -> errors.UnknownQueue:
    import difflib

    names = queues(app)
    hint = ""
    shards = [n for n in names if n.partition("#")[0] == queue and "#" in n]
    close = difflib.get_close_matches(queue, names, n=3, cutoff=0.6)
    if shards:
        more = ", ..." if len(shards) > 4 else ""
        hint = f" (it is sharded: {verb} its shards {', '.join(shards[:4])}{more})"
    elif close:
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    return errors.UnknownQueue(
        f"queue: {queue!r} is unknown: nothing was ever enqueued to it and no node serves it"
        f"{hint}; nothing done (--create on the command line, create=True in Python, to {verb} it"
        " anyway)"
    )


def pause(app: JobQ, queue: str, *, create: bool = False) -> bool:
    """Stop nodes claiming from ``queue`` (running jobs finish; enqueues still land). Returns
    False if it was already paused. A queue jobq does not know (see :func:`known_queue`) raises
    :class:`jobq.errors.UnknownQueue` unless ``create``; with it, the queue is registered too,
    so it shows (paused) in ``jobq stats``."""
    q = validate_queue(queue)
    if not create and not known_queue(app, q):
        raise _unknown(app, q, "pause")
    return reads.pause(app.client, app.keys, q, register=create)


def resume(app: JobQ, queue: str, *, create: bool = False) -> bool:
    """Let nodes claim from ``queue`` again; jobs resume in the order they were in. Returns False
    if it was not paused. A queue jobq does not know raises :class:`jobq.errors.UnknownQueue`
    unless ``create``."""
    q = validate_queue(queue)
    if not create and not known_queue(app, q):
        raise _unknown(app, q, "resume")
    changed = reads.resume(app.client, app.keys, q)
    if changed:
        # Idle nodes armed while it was paused: wake one per waiting job. Best effort: they
        # also look on their own (docs/workers.md, "Wake-ups").
        with contextlib.suppress(errors.JobqError):
            app.run(app.store.idle(q, "resume", "pass"))
    return changed


def purge(app: JobQ, queue: str, states: Sequence[str] = ("ready", "scheduled")) -> dict[str, int]:
    """Delete every job of ``queue`` in ``states`` (never running ones), 1,000 per script call.
    Returns the number deleted per state."""
    q = validate_queue(queue)
    for st in states:
        if st not in PURGE_STATES:
            raise errors.InvalidInput(
                f"state: cannot purge {st!r} (one of {', '.join(PURGE_STATES)})", "state"
            )
    out: dict[str, int] = {}
    for st in states:
        total = 0
        while True:
            n = app.run(app.store.purge(q, st, limit=MAX_SCAN))
            total += n
            if n == 0:
                break
        out[st] = total
    return out


def retry_dead(app: JobQ, queue: str, job_ids: Sequence[str] | None = None) -> int:
    """Move dead-lettered jobs of ``queue`` back to ready with fresh attempts: the given ids, or
    all of them (MAX_BATCH per script call). Returns how many moved."""
    q = validate_queue(queue)
    if job_ids:
        ids = [requests.validate_job_id(i) for i in job_ids]
        return sum(
            app.run(app.store.retry_dead(q, ids[i : i + MAX_BATCH], now_ms=app.now_ms()))
            for i in range(0, len(ids), MAX_BATCH)
        )
    total = 0
    while True:
        n = app.run(app.store.retry_dead(q, None, limit=MAX_BATCH, now_ms=app.now_ms()))
        total += n
        if n < MAX_BATCH:
            return total


def delete_dead(app: JobQ, queue: str, job_ids: Sequence[str]) -> int:
    """Delete the given dead letters of ``queue`` (the job hash, its place in the dead-letter
    list and its unique key when that still names it), as ``jobq dead purge`` does for all;
    returns how many were deleted. Ids that are not dead letters (any more) are left alone.

    Each job is one optimistic transaction (WATCH the dead list, the job and its unique key;
    MULTI; retry on a concurrent change): a retry of the same job racing with the delete wins or
    loses whole. Every key is in the queue's hash slot."""
    q = validate_queue(queue)
    ids = [requests.validate_job_id(raw_id) for raw_id in job_ids]
    return reads.delete_dead(app.client, app.keys, q, ids)


def cancel(app: JobQ, job_id: str, queue: str | None = None) -> str:
    """Cancel a job (a running one too: see :meth:`jobq.Job.cancel`); returns its queue. Raises
    :class:`jobq.errors.JobNotFound` or :class:`jobq.errors.JobNotCancellable`."""
    requests.validate_job_id(job_id)
    job = app.job(job_id, queue)
    job.cancel()
    return job.queue


# -- JSON requests (HTTP bodies, NDJSON lines) -------------------------------------------------------
#: Keys whose values are hidden when a job's arguments are shown (webhook headers, credentials).
_SECRET_KEY_RE = re.compile(r"(?i)authorization|password|passwd|secret|token|api[-_]?key|cookie")


#: The user info of a URL or DSN in any text (``https://user:pw@host``, ``postgres://u:pw@h/db``,
#: ``https://TOKEN@host``). A ``/`` in it counts only after a ``:`` (an unencoded ``/`` in a
#: password), so ``https://example.com/@user`` is left alone.
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s@/]*:[^\s@]*|[^\s@/:]+)@")
#: Secret-looking ``name=value`` pairs: URL query parameters (``?token=``, ``&X-Amz-Signature=``,
#: ``&sig=``) and keyword DSNs (``host=db password=pw``).
_SECRET_PARAM_RE = re.compile(
    r"(?i)((?:^|(?<=[\s?&;]))[\w.\-]*?(?:token|key|secret|pass|pwd|sig|auth|credential|session)"
    r"[\w.\-]*=)([^&\s#;'\"]+)"
)

#: Credentials of an HTTP authorization scheme written out (``Bearer eyJ...``, ``Basic dXNl...``).
_AUTH_SCHEME_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}")


def redact_text(text: str) -> str:
    """``text`` with the user info of every URL and DSN, and the values of secret-looking
    ``name=value`` pairs (query parameters, keyword DSNs), replaced by ``***``; a user name is
    kept when a password follows it."""

    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon and user else f"{m.group(1)}***@"

    text = _USERINFO_RE.sub(userinfo, text)
    text = _AUTH_SCHEME_RE.sub(lambda m: f"{m.group(1)} ***", text)
    return _SECRET_PARAM_RE.sub(lambda m: f"{m.group(1)}***", text)


def redact_args(value: Any) -> Any:
    """``value`` with the values of secret-looking mapping keys replaced by ``***`` (for showing
    a job's arguments: a webhook's ``Authorization`` header, a password), and every string
    passed through :func:`redact_text` (credentials inside URLs, DSNs and query strings)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: "***" if isinstance(k, str) and _SECRET_KEY_RE.search(k) else redact_args(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_args(v) for v in value]
    return value


def redacted(info: JobInfo) -> dict[str, Any]:
    """``info.to_dict()`` as shown to people and HTTP clients: arguments and the result through
    :func:`redact_args`, the last error and the progress message through :func:`redact_text`."""
    d = info.to_dict()
    d["args"] = redact_args(d["args"])
    d["kwargs"] = redact_args(d["kwargs"])
    d["result"] = redact_args(d["result"])
    for key in ("error", "progress_message"):
        if isinstance(d.get(key), str):
            d[key] = redact_text(d[key])
    return d
