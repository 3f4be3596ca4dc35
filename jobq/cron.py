"""Cron schedules for periodic tasks, evaluated on the Redis clock, in UTC or a named time zone.

Five fields ``minute hour day-of-month month day-of-week`` with ``*``, ``a``, ``a-b``, ``*/n``,
``a-b/n`` and comma lists (month and weekday names allowed; Sunday is 0 or 7), the macros
``@hourly @daily @weekly @monthly @yearly``, and ``@every <duration>`` (``@every 30s``, 1 s to
366 d) for fixed intervals aligned to the epoch. A schedule that can never fire (``0 0 31 2 *``)
is refused. A tick fires at most once across all nodes (the enqueue script
records the last tick per entry); ticks missed while no node ran are skipped, as cron does.

A schedule in a named zone (``tz="Europe/Berlin"``, the standard library's ``zoneinfo``) matches
local wall-clock times, and handles daylight-saving changes as cron (Vixie cron, cronie) does:

- a local time skipped by a spring-forward gap fires once, at the end of the gap (``30 2 * * *``
  on the day Berlin goes from 02:00 to 03:00 fires at 03:00; several such times fire once
  there), unless the schedule's hour field is a wildcard (``*``, ``*/n``): then the skipped
  times are skipped, as an hourly job does not run for an hour that never was;
- a local time repeated by a fall-back fold fires once, at its first occurrence, unless the
  hour field is a wildcard: then at both, as an hourly job runs every hour that passes.

Every tick is an instant (ms since the epoch), so the scheduler's exactly-once rule is the same.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cache
from typing import Any

from jobq.errors import InvalidInput

_MONTHS = {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: Days in each month, February counting its leap day (``0 0 29 2 *`` fires in leap years).
_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
#: ``@every`` bounds, seconds: the scheduler fires cron entries about once a second, so a
#: shorter interval would tick once a second anyway; a longer one than a year barely ever fires.
MIN_EVERY_S = 1.0
MAX_EVERY_S = 366 * 86400.0
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(text: str, field: str = "duration") -> float:
    """``"250ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"`` or plain seconds -> seconds."""
    m = _DURATION_RE.match(text)
    if not m:
        raise InvalidInput(
            f"{field}: {text!r} is not a duration (use e.g. 30, 30s, 250ms, 5m, 2h, 1d)", field
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _field(text: str, lo: int, hi: int, names: Mapping[str, int], what: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.lower().split(","):
        step = 1
        if "/" in part:
            part, step_s = part.split("/", 1)
            if not step_s.isdigit() or int(step_s) < 1:
                raise InvalidInput(f"schedule: bad step in {what} field {text!r}", "schedule")
            step = int(step_s)
        if part == "*":
            a, b = lo, hi
        elif "-" in part:
            a_s, b_s = part.split("-", 1)
            a, b = _value(a_s, names, what), _value(b_s, names, what)
        else:
            a = _value(part, names, what)
            b = hi if step > 1 else a
        if not (lo <= a <= hi and lo <= b <= hi and a <= b):
            raise InvalidInput(f"schedule: {what} field {text!r} is outside {lo}-{hi}", "schedule")
        out.update(range(a, b + 1, step))
    return frozenset(out)


def _value(text: str, names: Mapping[str, int], what: str) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        raise InvalidInput(f"schedule: {text!r} is not a valid {what}", "schedule")
    return int(text)


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A parsed schedule. ``prev_tick(now_ms)`` is the latest tick at or before ``now_ms``."""

    text: str
    minutes: frozenset[int] = frozenset()
    hours: frozenset[int] = frozenset()
    days: frozenset[int] = frozenset()
    months: frozenset[int] = frozenset()
    weekdays: frozenset[int] = frozenset()
    dom_star: bool = True
    dow_star: bool = True
    every_ms: int = 0
    #: The IANA time zone the fields are read in (None: UTC).
    tz: str | None = None
    #: The hour field is a wildcard (``*`` or ``*/n``): a time repeated by a fold fires twice.
    hour_star: bool = True

    @classmethod
    def parse(cls, text: str, tz: str | None = None) -> CronSchedule:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("schedule: must be a cron expression", "schedule")
        src = text.strip()
        if tz is not None:
            _zone(tz)  # a clear error for an unknown zone, at registration
            if src.startswith("@every"):
                raise InvalidInput(
                    f"tz: {src!r} is a fixed interval (aligned to the epoch): a time zone does not apply",
                    "tz",
                )
        if src.startswith("@every"):
            secs = parse_duration(src[len("@every") :], "schedule")
            if secs < MIN_EVERY_S:
                raise InvalidInput(
                    f"schedule: {src!r} is below the minimum of @every 1s (the scheduler "
                    "fires cron entries about once a second)",
                    "schedule",
                )
            if secs > MAX_EVERY_S:
                raise InvalidInput(
                    f"schedule: {src!r} is over the maximum of @every 366d (use a cron expression)",
                    "schedule",
                )
            return cls(src, every_ms=round(secs * 1000))
        expr = _MACROS.get(src.lower(), src)
        parts = expr.split()
        if len(parts) != 5:
            raise InvalidInput(
                f"schedule: {text!r} needs 5 fields (minute hour day month weekday)", "schedule"
            )
        weekdays = _field(parts[4], 0, 7, _DAYS, "weekday")
        if 7 in weekdays:
            weekdays = (weekdays - {7}) | {0}
        out = cls(
            src,
            minutes=_field(parts[0], 0, 59, {}, "minute"),
            hours=_field(parts[1], 0, 23, {}, "hour"),
            days=_field(parts[2], 1, 31, {}, "day"),
            months=_field(parts[3], 1, 12, _MONTHS, "month"),
            weekdays=weekdays,
            dom_star=parts[2] == "*",
            dow_star=parts[4] == "*",
            tz=tz,
            hour_star=parts[1].startswith("*"),
        )
        # A day of the month restricts alone when the weekday is "*" (cron ORs the two only
        # when both are restricted): then one of the months must have one of the days.
        if out.dow_star and not any(d <= _MONTH_DAYS[m] for m in out.months for d in out.days):
            raise InvalidInput(
                f"schedule: {text!r} never fires: none of its months has that day of the month",
                "schedule",
            )
        return out

    def _day_matches(self, d: datetime) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.weekday() + 1) % 7 in self.weekdays
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow  # cron: when both are restricted, either may match

    @property
    def label(self) -> str:
        """The schedule as shown: its text, and its zone when it has one."""
        return self.text if self.tz is None else f"{self.text} ({self.tz})"

    def prev_tick(self, now_ms: int) -> int | None:
        """The latest tick <= ``now_ms`` (ms since the epoch), within the last 5 years."""
        if self.every_ms:
            return now_ms - now_ms % self.every_ms
        if self.tz is not None:
            return self._prev_tick_zoned(now_ms, _zone(self.tz))
        return self._prev_tick_utc(now_ms)

    def _prev_tick_utc(self, now_ms: int) -> int | None:
        now = datetime.fromtimestamp(now_ms // 60_000 * 60, tz=timezone.utc)
        day = now.replace(hour=0, minute=0)
        for _ in range(5 * 366 + 1):
            if self._day_matches(day):
                last_hour = now.hour if day.date() == now.date() else 23
                for h in sorted((h for h in self.hours if h <= last_hour), reverse=True):
                    last_min = now.minute if (day.date() == now.date() and h == now.hour) else 59
                    mins = [m for m in self.minutes if m <= last_min]
                    if mins:
                        tick = day.replace(hour=h, minute=max(mins))
                        return int(tick.timestamp()) * 1000
            day -= timedelta(days=1)
        return None

    def next_tick(self, now_ms: int) -> int | None:
        """The earliest tick > ``now_ms`` (ms since the epoch), within the next 5 years."""
        if self.every_ms:
            return now_ms - now_ms % self.every_ms + self.every_ms
        if self.tz is not None:
            return self._next_tick_zoned(now_ms, _zone(self.tz))
        return self._next_tick_utc(now_ms)

    def _next_tick_utc(self, now_ms: int) -> int | None:
        start = datetime.fromtimestamp((now_ms // 60_000 + 1) * 60, tz=timezone.utc)
        day = start.replace(hour=0, minute=0)
        for _ in range(5 * 366 + 1):
            if self._day_matches(day):
                first_hour = start.hour if day.date() == start.date() else 0
                for h in sorted(h for h in self.hours if h >= first_hour):
                    first_min = start.minute if (day.date() == start.date() and h == start.hour) else 0
                    mins = [m for m in self.minutes if m >= first_min]
                    if mins:
                        return int(day.replace(hour=h, minute=min(mins)).timestamp()) * 1000
            day += timedelta(days=1)
        return None

    # -- named time zones ------------------------------------------------------------------------
    def _prev_tick_zoned(self, now_ms: int, zone: zoneinfo.ZoneInfo) -> int | None:
        now_s = now_ms // 60_000 * 60
        off = _offset_s(zone, now_s)
        # Quick path: no offset change from 26 h before now to 4 h after it (most of the year);
        # then the zone is a fixed offset, and a tick within those 26 h is the answer.
        if _offset_s(zone, now_s - 26 * 3600) == off == _offset_s(zone, now_s + 4 * 3600):
            t = self._prev_tick_utc((now_s + off) * 1000)
            if t is not None and t - off * 1000 >= (now_s - 26 * 3600) * 1000:
                return t - off * 1000
        # Near a change, or a sparse schedule: walk local wall times downward from a little past
        # now (a fold's first occurrence of a later wall time may precede now), keeping the
        # latest instant <= now, until walls are too early to beat it.
        now_wall = datetime.fromtimestamp(now_s, tz=zone).replace(tzinfo=None)
        best: int | None = None
        floor: datetime | None = None
        for wall in self._walls_down(now_wall + timedelta(hours=4)):
            if floor is not None and wall < floor:
                break
            for inst in _instants(zone, wall, wildcard=self.hour_star):
                if inst <= now_s and (best is None or inst > best):
                    best = inst
                    # Offsets and gaps move a wall time by < 4 h: earlier walls cannot beat it.
                    floor = datetime.fromtimestamp(best, tz=zone).replace(tzinfo=None) - timedelta(hours=4)
        return None if best is None else best * 1000

    def _next_tick_zoned(self, now_ms: int, zone: zoneinfo.ZoneInfo) -> int | None:
        now_s = now_ms // 1000
        off = _offset_s(zone, now_s)
        if _offset_s(zone, now_s - 4 * 3600) == off == _offset_s(zone, now_s + 26 * 3600):
            t = self._next_tick_utc(now_ms + off * 1000)
            if t is not None and t - off * 1000 <= (now_s + 26 * 3600) * 1000:
                return t - off * 1000
        now_wall = datetime.fromtimestamp(now_s, tz=zone).replace(tzinfo=None)
        best: int | None = None
        ceiling: datetime | None = None
        for wall in self._walls_up(now_wall - timedelta(hours=4)):
            if ceiling is not None and wall > ceiling:
                break
            for inst in _instants(zone, wall, wildcard=self.hour_star):
                if inst * 1000 > now_ms and (best is None or inst < best):
                    best = inst
                    ceiling = datetime.fromtimestamp(best, tz=zone).replace(tzinfo=None) + timedelta(hours=4)
        return None if best is None else best * 1000

    def _walls_up(self, start: datetime) -> Iterator[datetime]:
        """Local wall times matching the fields, at or after ``start``, earliest first (5 years)."""
        start = start.replace(second=0, microsecond=0)
        day = start.replace(hour=0, minute=0)
        hours = sorted(self.hours)
        minutes = sorted(self.minutes)
        for _ in range(5 * 366 + 1):
            if self._day_matches(day):
                same = day.date() == start.date()
                for h in hours:
                    if same and h < start.hour:
                        continue
                    for m in minutes:
                        if same and h == start.hour and m < start.minute:
                            continue
                        yield day.replace(hour=h, minute=m)
            day += timedelta(days=1)

    def _walls_down(self, start: datetime) -> Iterator[datetime]:
        """Local wall times matching the fields, at or before ``start``, latest first (5 years)."""
        start = start.replace(second=0, microsecond=0)
        day = start.replace(hour=0, minute=0)
        hours = sorted(self.hours, reverse=True)
        minutes = sorted(self.minutes, reverse=True)
        for _ in range(5 * 366 + 1):
            if self._day_matches(day):
                same = day.date() == start.date()
                for h in hours:
                    if same and h > start.hour:
                        continue
                    for m in minutes:
                        if same and h == start.hour and m > start.minute:
                            continue
                        yield day.replace(hour=h, minute=m)
            day -= timedelta(days=1)


@cache
def _zone(name: str) -> zoneinfo.ZoneInfo:
    if not isinstance(name, str) or not name or name != name.strip():
        raise InvalidInput(f"tz: {name!r} is not a time zone name (e.g. 'Europe/Berlin')", "tz")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInput(
            f"tz: {name!r} is not a known time zone (an IANA name such as 'Europe/Berlin' or 'UTC')", "tz"
        ) from None


def _offset_s(zone: zoneinfo.ZoneInfo, epoch_s: int) -> int:
    off = datetime.fromtimestamp(epoch_s, tz=zone).utcoffset()
    return 0 if off is None else int(off.total_seconds())


def _instants(zone: zoneinfo.ZoneInfo, wall: datetime, *, wildcard: bool) -> list[int]:
    """The instants (epoch seconds) at which local wall time ``wall`` fires: one normally; in a
    spring-forward gap, the end of the gap (none with ``wildcard``); in a fall-back fold, the
    first occurrence (and the second too with ``wildcard``)."""
    early = int(wall.replace(tzinfo=zone, fold=0).timestamp())
    late = int(wall.replace(tzinfo=zone, fold=1).timestamp())
    if early == late:
        return [early]
    if datetime.fromtimestamp(early, tz=zone).replace(tzinfo=None) == wall:
        return [early, late] if wildcard else [early]  # a fold: the wall time occurs twice
    if wildcard:
        return []  # a gap, and an hourly-style schedule: the skipped time is skipped
    # A gap: the wall time never occurs. The zone's change lies between the two readings; find
    # its instant (to the second) and fire there.
    lo, hi = min(early, late), max(early, late)
    before = _offset_s(zone, lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset_s(zone, mid) == before:
            lo = mid
        else:
            hi = mid
    return [hi]


@dataclass(frozen=True, slots=True)
class CronEntry:
    """A periodic task: enqueue ``task(*args, **kwargs)`` at every tick of ``schedule``."""

    task: str
    schedule: CronSchedule
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The entry's name in Redis (the cron state key); defaults to the task name.
    name: str = ""

    @property
    def key_name(self) -> str:
        return self.name or self.task
