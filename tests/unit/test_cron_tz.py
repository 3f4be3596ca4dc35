"""Cron schedules in a named time zone across both 2027 daylight-saving changes of
Europe/Berlin (2027-03-28 01:00 UTC: 02:00 CET -> 03:00 CEST; 2027-10-31 01:00 UTC: 03:00 CEST ->
02:00 CET) and of America/New_York, fired as a scheduler does: the latest tick at or before
each moment, once per new tick."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from jobq import InvalidInput, JobQ
from jobq.cron import CronSchedule


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def fired(schedule: str, tz: str, start: str, end: str, step_s: int = 60) -> list[str]:
    """The ticks a scheduler passing every ``step_s`` seconds from ``start`` to ``end`` (UTC)
    fires: each new latest tick once, as the enqueue script's last-tick rule does."""
    s = CronSchedule.parse(schedule, tz=tz)
    out: list[str] = []
    last = s.prev_tick(utc(start))
    now = utc(start)
    while now <= utc(end):
        tick = s.prev_tick(now)
        if tick is not None and (last is None or tick > last):
            out.append(iso(tick))
            last = tick
        now += step_s * 1000
    return out


def test_weekday_mornings_in_berlin_follow_the_local_clock_across_both_changes() -> None:
    # 09:00 Berlin is 08:00 UTC in winter time, 07:00 UTC in summer time.
    assert fired("0 9 * * mon-fri", "Europe/Berlin", "2027-03-25 00:00", "2027-03-31 00:00") == [
        "2027-03-25 08:00",
        "2027-03-26 08:00",
        "2027-03-29 07:00",
        "2027-03-30 07:00",
    ]
    assert fired("0 9 * * mon-fri", "Europe/Berlin", "2027-10-28 00:00", "2027-11-03 00:00") == [
        "2027-10-28 07:00",
        "2027-10-29 07:00",
        "2027-11-01 08:00",
        "2027-11-02 08:00",
    ]


def test_a_fixed_time_in_the_spring_gap_fires_once_at_the_end_of_the_gap() -> None:
    # 02:30 does not exist on 2027-03-28 in Berlin: it fires at 03:00 CEST (01:00 UTC).
    assert fired("30 2 * * *", "Europe/Berlin", "2027-03-26 12:00", "2027-03-29 12:00") == [
        "2027-03-27 01:30",
        "2027-03-28 01:00",
        "2027-03-29 00:30",
    ]
    # Several times of the gap land on its end together: one tick.
    assert fired("0,15,30,45 2 * * *", "Europe/Berlin", "2027-03-27 23:00", "2027-03-28 02:00") == [
        "2027-03-28 01:00"
    ]


def test_an_hourly_schedule_skips_the_hour_that_never_was() -> None:
    assert fired("30 * * * *", "Europe/Berlin", "2027-03-27 23:00", "2027-03-28 03:00") == [
        "2027-03-27 23:30",  # 00:30 CET
        "2027-03-28 00:30",  # 01:30 CET
        "2027-03-28 01:30",  # 03:30 CEST; no 02:30
        "2027-03-28 02:30",
    ]


def test_a_fixed_time_in_the_autumn_fold_fires_once_at_its_first_occurrence() -> None:
    # 02:30 happens twice on 2027-10-31 in Berlin: at 00:30 UTC (CEST) and 01:30 UTC (CET).
    assert fired("30 2 * * *", "Europe/Berlin", "2027-10-29 12:00", "2027-11-01 12:00") == [
        "2027-10-30 00:30",
        "2027-10-31 00:30",
        "2027-11-01 01:30",
    ]
    assert fired("*/20 2 * * *", "Europe/Berlin", "2027-10-30 23:00", "2027-10-31 03:00") == [
        "2027-10-31 00:00",
        "2027-10-31 00:20",
        "2027-10-31 00:40",
    ]


