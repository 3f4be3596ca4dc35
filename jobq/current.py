"""The running job, as a task sees it: :func:`current_job` returns its :class:`CurrentJob` (id,
attempt, queue, task; :meth:`~CurrentJob.progress` to record how far it got; whether it was
cancelled, and callbacks for when it is).

The worker sets it for every job it runs: an ``async def`` task reads it on the event loop, a plain
``def`` task in its pool thread. Outside a running job :func:`current_job` raises ``RuntimeError``.

A cancelled ``async def`` task is cancelled at its next ``await`` (``asyncio.CancelledError``); a
plain ``def`` task cannot be stopped from outside, so it looks at :attr:`CurrentJob.cancelled`
(or waits with :meth:`CurrentJob.wait_cancelled`, or registers :meth:`CurrentJob.on_cancel`) and
returns early. Either way the job ends ``cancelled``: what the task returns is never stored.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
from collections.abc import Awaitable, Callable

from jobq.errors import InvalidInput

log = logging.getLogger("jobq.worker")

_CURRENT: contextvars.ContextVar[CurrentJob] = contextvars.ContextVar("jobq_current_job")
#: Guards every CurrentJob's cancellation state and progress numbering: held only for a few
#: assignments (never while a callback runs or a task waits), so one lock for all of them costs
#: nothing, and the node does not make a lock per job.
_LOCK = threading.Lock()

#: Longest a plain ``def`` task waits in :meth:`CurrentJob.progress` for the write (seconds).
PROGRESS_WAIT = 10.0
#: Most bytes of a progress message (UTF-8).
MAX_PROGRESS_MESSAGE = 1024

#: Writes one progress record; the worker supplies it (never raises: a failed write is logged).
ProgressWriter = Callable[[float, "str | None"], Awaitable[None]]


class CurrentJob:
    """The job a task runs for. Read-only but for the cancellation the node delivers."""

    __slots__ = (
        "_callbacks",
        "_cancelled",
        "_event",
        "_lock",
        "_loop",
        "_pending",
        "_seq",
        "_write_lock",
        "_writer",
        "_written",
        "attempt",
        "id",
        "queue",
        "task",
    )

    def __init__(
        self,
        id: str,
        queue: str,
        task: str,
        attempt: int,
        *,
        writer: ProgressWriter | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        #: The job's id.
        self.id = id
        #: The queue it was claimed from (a shard's name on a sharded queue).
        self.queue = queue
        #: The registered task name.
        self.task = task
        #: This attempt's number, 1 for the first run.
        self.attempt = attempt
        # Set once, under _lock. The Event, the callback list and the set of pending writes are
        # made only when a task needs them: the worker makes one of these per job, and a drain of
        # short jobs pays for every object made here (most jobs never wait, register or write).
        self._cancelled = False
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[], object]] | None = None
        self._lock = _LOCK
        self._writer = writer
        #: The node's event loop, where the writes run.
        self._loop = loop
        self._pending: set[asyncio.Future[None]] | None = None
        #: Progress calls numbered as they are made; the newest written wins (a background write
        #: that comes late never overwrites a later call's value).
        self._seq = 0
        self._written = 0
        self._write_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"CurrentJob(id={self.id!r}, queue={self.queue!r}, task={self.task!r}, attempt={self.attempt})"

    @property
    def cancelled(self) -> bool:
        """The job was cancelled while it ran: stop soon; a return value is discarded."""
        return self._cancelled

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block (a plain ``def`` task) up to ``timeout`` seconds or until the job is cancelled;
        True if it was. An interruptible ``time.sleep`` for tasks that pace themselves."""
        with self._lock:
            if self._cancelled:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` once when the job is cancelled (at once if it already was). It runs
        on the node's event loop thread, not the task's: keep it short (set a flag, close a
        socket the task blocks on); an exception it raises is logged and ignored."""
        with self._lock:
            if not self._cancelled:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        _call(callback, self.id)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record how far the job has got: ``fraction`` 0..1 and an optional ``message`` (at most
        1024 bytes), stored on the job (``job.info()``, ``jobq status``, ``GET /jobs/{id}``).

        In a plain ``def`` task it returns once the value is stored (or after 10 s); in an
        ``async def`` task it never blocks the loop: the write is sent in the background (``await
        job.aprogress(...)`` to wait for it). A job no longer this attempt's (cancelled, lost)
        keeps what it had; a failed write is logged, never raised."""
        fraction = _check(fraction, message)
        loop = self._loop
        if self._writer is None or loop is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        seq = self._next()
        if here is loop:
            fut = asyncio.ensure_future(self._write(seq, fraction, message))
            if self._pending is None:
                self._pending = set()
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
            return
        done = asyncio.run_coroutine_threadsafe(self._write(seq, fraction, message), loop)
        try:
            done.result(PROGRESS_WAIT)
        except Exception as exc:  # a timeout, a stopping loop: progress never fails the task
            log.debug("job %s: progress not recorded: %r", self.id, exc)

    async def aprogress(self, fraction: float, message: str | None = None) -> None:
        """:meth:`progress` for ``async def`` tasks, returning once the value is stored."""
        fraction = _check(fraction, message)
        if self._writer is not None:
            await self._write(self._next(), fraction, message)

    def _next(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    async def _write(self, seq: int, fraction: float, message: str | None) -> None:
        """One write at a time, on the node's loop; skipped if a later call was written."""
        assert self._writer is not None
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            if seq < self._written:
                return
            self._written = seq
            await self._writer(fraction, message)

    def cancel(self) -> None:
        """Mark the job cancelled and run the callbacks (the worker calls this; once)."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            event, callbacks, self._callbacks = self._event, self._callbacks, None
        if event is not None:
            event.set()
        for cb in callbacks or ():
            _call(cb, self.id)


def _check(fraction: float, message: str | None) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise InvalidInput(f"fraction: must be a number 0..1, got {fraction!r}", "fraction")
    value = float(fraction)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"fraction: must be a number 0..1, got {fraction!r}", "fraction")
    if message is not None:
        if not isinstance(message, str):
            raise InvalidInput(f"message: must be a string or None, got {type(message).__name__}", "message")
        try:
            size = len(message.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidInput("message: not valid UTF-8 text (a lone surrogate)", "message") from None
        if size > MAX_PROGRESS_MESSAGE:
            raise InvalidInput(f"message: at most {MAX_PROGRESS_MESSAGE} bytes, got {size}", "message")
    return value


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
