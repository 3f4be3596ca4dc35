"""What a type checker sees of jobq's typed tasks. mypy --strict checks this module (pyproject's
``[tool.mypy] files``); it is never run. Each ``# type: ignore[code]`` marks an error that must be
reported there: with ``warn_unused_ignores`` (part of ``--strict``) mypy fails if it no longer is.
scripts/check and `make typecheck` run it with the package."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import jobq
from jobq import Job, JobQ

app = JobQ()


@app.task
def add(a: int, b: int = 0) -> int:
    return a + b


@app.task(queue="emails", max_attempts=5)
def send(to: str, *, subject: str) -> dict[str, str]:
    return {"to": to, "subject": subject}


@app.task
async def fetch(url: str) -> bytes:
    return url.encode()


def producer() -> None:
    # The task's signature reaches enqueue; the job carries the task's result type.
    j = add.enqueue(1, 2)
    assert_type(j, Job[int])
    assert_type(j.result(timeout=5), int)
    assert_type(add.enqueue(1, b=2), Job[int])
    assert_type(send.enqueue("a@example.com", subject="hi").result(), dict[str, str])
    # An async task's job gives the coroutine's result, not a coroutine.
    assert_type(fetch.enqueue("https://example.com"), Job[bytes])
    assert_type(fetch.enqueue("https://example.com").result(), bytes)
    # Per-call options through .options() keep the signature.
    bound = add.options(priority=5, delay=30)
    assert_type(bound.enqueue(1, 2), Job[int])
    assert_type(send.options(queue="urgent").enqueue("b@example.com", subject="x"), Job[dict[str, str]])
    assert_type(app.enqueue("tasks.add", [1, 2]), Job[Any])  # by name: no types to follow

    # Wrong arguments are errors at the call site.
    add.enqueue("one", 2)  # type: ignore[arg-type]
    add.enqueue(1, 2, 3)  # type: ignore[call-arg]
    send.enqueue("a@example.com")  # type: ignore[call-arg]
    send.enqueue("a@example.com", subject=1)  # type: ignore[arg-type]
    # An async task's enqueue is overloaded (to unwrap the coroutine): mypy names the error so.
    fetch.enqueue(b"bytes")  # type: ignore[call-overload]
    add.options(priority=5).enqueue("one")  # type: ignore[arg-type]
    add.options(priority="high")  # type: ignore[arg-type]
    x: str = add.enqueue(1).result()  # type: ignore[assignment]
    del x


async def async_producer() -> None:
    j = await add.aenqueue(1, 2)
    assert_type(j, Job[int])
    assert_type(await j.aresult(timeout=5), int)
    assert_type(await fetch.aenqueue("u"), Job[bytes])
    assert_type(await (await fetch.aenqueue("u")).aresult(), bytes)
    assert_type(await add.options(queue="q").aenqueue(1), Job[int])
    assert_type(await j.astatus(), jobq.JobState)
    assert_type(await j.ainfo(), jobq.JobInfo)
    jobs = await app.aenqueue_many([add.request(1, 2)])
    assert_type(jobs, list[Job[Any]])
    await add.aenqueue("one")  # type: ignore[arg-type]
    await send.options(delay=1).aenqueue(to=1, subject="s")  # type: ignore[arg-type]
