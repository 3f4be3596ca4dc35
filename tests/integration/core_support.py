"""Helpers for the core tests (tests/integration/test_core_*.py): keyspace snapshots and the
place-of-every-job scan behind the invariants I1-I3 of RELIABILITY.md."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from jobq.storage.keys import Keys


def snapshot(r: redis.Redis) -> dict[bytes, tuple[bytes, bool]]:
    """Every key with its DUMP and whether it has a TTL: equal snapshots = identical keyspace."""
    keys = list(r.scan_iter(count=1000))
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.dump(key)
        pipe.pttl(key)
    raw = pipe.execute()
    out: dict[bytes, tuple[bytes, bool]] = {}
    for i, key in enumerate(keys):
        dumped, pttl = raw[2 * i], raw[2 * i + 1]
        if dumped is None:  # expired between SCAN and DUMP
            continue
        out[key] = (dumped, pttl >= 0)
    return out


def assert_unchanged(r: redis.Redis, before: dict[bytes, tuple[bytes, bool]], dbsize: int) -> None:
    assert r.dbsize() == dbsize
    after = snapshot(r)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not changed, f"keys changed: {sorted(changed)[:10]}"


@dataclass
class Places:
    """Where every job id of one queue is, read from Redis."""

    ready: list[str]
    scheduled: list[str]
    active: dict[str, list[str]]
    dead: list[str]
    finished: list[str]
    leases: dict[str, int]

    def where(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for place, ids in (
            ("ready", self.ready),
            ("scheduled", self.scheduled),
            ("dead", self.dead),
            ("finished", self.finished),
        ):
            for i in ids:
                out.setdefault(i, []).append(place)
        for node, ids in self.active.items():
            for i in ids:
                out.setdefault(i, []).append(f"active:{node}")
        return out


def read_places(r: redis.Redis, keys: Keys, queue: str, nodes: Iterable[str]) -> Places:
    nodes = list(nodes)
    pipe = r.pipeline(transaction=False)
    pipe.zrange(keys.ready(queue), 0, -1)
    pipe.zrange(keys.scheduled(queue), 0, -1)
    for n in nodes:
        pipe.zrange(keys.active(queue, n), 0, -1)
    pipe.zrange(keys.dead(queue), 0, -1)
    pipe.zrange(keys.finished(queue), 0, -1)
    pipe.zrange(keys.leases(queue), 0, -1, withscores=True)
    raw: list[Any] = pipe.execute()

    def ids(v: list[bytes]) -> list[str]:
        return [x.decode() for x in v]

    active = {n: ids(raw[2 + i]) for i, n in enumerate(nodes)}
    k = 2 + len(nodes)
    return Places(
        ready=ids(raw[0]),
        scheduled=ids(raw[1]),
        active=active,
        dead=ids(raw[k]),
        finished=ids(raw[k + 1]),
        leases={m.decode(): int(s) for m, s in raw[k + 2]},
    )


def check_invariants(places: Places, job_ids: Iterable[str] = ()) -> dict[str, str]:
    """I1: each job id in exactly one place (and each given id somewhere); I2/I3: the leased ids
    are exactly the active ids. Returns id -> place."""
    where = places.where()
    twice = {i: p for i, p in where.items() if len(p) != 1}
    assert not twice, f"I1: jobs in more than one place: {twice}"
    missing = [i for i in job_ids if i not in where]
    assert not missing, f"I1: jobs in no place: {missing}"
    active_ids = {i for ids in places.active.values() for i in ids}
    leased = set(places.leases)
    assert leased <= active_ids, f"I3: leases without active entry: {leased - active_ids}"
    assert active_ids <= leased, f"I2: active without lease: {active_ids - leased}"
    return {i: p[0] for i, p in where.items()}
