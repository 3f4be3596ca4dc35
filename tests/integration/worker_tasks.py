"""Tasks for worker processes started by the tests (``jobq worker -A tests.integration.worker_tasks``).

Every execution is recorded OUTSIDE Redis: one line per start and one per finish, appended with
``O_APPEND`` to a per-process file in ``$JOBQ_TEST_RECORD_DIR`` (``<pid>.log``), so a test can
count how often each job ran even if Redis state were wrong. Line format::

    S <key> <pid> <wall time s>      (started)
    F <key> <pid> <wall time s>      (finished)

The app reads its Redis URL from ``JOBQ_REDIS_URL`` and keeps finished jobs for
``$JOBQ_TEST_RESULT_TTL`` seconds (default 600), so a test can inspect the retained jobs.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import jobq

app = jobq.JobQ(result_ttl=float(os.environ.get("JOBQ_TEST_RESULT_TTL", "600")))

_fd: int | None = None
_fd_pid = 0
_lock = threading.Lock()


def _record(kind: str, key: object) -> None:
    global _fd, _fd_pid
    with _lock:
        if _fd is None or _fd_pid != os.getpid():  # reopen after a fork
            path = os.path.join(os.environ["JOBQ_TEST_RECORD_DIR"], f"{os.getpid()}.log")
            _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            _fd_pid = os.getpid()
        os.write(_fd, f"{kind} {key} {os.getpid()} {time.time():.6f}\n".encode())


@app.task(queue="proc")
def record(key: int) -> int:
    """A no-op job: record that it ran."""
    _record("S", key)
    _record("F", key)
    return key


@app.task(queue="proc")
async def arecord(key: int) -> int:
    _record("S", key)
    _record("F", key)
    return key


@app.task(queue="proc")
async def sleep_async(key: int, seconds: float) -> int:
    _record("S", key)
    await asyncio.sleep(seconds)
    _record("F", key)
    return key


@app.task(queue="proc")
def sleep_sync(key: int, seconds: float) -> int:
    _record("S", key)
    time.sleep(seconds)
    _record("F", key)
    return key


@app.task(queue="proc", max_attempts=1)
def flaky(key: int) -> int:
    """Fails while ``$JOBQ_TEST_RECORD_DIR/fail-<key>`` exists (a test removes it to let a retry
    succeed)."""
    if os.path.exists(os.path.join(os.environ["JOBQ_TEST_RECORD_DIR"], f"fail-{key}")):
        raise RuntimeError(f"flaky {key}: failing on purpose")
    _record("flaky", key)
    return key


@app.task(queue="proc", timeout=120)
def stepped(key: int) -> int:
    """Reports progress in steps a test controls: each step is a JSON ``[fraction, message]``
    pushed on the Redis list ``jobq-test:steps:<key>`` (a blocking pop: no sleeps); ``null``
    ends the task."""
    import json

    import redis

    client = redis.Redis.from_url(os.environ["JOBQ_REDIS_URL"])
    try:
        while True:
            popped = client.blpop([f"jobq-test:steps:{key}"], timeout=60)
            if popped is None:
                raise RuntimeError(f"stepped {key}: no step for 60 s")
            step = json.loads(popped[1])
            if step is None:
                return key
            jobq.current_job().progress(step[0], step[1])
    finally:
        client.close()
