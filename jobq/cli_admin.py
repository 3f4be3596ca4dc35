"""Producer and admin commands: ``jobq enqueue``, ``stats``, ``status``, ``jobs``, ``dead``,
``cancel``, ``queue``, ``nodes``, ``serve``.

Read commands (``stats``, ``status``, ``jobs list``, ``dead list``, ``nodes``) only read. Commands
that delete or cancel (``cancel``, ``queue purge``, ``dead purge``, ``dead retry`` of a whole
queue) need ``--yes``; without it they change nothing and exit 2. Output is a table for people,
or JSON with ``--json``. Exit codes: 0 done, 1 failed (not found, Redis unavailable, queue full),
2 bad usage or input (nothing written).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any, TypeVar

import click

from jobq import admin, builtin, connection, errors, strict_json
from jobq.app import EnqueueRequest, JobInfo, JobQ
from jobq.cli import Settings, connection_options

COMMANDS: list[click.Command] = []
F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=click.Command)

#: Jobs per enqueue_many call when enqueueing a file (one pipelined round trip each).
BULK_CHUNK = 1000
#: Invalid NDJSON lines reported individually before the rest are summarised.
MAX_REPORTED = 20


def _command(fn: C) -> C:
    COMMANDS.append(fn)
    return fn


def _app(settings: Settings) -> JobQ:
    app = JobQ(settings.redis_url, prefix=settings.prefix)
    builtin.register(app)  # so webhook/email get their retry defaults when enqueued here
    return app


def _user_app(settings: Settings, app_spec: str | None) -> JobQ:
    """The application named by ``-A`` (bound to the command's Redis URL and prefix when they
    were given, as ``jobq worker`` does), with the built-in tasks; without ``-A``, a bare app
    with the built-in tasks only."""
    if not app_spec:
        return _app(settings)
    from jobq.cli_worker import _bind, load_app

    app = load_app(app_spec)
    _bind(app, settings, click.get_current_context())
    builtin.register(app)
    return app


def _app_option(fn: F) -> F:
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


class _Names:
    """Task names as the user typed them -> as registered (with ``-A``); as typed without."""

    def __init__(self, app: JobQ, app_spec: str | None) -> None:
        self.app = app
        self.spec = app_spec

    def __call__(self, name: object) -> object:
        if not self.spec or not isinstance(name, str):
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


@contextmanager
def _errors() -> Iterator[None]:
    """Map jobq errors to click's exit codes: bad input 2, everything else 1."""
    try:
        yield
    except errors.InvalidInput as exc:
        raise click.UsageError(str(exc)) from None
    except (errors.JobNotFound, errors.JobNotCancellable, errors.QueueFull) as exc:
        raise click.ClickException(str(exc)) from None
    except errors.JobqError as exc:
        raise click.ClickException(connection.redact(str(exc))) from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise click.ClickException(f"Redis unavailable: {connection.redact(str(exc))}") from None
    except Exception as exc:
        import redis

        if isinstance(exc, redis.exceptions.RedisError):
            raise click.ClickException(f"Redis error: {connection.redact(str(exc))}") from None
        raise


def _warn_unknown(app: JobQ, queues: Sequence[str]) -> None:
    """On stderr, name each queue jobq has never seen (a misspelling shows nothing otherwise)."""
    for q in queues:
        if not admin.known_queue(app, q):
            click.echo(
                f"warning: queue {q!r} is unknown (nothing was ever enqueued to it and no node "
                "serves it); `jobq stats` lists the known queues",
                err=True,
            )


def _need_yes(yes: bool, what: str) -> None:
    if not yes:
        raise click.UsageError(f"{what}: nothing done; add --yes to confirm")


def _json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float) -> str:
    if seconds < 1:
        return "0s" if seconds == 0 else f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


# -- enqueue --------------------------------------------------------------------------------------------
def _parse_json(text: str, what: str) -> Any:
    try:
        return strict_json.loads(text)
    except ValueError as exc:
        raise click.UsageError(f"{what}: not valid JSON: {exc}") from None


