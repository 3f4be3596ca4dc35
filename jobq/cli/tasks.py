"""``jobq tasks``: the tasks of an application, the names to enqueue them by (reads no Redis)."""

from __future__ import annotations

from typing import Any

import click

from jobq import builtin
from jobq.app import JobQ
from jobq.cli.apps import app_option, load_app
from jobq.cli.common import json_option
from jobq.cli.output import echo_json, table


def _task_rows(app: JobQ) -> list[dict[str, Any]]:
    import inspect

    schedules: dict[str, list[str]] = {}
    for entry in app.cron_entries:
        schedules.setdefault(entry.task, []).append(entry.schedule.label)
    out = []
    for name in sorted(app.tasks):
        t = app.tasks[name]
        try:
            sig = inspect.signature(t.fn)
            bare = sig.replace(
                parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                return_annotation=inspect.Signature.empty,
            )
            signature = str(bare)
        except (TypeError, ValueError):
            signature = "(...)"
        d = t.defaults
        out.append(
            {
                "name": name,
                "queue": d.queue,
                "priority": d.priority,
                "max_attempts": d.max_attempts,
                "timeout": d.timeout,
                "retry_backoff": d.retry_backoff,
                "schedule": schedules.get(name, []),
                "signature": signature,
                "async": t.is_async,
                "check_args": t.arg_check is not None,
                "builtin": t.fn.__module__ == builtin.__name__,
            }
        )
    return out


@click.command("tasks")
@app_option
@json_option
def tasks_command(app_spec: str | None, as_json: bool) -> None:
    """List the tasks of the application given with -A (default: $JOBQ_APP): the names to
    enqueue them by, their queues and options, cron schedules and arguments. Without -A, the
    built-in tasks (what `jobq worker` runs without -A). Reads no Redis."""
    if app_spec:
        app = load_app(app_spec)
    else:
        app = JobQ("redis://127.0.0.1:6379/0")  # never connected
    builtin.register(app)
    rows = _task_rows(app)
    if as_json:
        echo_json(rows)
        return
    cells = [
        (
            r["name"],
            r["queue"],
            r["priority"],
            r["max_attempts"],
            "-" if r["timeout"] is None else f"{r['timeout']:g}s",
            ", ".join(r["schedule"]),
            r["signature"],
        )
        for r in rows
    ]
    click.echo(table(("TASK", "QUEUE", "PRIO", "ATTEMPTS", "TIMEOUT", "SCHEDULE", "ARGUMENTS"), cells))
