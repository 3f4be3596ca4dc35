"""FastAPI and jobq: enqueue from request handlers without blocking the event loop.

Run the API with ``uvicorn fastapi_app:api`` and a worker with ``jobq worker -A fastapi_app:jobs``
(both read ``JOBQ_REDIS_URL``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

import jobq

jobs = jobq.JobQ()


@jobs.task(queue="emails")
def send_welcome(address: str) -> str:
    # ... send the mail (this runs on a worker) ...
    return f"welcome sent to {address}"


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with jobs:  # on shutdown: close this event loop's Redis connections
        yield


api = FastAPI(lifespan=lifespan)


@api.post("/signup")
async def signup(address: str) -> dict[str, Any]:
    job = await send_welcome.aenqueue(address)  # one round trip; the loop keeps serving
    return {"job": job.id}


@api.post("/signup/wait")
async def signup_and_wait(address: str) -> dict[str, Any]:
    job = await send_welcome.aenqueue(address)
    try:
        # Woken by the job's completion notice, not by polling.
        return {"job": job.id, "result": await job.aresult(timeout=5)}
    except jobq.ResultTimeout:
        return {"job": job.id, "result": None}


@api.get("/signup/{job_id}")
async def signup_status(job_id: str) -> dict[str, Any]:
    info = await jobs.job(job_id, queue="emails").ainfo(with_args=False)
    if info.state is jobq.JobState.UNKNOWN:
        raise HTTPException(status_code=404, detail="no such job")
    return {"job": job_id, "state": info.state.value, "result": info.result}
