"""The tasks the cancel tests run: ``jobq worker -A tests.harness.cancel_tasks:app``.

Each task records in Redis, under ``cx:<key>:*`` on ``JOBQ_CANCEL_SIGNAL_URL`` (default
``JOBQ_REDIS_URL``: point it at Redis directly when the worker goes through a chaos proxy), what it
saw: ``runs`` (INCR per start), ``current`` (what ``jobq.current_job()`` gave, as JSON), ``end``
(how the run ended) and ``callback`` (the cancellation callback ran). Each returns a result the
tests check is never stored for a cancelled job.

- ``aslow(key, seconds)``: ``async def``, awaits ``asyncio.sleep``; ``end`` = "cancelled" when the
  sleep is cancelled, else "finished";
- ``sslow(key, seconds)``: ``def``, waits with ``current_job().wait_cancelled()``; ``end`` =
  "saw-cancelled" when it returns early, else "finished";
- ``stubborn(key, seconds)``: ``def`` that ignores cancellation and returns after ``seconds``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import jobq
from jobq.storage.clients import sync_client

app = jobq.JobQ(os.environ.get("JOBQ_REDIS_URL"))
# Standalone or cluster URLs alike.
_signal = sync_client(
    os.environ.get("JOBQ_CANCEL_SIGNAL_URL") or os.environ.get("JOBQ_REDIS_URL") or "redis://127.0.0.1:6379/0"
)


def _started(key: str) -> jobq.CurrentJob:
    cur = jobq.current_job()
    _signal.set(
        f"cx:{key}:current",
        json.dumps({"id": cur.id, "queue": cur.queue, "task": cur.task, "attempt": cur.attempt}),
    )
    _signal.incr(f"cx:{key}:runs")
    return cur


@app.task(name="cancel.aslow", queue="fault", max_attempts=3)
async def aslow(key: str, seconds: float) -> str:
    _started(key)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _signal.set(f"cx:{key}:end", "cancelled")
        raise
    _signal.set(f"cx:{key}:end", "finished")
    return "not-stored"


@app.task(name="cancel.sslow", queue="fault", max_attempts=3)
def sslow(key: str, seconds: float) -> str:
    cur = _started(key)
    cur.on_cancel(lambda: _signal.set(f"cx:{key}:callback", "1"))
    if cur.wait_cancelled(seconds):
        _signal.set(f"cx:{key}:end", "saw-cancelled")
        return "not-stored"
    _signal.set(f"cx:{key}:end", "finished")
    return "not-stored"


@app.task(name="cancel.stubborn", queue="fault", max_attempts=3)
def stubborn(key: str, seconds: float) -> str:
    _started(key)
    time.sleep(seconds)
    _signal.set(f"cx:{key}:end", "finished")
    return "not-stored"


@app.task(name="cancel.sreport", queue="fault")
def sreport(key: str) -> None:
    """Reports progress (stored when the call returns), then waits to be cancelled."""
    cur = _started(key)
    cur.progress(0.5, "half way")
    _signal.set(f"cx:{key}:reported", "1")
    cur.wait_cancelled(60)


@app.task(name="cancel.areport", queue="fault")
async def areport(key: str) -> None:
    cur = _started(key)
    cur.progress(0.1)  # in the background: never blocks the loop
    await cur.aprogress(0.75, "three quarters")
    _signal.set(f"cx:{key}:reported", "1")
    await asyncio.sleep(60)
