"""jobq.current_job() and the CurrentJob a task sees: validation, cancellation callbacks, and the
progress write on the node's loop (from its thread and from a pool thread)."""

from __future__ import annotations

import asyncio
import threading

import pytest

import jobq
from jobq.current import CurrentJob, reset_current, set_current


def test_current_job_outside_a_task_raises() -> None:
    with pytest.raises(RuntimeError, match="only available inside a task"):
        jobq.current_job()
    cur = CurrentJob("j1", "q", "t", 2)
    token = set_current(cur)
    try:
        assert jobq.current_job() is cur
    finally:
        reset_current(token)


@pytest.mark.parametrize(
    ("fraction", "message"),
    [
        (-0.1, None),
        (1.01, None),
        (float("nan"), None),
        (True, None),
        ("0.5", None),
        (0.5, 3),
        (0.5, "x" * 1025),
    ],
)
def test_progress_refuses_bad_input(fraction: object, message: object) -> None:
    cur = CurrentJob("j1", "q", "t", 1)
    with pytest.raises(jobq.InvalidInput):
        cur.progress(fraction, message)  # type: ignore[arg-type]


def test_on_cancel_runs_once_and_at_once_when_already_cancelled() -> None:
    cur = CurrentJob("j1", "q", "t", 1)
    calls: list[str] = []
    cur.on_cancel(lambda: calls.append("a"))
    cur.on_cancel(lambda: 1 / 0)  # logged, never raised, the others still run
    cur.on_cancel(lambda: calls.append("b"))
    assert not cur.cancelled and not cur.wait_cancelled(0)
    cur.cancel()
    cur.cancel()
    assert cur.cancelled and cur.wait_cancelled(0) and calls == ["a", "b"]
    cur.on_cancel(lambda: calls.append("late"))
    assert calls == ["a", "b", "late"]


def test_progress_is_written_on_the_loop_and_the_latest_call_wins() -> None:
    written: list[tuple[float, str | None, str]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def writer(f: float, m: str | None) -> None:
            written.append((f, m, threading.current_thread().name))

        cur = CurrentJob("j1", "q", "t", 1, writer=writer, loop=loop)
        # A sync task: its pool thread waits until the write ran on the loop.
        await loop.run_in_executor(None, cur.progress, 0.25, "a")
        assert written[-1][:2] == (0.25, "a")
        cur.progress(0.5)  # an async task: in the background, not yet run ...
        await cur.aprogress(1, "done")
        await asyncio.sleep(0.01)  # ... and when it runs, the later call's value stays

    asyncio.run(main())
    assert [w[:2] for w in written] == [(0.25, "a"), (1.0, "done")]
    assert {w[2] for w in written} == {threading.main_thread().name}
