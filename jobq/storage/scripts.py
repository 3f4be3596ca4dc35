"""The registry of jobq's Lua scripts: one file per atomic operation in ``lua/``.

The files ship inside the wheel as ``jobq/lua/*.lua`` (hatch ``force-include``); in a source
checkout or an editable install they are read from the repository's top-level ``lua/``.

Helpers every script needs (argument checks, the clock, ready scores, dead-lettering) live once in
``lua/lib/common.lua``. The script Redis runs for an operation is that operation's file with the
parts of the prelude it uses inserted right after its first line (the ``#!lua`` shebang, which
Redis requires to come first): Redis runs a script's whole text on every call, and each helper
defined costs a closure, so an operation carries only the helpers it names (directly or through
another helper it carries), in the prelude's order. Both parts are static files shipped in the
package (the cut is made at the prelude's blank lines): no script text is ever built from data,
and ``loadstring`` is never used (RELIABILITY SEC6).
"""

from __future__ import annotations

import hashlib
import re
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
    PROGRESS = "progress"
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


_DEFINES = re.compile(r"^local (?:function )?(\w+(?:\s*,\s*\w+)*)", re.M)


def _paragraphs(text: str) -> list[tuple[str, frozenset[str]]]:
    """The prelude cut at blank lines: each paragraph's text (with its trailing blank line) and
    the names it defines at top level (``local NAME``, ``local function NAME``)."""
    out = []
    for chunk in re.split(r"(?<=\n)(?=\n)", text):
        names = {n.strip() for m in _DEFINES.finditer(chunk) for n in m.group(1).split(",")}
        out.append((chunk, frozenset(names)))
    return out


def _uses(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.:]){re.escape(name)}\b", text) is not None


def prelude_for(body: str) -> str:
    """The part of the prelude a script body needs: every paragraph that defines nothing (the
    header comment) and every one that defines a name the body uses, directly or through another
    paragraph kept, in the prelude's order."""
    paras = _paragraphs(prelude())
    keep = [not names for _, names in paras]
    used_text = body
    changed = True
    while changed:
        changed = False
        for i, (chunk, names) in enumerate(paras):
            if not keep[i] and any(_uses(used_text, n) for n in names):
                keep[i] = True
                used_text += chunk
                changed = True
    return "".join(chunk for (chunk, _), k in zip(paras, keep, strict=True) if k)


def operation_file(name: ScriptName) -> Path:
    """The file of one operation."""
    return lua_dir() / f"{name.value}.lua"


@cache
def source(name: ScriptName) -> str:
    """The full text Redis runs for one operation: its shebang line, the parts of the shared
    prelude it uses (:func:`prelude_for`), then the rest of its file (header comment and body)."""
    text = operation_file(name).read_text(encoding="utf-8")
    shebang, sep, rest = text.partition("\n")
    if not shebang.startswith("#!lua") or not sep:
        raise ValueError(f"{name.value}.lua must start with a '#!lua' shebang line")
    return f"{shebang}\n{prelude_for(rest)}{rest}"


@cache
def sha1(name: ScriptName) -> str:
    """The EVALSHA digest of one script."""
    return hashlib.sha1(source(name).encode("utf-8")).hexdigest()
