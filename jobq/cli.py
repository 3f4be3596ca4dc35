"""The ``jobq`` command line: one click group; connection options on the group.

Commands stay thin: parse, build library objects, call them, print.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click

from jobq.connection import default_url


@dataclass
class Settings:
    """Options shared by every command (``--redis-url``, ``--prefix``)."""

    redis_url: str
    prefix: str


pass_settings = click.make_pass_decorator(Settings)


@click.group()
@click.option(
    "--redis-url",
    envvar="JOBQ_REDIS_URL",
    default=default_url,
    show_default="$JOBQ_REDIS_URL or redis://127.0.0.1:6379/0",
    help="Redis URL. Prefer the JOBQ_REDIS_URL environment variable for passwords.",
)
@click.option("--prefix", envvar="JOBQ_PREFIX", default="jobq", show_default=True)
@click.version_option(package_name="jobq")
@click.pass_context
def main(ctx: click.Context, redis_url: str, prefix: str) -> None:
    """jobq: a Redis-native distributed job queue."""
    ctx.obj = Settings(redis_url=redis_url, prefix=prefix)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
