"""``jobq events``: the lifecycle events of jobs, from the per-queue event streams
(docs/events.md). Read only."""

from __future__ import annotations

import json

import click

from jobq.cli.common import Settings, admin_app, cli_errors, connection_options
from jobq.cli.output import utc
from jobq.events import Event

#: Events shown before following, when neither --since nor --last is given.
DEFAULT_LAST = 20


def _detail(ev: Event) -> str:
    parts = []
    if ev.fraction is not None:
        parts.append(f"{ev.fraction:.0%}")
    for name in ("message", "error", "node", "state"):
        value = getattr(ev, name)
        if value:
            parts.append(f"{name}={value}")
    if ev.run_at_ms is not None:
        parts.append(f"run_at={utc(ev.run_at_ms)}")
    return " ".join(parts)[:200]


def _line(ev: Event) -> str:
    ms = ev.time_ms % 1000
    attempt = "-" if ev.attempt is None else str(ev.attempt)
    return (
        f"{utc(ev.time_ms)}.{ms:03d}  {ev.queue}  {ev.type:<11}  {ev.job_id}  {ev.task or '-'}  "
        f"{attempt}  {_detail(ev)}".rstrip()
    )


@click.command()
@connection_options
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    help="Only this queue; repeat for several (default: every known queue).",
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they come (Ctrl-C ends).")
@click.option(
    "--since",
    metavar="ID",
    help="Start after this event id (an event's 'id'), or '0' for every event kept, '$' for new ones only.",
)
@click.option(
    "--last",
    "-n",
    type=click.IntRange(0, 100_000),
    help=f"Start with the newest N events (default {DEFAULT_LAST} when --since is not given).",
)
@click.option("--limit", type=click.IntRange(1), help="Stop after this many events.")
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines) instead of text."
)
def events(
    settings: Settings,
    queues: tuple[str, ...],
    follow: bool,
    since: str | None,
    last: int | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Print the lifecycle events of jobs (enqueued, started, progress, retried, done, dead,
    cancelled, reaped, ...), oldest first: TIME (UTC), QUEUE, TYPE, JOB, TASK, ATTEMPT, DETAIL.
    Events never carry a job's arguments."""
    if since is None and last is None:
        last = DEFAULT_LAST
    printed = 0
    with cli_errors():
        app = admin_app(settings)
        try:
            for ev in app.iter_events(list(queues) or None, since=since, last=last, follow=follow):
                click.echo(json.dumps(ev.to_dict(), ensure_ascii=False) if as_json else _line(ev))
                printed += 1
                if limit is not None and printed >= limit:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            app.close()
