"""``jobq serve``: run the HTTP API (:mod:`jobq.web`, the ``jobq[web]`` extra)."""

from __future__ import annotations

from typing import Any

import click

from jobq import builtin
from jobq.app import JobQ
from jobq.cli.common import Settings, connection_options
from jobq.storage import clients


def _max_depth(values: tuple[str, ...]) -> int | dict[str, int]:
    per_queue: dict[str, int] = {}
    default = 0
    for v in values:
        name, sep, num = v.rpartition("=")
        if not num.isdigit():
            raise click.BadParameter(f"{v!r}: expected N or QUEUE=N", param_hint="'--max-depth'")
        if sep:
            per_queue[name] = int(num)
        else:
            default = int(num)
    if not per_queue:
        return default
    if default:
        raise click.BadParameter("give either N or QUEUE=N values, not both", param_hint="'--max-depth'")
    return per_queue


@click.command()
@connection_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    envvar="JOBQ_HTTP_TOKEN",
    help="Require 'Authorization: Bearer TOKEN' (prefer $JOBQ_HTTP_TOKEN: argv is visible to others).",
)
@click.option(
    "--max-depth",
    "max_depth",
    multiple=True,
    metavar="N|QUEUE=N",
    help="Refuse enqueues (503) when a queue holds N waiting jobs (repeatable per queue).",
)
@click.option("--max-body", default=2 * 1024 * 1024, show_default=True, type=click.IntRange(1))
@click.option("--ui/--no-ui", default=True, show_default=True, help="Serve the dashboard at /ui.")
@click.option("--read-only", is_flag=True, help="Dashboard without actions (every POST refused).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
def serve(
    settings: Settings,
    host: str,
    port: int,
    token: str | None,
    max_depth: tuple[str, ...],
    max_body: int,
    ui: bool,
    read_only: bool,
    log_format: str,
    log_level: str,
) -> None:
    """Run the HTTP API (POST/GET/DELETE /jobs, /stats, /health, /metrics, /openapi.json) and
    the dashboard at /ui."""
    from jobq import logs

    try:
        from jobq.web.server import ApiServer
    except ImportError as exc:
        raise click.ClickException(
            f"jobq serve needs the web extra: pip install 'jobq[web]' ({exc})"
        ) from None

    logs.configure(log_format, log_level)
    logs.add_secret(token)
    depth = _max_depth(max_depth)
    app = JobQ(settings.redis_url, prefix=settings.prefix, max_depth=depth)
    builtin.register(app)
    try:
        server = ApiServer(app, host, port, token=token, max_body=max_body, ui=ui, read_only=read_only)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    import logging
    import signal

    log = logging.getLogger("jobq.http")
    log.info(
        "jobq HTTP API on http://%s:%d (redis %s%s)",
        host,
        server.port,
        clients.redact_url(app.url),
        ", token required" if token else "",
    )

    def stop(sig: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(sig).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()  # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises it
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        app.close()
