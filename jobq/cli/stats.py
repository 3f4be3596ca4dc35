"""``jobq stats``: per-queue depths, once or ``--watch``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import click

from jobq import admin, errors, requests
from jobq.cli.common import Settings, admin_app, cli_errors, connection_options, json_option, warn_unknown
from jobq.cli.output import age, table


def _stats_table(stats: Sequence[admin.QueueStats], live_nodes: int | None) -> str:
    rows: list[tuple[object, ...]] = [
        (
            s.queue,
            s.ready,
            s.scheduled,
            s.active,
            s.dead,
            "yes" if s.paused else "",
            s.nodes,
            age(s.oldest_ready_age_s) if s.ready else "-",
        )
        for s in stats
    ]
    t = admin.totals(stats)
    nodes = "?" if live_nodes is None else live_nodes
    rows.append(("TOTAL", t["ready"], t["scheduled"], t["active"], t["dead"], "", nodes, ""))
    headers = ("QUEUE", "READY", "SCHEDULED", "ACTIVE", "DEAD", "PAUSED", "NODES", "OLDEST READY")
    return table(headers, rows)


@click.command()
@connection_options
@click.option("--queue", "-q", "queues", multiple=True, help="Only these queues (repeatable).")
@click.option("--watch", "-w", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval", default="2s", show_default=True, help="Refresh interval with --watch.")
@click.option("--iterations", type=int, default=0, hidden=True, help="Stop --watch after N refreshes.")
@json_option
def stats(
    settings: Settings, queues: tuple[str, ...], watch: bool, interval: str, iterations: int, as_json: bool
) -> None:
    """Per-queue depths: ready, scheduled, active, dead, paused, nodes, oldest ready job's age."""
    with cli_errors():
        every = requests.parse_seconds(interval, "interval", errors.InvalidInput)
        if every <= 0:
            raise errors.InvalidInput("interval: must be > 0", "interval")
        app = admin_app(settings)
        try:
            n = 0
            while True:
                if n == 0:
                    warn_unknown(app, queues)
                report = admin.stats_report(app, list(queues) or None)
                if as_json:
                    click.echo(json.dumps(report.to_dict()))
                else:
                    if watch and sys.stdout.isatty():
                        click.clear()
                    if watch:
                        click.echo(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
                    click.echo(_stats_table(report.queues, report.nodes))
                    for d in report.unreachable:
                        click.echo(f"UNREACHABLE shard {d.shard}: {', '.join(d.queues)} ({d.error})")
                n += 1
                if not watch or (iterations and n >= iterations):
                    return
                time.sleep(every)
        except KeyboardInterrupt:
            return
        finally:
            app.close()
