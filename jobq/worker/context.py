"""The narrow context the worker's background components need from the app: its key names, its
script-call builder and its clock. :class:`jobq.JobQ` is one; so is any object with these three,
which is how the heartbeat and the reaper avoid depending on the public API."""

from __future__ import annotations

from typing import Protocol

from jobq.storage.calls import Store
from jobq.storage.keys import Keys


class Context(Protocol):
    """Keys, script calls and the clock (``now_ms()``: the fake clock's time, None for Redis's)."""

    @property
    def keys(self) -> Keys: ...

    @property
    def store(self) -> Store: ...

    def now_ms(self) -> int | None: ...
