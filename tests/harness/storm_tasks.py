"""Test tasks for the connection-kill storm (F7): ``jobq worker -A tests.harness.storm_tasks:app``.

The same task name and history records as :mod:`tests.harness.fault_tasks`, without its Redis
read of the attempt counter (recorded as -1 here): a storm of ``CLIENT KILL TYPE normal`` kills
that read's connection too, and redis-py's default retry then sleeps in the task for up to
seconds, which would measure the test harness instead of jobq.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jobq
from tests.harness.history import DIR_ENV, FSYNC_ENV, NODE_ENV, RecordFile

app = jobq.JobQ(os.environ.get("JOBQ_REDIS_URL"))

_NODE = os.environ.get(NODE_ENV, f"pid{os.getpid()}")
_file: RecordFile | None = None
_lock = threading.Lock()


def _append(rec: dict[str, Any]) -> None:
    global _file
    with _lock:
        if _file is None and os.environ.get(DIR_ENV):
            path = Path(os.environ[DIR_ENV]) / f"worker-{_NODE}-{os.getpid()}.jsonl"
            _file = RecordFile(path, fsync=os.environ.get(FSYNC_ENV, "1") != "0")
        f = _file
    if f is not None:
        f.append(rec)


@app.task(name="fault.record", queue="fault")
def record(job_id: str, seq: int, *, queue: str = "fault", sleep: float = 0.0) -> dict[str, Any]:
    run = uuid.uuid4().hex[:12]
    _append(
        {
            "ev": "start",
            "job": job_id,
            "node": _NODE,
            "pid": os.getpid(),
            "attempt": -1,
            "t": time.time(),
            "run": run,
        }
    )
    outcome = "error"
    try:
        if sleep:
            time.sleep(sleep)
        outcome = "ok"
        return {"node": _NODE, "pid": os.getpid(), "attempt": -1, "seq": seq}
    finally:
        _append({"ev": "end", "job": job_id, "node": _NODE, "t": time.time(), "run": run, "outcome": outcome})
