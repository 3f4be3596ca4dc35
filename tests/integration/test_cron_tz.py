"""Cron in a named time zone, exactly once across nodes: three nodes with skewed clocks
(controlled time) race through each 2027 daylight-saving change of Europe/Berlin, and every tick
is enqueued once, at the instants cron's rules give (tests/unit/test_cron_tz.py has the rules)."""

from __future__ import annotations

import asyncio
import os
import random
from datetime import datetime, timezone

import pytest
import redis

from jobq import FakeClock, JobQ
from jobq.storage.calls import AsyncRunner
from jobq.storage.clients import async_client
from jobq.worker.scheduler import Scheduler

pytestmark = pytest.mark.integration


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


@pytest.mark.parametrize(
    ("start", "end", "half_hourly", "at_0230"),
    [
        # Spring: 02:00 CET -> 03:00 CEST at 01:00 UTC. Half-hourly skips 02:00 and 02:30 local;
        # 02:30 local fires at the end of the gap.
        (
            "2027-03-27 23:00:10",
            "2027-03-28 02:30:10",
            ["23:00", "23:30", "00:00", "00:30", "01:00", "01:30", "02:00", "02:30"],
            ["2027-03-28 01:00"],
        ),
        # Autumn: 03:00 CEST -> 02:00 CET at 01:00 UTC. Half-hourly runs in both passes of the
        # repeated hour (every 30 min of UTC); 02:30 local fires at its first occurrence only.
        (
            "2027-10-30 23:00:10",
            "2027-10-31 02:30:10",
            ["23:00", "23:30", "00:00", "00:30", "01:00", "01:30", "02:00", "02:30"],
            ["2027-10-31 00:30"],
        ),
    ],
    ids=["spring", "autumn"],
)
def test_three_skewed_nodes_fire_each_zoned_tick_once_across_a_change(
    redis_url: str, r: redis.Redis, start: str, end: str, half_hourly: list[str], at_0230: list[str]
) -> None:
    seed = int(os.environ.get("JOBQ_TEST_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    # The window starts 10 s after a tick and ends 10 s after one: with these skews every node
    # sees the same ticks.
    skews_s = [-6.0, 0.0, 8.0]
    t0, t1 = utc(start), utc(end)
    apps = [JobQ(redis_url, clock=FakeClock(t0 + round(s * 1000))) for s in skews_s]
    for a in apps:

        @a.periodic("*/30 * * * *", tz="Europe/Berlin", name="half-hourly", queue="cron")
        def half() -> None: ...

        @a.periodic("30 2 * * *", tz="Europe/Berlin", name="at-0230", queue="cron")
        def at() -> None: ...

    async def run() -> list[tuple[str, int, str]]:
        client = async_client(redis_url)
        runner = AsyncRunner(client)
        scheds = [Scheduler(a, runner, ["cron"], a.cron_entries) for a in apps]
        fired: list[tuple[str, int, str]] = []
        now = t0
        while now < t1:
            order = list(range(len(apps)))
            rng.shuffle(order)
            for i in order:
                if rng.random() < 0.8:
                    fired += (await scheds[i].run_once()).fired
            step = min(rng.randint(500, 30_000), t1 - now)  # a tick is fired within 60 s or not at all
            now += step
            for a in apps:
                assert isinstance(a.clock, FakeClock)
                a.clock.advance(step / 1000)
        for sched in scheds:  # every node passes once more at the end (10 s after the last tick)
            fired += (await sched.run_once()).fired
        await client.aclose()
        return fired

    fired = asyncio.run(run())
    day0, day1 = start[:10], end[:10]
    want_half = [utc(f"{day0 if hm >= '12:00' else day1} {hm}") for hm in half_hourly]
    got = {name: sorted(tick for n, tick, _ in fired if n == name) for name in ("half-hourly", "at-0230")}
    assert got["half-hourly"] == want_half, f"seed {seed}"
    assert got["at-0230"] == [utc(t) for t in at_0230], f"seed {seed}"
    assert r.zcard(apps[0].keys.ready("cron")) == len(want_half) + len(at_0230), f"seed {seed}"
    for a in apps:
        a.close()
