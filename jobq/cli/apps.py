"""The application a command works with: ``-A MODULE[:ATTR]`` imported and bound to the command's
Redis URL and prefix, and task names resolved against it."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from jobq import builtin, errors
from jobq.app import JobQ
from jobq.cli.common import Settings, admin_app
from jobq.storage import clients

F = TypeVar("F", bound=Callable[..., Any])


def load_app(spec: str) -> JobQ:
    """Import ``module[:attr]`` and return its :class:`JobQ`."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise click.BadParameter(f"{spec!r}: expected module[:attr]", param_hint="'-A'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {clients.redact(str(exc))}", param_hint="'-A'"
        ) from None
    if attr:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if not isinstance(obj, JobQ):
            raise click.BadParameter(
                f"{module_name}:{attr} is not a jobq.JobQ application", param_hint="'-A'"
            )
        return obj
    found = getattr(module, "app", None)
    if isinstance(found, JobQ):
        return found
    apps = {id(v): v for v in vars(module).values() if isinstance(v, JobQ)}
    if len(apps) == 1:
        return next(iter(apps.values()))
    what = "no jobq.JobQ" if not apps else "several jobq.JobQ objects"
    raise click.BadParameter(
        f"module {module_name!r} has {what}; name one with -A {module_name}:ATTR",
        param_hint="'-A'",
    )


def explicit(ctx: click.Context, sub: str, group: str) -> bool:
    """Was a connection option given (flag or environment), rather than defaulted?"""
    src = ctx.get_parameter_source(sub)
    if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP"):
        return ctx.params.get(sub) is not None
    parent = ctx.parent
    if parent is None:
        return False
    psrc = parent.get_parameter_source(group)
    return psrc is not None and psrc.name not in ("DEFAULT", "DEFAULT_MAP")


def bind(app: JobQ, settings: Settings, ctx: click.Context) -> str:
    """Point the app at the command's Redis URL and prefix when they were given."""
    url = (
        settings.redis_url
        if explicit(ctx, "sub_redis_url", "redis_url") or app.url == clients.DEFAULT_URL
        else None
    )
    prefix = settings.prefix if explicit(ctx, "sub_prefix", "prefix") else None
    app.bind(url=url, prefix=prefix)
    return app.url


def user_app(settings: Settings, app_spec: str | None) -> JobQ:
    """The application named by ``-A`` (bound to the command's Redis URL and prefix when they
    were given, as ``jobq worker`` does), with the built-in tasks; without ``-A``, a bare app
    with the built-in tasks only."""
    if not app_spec:
        return admin_app(settings)
    app = load_app(app_spec)
    bind(app, settings, click.get_current_context())
    builtin.register(app)
    return app


def app_option(fn: F) -> F:
    return click.option(
        "-A",
        "--app",
        "app_spec",
        envvar="JOBQ_APP",
        metavar="MODULE[:ATTR]",
        default=None,
        help="Your application (default: $JOBQ_APP), as for jobq worker. Its task names resolve, "
        "short ones too (send_email for tasks.send_email); a task's queue and options apply; "
        "arguments are checked against its signature; an unknown name is refused.",
    )(fn)


class TaskNames:
    """Task names as the user typed them -> as registered (with ``-A``); as typed without."""

    def __init__(self, app: JobQ, app_spec: str | None) -> None:
        self.app = app
        self.spec = app_spec
        self._warned: set[str] = set()

    def __call__(self, name: object) -> object:
        if not isinstance(name, str):
            return name
        if not self.spec:
            self._warn_bare(name)
            return name
        t = self.app.find_task(name)
        if t is None:
            import difflib

            known = sorted(self.app.tasks)
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise errors.InvalidTaskName(
                f"task: {name!r} is not a task of {self.spec}{hint} (jobq tasks -A {self.spec} lists them)"
            )
        return t.name

    def _warn_bare(self, name: str) -> None:
        """Without -A, a name with no module part that is not a built-in is most likely a short
        name (send_email for tasks.send_email): the job would fail "unknown task" on every
        worker. It may also be a task registered under that exact name, so warn, not refuse."""
        if "." in name or name in self.app.tasks or name in self._warned:
            return
        self._warned.add(name)
        click.echo(
            f"warning: task {name!r} is not a built-in and has no module part; workers run it only "
            "if a task is registered under exactly this name (tasks are named module.qualname, "
            "e.g. tasks.send_email: give -A MODULE to use short names; jobq tasks -A MODULE lists them)",
            err=True,
        )
