"""``jobq nodes``: the worker nodes and their heartbeats."""

from __future__ import annotations

import click

from jobq import admin
from jobq.cli.common import Settings, admin_app, cli_errors, connection_options, json_option
from jobq.cli.output import age, echo_json, table


@click.command()
@connection_options
@click.option("--all", "include_gone", is_flag=True, help="Include nodes whose heartbeats stopped.")
@json_option
def nodes(settings: Settings, include_gone: bool, as_json: bool) -> None:
    """Live worker nodes: queues, in-flight jobs, last heartbeat."""
    with cli_errors():
        app = admin_app(settings)
        try:
            found = admin.nodes(app, include_gone=include_gone)
        finally:
            app.close()
    if as_json:
        echo_json([n.to_dict() for n in found])
        return
    if not found:
        click.echo("no live nodes")
        return
    rows = [
        (
            n.node,
            "live" if n.live else "gone",
            ",".join(n.queues),
            n.host,
            n.pid,
            "" if n.inflight is None else f"{n.inflight}/{n.concurrency}",
            f"{age(n.heartbeat_age_s)} ago",
            n.version or "",
        )
        for n in found
    ]
    click.echo(table(("NODE", "STATUS", "QUEUES", "HOST", "PID", "IN FLIGHT", "HEARTBEAT", "VERSION"), rows))