def test_an_hourly_schedule_runs_in_both_passes_of_the_repeated_hour() -> None:
    assert fired("30 * * * *", "Europe/Berlin", "2027-10-30 23:00", "2027-10-31 03:00") == [
        "2027-10-30 23:30",  # 01:30 CEST
        "2027-10-31 00:30",  # 02:30 CEST
        "2027-10-31 01:30",  # 02:30 CET, the second pass
        "2027-10-31 02:30",  # 03:30 CET
    ]


def test_new_york_changes_too() -> None:
    # 2027-03-14 02:00 EST -> 03:00 EDT (07:00 UTC); 2027-11-07 02:00 EDT -> 01:00 EST (06:00 UTC).
    assert fired("30 2 * * *", "America/New_York", "2027-03-13 00:00", "2027-03-15 12:00") == [
        "2027-03-13 07:30",
        "2027-03-14 07:00",
        "2027-03-15 06:30",
    ]
    assert fired("30 1 * * *", "America/New_York", "2027-11-06 00:00", "2027-11-08 12:00") == [
        "2027-11-06 05:30",
        "2027-11-07 05:30",
        "2027-11-08 06:30",
    ]


def test_a_passing_scheduler_fires_the_same_ticks_at_any_pace() -> None:
    """The slow path (walking wall times near a change) and the quick one (a fixed offset)
    agree: a pass every 7 s or every 13 min fires ticks of the same series across the autumn
    change."""
    a = fired("*/10 * * * *", "Europe/Berlin", "2027-10-30 20:00", "2027-10-31 06:00", step_s=7)
    b = fired("*/10 * * * *", "Europe/Berlin", "2027-10-30 20:00", "2027-10-31 06:00", step_s=13 * 60)
    # Every 10 minutes of UTC, none twice, none missing: both passes of the repeated local hour.
    assert a == [iso(utc("2027-10-30 20:10") + i * 600_000) for i in range(59)]
    assert set(b) <= set(a) and b[-1] == a[-1]  # a slower pass skips ticks, as cron does


def test_utc_and_none_agree() -> None:
    for now in ("2027-03-28 01:30", "2027-10-31 01:30", "2027-06-01 12:34"):
        assert CronSchedule.parse("*/5 3 * * *", tz="UTC").prev_tick(utc(now)) == CronSchedule.parse(
            "*/5 3 * * *"
        ).prev_tick(utc(now))


@pytest.mark.parametrize("bad", ["Mars/Olympus", "", " Europe/Berlin", "../etc/passwd", "Europe/"])
def test_an_unknown_zone_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        CronSchedule.parse("0 9 * * *", tz=bad)
    assert exc.value.field == "tz"


def test_every_takes_no_zone_and_periodic_passes_it_on() -> None:
    with pytest.raises(InvalidInput, match="tz:"):
        CronSchedule.parse("@every 30s", tz="Europe/Berlin")
    app = JobQ("redis://127.0.0.1:1/0")

    @app.periodic("0 9 * * mon-fri", tz="Europe/Berlin", name="morning")
    def morning() -> None: ...

    (entry,) = app.cron_entries
    assert entry.schedule.tz == "Europe/Berlin"
    assert entry.schedule.label == "0 9 * * mon-fri (Europe/Berlin)"
    with pytest.raises(InvalidInput):
        app.periodic("0 9 * * *", tz="Nowhere/Land")
    assert len(app.cron_entries) == 1


@pytest.mark.parametrize("schedule", ["30 2 * * *", "30 * * * *", "*/20 2 * * *", "0 9 * * mon-fri"])
def test_next_tick_is_the_tick_the_scheduler_fires_next(schedule: str) -> None:
    """Every 7 minutes around both changes, the dashboard's next tick is the first tick a
    passing scheduler fires after that moment."""
    s = CronSchedule.parse(schedule, tz="Europe/Berlin")
    for start, end in (("2027-03-27 20:00", "2027-03-29 12:00"), ("2027-10-30 20:00", "2027-11-01 12:00")):
        seen = [utc(x) for x in fired(schedule, "Europe/Berlin", start, end)]
        for m in range(0, 10 * 60, 7):
            t = utc(start) + m * 60_000 + 13_000
            want = next(x for x in seen if x > t)
            assert s.next_tick(t) == want, (schedule, iso(t))
