"""The running job, as a task sees it: :func:`current_job` returns its :class:`CurrentJob` (id,
attempt, queue, task; whether it was cancelled, and callbacks for when it is).

The worker sets it for every job it runs: an ``async def`` task reads it on the event loop, a plain
``def`` task in its pool thread. Outside a running job :func:`current_job` raises ``RuntimeError``.

A cancelled ``async def`` task is cancelled at its next ``await`` (``asyncio.CancelledError``); a
plain ``def`` task cannot be stopped from outside, so it looks at :attr:`CurrentJob.cancelled`
(or waits with :meth:`CurrentJob.wait_cancelled`, or registers :meth:`CurrentJob.on_cancel`) and
returns early. Either way the job ends ``cancelled``: what the task returns is never stored.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("jobq.worker")

_CURRENT: contextvars.ContextVar[CurrentJob] = contextvars.ContextVar("jobq_current_job")


class CurrentJob:
    """The job a task runs for. Read-only but for the cancellation the node delivers."""

    __slots__ = ("_callbacks", "_cancelled", "_lock", "attempt", "id", "queue", "task")

    def __init__(self, id: str, queue: str, task: str, attempt: int) -> None:
        #: The job's id.
        self.id = id
        #: The queue it was claimed from (a shard's name on a sharded queue).
        self.queue = queue
        #: The registered task name.
        self.task = task
        #: This attempt's number, 1 for the first run.
        self.attempt = attempt
        self._cancelled = threading.Event()
        self._callbacks: list[Callable[[], object]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CurrentJob(id={self.id!r}, queue={self.queue!r}, task={self.task!r}, attempt={self.attempt})"

    @property
    def cancelled(self) -> bool:
        """The job was cancelled while it ran: stop soon; a return value is discarded."""
        return self._cancelled.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block (a plain ``def`` task) up to ``timeout`` seconds or until the job is cancelled;
        True if it was. An interruptible ``time.sleep`` for tasks that pace themselves."""
        return self._cancelled.wait(timeout)

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once when the job is cancelled (at once if it already was). It runs
        on the node's event loop thread, not the task's: keep it short (set a flag, close a
        socket the task blocks on); an exception it raises is logged and ignored."""
        with self._lock:
            if not self._cancelled.is_set():
                self._callbacks.append(callback)
                return
        _call(callback, self.id)

    def cancel(self) -> None:
        """Mark the job cancelled and run the callbacks (the worker calls this; once)."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            _call(cb, self.id)


def _call(callback: Callable[[], object], job_id: str) -> None:
    try:
        callback()
    except Exception:
        log.exception("job %s: a cancellation callback raised", job_id)


def current_job() -> CurrentJob:
    """The job the calling task runs for. Raises ``RuntimeError`` outside a running job."""
    try:
        return _CURRENT.get()
    except LookupError:
        raise RuntimeError("jobq.current_job() is only available inside a task a worker runs") from None


def set_current(job: CurrentJob) -> contextvars.Token[CurrentJob]:
    """Make ``job`` the current job of this context (the worker, before it calls the task)."""
    return _CURRENT.set(job)


def reset_current(token: contextvars.Token[CurrentJob]) -> None:
    _CURRENT.reset(token)
