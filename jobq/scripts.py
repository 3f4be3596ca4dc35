"""The registry of jobq's Lua scripts: one file per atomic operation in ``lua/``.

The files ship inside the wheel as ``jobq/lua/*.lua`` (hatch ``force-include``); in a source
checkout or an editable install they are read from the repository's top-level ``lua/``.
"""

from __future__ import annotations

import hashlib
from enum import Enum
from functools import cache
from importlib import resources
from pathlib import Path


class ScriptName(str, Enum):
    """One member per ``lua/<name>.lua``; a test checks the two match exactly."""

    ENQUEUE = "enqueue"
    CLAIM = "claim"
    ACK = "ack"
    FAIL = "fail"
    EXTEND = "extend"
    RELEASE = "release"
    REAP = "reap"
    PROMOTE = "promote"
    CANCEL = "cancel"
    RETRY_DEAD = "retry_dead"
    PURGE = "purge"


def lua_dir() -> Path:
    """Where the ``.lua`` files are: inside the installed package, else the source tree."""
    packaged = resources.files("jobq").joinpath("lua")
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parent.parent / "lua"
    if source.is_dir():
        return source
    raise FileNotFoundError("jobq's lua/ scripts are missing from this installation")


@cache
def source(name: ScriptName) -> str:
    """The text of one script."""
    return (lua_dir() / f"{name.value}.lua").read_text(encoding="utf-8")


@cache
def sha1(name: ScriptName) -> str:
    """The EVALSHA digest of one script."""
    return hashlib.sha1(source(name).encode("utf-8")).hexdigest()
