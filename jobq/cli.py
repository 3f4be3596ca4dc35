"""The ``jobq`` command line: one click group; connection options on the group.

Commands stay thin: parse, build library objects, call them, print. They live in their own
modules and are attached here: ``jobq worker`` (:mod:`jobq.cli_worker`), and the producer and
admin commands (:mod:`jobq.cli_admin`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from jobq.connection import default_url


@dataclass
class Settings:
    """Options shared by every command (``--redis-url``, ``--prefix``)."""

    redis_url: str
    prefix: str


pass_settings = click.make_pass_decorator(Settings)
F = TypeVar("F", bound=Callable[..., Any])


def connection_options(fn: F) -> F:
    """``--redis-url`` and ``--prefix`` on a subcommand too (``jobq worker --redis-url ...``).

    Put it between ``@click.command()`` and the command's own options. Given on the subcommand,
    the values override the group's; the command receives the merged :class:`Settings` as its
    ``settings`` keyword argument."""

    def wrapper(*args: Any, sub_redis_url: str | None, sub_prefix: str | None, **kwargs: Any) -> Any:
        base = click.get_current_context().find_object(Settings) or Settings(default_url(), "jobq")
        settings = Settings(sub_redis_url or base.redis_url, sub_prefix or base.prefix)
        return fn(*args, settings=settings, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__click_params__ = list(getattr(fn, "__click_params__", []))  # type: ignore[attr-defined]
    wrapped = click.option("--prefix", "sub_prefix", default=None, help="Key prefix (default: jobq).")(
        wrapper
    )
    wrapped = click.option(
        "--redis-url",
        "sub_redis_url",
        default=None,
        help="Redis URL (default: $JOBQ_REDIS_URL or redis://127.0.0.1:6379/0). Prefer the "
        "environment variable for passwords: argv is readable by other users.",
    )(wrapped)
    return wrapped  # type: ignore[return-value]


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


def _attach() -> None:
    # Imported here so each command module can import Settings/pass_settings from this one.
    from jobq import cli_admin, cli_worker

    for module in (cli_worker, cli_admin):
        for command in module.COMMANDS:
            main.add_command(command)


_attach()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
