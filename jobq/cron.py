"""Cron schedules for periodic tasks, evaluated in UTC on the Redis clock.

Five fields ``minute hour day-of-month month day-of-week`` with ``*``, ``a``, ``a-b``, ``*/n``,
``a-b/n`` and comma lists (month and weekday names allowed; Sunday is 0 or 7), the macros
``@hourly @daily @weekly @monthly @yearly``, and ``@every <duration>`` (``@every 30s``, 1 s to
366 d) for fixed intervals aligned to the epoch. A schedule that can never fire (``0 0 31 2 *``)
is refused. A tick fires at most once across all nodes (the enqueue script
records the last tick per entry); ticks missed while no node ran are skipped, as cron does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
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

    @classmethod
    def parse(cls, text: str) -> CronSchedule:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("schedule: must be a cron expression", "schedule")
        src = text.strip()
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

    def prev_tick(self, now_ms: int) -> int | None:
        """The latest tick <= ``now_ms`` (ms since the epoch, UTC), within the last 5 years."""
        if self.every_ms:
            return now_ms - now_ms % self.every_ms
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
        """The earliest tick > ``now_ms`` (ms since the epoch, UTC), within the next 5 years."""
        if self.every_ms:
            return now_ms - now_ms % self.every_ms + self.every_ms
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
