"""``jobq enqueue``: one job from the command line, or NDJSON requests from a file."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import IO, Any

import click

from jobq import errors, requests, strict_json
from jobq.app import EnqueueRequest, JobQ
from jobq.cli.apps import TaskNames, app_option, user_app
from jobq.cli.common import Settings, cli_errors, connection_options

#: Jobs per enqueue_many call when enqueueing a file (one pipelined round trip each).
BULK_CHUNK = 1000
#: Invalid NDJSON lines reported individually before the rest are summarised.
MAX_REPORTED = 20


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
    return requests.request_from_json(data)


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
    names: TaskNames,
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
            req = requests.request_from_json(data)
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
@app_option
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
        with cli_errors():
            app = user_app(settings, app_spec)
            if no_check_args:
                for t in app.tasks.values():
                    t.arg_check = None
            try:
                _bulk(app, from_file, skip_invalid, as_json, options, TaskNames(app, app_spec))
            finally:
                app.close()
        return
    if task is None:
        raise click.UsageError("missing TASK (or --from-file)")
    with cli_errors():
        req = _single_request(task, args_json, kwargs_json, options)
        app = user_app(settings, app_spec)
        try:
            name = TaskNames(app, app_spec)(req.task)
            assert isinstance(name, str)
            req = dataclasses.replace(req, task=name, check_args=not no_check_args)
            job = app.enqueue_request(req)
        finally:
            app.close()
    click.echo(json.dumps({"id": job.id, "queue": job.queue}) if as_json else job.id)
