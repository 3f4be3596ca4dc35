"""``jobq jobs list``, ``jobq status`` and ``jobq cancel``: one job or a list of them.

Read commands only read; ``cancel`` needs ``--yes``."""

from __future__ import annotations

import json

import click

from jobq import admin
from jobq.cli.common import (
    Settings,
    admin_app,
    cli_errors,
    connection_options,
    json_option,
    need_yes,
    warn_unknown,
)
from jobq.cli.output import echo_json, print_jobs, utc


@click.group()
def jobs() -> None:
    """Inspect jobs."""


@jobs.command("list")
@connection_options
@click.option("--queue", "-q", help="Only this queue (default: every queue).")
@click.option("--state", "-s", type=click.Choice(admin.LIST_STATES), help="Only this state (default: all).")
@click.option("--limit", "-n", type=click.IntRange(1, admin.MAX_LIST), default=50, show_default=True)
@json_option
def jobs_list(settings: Settings, queue: str | None, state: str | None, limit: int, as_json: bool) -> None:
    """List jobs: ready in run order, scheduled by run time, active by lease, dead and finished
    most recent first."""
    with cli_errors():
        app = admin_app(settings)
        try:
            found = admin.list_jobs(app, queue, state, limit=limit)
            if queue is not None and not found:
                warn_unknown(app, [queue])
        finally:
            app.close()
    print_jobs(found, as_json)


@click.command()
@connection_options
@click.argument("job_id", metavar="ID")
@click.option("--queue", "-q", help="The job's queue (default: search every queue).")
@click.option("--args", "show_args", is_flag=True, help="Show the arguments (secret-looking keys masked).")
@json_option
def status(settings: Settings, job_id: str, queue: str | None, show_args: bool, as_json: bool) -> None:
    """Show one job: state, attempts, times, node, last error, progress."""
    with cli_errors():
        app = admin_app(settings)
        try:
            info = admin.job_info(app, job_id, queue, with_args=show_args)
        finally:
            app.close()
    d = admin.redacted(info)
    if not show_args:
        d.pop("args")
        d.pop("kwargs")
    if as_json:
        echo_json(d)
        return
    for key in ("enqueued_ms", "run_at_ms", "started_ms", "finished_ms", "deadline_ms", "progress_ms"):
        if d.get(key) is not None:
            d[key] = f"{d[key]} ({utc(d[key])} UTC)"
    width = max(len(k) for k in d)
    for k, v in d.items():
        if v is None:
            continue
        shown = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
        click.echo(f"{k.ljust(width)}  {shown}")


@click.command()
@connection_options
@click.argument("job_id", metavar="ID")
@click.option("--queue", "-q", help="The job's queue (default: search every queue).")
@click.option("--yes", is_flag=True, help="Confirm.")
def cancel(settings: Settings, job_id: str, queue: str | None, yes: bool) -> None:
    """Cancel a job: not started yet, or running (its node is told to stop it)."""
    need_yes(yes, f"cancel {job_id}")
    with cli_errors():
        app = admin_app(settings)
        try:
            q = admin.cancel(app, job_id, queue)
        finally:
            app.close()
    click.echo(f"cancelled {job_id} (queue {q})")
