"""``jobq queue pause|resume|purge``: act on a whole queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from jobq import admin
from jobq.cli.common import Settings, admin_app, cli_errors, connection_options, need_yes, warn_unknown

F = TypeVar("F", bound=Callable[..., Any])


@click.group("queue")
def queue_group() -> None:
    """Pause, resume or purge a queue."""


def _create_option(fn: F) -> F:
    return click.option(
        "--create",
        is_flag=True,
        help="Act on a queue jobq has never seen (nothing enqueued to it, no node serving it); "
        "without it an unknown name is refused, so a misspelling is not silently paused.",
    )(fn)


@queue_group.command("pause")
@connection_options
@click.argument("queue")
@_create_option
def queue_pause(settings: Settings, queue: str, create: bool) -> None:
    """Stop claims from QUEUE (running jobs finish; enqueues still land)."""
    with cli_errors():
        app = admin_app(settings)
        try:
            changed = admin.pause(app, queue, create=create)
        finally:
            app.close()
    click.echo(f"queue {queue} paused" if changed else f"queue {queue} was already paused")


@queue_group.command("resume")
@connection_options
@click.argument("queue")
@_create_option
def queue_resume(settings: Settings, queue: str, create: bool) -> None:
    """Let nodes claim from QUEUE again, in the order the jobs were in."""
    with cli_errors():
        app = admin_app(settings)
        try:
            changed = admin.resume(app, queue, create=create)
        finally:
            app.close()
    click.echo(f"queue {queue} resumed" if changed else f"queue {queue} was not paused")


@queue_group.command("purge")
@connection_options
@click.argument("queue")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice((*admin.PURGE_STATES, "all")),
    help="What to delete (repeatable; default: ready and scheduled). Running jobs are never touched.",
)
@click.option("--yes", is_flag=True, help="Confirm.")
def queue_purge(settings: Settings, queue: str, states: tuple[str, ...], yes: bool) -> None:
    """Delete the waiting jobs of QUEUE (ready and scheduled, or --state ...)."""
    chosen = list(admin.PURGE_STATES) if "all" in states else list(states or ("ready", "scheduled"))
    need_yes(yes, f"purge {', '.join(chosen)} jobs of {queue}")
    with cli_errors():
        app = admin_app(settings)
        try:
            warn_unknown(app, [queue])  # a misspelled name would delete nothing, silently
            done = admin.purge(app, queue, chosen)
        finally:
            app.close()
    click.echo(", ".join(f"{n} {st}" for st, n in done.items()) + " job(s) deleted")
