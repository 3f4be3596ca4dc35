"""The Lua script registry and each script's contract header (STYLE 3.3, RELIABILITY SEC6)."""

from __future__ import annotations

import re

import pytest

from jobq.storage.calls import JobSpec, Store
from jobq.storage.keys import Keys
from jobq.storage.scripts import PRELUDE, ScriptName, lua_dir, operation_file, prelude, prelude_for, source

STORE = Store(Keys("jobq"))
SPEC = JobSpec(id="j1", task="t", payload=b"\x92\x90\x80")

#: One call per script, and how many ARGV values each extra item adds (variadic scripts).
CALLS = {
    ScriptName.ENQUEUE: (STORE.enqueue("q", [SPEC, SPEC]), 2, 11),
    ScriptName.CLAIM: (STORE.claim("q", "n1", 5, 1000), 0, 0),
    ScriptName.ACK: (STORE.ack("q", "n1", [("a", b""), ("b", b"")]), 2, 3),
    ScriptName.FAIL: (STORE.fail("q", "n1", "a", "err"), 0, 0),
    ScriptName.EXTEND: (STORE.extend("q", "n1", 1000), 0, 0),
    ScriptName.RELEASE: (STORE.release("q", "n1", ["a", "b", "c"]), 3, 3),
    ScriptName.REAP: (STORE.reap("q", node_ttl_ms=1000), 0, 0),
    ScriptName.PROMOTE: (STORE.promote("q"), 0, 0),
    ScriptName.CANCEL: (STORE.cancel("q", "a"), 0, 0),
    ScriptName.RETRY_DEAD: (STORE.retry_dead("q", ["a"]), 1, 1),
    ScriptName.PURGE: (STORE.purge("q", "dead"), 0, 0),
    ScriptName.PROGRESS: (STORE.progress("q", "n1", "a", 1, 0.5, "half"), 0, 0),
    ScriptName.IDLE: (STORE.idle("q", "n1"), 0, 0),
}


def test_every_lua_file_has_a_script_name_and_the_prelude_is_not_an_operation() -> None:
    assert {p.stem for p in lua_dir().glob("*.lua")} == {n.value for n in ScriptName}
    assert (lua_dir() / PRELUDE).is_file()
    assert set(CALLS) == set(ScriptName)


@pytest.mark.parametrize("name", list(ScriptName), ids=lambda n: n.value)
def test_script_is_its_shebang_then_the_prelude_then_its_file(name: ScriptName) -> None:
    text = operation_file(name).read_text()
    first, rest = text.split("\n", 1)
    assert re.fullmatch(r"#!lua( flags=allow-oom)?", first)
    assert source(name) == f"{first}\n{prelude_for(rest)}{rest}"
    # Only enqueue and retry_dead add jobs; everything else must run under OOM.
    assert ("allow-oom" in first) == (name not in (ScriptName.ENQUEUE, ScriptName.RETRY_DEAD))


def test_a_script_carries_the_prelude_helpers_it_names_and_what_they_name() -> None:
    body = "local e = bad_qprefix(ARGV[1])\n"
    part = prelude_for(body)
    # bad_qprefix calls badarg; neither calls to_dead, which stays out.
    assert "local function bad_qprefix(" in part and "local function badarg(" in part
    assert "local function to_dead(" not in part
    # to_dead needs trim_dead, drop_dead, same_incarnation and release_unique (in prelude order).
    full = prelude_for("to_dead(a, b, c, d, e, f, g)\n")
    names = ["release_unique", "same_incarnation", "drop_dead", "trim_dead", "to_dead"]
    at = [full.index(f"local function {n}(") for n in names]
    assert at == sorted(at)
    assert "local function promote_due(" not in full


@pytest.mark.parametrize("name", list(ScriptName), ids=lambda n: n.value)
def test_header_lists_the_keys_and_argv_store_passes(name: ScriptName) -> None:
    text = operation_file(name).read_text()
    header = text.split("]]", 1)[0]
    for section in ("Returns:", "Errors:", "Cost:"):
        assert section in header
    keys = [int(k) for k in re.findall(r"^\s*KEYS\[(\d+)\]", header, re.M)]
    argv = [int(k) for k in re.findall(r"^\s*ARGV\[(\d+)\]", header, re.M)]
    call, items, per_item = CALLS[name]
    assert keys == list(range(1, len(call.keys) + 1))
    assert argv == list(range(1, len(argv) + 1))
    # Values after the per-item ones are listed as ARGV[<k> + <m>n] (the events cap).
    tail = re.findall(r"^\s*ARGV\[\d+ \+ \d*n\]", header, re.M)
    assert len(call.args) == len(argv) + items * per_item + len(tail)
    # Every key a call passes belongs to one queue's hash tag (one cluster slot).
    assert all("{q}" in k for k in call.keys)


def code_only(text: str) -> str:
    """Lua text without comments."""
    text = re.sub(r"--\[\[.*?\]\]", "", text, flags=re.S)
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def test_scripts_are_static_text_without_loadstring_or_keys_scans() -> None:
    """SEC6: data reaches a script only through KEYS/ARGV; no dynamic code, no keyspace scans."""
    for path in [*lua_dir().glob("*.lua"), lua_dir() / PRELUDE]:
        code = code_only(path.read_text())
        assert not re.search(r"\b(loadstring|load|dofile|loadfile|setfenv)\s*\(", code), path
        assert not re.search(r"['\"](KEYS|SCAN|FLUSHALL|FLUSHDB)['\"]", code), path


def test_prelude_defines_only_locals() -> None:
    for line in code_only(prelude()).splitlines():
        if line and not line[0].isspace() and line.strip() not in ("end", ")"):
            assert line.startswith("local "), line
