"""The README's shell example is true (issue 17 §4): `jobq tasks -A mod` shows the names tasks
are registered under (module.qualname) and their queues; `jobq enqueue -A mod send_email ...`
finds the task by its short name, puts the job in the task's queue, checks its arguments, and
a worker of the same app runs it."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from jobq import logs
from jobq.cli import main
from jobq.cli.apps import load_app
from jobq.worker import Worker, WorkerConfig
from tests.harness.cli import cli_runner

pytestmark = [pytest.mark.integration]

MODULE = """
import jobq

app = jobq.JobQ()
SENT = []


@app.task(queue="emails", max_attempts=5, timeout=30)
def send_email(to: str, subject: str = "") -> None:
    SENT.append((to, subject))


@app.periodic("*/5 * * * *", queue="reports")
def report() -> None: ...


class Billing:
    @staticmethod
    @app.task
    def send_email(invoice: int) -> None: ...
"""


@pytest.fixture
def mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"papercut_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def run(redis_url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = cli_runner().invoke(main, ["--redis-url", redis_url, *args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


def test_tasks_lists_registered_names_and_queues(mod: str) -> None:
    code, out = run("redis://127.0.0.1:1/0", "tasks", "-A", mod)
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {
        f"{mod}.send_email",
        f"{mod}.report",
        f"{mod}.Billing.send_email",
        "webhook",
        "email",
    }
    assert " emails " in lines[f"{mod}.send_email"] and "(to, subject='')" in lines[f"{mod}.send_email"]
    assert "*/5 * * * *" in lines[f"{mod}.report"] and " reports " in lines[f"{mod}.report"]
    code, out = run("redis://127.0.0.1:1/0", "tasks", "--json", env={"JOBQ_APP": mod})
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows[f"{mod}.send_email"]["queue"] == "emails" and rows[f"{mod}.send_email"]["max_attempts"] == 5
    assert rows["webhook"]["builtin"] and not rows[f"{mod}.send_email"]["builtin"]
    # Without -A: the built-in tasks.
    code, out = run("redis://127.0.0.1:1/0", "tasks")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["email", "webhook"]


def test_enqueue_by_short_name_into_the_tasks_queue_and_run_it(
    redis_url: str, r: redis.Redis, mod: str
) -> None:
    # The ambiguous short name is refused, naming both; the qualified one is taken.
    code, out = run(redis_url, "enqueue", "-A", mod, "send_email", '{"to": "a@example.com"}')
    assert code == 2 and "ambiguous" in out and f"{mod}.Billing.send_email" in out
    code, out = run(redis_url, "enqueue", "-A", mod, f"{mod}.send_email", '{"to": "a@example.com"}', "--json")
    assert code == 0, out
    row = json.loads(out)
    assert row["queue"] == "emails"  # the task's queue, not 'default'
    app = load_app(mod)
    app.url = redis_url
    info = app.job(row["id"], "emails").info()
    assert info.task == f"{mod}.send_email" and info.max_attempts == 5 and info.timeout_ms == 30_000
    # Unique short names resolve (the cron task); JOBQ_APP stands for -A.
    code, out = run(redis_url, "enqueue", "report", "--json", env={"JOBQ_APP": mod})
    assert code == 0 and json.loads(out)["queue"] == "reports"
    # A worker of the same app runs the job.
    asyncio.run(Worker(app, WorkerConfig(queues=[("emails", 1)], burst=True)).run())
    assert sys.modules[mod].SENT == [("a@example.com", "")]
    app.close()


def test_enqueue_with_app_refuses_unknown_names_and_bad_arguments(
    redis_url: str, r: redis.Redis, mod: str
) -> None:
    code, out = run(redis_url, "enqueue", "-A", mod, "sendemail", "[]")
    assert code == 2 and f"'sendemail' is not a task of {mod}" in out and f"jobq tasks -A {mod}" in out
    code, out = run(redis_url, "enqueue", "-A", mod, f"{mod}.send_email", '{"too": "a@example.com"}')
    assert code == 2 and "missing a required argument: 'to'" in out
    lines = "".join(
        json.dumps(d) + "\n" for d in ({"task": "report"}, {"task": "nope"}, {"task": f"{mod}.send_email"})
    )
    result = cli_runner().invoke(
        main, ["--redis-url", redis_url, "enqueue", "-A", mod, "--from-file", "-"], input=lines
    )
    assert result.exit_code == 2
    assert "line 2: task: 'nope' is not a task of" in result.stderr
    assert "line 3: args: missing a required argument: 'to'" in result.stderr
    assert not [k for k in r.keys("*") if b":job:" in k]
    # --no-check-args lets an argument list through that the producer's signature refuses.
    code, out = run(redis_url, "enqueue", "-A", mod, f"{mod}.send_email", "[1, 2, 3]", "--no-check-args")
    assert code == 0, out
    # Bulk with -A resolves short names per line.
    result = cli_runner().invoke(
        main,
        ["--redis-url", redis_url, "enqueue", "-A", mod, "--from-file", "-", "--json"],
        input=json.dumps({"task": "report"}) + "\n",
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["queue"] == "reports"


def test_worker_takes_the_app_from_jobq_app(redis_url: str, mod: str) -> None:
    code, out = run(redis_url, "enqueue", "-A", mod, "report")
    assert code == 0, out
    job_id = out.strip()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        code, out = run(redis_url, "worker", "--burst", "-Q", "reports", env={"JOBQ_APP": mod})
    finally:  # the worker command installs its log handler: leave logging as it was
        if logs._handler is not None and logs._handler not in handlers:
            root.removeHandler(logs._handler)
            logs._handler = None
        root.setLevel(level)
    assert code == 0, out
    app = load_app(mod)
    app.url = redis_url
    assert app.job(job_id, "reports").status().value == "done"
    app.close()


def test_a_bare_short_name_without_app_is_warned_about(redis_url: str) -> None:
    """Without -A, `jobq enqueue send_email` stores a job no worker knows (tasks are named
    module.qualname): it is still enqueued (a task may be registered under that exact name), but
    the command says so on stderr, once per name; qualified and built-in names are not warned."""
    runner = cli_runner()

    def enqueue(*args: str, input: str | None = None) -> tuple[int, str, str]:
        res = runner.invoke(main, ["--redis-url", redis_url, "enqueue", *args], input=input)
        return res.exit_code, res.stdout, res.stderr

    code, out, err = enqueue("send_email", '{"to": "a@example.com"}')
    assert code == 0 and len(out.split()) == 1
    assert "warning: task 'send_email' is not a built-in" in err and "tasks.send_email" in err
    for name, args in (("tasks.send_email", '{"to": "a"}'), ("webhook", '{"url": "https://e.com"}')):
        code, out, err = enqueue(name, args)
        assert code == 0 and err == "", (name, err)
    lines = "".join(json.dumps({"task": t, "args": [1]}) + "\n" for t in ("send_email", "send_email", "m.f"))
    code, out, err = enqueue("--from-file", "-", input=lines)
    assert code == 0 and len(out.split()) == 3
    assert err.count("warning: task 'send_email'") == 1, err
