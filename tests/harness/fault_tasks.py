"""The tasks the fault tests run: ``jobq worker -A tests.harness.fault_tasks:app``.

Each task records its start and its end in the history (see :mod:`tests.harness.history`)
outside Redis, then does what its ``mode`` says. Arguments: ``(job_id, seq)`` positionally, the
rest by keyword:

- ``queue``: the job's queue (to read its attempt counter); the producer fills it in;
- ``sleep``: seconds to run (sync: ``time.sleep``; async: ``asyncio.sleep``);
- ``slow`` / ``slow_node``: run ``slow`` seconds instead when on node ``slow_node`` (a job that
  must outlast a shutdown on one node and be quick on the others);
- ``mode``:
  - ``"ok"`` (default): run ``sleep`` seconds, return ``{"node", "pid", "attempt"}``;
  - ``"fail_first"``: raise ``RuntimeError`` while the attempt is <= ``fail_until``;
  - ``"exit"``: the poison pill, ``os._exit(1)`` on every attempt (after its start record);
  - ``"recv"``: block in ``socket.recv`` on ``addr`` (``"host:port"`` of a silent server) for
    ``sleep`` seconds (default 60);
  - ``"block"`` (async only): ``time.sleep(sleep)`` on the event loop, blocking it, then
    ``await asyncio.sleep(0.2)``.

The app reads ``JOBQ_REDIS_URL`` like the worker, and ``JOBQ_FAULT_RESULT_TTL`` (seconds) for
result retention. ``JOBQ_HISTORY_REDIS_URL`` (default: ``JOBQ_REDIS_URL``) is where the task reads
its attempt counter; point it at Redis directly when the workers go through a chaos proxy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

import jobq
from tests.harness.history import DIR_ENV, FSYNC_ENV, NODE_ENV, RecordFile

_ttl = os.environ.get("JOBQ_FAULT_RESULT_TTL")
app = jobq.JobQ(os.environ.get("JOBQ_REDIS_URL"), **({"result_ttl": float(_ttl)} if _ttl else {}))

_NODE = os.environ.get(NODE_ENV, f"pid{os.getpid()}")
_file: RecordFile | None = None
_client: redis.Redis | None = None
_lock = threading.Lock()


def _record_file() -> RecordFile | None:
    global _file
    with _lock:
        if _file is None and os.environ.get(DIR_ENV):
            path = Path(os.environ[DIR_ENV]) / f"worker-{_NODE}-{os.getpid()}.jsonl"
            _file = RecordFile(path, fsync=os.environ.get(FSYNC_ENV, "1") != "0")
        return _file


def _attempt(job_id: str, queue: str) -> int:
    """The job's attempt counter in Redis (the claim counted this run); -1 if unreadable."""
    global _client
    try:
        with _lock:
            if _client is None:
                url = os.environ.get("JOBQ_HISTORY_REDIS_URL") or app.url
                _client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        raw = _client.hget(app.keys.job(queue, job_id), "attempts")
        return int(raw) if raw is not None else -1
    except Exception:
        return -1


def _start(job_id: str, queue: str) -> tuple[str, int]:
    t = time.time()  # the task's start, before the attempt is read back from Redis
    run = uuid.uuid4().hex[:12]
    attempt = _attempt(job_id, queue)
    f = _record_file()
    if f is not None:
        f.append(
            {
                "ev": "start",
                "job": job_id,
                "node": _NODE,
                "pid": os.getpid(),
                "attempt": attempt,
                "t": t,
                "run": run,
            }
        )
    return run, attempt


def _end(run: str, job_id: str, outcome: str) -> None:
    f = _record_file()
    if f is not None:
        f.append(
            {"ev": "end", "job": job_id, "node": _NODE, "t": time.time(), "run": run, "outcome": outcome}
        )


def _blocking_recv(addr: str, limit: float) -> None:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(limit)
        try:
            s.recv(1)
        except TimeoutError:
            pass


@app.task(name="fault.record", queue="fault")
def record(
    job_id: str,
    seq: int,
    *,
    queue: str = "fault",
    sleep: float = 0.0,
    mode: str = "ok",
    fail_until: int = 0,
    addr: str = "",
    slow: float = 0.0,
    slow_node: str = "",
) -> dict[str, Any]:
    run, attempt = _start(job_id, queue)
    if slow_node == _NODE:
        sleep = slow
    outcome = "error"
    try:
        if mode == "exit":
            os._exit(1)
        if mode == "fail_first" and attempt <= fail_until:
            raise RuntimeError(f"planned failure of attempt {attempt}")
        if mode == "recv":
            _blocking_recv(addr, sleep or 60.0)
        elif sleep:
            time.sleep(sleep)
        outcome = "ok"
        return {"node": _NODE, "pid": os.getpid(), "attempt": attempt, "seq": seq}
    except BaseException as exc:
        outcome = "timeout" if type(exc).__name__ == "JobTimeout" else "error"
        raise
    finally:
        _end(run, job_id, outcome)


@app.task(name="fault.arecord", queue="fault")
async def arecord(
    job_id: str,
    seq: int,
    *,
    queue: str = "fault",
    sleep: float = 0.0,
    mode: str = "ok",
    fail_until: int = 0,
    slow: float = 0.0,
    slow_node: str = "",
) -> dict[str, Any]:
    run, attempt = _start(job_id, queue)
    if slow_node == _NODE:
        sleep = slow
    outcome = "error"
    try:
        if mode == "exit":
            os._exit(1)
        if mode == "fail_first" and attempt <= fail_until:
            raise RuntimeError(f"planned failure of attempt {attempt}")
        if mode == "block":
            time.sleep(sleep)  # blocks the event loop on purpose (F13) ...
            await asyncio.sleep(0.2)  # ... then awaits: the first point its timeout can act
        elif sleep:
            await asyncio.sleep(sleep)
        outcome = "ok"
        return {"node": _NODE, "pid": os.getpid(), "attempt": attempt, "seq": seq}
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except BaseException as exc:
        outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
        raise
    finally:
        _end(run, job_id, outcome)