def _single_request(
    task: str,
    args_json: str | None,
    kwargs_json: str | None,
    options: dict[str, Any],
) -> EnqueueRequest:
    data: dict[str, Any] = {"task": task}
    if args_json is not None:
        value = _parse_json(args_json, "ARGS_JSON")
        if isinstance(value, list):
            data["args"] = value
        elif isinstance(value, dict):
            # An object is the keyword arguments: jobq enqueue send_email '{"to": "a@b.c"}'.
            if kwargs_json is not None:
                raise click.UsageError("ARGS_JSON is an object (keyword arguments) and --kwargs is given too")
            data["kwargs"] = value
        else:
            data["args"] = [value]
    if kwargs_json is not None:
        value = _parse_json(kwargs_json, "--kwargs")
        if not isinstance(value, dict):
            raise click.UsageError("--kwargs: must be a JSON object")
        data["kwargs"] = value
    data.update({k: v for k, v in options.items() if v is not None})
    return admin.request_from_json(data)


def _read_lines(stream: IO[str]) -> list[tuple[int, str]]:
    try:
        return [(n, line) for n, line in enumerate(stream, start=1) if line.strip(" \t\r\n\ufeff")]
    except UnicodeDecodeError as exc:
        what = "UTF-16" if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff") else "not UTF-8"
        raise click.UsageError(
            f"--from-file: the input is {what} (at byte {exc.start}); NDJSON must be UTF-8, nothing enqueued"
        ) from None


def _bulk(
    app: JobQ,
    source: IO[str],
    skip_invalid: bool,
    as_json: bool,
    options: dict[str, Any],
    names: _Names,
) -> None:
    """Validate every line first (nothing is written if one is bad, unless --skip-invalid), then
    enqueue in pipelined chunks of BULK_CHUNK."""
    good: list[EnqueueRequest] = []
    bad: list[str] = []
    for lineno, line in _read_lines(source):
        try:
            data = strict_json.loads(line)
            if isinstance(data, dict):
                if "task" in data:
                    data["task"] = names(data["task"])
                # Command-line options are defaults for the lines that do not set them (a line
                # that sets its own run time replaces both --delay and --at).
                defaults = {k: v for k, v in options.items() if v is not None}
                if any(data.get(k) is not None for k in ("delay", "run_at", "scheduled_at")):
                    defaults.pop("delay", None)
                    defaults.pop("run_at", None)
                data = {**defaults, **data}
            req = admin.request_from_json(data)
            app.prepare(req)  # full validation, no I/O
        except (ValueError, errors.InvalidInput) as exc:
            bad.append(f"line {lineno}: {exc}")
            continue
        good.append(req)
    if bad:
        for msg in bad[:MAX_REPORTED]:
            click.echo(msg, err=True)
        if len(bad) > MAX_REPORTED:
            click.echo(f"... and {len(bad) - MAX_REPORTED} more invalid line(s)", err=True)
        if not skip_invalid:
            raise click.UsageError(
                f"{len(bad)} invalid line(s); nothing enqueued (--skip-invalid to skip them)"
            )
        click.echo(f"skipping {len(bad)} invalid line(s)", err=True)
    if not good:
        if not bad:
            click.echo("no jobs in the input", err=True)
        return
    tty = sys.stdout.isatty()
    stored: list[Any] = []

    def emit(jobs: Sequence[Any]) -> None:
        for j in jobs:
            click.echo(json.dumps({"id": j.id, "queue": j.queue}) if as_json else j.id)

    chunks = [good[i : i + BULK_CHUNK] for i in range(0, len(good), BULK_CHUNK)]
    if tty:
        with click.progressbar(length=len(good), label="enqueueing", file=sys.stderr) as bar:
            for chunk in chunks:
                stored += app.enqueue_many(chunk)
                bar.update(len(chunk))
        emit(stored)
    else:
        for chunk in chunks:
            # Printed per chunk: if Redis fails midway, the ids printed are exactly those stored.
            emit(app.enqueue_many(chunk))


