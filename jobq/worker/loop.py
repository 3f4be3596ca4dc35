"""The worker's event loop: uvloop where it is installed, else asyncio's, with timers that fire on
time.

On Linux asyncio waits in ``epoll_wait``, whose timeout is whole milliseconds: Python rounds a
wait up to the next millisecond, so a timer due in 0.3 ms fires about 1 ms from now. Twenty
``await asyncio.sleep(0.01)`` started together share one wake-up and lose little; the jobs of a
busy node start a few microseconds apart, their timers fall between millisecond steps, and each
wake-up is late by up to 1 ms (half of it on average): 2,000 jobs that sleep 10 ms ran at about
1,720 jobs/s at concurrency 20 instead of 2,000.

:class:`PreciseEpollSelector` keeps epoll for the I/O and waits on the epoll descriptor itself
with ``select()``, whose timeout has microseconds; then it collects the events with a
non-blocking ``epoll_wait``. One extra system call per timed wait, no busy waiting, and every
descriptor the loop watches still goes through epoll (``select()`` sees only the epoll
descriptor, so its 1,024-descriptor limit does not apply to the loop's own sockets; should the
epoll descriptor itself be numbered beyond it, the selector falls back to epoll's rounding).
Other platforms keep asyncio's default selector (kqueue's timeouts already have nanoseconds).

:func:`run` also sets the thread's timer slack to 1 µs (``prctl(PR_SET_TIMERSLACK)``): Linux
otherwise lets each timed wait of a normal thread end up to 50 µs late, so it may batch wake-ups.
On a 2-core VM that halved the lateness of a 10 ms sleep among 20 (about 100 -> 50 µs), worth
about 0.4 % on 2,000 jobs that sleep 10 ms (1,948 -> 1,955 jobs/s, medians of 9 runs each).

uvloop, where it is installed (``jobq[web]`` brings it), runs the node instead (:func:`loop_kind`):
its socket reads and writes cost less per wake-up, claim and ack than asyncio's, which shortens
the worker's part of an idle node's pickup (docs/performance.md). Its timers have whole
milliseconds (a ``sleep(0.0003)`` returns at once, ``loop.time()`` moves in milliseconds).
``JOBQ_WORKER_LOOP=asyncio`` keeps the precise asyncio loop above; ``uvloop`` insists on
uvloop (an error without it); ``auto`` (the default) takes uvloop when it imports.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import select
import selectors
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: select()'s descriptor limit (FD_SETSIZE on Linux).
_FD_SETSIZE = 1024

#: The environment variable that picks the node's event loop (:func:`loop_kind`).
LOOP_ENV = "JOBQ_WORKER_LOOP"
LOOP_CHOICES = ("auto", "asyncio", "uvloop")


class LoopChoiceError(ValueError):
    """``JOBQ_WORKER_LOOP`` names no loop, or uvloop, which does not import."""


def loop_kind(wanted: str | None = None) -> str:
    """The loop :func:`run` uses: ``"uvloop"`` or ``"asyncio"``. ``wanted`` (default: the
    ``JOBQ_WORKER_LOOP`` environment variable, else ``auto``) is ``auto`` (uvloop when it
    imports), ``asyncio`` or ``uvloop``."""
    if wanted is None:
        wanted = os.environ.get(LOOP_ENV, "")
    wanted = wanted.strip().lower() or "auto"
    if wanted not in LOOP_CHOICES:
        raise LoopChoiceError(f"{LOOP_ENV}={wanted!r}: expected one of {', '.join(LOOP_CHOICES)}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        if wanted == "uvloop":
            raise LoopChoiceError(f"{LOOP_ENV}=uvloop: uvloop does not import ({exc})") from None
        return "asyncio"
    return "uvloop"


def running_loop_kind() -> str:
    """Which loop runs this coroutine: ``"uvloop"`` or ``"asyncio"`` (for the node's start line)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


if hasattr(selectors, "EpollSelector"):

    class PreciseEpollSelector(selectors.EpollSelector):
        """epoll, with timed waits to the microsecond (see the module docstring)."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is not None and timeout > 0:
                epfd = self.fileno()
                if epfd < _FD_SETSIZE:
                    # Readable once any registered descriptor is ready; the events are then
                    # collected without blocking.
                    select.select([epfd], [], [], timeout)
                    timeout = 0
            return super().select(timeout)

    def new_event_loop() -> asyncio.AbstractEventLoop:
        """An asyncio event loop whose timers fire within microseconds of their time."""
        return asyncio.SelectorEventLoop(PreciseEpollSelector())

else:  # pragma: no cover - not Linux

    def new_event_loop() -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()


#: prctl() option that sets the calling thread's timer slack, in nanoseconds (linux/prctl.h).
_PR_SET_TIMERSLACK = 29
#: The slack asked for: 1 µs, where Linux's default lets a timed wait end up to 50 µs late.
_TIMER_SLACK_NS = 1000


def _tight_timer_slack() -> None:
    """Ask Linux to end this thread's timed waits within 1 µs of their time (threads started
    from it inherit the setting). Elsewhere, or without prctl, nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, _TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        pass


def _uvloop_new_event_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T], *, kind: str | None = None) -> T:
    """:func:`asyncio.run` on the loop :func:`loop_kind` picks (``kind``: ``auto``, ``asyncio``
    or ``uvloop``; default ``JOBQ_WORKER_LOOP``): uvloop, or :func:`new_event_loop`. Raises
    :class:`LoopChoiceError` (before ``main`` starts) for a choice it cannot honour."""
    try:
        factory = _uvloop_new_event_loop if loop_kind(kind) == "uvloop" else new_event_loop
    except LoopChoiceError:
        main.close()
        raise
    _tight_timer_slack()
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    loop = factory()  # pragma: no cover - Python 3.10
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
