"""The ``jobq`` command line: one click group; connection options on the group.

Commands stay thin: parse, build library objects, call them, print. One module per command
group, each attached here: ``worker``, ``enqueue``, ``tasks``, ``stats``, ``jobs`` (with
``status`` and ``cancel``), ``dead``, ``events``, ``queue``, ``nodes``, ``serve``. What they share lives below
them: :mod:`jobq.cli.common` (settings, options, exit codes), :mod:`jobq.cli.apps` (``-A``) and
:mod:`jobq.cli.output` (tables, JSON). Nothing below imports this package's ``__init__``, so
there is no import circle.
"""

from __future__ import annotations

import sys

import click

from jobq.cli import dead, enqueue, events, jobs, nodes, queue, serve, stats, tasks, worker
from jobq.cli.common import Settings
from jobq.storage.clients import default_url

__all__ = ["main"]


@click.group()
@click.option(
    "--redis-url",
    envvar="JOBQ_REDIS_URL",
    default=default_url,
    show_default="$JOBQ_REDIS_URL or redis://127.0.0.1:6379/0",
    help="Redis URL. Prefer the JOBQ_REDIS_URL environment variable for passwords.",
)
@click.option("--prefix", envvar="JOBQ_PREFIX", default="jobq", show_default=True)
@click.version_option(package_name="jobq", prog_name="jobq")
@click.pass_context
def main(ctx: click.Context, redis_url: str, prefix: str) -> None:
    """jobq: a Redis-native distributed job queue."""
    ctx.obj = Settings(redis_url=redis_url, prefix=prefix)


for _command in (
    worker.worker,
    enqueue.enqueue,
    tasks.tasks_command,
    stats.stats,
    jobs.jobs,
    jobs.status,
    jobs.cancel,
    dead.dead,
    events.events,
    queue.queue_group,
    nodes.nodes,
    serve.serve,
):
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
