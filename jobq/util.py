"""Small helpers with no jobq imports, usable from every layer."""

from __future__ import annotations

from typing import Any


def to_str(value: Any, errors: str = "strict") -> str:
    """A reply value from redis-py as text: ``bytes`` decoded as UTF-8 (``errors`` as for
    :meth:`bytes.decode`: ``"replace"`` where a bad byte must not stop a listing), anything
    else through ``str``."""
    return value.decode("utf-8", errors) if isinstance(value, bytes) else str(value)


def refused(exc: BaseException) -> bool:
    """Was a connection refused (nothing listening), anywhere in the exception's chain?"""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
