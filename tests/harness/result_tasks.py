"""The tasks the async-API and result tests run in a worker process:
``jobq worker -A tests.harness.result_tasks:app --redis-url URL``.

- ``add(a, b)``: returns ``a + b``;
- ``aadd(a, b)``: the same as an ``async def``;
- ``secret()``: returns a mapping with a secret-looking key (``token``) and a plain one;
- ``fail()``: raises :class:`jobq.Fail` (dead-lettered at once);
- ``nap(seconds)``: sleeps, then returns ``seconds``;
- ``big(n)``: returns a string of ``n`` characters.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jobq

app = jobq.JobQ()


@app.task(name="rt.add")
def add(a: int, b: int) -> int:
    return a + b


@app.task(name="rt.aadd")
async def aadd(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


@app.task(name="rt.secret")
def secret() -> dict[str, Any]:
    return {"token": "s3cr3t-value", "ok": 1}


@app.task(name="rt.fail")
def fail() -> None:
    raise jobq.Fail("refused on purpose")


@app.task(name="rt.nap")
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="rt.big")
def big(n: int) -> str:
    return "x" * n