@_command
@click.command()
@connection_options
@click.argument("task", required=False)
@click.argument("args_json", required=False, metavar="[ARGS_JSON]")
@click.option("--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments as a JSON object.")
@click.option("--queue", "-q", help="Queue (default: the task's with -A, else 'default').")
@click.option("--priority", "-p", type=int, help="-100..100, higher runs first.")
@click.option("--delay", help="Run after this long: 30, 30s, 250ms, 5m, 2h, 1d.")
@click.option("--at", "run_at", metavar="ISO8601", help="Run at this time (no offset = UTC).")
@click.option("--max-attempts", type=int, help="Attempts before dead-lettering.")
@click.option("--timeout", help="Per-attempt timeout: 30, 30s, 5m ...")
@click.option("--unique", "unique_key", metavar="KEY", help="Idempotency key.")
@click.option("--job-id", help="Client-chosen job id (a retried enqueue is then a no-op).")
@click.option(
    "--from-file",
    type=click.File("r", encoding="utf-8"),
    metavar="FILE|-",
    help="Bulk: NDJSON, one request object per line (HTTP field names); '-' = stdin.",
)
@click.option(
    "--skip-invalid", is_flag=True, help="With --from-file: enqueue the valid lines, skip the rest."
)
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "queue"} JSON lines instead of bare ids.')
@_app_option
@click.option(
    "--no-check-args",
    "no_check_args",
    is_flag=True,
    help="With -A: do not check the arguments against the task's signature.",
)
def enqueue(
    settings: Settings,
    app_spec: str | None,
    no_check_args: bool,
    task: str | None,
    args_json: str | None,
    kwargs_json: str | None,
    queue: str | None,
    priority: int | None,
    delay: str | None,
    run_at: str | None,
    max_attempts: int | None,
    timeout: str | None,
    unique_key: str | None,
    job_id: str | None,
    from_file: IO[str] | None,
    skip_invalid: bool,
    as_json: bool,
) -> None:
    """Enqueue TASK with ARGS_JSON (a JSON array of arguments, or an object of keyword
    arguments), or a file of NDJSON requests; prints the job ids.

    Tasks are registered as module.qualname (tasks.send_email); `jobq tasks -A MODULE` lists
    them. With -A MODULE (or $JOBQ_APP) a short name does too, and the task's queue and
    options are its defaults: jobq enqueue -A tasks send_email '{"to": "a@example.com"}'."""
    if delay is not None and run_at is not None:
        raise click.UsageError("give --delay or --at, not both")
    options = {
        "queue": queue,
        "priority": priority,
        "delay": delay,
        "run_at": run_at,
        "max_attempts": max_attempts,
        "timeout": timeout,
        "unique_key": unique_key,
        "job_id": job_id,
    }
    if from_file is not None:
        if task is not None or args_json is not None or kwargs_json is not None:
            raise click.UsageError("--from-file takes no TASK, ARGS_JSON or --kwargs (they are in each line)")
        if unique_key is not None or job_id is not None:
            raise click.UsageError("--unique and --job-id apply to one job; put them in the lines")
        with _errors():
            app = _user_app(settings, app_spec)
            if no_check_args:
                for t in app.tasks.values():
                    t.arg_check = None
            try:
                _bulk(app, from_file, skip_invalid, as_json, options, _Names(app, app_spec))
            finally:
                app.close()
        return
    if task is None:
        raise click.UsageError("missing TASK (or --from-file)")
    with _errors():
        req = _single_request(task, args_json, kwargs_json, options)
        app = _user_app(settings, app_spec)
        try:
            name = _Names(app, app_spec)(req.task)
            assert isinstance(name, str)
            req = dataclasses.replace(req, task=name, check_args=not no_check_args)
            job = app.enqueue_request(req)
        finally:
            app.close()
    click.echo(json.dumps({"id": job.id, "queue": job.queue}) if as_json else job.id)


