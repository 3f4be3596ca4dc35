"""``jobq enqueue``: single jobs with every option, and bulk NDJSON with all-or-nothing validation,
against a real redis-server."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from jobq import JobQ
from jobq.cli import main
from tests.harness.cli import cli_runner

pytestmark = [pytest.mark.integration]


def run(redis_url: str, *args: str, input: str | None = None) -> tuple[int, str, str]:
    result = cli_runner().invoke(main, ["--redis-url", redis_url, *args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def job_keys(r: redis.Redis) -> list[bytes]:
    return sorted(k for k in r.keys("*") if b":job:" in k)


def test_enqueue_one_job_with_options(redis_url: str, app: JobQ, r: redis.Redis) -> None:
    code, out, err = run(
        redis_url,
        "enqueue",
        "send_email",
        '["a@example.com"]',
        "--kwargs",
        '{"subject": "hi"}',
        "--queue",
        "emails",
        "--priority",
        "5",
        "--delay",
        "30s",
        "--max-attempts",
        "7",
        "--timeout",
        "1m",
        "--unique",
        "welcome-a",
    )
    assert code == 0, err
    job_id = out.strip()
    info = app.job(job_id, "emails").info()
    assert info.task == "send_email"
    assert info.args == ["a@example.com"] and info.kwargs == {"subject": "hi"}
    assert info.state.value == "scheduled"
    assert info.priority == 5 and info.max_attempts == 7 and info.timeout_ms == 60_000
    assert info.unique_key == "welcome-a"
    assert info.run_at_ms is not None and info.enqueued_ms is not None
    assert 29_000 <= info.run_at_ms - info.enqueued_ms <= 31_000
    # The same unique key returns the job already holding it.
    code, out2, _ = run(redis_url, "enqueue", "send_email", "[]", "-q", "emails", "--unique", "welcome-a")
    assert code == 0 and out2.strip() == job_id


def test_object_argument_is_kwargs_and_at_is_absolute(redis_url: str, app: JobQ) -> None:
    code, out, err = run(
        redis_url,
        "enqueue",
        "send_email",
        '{"to": "a@example.com"}',
        "--at",
        "2031-01-02T03:04:05Z",
        "--json",
    )
    assert code == 0, err
    data = json.loads(out)
    info = app.job(data["id"], data["queue"]).info()
    assert data["queue"] == "default"
    assert info.kwargs == {"to": "a@example.com"} and info.args == []
    assert info.run_at_ms == 1925089445000


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["enqueue", "t", "[1,"], "ARGS_JSON"),
        (["enqueue", "t", "--kwargs", "[1]"], "--kwargs"),
        (["enqueue", "t", "--priority", "500"], "priority"),
        (["enqueue", "t", "--delay", "soon"], "delay"),
        (["enqueue", "t", "--at", "tomorrow"], "run_at"),
        (["enqueue", "t", "--delay", "1s", "--at", "2030-01-01T00:00:00"], "--delay or --at"),
        (["enqueue", "t", "--queue", "bad queue"], "queue"),
        (["enqueue", "bad task name"], "task"),
        (["enqueue", "t", "--max-attempts", "0"], "max_attempts"),
        (["enqueue"], "TASK"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    redis_url: str, r: redis.Redis, args: list[str], needle: str
) -> None:
    code, _, err = run(redis_url, *args)
    assert code == 2
    assert needle in err
    assert r.dbsize() == 0


def write_ndjson(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bulk_from_file_enqueues_every_line(
    redis_url: str, app: JobQ, r: redis.Redis, tmp_path: Path
) -> None:
    lines = [
        json.dumps({"task": "webhook", "kwargs": {"url": f"http://h/{i}"}, "queue": "hooks"})
        for i in range(2500)
    ]
    lines.insert(10, "")  # blank lines are skipped
    email = {"to": "a@b.c", "subject": "hi", "body": "text"}  # all it needs: checked at enqueue
    lines.append(json.dumps({"task": "email", "kwargs": email, "delay": "5m", "priority": 3}))
    code, out, err = run(redis_url, "enqueue", "--from-file", write_ndjson(tmp_path / "jobs.ndjson", lines))
    assert code == 0, err
    ids = out.split()
    assert len(ids) == 2501 and len(set(ids)) == 2501
    assert r.zcard(app.keys.ready("hooks")) == 2500
    assert r.zcard(app.keys.scheduled("default")) == 1
    first = app.job(ids[0], "hooks").info()
    assert first.kwargs == {"url": "http://h/0"}
    # Built-in task defaults apply when enqueued from the shell.
    assert first.max_attempts == 5


def test_bulk_from_stdin_with_cli_defaults(redis_url: str, app: JobQ, r: redis.Redis) -> None:
    stdin = "\n".join(json.dumps({"task": "t", "args": [i]}) for i in range(3)) + "\n"
    code, out, err = run(redis_url, "enqueue", "--from-file", "-", "--queue", "bulkq", "--json", input=stdin)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["queue"] for row in rows] == ["bulkq"] * 3
    assert r.zcard(app.keys.ready("bulkq")) == 3


def test_a_line_schedule_replaces_the_cli_default(redis_url: str, app: JobQ, r: redis.Redis) -> None:
    stdin = (
        json.dumps({"task": "t", "scheduled_at": "2040-01-01T00:00:00Z"}) + "\n" + json.dumps({"task": "t"})
    )
    code, out, err = run(redis_url, "enqueue", "--from-file", "-", "--delay", "1h", "--json", input=stdin)
    assert code == 0, err
    first, second = (json.loads(line)["id"] for line in out.splitlines())
    assert app.job(first, "default").info().run_at_ms == 2208988800000
    info = app.job(second, "default").info()
    assert info.run_at_ms is not None and info.enqueued_ms is not None
    assert 3_599_000 <= info.run_at_ms - info.enqueued_ms <= 3_601_000


def test_bulk_with_bad_lines_writes_nothing_and_names_the_lines(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    lines = [
        json.dumps({"task": "t", "args": [1]}),
        "{not json",
        json.dumps({"task": "t", "priority": 1000}),
        json.dumps({"task": "t", "colour": "red"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"task": "t", "args": [2]}),
    ]
    code, out, err = run(redis_url, "enqueue", "--from-file", write_ndjson(tmp_path / "bad.ndjson", lines))
    assert code == 2
    assert out == ""
    assert (
        "line 2:" in err
        and "line 3: priority" in err
        and "line 4: 'colour': unknown field" in err
        and "line 5:" in err
    )
    assert "line 1:" not in err and "line 6:" not in err
    assert "nothing enqueued" in err
    assert r.dbsize() == 0


def test_bulk_skip_invalid_enqueues_the_good_lines(
    redis_url: str, app: JobQ, r: redis.Redis, tmp_path: Path
) -> None:
    lines = [json.dumps({"task": "t", "args": [1]}), "{oops", json.dumps({"task": "t", "args": [2]})]
    path = write_ndjson(tmp_path / "mixed.ndjson", lines)
    code, out, err = run(redis_url, "enqueue", "--from-file", path, "--skip-invalid")
    assert code == 0
    assert len(out.split()) == 2
    assert "line 2:" in err and "skipping 1 invalid line" in err
    assert r.zcard(app.keys.ready("default")) == 2


def test_invalid_job_id_exits_2(redis_url: str, r: redis.Redis) -> None:
    code, _, err = run(redis_url, "enqueue", "t", "--job-id", "a b")
    assert code == 2 and "id:" in err
    assert r.dbsize() == 0


def test_progress_bar_only_on_a_terminal(redis_url: str, tmp_path: Path) -> None:
    lines = [json.dumps({"task": "t", "args": [i]}) for i in range(5)]
    path = write_ndjson(tmp_path / "tty.ndjson", lines)
    cmd = [sys.executable, "-m", "jobq", "--redis-url", redis_url, "enqueue", "--from-file", path]
    # Not a terminal: ids only, no bar.
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert len(piped.stdout.split()) == 5 and "enqueueing" not in piped.stderr
    # A terminal: the bar is drawn (on stderr, sharing the terminal), then the ids.
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(30)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "enqueueing" in text
