"""``jobq worker`` options: parsing, bad input (exit 2 with a message naming the option), -A
resolution, and the connection options reaching the node."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobq import InvalidInput, JobQ, JobState
from jobq.cli import main
from jobq.cli.apps import load_app
from jobq.cli.worker import parse_queues
from tests.harness.cli import cli_runner

pytestmark = pytest.mark.integration

TASKS = "tests.integration.worker_tasks"


@pytest.mark.parametrize(
    ("text", "queues", "weighted"),
    [
        ("default", [("default", 1)], False),
        ("critical,default,low", [("critical", 1), ("default", 1), ("low", 1)], False),
        ("critical:6,default:3,low:1", [("critical", 6), ("default", 3), ("low", 1)], True),
        (" a:2 , b ", [("a", 2), ("b", 1)], True),
    ],
)
def test_parse_queues(text: str, queues: list[tuple[str, int]], weighted: bool) -> None:
    assert parse_queues(text) == (queues, weighted)


@pytest.mark.parametrize("bad", ["", "a,,b", "a:0", "a:x", "a:1:2", "a,a", "bad{name}", "a b"])
def test_parse_queues_refuses_bad_lists(bad: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_queues(bad)
    assert "queue" in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--queues", "a:x"], "queues: weight 'x'"),
        (["--queues", "a{b}"], "Invalid value"),
        (["--lease", "30x"], "lease: '30x' is not a duration"),
        (["--grace", "-1s"], "grace"),
        (["--lease", "0s"], "lease: must be greater than 0"),
        (["--poll-interval", "soon"], "poll-interval"),
        # Below the sane minimums (issue 17: --lease 1ms flapped between fenced and unfenced).
        (["--lease", "1ms"], "lease: 1ms is below the minimum of 1s"),
        (["--lease", "0.5"], "lease: 0.5 is below the minimum of 1s"),
        (["--grace", "1ms"], "grace: 1ms is below the minimum of 100ms (or 0: release at once)"),
        (["--poll-interval", "1ms"], "poll-interval: 1ms is below the minimum of 50ms"),
        (["--poll-interval", "0"], "poll-interval: must be greater than 0 (the minimum is 50ms)"),
        (["--concurrency", "0"], "--concurrency"),
        (["--processes", "0"], "--processes"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--log-format", "xml"], "--log-format"),
        (["--loop", "trio"], "--loop"),
        (["-A", "tests.integration.no_such_module"], "cannot import 'tests.integration.no_such_module'"),
        (["-A", "tests.integration.worker_tasks:nope"], "is not a jobq.JobQ application"),
        (["-A", "tests.integration"], "has no jobq.JobQ"),
        (["--node-id", "bad node"], "node"),
        (["--no-such-flag"], "No such option"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    res = cli_runner().invoke(main, ["worker", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_load_app_finds_the_app() -> None:
    from tests.integration import worker_tasks

    assert load_app(TASKS) is worker_tasks.app
    assert load_app(f"{TASKS}:app") is worker_tasks.app


def test_burst_worker_from_the_cli_runs_the_jobs(
    redis_url: str, r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBQ_TEST_RECORD_DIR", str(tmp_path))
    # A different prefix on the command line reaches the node: the app is rebound to it.
    app = JobQ(redis_url, prefix="other")
    jobs = [app.enqueue(f"{TASKS}.record", (k,), queue="proc") for k in range(5)]
    res = cli_runner().invoke(
        main,
        ["--redis-url", redis_url, "worker", "-A", TASKS, "-Q", "proc", "--burst", "--prefix", "other"],
    )
    assert res.exit_code == 0, res.output
    assert [j.status() for j in jobs] == [JobState.DONE] * 5
    assert [j.result(timeout=0) for j in jobs] == list(range(5))
    assert not r.keys("jobq:*")  # nothing under the default prefix
    app.close()


def test_worker_without_an_app_runs_builtins_only(redis_url: str) -> None:
    app = JobQ(redis_url)
    job = app.enqueue("someone.elses.task", max_attempts=1)
    res = cli_runner().invoke(main, ["worker", "--redis-url", redis_url, "--burst"])
    assert res.exit_code == 0, res.output
    info = job.info()
    assert info.state is JobState.DEAD and "unknown task 'someone.elses.task'" in (info.error or "")
    app.close()


@pytest.mark.parametrize("how", ["default", "option", "env"])
def test_the_start_line_says_which_event_loop_runs(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # uvloop when installed (auto), else asyncio's; --loop / JOBQ_WORKER_LOOP switch it off.
    from jobq.worker import loop as jobq_loop

    monkeypatch.delenv(jobq_loop.LOOP_ENV, raising=False)
    args = ["worker", "--redis-url", redis_url, "--burst"]
    if how == "option":
        args += ["--loop", "asyncio"]
    elif how == "env":
        monkeypatch.setenv(jobq_loop.LOOP_ENV, "asyncio")
    res = cli_runner().invoke(main, args)
    assert res.exit_code == 0, res.output
    want = jobq_loop.loop_kind("auto") if how == "default" else "asyncio"
    assert f", event loop {want}, redis " in res.output, res.output


def test_the_loop_option_is_in_the_help() -> None:
    res = cli_runner().invoke(main, ["worker", "--help"])
    assert res.exit_code == 0
    assert "--loop" in res.output and "uvloop" in res.output and "JOBQ_WORKER_LOOP" in res.output
