"""The history recorder: what the workers ran and what the producer enqueued, kept OUTSIDE Redis.

How to use it (see also :mod:`tests.harness.checker` and :mod:`tests.harness.fleet`)::

    hist = History(tmp_path / "history")            # one directory per test
    fleet = WorkerFleet(url, tmp_path, history=hist)  # workers write their records there
    prod = Producer(app, hist)                        # logs enqueue_ok / _error / _unknown
    ids = prod.enqueue_batch(100, sleep=0.5)          # jobs of tests.harness.fault_tasks.record
    ...                                               # faults, then drain
    report = check(hist, r, stale_reported=fleet.stale_count())
    report.assert_ok()

Worker side: every test task of :mod:`tests.harness.fault_tasks` appends one ``start`` record
when it begins and one ``end`` record when it stops, each a JSON line written with ``O_APPEND``
and ``fsync`` to a file of its own process (``<dir>/worker-<node>-<pid>.jsonl``), so a SIGKILL
right after a start still leaves the start on disk. The pair, joined by a random ``run`` token,
is one :class:`Attempt`: ``(job_id, node, attempt, t_start, t_end, outcome)``. ``attempt`` is the
job's ``attempts`` counter in Redis when the run began (-1 if Redis could not be read).

Producer side: :class:`Producer` appends ``(job_id, enqueue_ok|enqueue_error|enqueue_unknown)``
to ``<dir>/producer-<pid>.jsonl``. ``enqueue_error`` = jobq refused it and wrote nothing (bad
input, queue full, OOM, auth); ``enqueue_unknown`` = the outcome is not known (connection lost,
timeout): the job may or may not exist.

Environment the workers need (``History.env(node)`` builds it): ``JOBQ_HISTORY_DIR``,
``JOBQ_HISTORY_NODE``; ``JOBQ_HISTORY_FSYNC=0`` skips fsync (throughput runs only; the write
itself still survives a SIGKILL, fsync is for power loss).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jobq
from jobq import errors

DIR_ENV = "JOBQ_HISTORY_DIR"
NODE_ENV = "JOBQ_HISTORY_NODE"
FSYNC_ENV = "JOBQ_HISTORY_FSYNC"

#: The default test task (see tests/harness/fault_tasks.py).
RECORD_TASK = "fault.record"
ARECORD_TASK = "fault.arecord"

ENQUEUE_OK = "enqueue_ok"
ENQUEUE_ERROR = "enqueue_error"
ENQUEUE_UNKNOWN = "enqueue_unknown"

#: jobq errors that guarantee nothing was written.
_DEFINITE = (errors.InvalidInput, errors.QueueFull, errors.RedisOutOfMemory, errors.RedisAuthError)


class RecordFile:
    """One append-only JSON-lines file, safe against SIGKILL (O_APPEND, one write per record)."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def append(self, rec: Mapping[str, Any]) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)

    def append_many(self, recs: Iterable[Mapping[str, Any]]) -> None:
        data = b"".join((json.dumps(r, separators=(",", ":")) + "\n").encode() for r in recs)
        with self._lock:
            os.write(self._fd, data)
            if self.fsync:
                os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of one file; a torn last line (crash mid-write) is skipped."""
    with path.open("rb") as f:
        for raw in f:
            try:
                yield json.loads(raw)
            except ValueError:
                continue


@dataclass
class Attempt:
    """One run of a job on a node, as the task recorded it."""

    job_id: str
    node: str
    pid: int
    attempt: int
    t_start: float
    t_end: float | None = None
    #: "ok", "error", "retry", "cancelled", or None when the run never recorded its end
    #: (the process died, or the thread is still stuck).
    outcome: str | None = None
    run: str = ""


@dataclass
class Enqueue:
    job_id: str
    status: str
    t: float
    error: str = ""


@dataclass
class History:
    """A history directory: worker record files and producer logs."""

    dir: Path
    fsync: bool = True
    _producer: RecordFile | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def env(self, node: str) -> dict[str, str]:
        """Environment variables for a worker process named ``node``."""
        return {DIR_ENV: str(self.dir), NODE_ENV: node, FSYNC_ENV: "1" if self.fsync else "0"}

    # -- producer log ---------------------------------------------------------------------------
    def log_enqueue(self, job_id: str, status: str, error: str = "") -> None:
        self.log_enqueues([job_id], status, error)

    def log_enqueues(
        self, job_ids: Iterable[str], status: str, error: str = "", t: float | None = None
    ) -> None:
        """Log outcomes; ``t`` = when the enqueue call was made (default: now)."""
        if self._producer is None:
            self._producer = RecordFile(self.dir / f"producer-{os.getpid()}.jsonl", fsync=self.fsync)
        t = time.time() if t is None else t
        recs: list[dict[str, Any]] = []
        for jid in job_ids:
            rec: dict[str, Any] = {"ev": "enqueue", "job": jid, "status": status, "t": t}
            if error:
                rec["error"] = error[:300]
            recs.append(rec)
        self._producer.append_many(recs)

    # -- reading --------------------------------------------------------------------------------
    def enqueues(self) -> list[Enqueue]:
        out = []
        for p in sorted(self.dir.glob("producer-*.jsonl")):
            for rec in read_jsonl(p):
                out.append(Enqueue(rec["job"], rec["status"], rec["t"], rec.get("error", "")))
        return out

    def attempts(self) -> list[Attempt]:
        """Every recorded run, start time order."""
        runs: dict[str, Attempt] = {}
        ends: dict[str, dict[str, Any]] = {}
        for p in sorted(self.dir.glob("worker-*.jsonl")):
            for rec in read_jsonl(p):
                if rec["ev"] == "start":
                    runs[rec["run"]] = Attempt(
                        rec["job"], rec["node"], rec["pid"], rec["attempt"], rec["t"], run=rec["run"]
                    )
                elif rec["ev"] == "end":
                    ends[rec["run"]] = rec
        for run, rec in ends.items():
            a = runs.get(run)
            if a is not None:
                a.t_end = rec["t"]
                a.outcome = rec["outcome"]
        return sorted(runs.values(), key=lambda a: a.t_start)

    def by_job(self) -> dict[str, list[Attempt]]:
        out: dict[str, list[Attempt]] = {}
        for a in self.attempts():
            out.setdefault(a.job_id, []).append(a)
        return out

    def completed(self) -> set[str]:
        return {a.job_id for a in self.attempts() if a.outcome == "ok"}

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


class Producer:
    """Enqueues test jobs and logs each outcome to the history before returning it.

    ``enqueue(job_id, seq, **task_kwargs)`` enqueues ``task`` (default ``fault.record``) with
    ``job_id`` as the jobq job id too, so history and Redis speak of the same id; returns the
    status string. ``options`` are enqueue options (queue, max_attempts, timeout, ...)."""

    def __init__(self, app: jobq.JobQ, history: History, *, task: str = RECORD_TASK, queue: str = "fault"):
        self.app = app
        self.history = history
        self.task = task
        self.queue = queue
        self._seq = 0

    def _next_id(self) -> tuple[str, int]:
        self._seq += 1
        return f"j{os.getpid()}-{self._seq:07d}-{os.urandom(3).hex()}", self._seq

    def enqueue(
        self,
        job_id: str | None = None,
        *,
        task: str | None = None,
        options: Mapping[str, Any] | None = None,
        **task_kwargs: Any,
    ) -> str:
        jid, seq = self._next_id()
        jid = job_id or jid
        opts = {"queue": self.queue, **(options or {})}
        kwargs = {"queue": opts["queue"], **task_kwargs}
        try:
            self.app.enqueue(task or self.task, [jid, seq], kwargs, job_id=jid, **opts)
        except _DEFINITE as exc:
            self.history.log_enqueue(jid, ENQUEUE_ERROR, f"{type(exc).__name__}: {exc}")
            return ENQUEUE_ERROR
        except Exception as exc:  # connection lost, timeout: may or may not be stored
            self.history.log_enqueue(jid, ENQUEUE_UNKNOWN, f"{type(exc).__name__}: {exc}")
            return ENQUEUE_UNKNOWN
        self.history.log_enqueue(jid, ENQUEUE_OK)
        return ENQUEUE_OK

    def enqueue_batch(
        self,
        n: int,
        *,
        task: str | None = None,
        options: Mapping[str, Any] | None = None,
        per_job: Iterable[Mapping[str, Any]] | None = None,
        **task_kwargs: Any,
    ) -> list[str]:
        """Enqueue ``n`` jobs in batches of 1,000 (one round trip each); returns the ids of the
        ``enqueue_ok`` ones. ``per_job`` gives extra task kwargs job by job."""
        extra = list(per_job) if per_job is not None else [{}] * n
        opts = {"queue": self.queue, **(options or {})}
        ok: list[str] = []
        for start in range(0, n, 1000):
            reqs = []
            ids = []
            for i in range(start, min(n, start + 1000)):
                jid, seq = self._next_id()
                ids.append(jid)
                kw = {"queue": opts["queue"], **task_kwargs, **extra[i]}
                reqs.append(
                    {"task": task or self.task, "args": [jid, seq], "kwargs": kw, "job_id": jid, **opts}
                )
            status, err = ENQUEUE_OK, ""
            t_call = time.time()
            try:
                self.app.enqueue_many(reqs)
            except _DEFINITE as exc:
                status, err = ENQUEUE_ERROR, f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                status, err = ENQUEUE_UNKNOWN, f"{type(exc).__name__}: {exc}"
            self.history.log_enqueues(ids, status, err, t=t_call)
            if status == ENQUEUE_OK:
                ok.extend(ids)
        return ok