# -- tasks ------------------------------------------------------------------------------------------------
def _task_rows(app: JobQ) -> list[dict[str, Any]]:
    import inspect

    schedules: dict[str, list[str]] = {}
    for entry in app.cron_entries:
        schedules.setdefault(entry.task, []).append(entry.schedule.text)
    out = []
    for name in sorted(app.tasks):
        t = app.tasks[name]
        try:
            sig = inspect.signature(t.fn)
            bare = sig.replace(
                parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                return_annotation=inspect.Signature.empty,
            )
            signature = str(bare)
        except (TypeError, ValueError):
            signature = "(...)"
        d = t.defaults
        out.append(
            {
                "name": name,
                "queue": d.queue,
                "priority": d.priority,
                "max_attempts": d.max_attempts,
                "timeout": d.timeout,
                "retry_backoff": d.retry_backoff,
                "schedule": schedules.get(name, []),
                "signature": signature,
                "async": t.is_async,
                "check_args": t.arg_check is not None,
                "builtin": t.fn.__module__ == builtin.__name__,
            }
        )
    return out


@_command
@click.command("tasks")
@_app_option
@_json_option
def tasks_command(app_spec: str | None, as_json: bool) -> None:
    """List the tasks of the application given with -A (default: $JOBQ_APP): the names to
    enqueue them by, their queues and options, cron schedules and arguments. Without -A, the
    built-in tasks (what `jobq worker` runs without -A). Reads no Redis."""
    if app_spec:
        from jobq.cli_worker import load_app

        app = load_app(app_spec)
    else:
        app = JobQ("redis://127.0.0.1:6379/0")  # never connected
    builtin.register(app)
    rows = _task_rows(app)
    if as_json:
        _echo_json(rows)
        return
    table = [
        (
            r["name"],
            r["queue"],
            r["priority"],
            r["max_attempts"],
            "-" if r["timeout"] is None else f"{r['timeout']:g}s",
            ", ".join(r["schedule"]),
            r["signature"],
        )
        for r in rows
    ]
    click.echo(_table(("TASK", "QUEUE", "PRIO", "ATTEMPTS", "TIMEOUT", "SCHEDULE", "ARGUMENTS"), table))


# -- stats ------------------------------------------------------------------------------------------------
def _stats_table(stats: Sequence[admin.QueueStats], live_nodes: int) -> str:
    rows = [
        (
            s.queue,
            s.ready,
            s.scheduled,
            s.active,
            s.dead,
            "yes" if s.paused else "",
            s.nodes,
            _age(s.oldest_ready_age_s) if s.ready else "-",
        )
        for s in stats
    ]
    t = admin.totals(stats)
    rows.append(("TOTAL", t["ready"], t["scheduled"], t["active"], t["dead"], "", live_nodes, ""))
    headers = ("QUEUE", "READY", "SCHEDULED", "ACTIVE", "DEAD", "PAUSED", "NODES", "OLDEST READY")
    return _table(headers, rows)


