"""The registry of jobq's Lua scripts: one file per atomic operation in ``lua/``.

The files ship inside the wheel as ``jobq/lua/*.lua`` (hatch ``force-include``); in a source
checkout or an editable install they are read from the repository's top-level ``lua/``.

Helpers every script needs (argument checks, the clock, ready scores, dead-lettering) live once in
``lua/lib/common.lua``. The script Redis runs for an operation is that operation's file with the
prelude inserted right after its first line (the ``#!lua`` shebang, which Redis requires to come
first). Both parts are static files shipped in the package: no script text is ever built from
data, and ``loadstring`` is never used (RELIABILITY SEC6).
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
    IDLE = "idle"


def lua_dir() -> Path:
    """Where the ``.lua`` files are: inside the installed package, else the source tree."""
    packaged = resources.files("jobq").joinpath("lua")
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parents[2] / "lua"
    if source.is_dir():
        return source
    raise FileNotFoundError("jobq's lua/ scripts are missing from this installation")


#: The shared prelude, relative to :func:`lua_dir`.
PRELUDE = Path("lib") / "common.lua"


@cache
def prelude() -> str:
    """The text of ``lua/lib/common.lua``."""
    return (lua_dir() / PRELUDE).read_text(encoding="utf-8")


def operation_file(name: ScriptName) -> Path:
    """The file of one operation."""
    return lua_dir() / f"{name.value}.lua"


@cache
def source(name: ScriptName) -> str:
    """The full text Redis runs for one operation: its shebang line, the shared prelude, then
    the rest of its file (header comment and body)."""
    text = operation_file(name).read_text(encoding="utf-8")
    shebang, sep, rest = text.partition("\n")
    if not shebang.startswith("#!lua") or not sep:
        raise ValueError(f"{name.value}.lua must start with a '#!lua' shebang line")
    return f"{shebang}\n{prelude()}{rest}"


@cache
def sha1(name: ScriptName) -> str:
    """The EVALSHA digest of one script."""
    return hashlib.sha1(source(name).encode("utf-8")).hexdigest()
