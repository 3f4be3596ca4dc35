"""``jobq dead list|retry|purge``: the dead-letter list of a queue.

Retrying every dead job of a queue, and purging, need ``--yes``."""

from __future__ import annotations

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
from jobq.cli.output import print_jobs


@click.group()
def dead() -> None:
    """Inspect and repair the dead-letter list of a queue."""


@dead.command("list")
@connection_options
@click.option("--queue", "-q", help="Only this queue (default: every queue).")
@click.option("--limit", "-n", type=click.IntRange(1, admin.MAX_LIST), default=50, show_default=True)
@json_option
def dead_list(settings: Settings, queue: str | None, limit: int, as_json: bool) -> None:
    """Dead-lettered jobs, most recent first, with their last error; TIME is the time of death."""
    with cli_errors():
        app = admin_app(settings)
        try:
            found = admin.list_jobs(app, queue, "dead", limit=limit)
            if queue is not None and not found:
                warn_unknown(app, [queue])
        finally:
            app.close()
    print_jobs(found, as_json)


@dead.command("retry")
@connection_options
@click.option("--queue", "-q", required=True)
@click.argument("job_ids", nargs=-1, metavar="[ID]...")
@click.option("--yes", is_flag=True, help="Confirm retrying every dead job of the queue (no IDs).")
def dead_retry(settings: Settings, queue: str, job_ids: tuple[str, ...], yes: bool) -> None:
    """Move dead jobs back to ready with fresh attempts: the IDs given, or all (needs --yes)."""
    if not job_ids:
        need_yes(yes, f"retry every dead job of {queue}")
    with cli_errors():
        app = admin_app(settings)
        try:
            warn_unknown(app, [queue])  # a misspelled name would retry nothing, silently
            n = admin.retry_dead(app, queue, list(job_ids) or None)
        finally:
            app.close()
    click.echo(f"{n} job(s) moved back to ready")


@dead.command("purge")
@connection_options
@click.option("--queue", "-q", required=True)
@click.option("--yes", is_flag=True, help="Confirm.")
def dead_purge(settings: Settings, queue: str, yes: bool) -> None:
    """Delete every dead job of the queue."""
    need_yes(yes, f"purge the dead letters of {queue}")
    with cli_errors():
        app = admin_app(settings)
        try:
            warn_unknown(app, [queue])  # a misspelled name would delete nothing, silently
            n = admin.purge(app, queue, ("dead",))["dead"]
        finally:
            app.close()
    click.echo(f"{n} dead job(s) deleted")
