"""Script ARGV fuzz (RELIABILITY B3): every Lua script, called with a valid argument vector that
has one or more values made bad (missing, extra, non-numeric, negative, huge, empty, foreign key
prefix, bad ids), answers a "BADARG <field> ..." error and leaves the keyspace unchanged, because
every script validates before its first write."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobq
from jobq.storage.calls import MAX_BATCH, MAX_CLAIM_PROMOTE, MAX_EXTEND, MAX_REAP, MAX_SCAN, Call
from jobq.storage.scripts import ScriptName, source
from tests.integration.core_support import assert_unchanged, snapshot

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
LATER = T0 + 3_600_000  # the leases below have expired by then
Q = "fuzz"

NOT_INT = ["", "abc", "1.5", "1e3", "0x10", " 5", "5 ", "nan", "inf", "-inf", str(2**53), "9" * 30, "+5"]
NOW_BAD = [v for v in NOT_INT if v != ""] + ["-1", "-9007199254740991"]


def int_bad(lo: int | None, hi: int | None) -> list[str]:
    out = list(NOT_INT)
    if lo is not None:
        out += [str(lo - 1), str(lo - 10**6)]
    if hi is not None:
        out += [str(hi + 1), str(hi + 10**9)]
    return out


OPT_INT_BAD = [v for v in NOT_INT if v != ""] + ["-1"]  # "" is valid: "not given"
QPREFIX_BAD = ["", "x", "jobq:{other}:", "jobq:{fuzz}", "jobq:", "{fuzz}:", "jobq:{fuzz}:ready"]
NODE_BAD = ["", "a b", "x{y}", "a:b", "n\n", "x" * 129, "other-node"]
ID_BAD = ["", "a b", "{x}", "x" * 129, "a\tb"]
#: An attempt number: "" is valid ("the attempt this node holds").
ATTEMPT_BAD = [v for v in NOT_INT if v != ""] + ["0", "-1"]
CALL_ID_BAD = ["a b", "x" * 65, "{x}", "a:b", "a\nb"]
#: The events stream's length cap, the last value of every script that writes events.
EVENTS_BAD = int_bad(0, None)

#: Per script: 1-based ARGV position -> bad values for it.
BAD: dict[ScriptName, dict[int, list[str]]] = {
    ScriptName.ENQUEUE: {
        1: QPREFIX_BAD,
        2: NOW_BAD,
        3: int_bad(0, None),
        4: ["a b", "{x}", "a\nb"],
        5: int_bad(0, None),
        6: int_bad(1, MAX_BATCH),
        7: ID_BAD,
        8: ["", "a b", "x" * 201, "a\nb"],
        10: int_bad(-100, 100),
        11: [*OPT_INT_BAD, str(2**53 - 1)],  # delay: now + delay beyond 2^53
        12: OPT_INT_BAD,
        13: int_bad(1, 1_000_000),
        14: int_bad(0, None),
        15: int_bad(0, None),
        16: ["abc", "+", "+-1", "-5", "1.5", "+1e3", "1", str(T0 - 1)],  # deadline; "1" is before now
        17: ["u" * 513, "a\x01b"],
        18: EVENTS_BAD,  # events_max, last (one job)
    },
    ScriptName.CLAIM: {
        1: QPREFIX_BAD,
        2: NODE_BAD,
        3: NOW_BAD,
        4: int_bad(1, None),
        5: int_bad(0, MAX_BATCH),
        6: int_bad(0, MAX_CLAIM_PROMOTE),
        7: int_bad(1, None),
        8: int_bad(1, None),
        9: EVENTS_BAD,
    },
    ScriptName.ACK: {
        1: QPREFIX_BAD,
        2: NODE_BAD,
        3: NOW_BAD,
        4: int_bad(0, None),
        5: int_bad(0, None),
        6: int_bad(1, MAX_BATCH),
        7: CALL_ID_BAD,
        8: ID_BAD,
        9: ATTEMPT_BAD,
        11: EVENTS_BAD,  # last (one job)
    },
    ScriptName.FAIL: {
        1: QPREFIX_BAD,
        2: NODE_BAD,
        3: NOW_BAD,
        4: ID_BAD,
        6: ["", "x", "RETRY", "dead "],
        7: OPT_INT_BAD,
        8: ["", "abc", "-0.1", "1.5", "nan", "inf"],
        9: int_bad(0, None),
        10: int_bad(1, None),
        11: int_bad(1, None),
        12: ATTEMPT_BAD,
        13: ["x", "0", "2", " 1"],
        14: EVENTS_BAD,
    },
    ScriptName.EXTEND: {
        1: NODE_BAD,
        2: NOW_BAD,
        3: int_bad(1, None),
        4: int_bad(1, MAX_EXTEND),
        5: ["{x}", "a {b}", "x" * 129, "ok\x00"],
    },
    ScriptName.RELEASE: {
        1: QPREFIX_BAD,
        2: NODE_BAD,
        3: NOW_BAD,
        4: int_bad(0, MAX_BATCH),
        5: int_bad(1, None),
        6: int_bad(1, None),
        7: ID_BAD,
        8: ATTEMPT_BAD,
        9: int_bad(0, 1_000_000),
        10: EVENTS_BAD,  # last (one job)
    },
    ScriptName.REAP: {
        1: QPREFIX_BAD,
        2: NOW_BAD,
        3: int_bad(1, MAX_REAP),
        4: int_bad(1, None),
        5: int_bad(1, None),
        6: int_bad(1, None),
        7: int_bad(0, None),
        8: EVENTS_BAD,
    },
    ScriptName.PROMOTE: {1: QPREFIX_BAD, 2: NOW_BAD, 3: int_bad(1, MAX_SCAN), 4: EVENTS_BAD},
    ScriptName.CANCEL: {1: QPREFIX_BAD, 2: ID_BAD, 3: NOW_BAD, 4: int_bad(0, None), 5: EVENTS_BAD},
    ScriptName.RETRY_DEAD: {
        1: QPREFIX_BAD,
        2: NOW_BAD,
        3: int_bad(1, MAX_BATCH),
        4: int_bad(0, MAX_BATCH),
        5: ID_BAD,
        6: EVENTS_BAD,  # last (one id)
    },
    ScriptName.PURGE: {1: QPREFIX_BAD, 2: int_bad(1, MAX_SCAN)},
    ScriptName.PROGRESS: {
        1: QPREFIX_BAD,
        2: NODE_BAD,
        3: NOW_BAD,
        4: ID_BAD,
        5: ATTEMPT_BAD,
        6: ["", "abc", "-0.1", "1.5", "nan", "inf"],
        7: ["x" * 1025],
        8: EVENTS_BAD,
    },
    ScriptName.IDLE: {
        1: QPREFIX_BAD,
        2: [v for v in NODE_BAD if v != "other-node"],  # any well-formed node id may arm
        3: NOW_BAD,
        4: ["", "ARM", "x", "arm ", "leave\n"],
        5: ["", "abc", "-2", "1.5", "nan", "inf"],
    },
}


@pytest.fixture
def seeded(redis_url: str) -> Iterator[tuple[jobq.JobQ, dict[ScriptName, Call[Any]]]]:
    """A queue with jobs in every state, and for each script a call that is valid and would write
    (so a script that wrote before validating would show up in the snapshot)."""
    app = jobq.JobQ(redis_url, clock=jobq.FakeClock(T0))
    s = app.store
    for i in range(4):
        app.enqueue("t", queue=Q, job_id=f"r{i}", unique_key=f"u{i}")
    app.enqueue("t", queue=Q, job_id="s0", delay=60)
    app.run(s.claim(Q, "n1", 2, 30_000, now_ms=T0))  # r0, r1 active on n1
    app.run(s.extend(Q, "n1", 30_000, now_ms=T0))
    app.enqueue("t", queue=Q, job_id="d0", max_attempts=1)
    app.run(s.claim(Q, "n2", 2, 30_000, now_ms=T0))  # r2, r3 on n2
    app.run(s.fail(Q, "n2", "r2", "boom", dead=True, now_ms=T0))  # r2 dead
    calls: dict[ScriptName, Call[Any]] = {
        ScriptName.ENQUEUE: s.enqueue(
            Q, [app.prepare(jobq.EnqueueRequest("t", queue=Q, job_id="new"))[1]], now_ms=T0
        ),
        ScriptName.CLAIM: s.claim(Q, "n1", 5, 30_000, now_ms=LATER),
        # Before the ack: r0 is still running on n1.
        ScriptName.PROGRESS: s.progress(Q, "n1", "r0", 1, 0.25, "a quarter", now_ms=T0),
        ScriptName.ACK: s.ack(Q, "n1", [("r0", b"\x01")], now_ms=T0),
        ScriptName.FAIL: s.fail(Q, "n1", "r1", "err", jitter=0.5, now_ms=T0),
        ScriptName.EXTEND: s.extend(Q, "n1", 30_000, now_ms=T0),
        ScriptName.RELEASE: s.release(Q, "n2", ["r3"], now_ms=T0),
        ScriptName.REAP: s.reap(Q, node_ttl_ms=1000, now_ms=LATER),
        ScriptName.PROMOTE: s.promote(Q, now_ms=LATER),
        ScriptName.CANCEL: s.cancel(Q, "s0", now_ms=T0),
        ScriptName.RETRY_DEAD: s.retry_dead(Q, ["r2"], now_ms=T0),
        ScriptName.PURGE: s.purge(Q, "ready"),
        # Last in the base run: ready was purged, so the node arms its wake-up token.
        ScriptName.IDLE: s.idle(Q, "n9", "arm", now_ms=T0),
    }
    assert set(calls) == set(ScriptName) == set(BAD)
    yield app, calls
    app.close()


def raw_call(r: redis.Redis) -> Callable[[Call[Any], list[Any]], Any]:
    scripts = {n: r.register_script(source(n)) for n in ScriptName}

    def call(c: Call[Any], argv: list[Any]) -> Any:
        return scripts[c.script](keys=c.keys, args=argv, client=r)

    return call


def test_every_base_call_is_valid_and_writes(
    seeded: tuple[jobq.JobQ, dict[ScriptName, Call[Any]]], r: redis.Redis
) -> None:
    """The fuzz below starts from these calls: each must be accepted and change the keyspace."""
    _, calls = seeded
    call = raw_call(r)
    for name, c in calls.items():
        before = snapshot(r)
        call(c, list(c.args))
        assert snapshot(r) != before, name


def mutate(data: st.DataObject, name: ScriptName, argv: list[Any]) -> list[Any]:
    kind = data.draw(st.sampled_from(["bad-values", "missing", "extra"]), label="kind")
    if kind == "missing":
        k = data.draw(st.integers(1, len(argv)), label="drop")
        return argv[: len(argv) - k]
    if kind == "extra":
        extra = data.draw(
            st.lists(st.sampled_from(["", "1", "x", "-1"]), min_size=1, max_size=3), label="extra"
        )
        return argv + extra
    spec = BAD[name]
    positions = data.draw(st.sets(st.sampled_from(sorted(spec)), min_size=1, max_size=3), label="positions")
    out = list(argv)
    for p in positions:
        out[p - 1] = data.draw(st.sampled_from(spec[p]), label=f"ARGV[{p}]")
    return out


@pytest.mark.parametrize("name", sorted(ScriptName, key=lambda n: n.value), ids=lambda n: n.value)
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bad_argv_is_refused_with_badarg_and_changes_nothing(
    seeded: tuple[jobq.JobQ, dict[ScriptName, Call[Any]]],
    r: redis.Redis,
    name: ScriptName,
    data: st.DataObject,
) -> None:
    """500 bad argument vectors per script (B3)."""
    _, calls = seeded
    call = raw_call(r)
    c = calls[name]
    argv = mutate(data, name, list(c.args))
    before, size = snapshot(r), r.dbsize()
    with pytest.raises(redis.exceptions.ResponseError, match=r"^BADARG \w+ ") as info:
        call(c, argv)
    assert "BUSY" not in str(info.value)
    assert_unchanged(r, before, size)


def test_wrong_key_count_is_refused(
    seeded: tuple[jobq.JobQ, dict[ScriptName, Call[Any]]], r: redis.Redis
) -> None:
    _, calls = seeded
    call = raw_call(r)
    before, size = snapshot(r), r.dbsize()
    for name, c in calls.items():
        for keys in (c.keys[:-1], [*c.keys, c.keys[0]]):
            with pytest.raises(redis.exceptions.ResponseError, match=r"^BADARG"):
                call(Call(c.script, keys, c.args, c.parse), list(c.args))
        assert name
    assert_unchanged(r, before, size)


def test_a_script_without_its_slot_guard_is_refused(
    seeded: tuple[jobq.JobQ, dict[ScriptName, Call[Any]]], r: redis.Redis
) -> None:
    """Every script that builds per-job keys must declare the queue's slot guard last (the key
    that keeps it from running while the queue's cluster slot is half moved): a call whose last
    key is another key of the queue is refused and writes nothing."""
    _, calls = seeded
    call = raw_call(r)
    guarded = {n for n in ScriptName if n is not ScriptName.EXTEND}
    before, size = snapshot(r), r.dbsize()
    for name in guarded:
        c = calls[name]
        assert c.keys[-1] == f"jobq:{{{Q}}}:slot-guard", name
        keys = [*c.keys[:-1], f"jobq:{{{Q}}}:paused"]
        with pytest.raises(redis.exceptions.ResponseError, match=r"^BADARG keys .*slot guard"):
            call(Call(c.script, keys, c.args, c.parse), list(c.args))
    assert_unchanged(r, before, size)
    assert r.exists(f"jobq:{{{Q}}}:slot-guard") == 0


def test_a_script_whose_events_key_is_another_key_is_refused(
    seeded: tuple[jobq.JobQ, dict[ScriptName, Call[Any]]], r: redis.Redis
) -> None:
    """The scripts that write lifecycle events take the queue's stream as the key before the slot
    guard: any other key there is refused before the first write, so an event can only ever land
    in its own queue's stream."""
    _, calls = seeded
    call = raw_call(r)
    writers = {n for n in ScriptName if n not in (ScriptName.EXTEND, ScriptName.PURGE, ScriptName.IDLE)}
    before, size = snapshot(r), r.dbsize()
    for name in writers:
        c = calls[name]
        assert c.keys[-2] == f"jobq:{{{Q}}}:events", name
        for other in (f"jobq:{{{Q}}}:events2", f"jobq:{{{Q}}}:ready"):  # same slot (a cluster leg)
            keys = [*c.keys[:-2], other, c.keys[-1]]
            with pytest.raises(redis.exceptions.ResponseError, match=r"^BADARG keys .*events stream"):
                call(Call(c.script, keys, c.args, c.parse), list(c.args))
    assert_unchanged(r, before, size)
