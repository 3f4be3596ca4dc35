"""The bounded thread pool the web layer runs its Redis work on (one per process)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Threads (and so at most Redis connections) doing requests' Redis work at once.
MAX_THREADS = 32

_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def run_sync(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` on the process's bounded pool of ``MAX_THREADS`` (a plain executor:
    anyio's per-call bookkeeping, as in Starlette's ``run_in_threadpool``, cost a fifth of the
    request rate)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="jobq-http")
    return asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args))
