"""How commands print: JSON, plain tables, UTC times and ages, and the jobs table shared by
``jobs list`` and ``dead list``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import click

from jobq import admin
from jobq.app import JobInfo


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def utc(ms: int | None) -> str:
    """Epoch ms as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``-`` for none."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float) -> str:
    if seconds < 1:
        return "0s" if seconds == 0 else f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _job_time(j: JobInfo) -> int | None:
    """The time that matters for the job's state: when it will run (scheduled), started
    (active), ended (dead, done, cancelled: the time of death for a dead letter), else when it
    was enqueued."""
    st = j.state.value
    if st == "scheduled":
        return j.run_at_ms
    if st == "active":
        return j.started_ms or j.enqueued_ms
    if st in ("dead", "done", "cancelled"):
        return j.finished_ms or j.enqueued_ms
    return j.enqueued_ms


def _job_rows(jobs: Sequence[JobInfo]) -> str:
    rows = [
        (
            j.id,
            j.queue,
            j.state.value,
            j.task,
            j.priority,
            f"{j.attempts}/{j.max_attempts}",
            utc(_job_time(j)),
            admin.redact_text((j.error or "").split("\n", 1)[0])[:60],  # the line before the traceback
        )
        for j in jobs
    ]
    return table(("ID", "QUEUE", "STATE", "TASK", "PRIO", "ATTEMPTS", "TIME (UTC)", "LAST ERROR"), rows)


def print_jobs(jobs: Sequence[JobInfo], as_json: bool) -> None:
    if as_json:
        echo_json([admin.redacted(j) for j in jobs])
    elif not jobs:
        click.echo("no jobs")
    else:
        click.echo(_job_rows(jobs))