@_command
@click.command()
@connection_options
@click.option("--queue", "-q", "queues", multiple=True, help="Only these queues (repeatable).")
@click.option("--watch", "-w", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval", default="2s", show_default=True, help="Refresh interval with --watch.")
@click.option("--iterations", type=int, default=0, hidden=True, help="Stop --watch after N refreshes.")
@_json_option
def stats(
    settings: Settings, queues: tuple[str, ...], watch: bool, interval: str, iterations: int, as_json: bool
) -> None:
    """Per-queue depths: ready, scheduled, active, dead, paused, nodes, oldest ready job's age."""
    with _errors():
        every = admin.parse_seconds(interval, "interval", errors.InvalidInput)
        if every <= 0:
            raise errors.InvalidInput("interval: must be > 0", "interval")
        app = _app(settings)
        try:
            n = 0
            while True:
                if n == 0:
                    _warn_unknown(app, queues)
                st = admin.queue_stats(app, list(queues) or None)
                live = admin.live_node_count(app)
                if as_json:
                    click.echo(
                        json.dumps(
                            {"queues": [s.to_dict() for s in st], "totals": admin.totals(st), "nodes": live}
                        )
                    )
                else:
                    if watch and sys.stdout.isatty():
                        click.clear()
                    if watch:
                        click.echo(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
                    click.echo(_stats_table(st, live))
                n += 1
                if not watch or (iterations and n >= iterations):
                    return
                time.sleep(every)
        except KeyboardInterrupt:
            return
        finally:
            app.close()


# -- jobs -------------------------------------------------------------------------------------------------
def _job_time(j: JobInfo) -> int | None:
    """The time that matters for the job's state: when it will run (scheduled), started
    (active), ended (dead, done, cancelled: the time of death for a dead letter), else when it
    was enqueued."""
    st = j.state.value
    if st == "scheduled":
        return j.run_at_ms
    if st == "active":
        return j.started_ms or j.enqueued_ms
    if st in ("dead", "done", "cancelled"):
        return j.finished_ms or j.enqueued_ms
    return j.enqueued_ms


def _job_rows(jobs: Sequence[JobInfo]) -> str:
    rows = [
        (
            j.id,
            j.queue,
            j.state.value,
            j.task,
            j.priority,
            f"{j.attempts}/{j.max_attempts}",
            _ms(_job_time(j)),
            admin.redact_text(j.error or "")[:60],
        )
        for j in jobs
    ]
    return _table(("ID", "QUEUE", "STATE", "TASK", "PRIO", "ATTEMPTS", "TIME (UTC)", "LAST ERROR"), rows)


def _print_jobs(jobs: Sequence[JobInfo], as_json: bool) -> None:
    if as_json:
        _echo_json([admin.redacted(j) for j in jobs])
    elif not jobs:
        click.echo("no jobs")
    else:
        click.echo(_job_rows(jobs))


@_command
@click.group()
def jobs() -> None:
    """Inspect jobs."""


@jobs.command("list")
@connection_options
@click.option("--queue", "-q", help="Only this queue (default: every queue).")
@click.option("--state", "-s", type=click.Choice(admin.LIST_STATES), help="Only this state (default: all).")
@click.option("--limit", "-n", type=click.IntRange(1, admin.MAX_LIST), default=50, show_default=True)
@_json_option
def jobs_list(settings: Settings, queue: str | None, state: str | None, limit: int, as_json: bool) -> None:
    """List jobs: ready in run order, scheduled by run time, active by lease, dead and finished
    most recent first."""
    with _errors():
        app = _app(settings)
        try:
            found = admin.list_jobs(app, queue, state, limit=limit)
            if queue is not None and not found:
                _warn_unknown(app, [queue])
        finally:
            app.close()
    _print_jobs(found, as_json)


@_command
@click.command()
@connection_options
@click.argument("job_id", metavar="ID")
@click.option("--queue", "-q", help="The job's queue (default: search every queue).")
@click.option("--args", "show_args", is_flag=True, help="Show the arguments (secret-looking keys masked).")
@_json_option
def status(settings: Settings, job_id: str, queue: str | None, show_args: bool, as_json: bool) -> None:
    """Show one job: state, attempts, times, node, last error."""
    with _errors():
        app = _app(settings)
        try:
            info = admin.job_info(app, job_id, queue, with_args=show_args)
        finally:
            app.close()
    d = admin.redacted(info)
    if not show_args:
        d.pop("args")
        d.pop("kwargs")
    if as_json:
        _echo_json(d)
        return
    for key in ("enqueued_ms", "run_at_ms", "started_ms", "finished_ms", "deadline_ms"):
        if d.get(key) is not None:
            d[key] = f"{d[key]} ({_ms(d[key])} UTC)"
    width = max(len(k) for k in d)
    for k, v in d.items():
        if v is None:
            continue
        shown = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
        click.echo(f"{k.ljust(width)}  {shown}")


@_command
@click.command()
@connection_options
@click.argument("job_id", metavar="ID")
@click.option("--queue", "-q", help="The job's queue (default: search every queue).")
@click.option("--yes", is_flag=True, help="Confirm.")
def cancel(settings: Settings, job_id: str, queue: str | None, yes: bool) -> None:
    """Cancel a job that has not started (ready or scheduled)."""
    _need_yes(yes, f"cancel {job_id}")
    with _errors():
        app = _app(settings)
        try:
            q = admin.cancel(app, job_id, queue)
        finally:
            app.close()
    click.echo(f"cancelled {job_id} (queue {q})")


# -- dead letters --------------------------------------------------------------------------------------------
@_command
@click.group()
def dead() -> None:
    """Inspect and repair the dead-letter list of a queue."""


@dead.command("list")
@connection_options
@click.option("--queue", "-q", help="Only this queue (default: every queue).")
@click.option("--limit", "-n", type=click.IntRange(1, admin.MAX_LIST), default=50, show_default=True)
@_json_option
def dead_list(settings: Settings, queue: str | None, limit: int, as_json: bool) -> None:
    """Dead-lettered jobs, most recent first, with their last error; TIME is the time of death."""
    with _errors():
        app = _app(settings)
        try:
            found = admin.list_jobs(app, queue, "dead", limit=limit)
            if queue is not None and not found:
                _warn_unknown(app, [queue])
        finally:
            app.close()
    _print_jobs(found, as_json)


@dead.command("retry")
@connection_options
@click.option("--queue", "-q", required=True)
@click.argument("job_ids", nargs=-1, metavar="[ID]...")
@click.option("--yes", is_flag=True, help="Confirm retrying every dead job of the queue (no IDs).")
def dead_retry(settings: Settings, queue: str, job_ids: tuple[str, ...], yes: bool) -> None:
    """Move dead jobs back to ready with fresh attempts: the IDs given, or all (needs --yes)."""
    if not job_ids:
        _need_yes(yes, f"retry every dead job of {queue}")
    with _errors():
        app = _app(settings)
        try:
            n = admin.retry_dead(app, queue, list(job_ids) or None)
        finally:
            app.close()
    click.echo(f"{n} job(s) moved back to ready")


@dead.command("purge")
@connection_options
@click.option("--queue", "-q", required=True)
@click.option("--yes", is_flag=True, help="Confirm.")
def dead_purge(settings: Settings, queue: str, yes: bool) -> None:
    """Delete every dead job of the queue."""
    _need_yes(yes, f"purge the dead letters of {queue}")
    with _errors():
        app = _app(settings)
        try:
            n = admin.purge(app, queue, ("dead",))["dead"]
        finally:
            app.close()
    click.echo(f"{n} dead job(s) deleted")


# -- queues -----------------------------------------------------------------------------------------------
@_command
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
    with _errors():
        app = _app(settings)
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
    with _errors():
        app = _app(settings)
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
    _need_yes(yes, f"purge {', '.join(chosen)} jobs of {queue}")
    with _errors():
        app = _app(settings)
        try:
            done = admin.purge(app, queue, chosen)
        finally:
            app.close()
    click.echo(", ".join(f"{n} {st}" for st, n in done.items()) + " job(s) deleted")


# -- nodes ------------------------------------------------------------------------------------------------
@_command
@click.command()
@connection_options
@click.option("--all", "include_gone", is_flag=True, help="Include nodes whose heartbeats stopped.")
@_json_option
def nodes(settings: Settings, include_gone: bool, as_json: bool) -> None:
    """Live worker nodes: queues, in-flight jobs, last heartbeat."""
    with _errors():
        app = _app(settings)
        try:
            found = admin.nodes(app, include_gone=include_gone)
        finally:
            app.close()
    if as_json:
        _echo_json([n.to_dict() for n in found])
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
            f"{_age(n.heartbeat_age_s)} ago",
        )
        for n in found
    ]
    click.echo(_table(("NODE", "STATUS", "QUEUES", "HOST", "PID", "IN FLIGHT", "HEARTBEAT"), rows))


# -- serve ------------------------------------------------------------------------------------------------
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


@_command
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
    log_format: str,
    log_level: str,
) -> None:
    """Run the HTTP API (POST/GET/DELETE /jobs, /stats, /health, /metrics, /openapi.json)."""
    from jobq import logs
    from jobq.http import ApiServer

    logs.configure(log_format, log_level)
    logs.add_secret(token)
    depth = _max_depth(max_depth)
    app = JobQ(settings.redis_url, prefix=settings.prefix, max_depth=depth)
    builtin.register(app)
    try:
        server = ApiServer(app, host, port, token=token, max_body=max_body)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    import logging
    import signal

    log = logging.getLogger("jobq.http")
    log.info(
        "jobq HTTP API on http://%s:%d (redis %s%s)",
        host,
        server.port,
        connection.redact_url(app.url),
        ", token required" if token else "",
    )

    def stop(sig: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(sig).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        server.health_client.close()
        app.close()
