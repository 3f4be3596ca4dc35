"""Tasks for the worker processes of tests/integration/test_events.py (``jobq worker -A
tests.integration.event_tasks``); the app reads its Redis URL from ``JOBQ_REDIS_URL``."""

from __future__ import annotations

import jobq

app = jobq.JobQ()


@app.task(queue="ev", max_attempts=3, retry_backoff=0)
def half_then_flaky(secret: str) -> str:
    """Reports progress, fails its first attempt (retried at once), finishes the second."""
    job = jobq.current_job()
    job.progress(0.5, "half way")
    if job.attempt == 1:
        raise RuntimeError("first attempt fails")
    return "ok"


@app.task(queue="ev", max_attempts=1)
def always_fails(secret: str) -> None:
    raise ValueError("no luck")
