"""What every command shares: the connection options and :class:`Settings`, the mapping of jobq
errors to exit codes, ``--yes`` and ``--json``, and the app a producer or admin command uses.

Exit codes: 0 done, 1 failed (not found, Redis unavailable, queue full), 2 bad usage or input
(nothing written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from jobq import admin, builtin, errors
from jobq.app import JobQ
from jobq.storage import clients
from jobq.storage.clients import default_url

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    """Options shared by every command (``--redis-url``, ``--prefix``)."""

    redis_url: str
    prefix: str


pass_settings = click.make_pass_decorator(Settings)


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


def admin_app(settings: Settings) -> JobQ:
    """A bare app on the command's Redis URL and prefix, with the built-in tasks (so webhook and
    email get their retry defaults when enqueued from here)."""
    app = JobQ(settings.redis_url, prefix=settings.prefix)
    builtin.register(app)
    return app


@contextmanager
def cli_errors() -> Iterator[None]:
    """Map jobq errors to click's exit codes: bad input 2, everything else 1."""
    try:
        yield
    except errors.InvalidInput as exc:
        raise click.UsageError(str(exc)) from None
    except (errors.JobNotFound, errors.JobNotCancellable, errors.QueueFull) as exc:
        raise click.ClickException(str(exc)) from None
    except errors.JobqError as exc:
        raise click.ClickException(clients.redact(str(exc))) from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise click.ClickException(f"Redis unavailable: {clients.redact(str(exc))}") from None
    except Exception as exc:
        import redis

        if isinstance(exc, redis.exceptions.RedisError):
            raise click.ClickException(f"Redis error: {clients.redact(str(exc))}") from None
        raise


def warn_unknown(app: JobQ, queues: Sequence[str]) -> None:
    """On stderr, name each queue jobq has never seen (a misspelling shows nothing otherwise)."""
    for q in queues:
        if not admin.known_queue(app, q):
            click.echo(
                f"warning: queue {q!r} is unknown (nothing was ever enqueued to it and no node "
                "serves it); `jobq stats` lists the known queues",
                err=True,
            )


def need_yes(yes: bool, what: str) -> None:
    """Refuse (exit 2, nothing done) a destructive command without ``--yes``."""
    if not yes:
        raise click.UsageError(f"{what}: nothing done; add --yes to confirm")


def json_option(fn: F) -> F:
    """``--json``: print JSON instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
