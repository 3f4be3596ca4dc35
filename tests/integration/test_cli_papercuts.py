"""Things a new user tripped on (issue 17 §4), through the real CLI against a real redis-server:
the dead list and the jobs list agree, times and characters are shown as they are."""

from __future__ import annotations

import json

import pytest

from jobq import FakeClock, JobQ
from jobq.cli import main
from tests.harness.cli import cli_runner

pytestmark = [pytest.mark.integration]

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC


def run(redis_url: str, *args: str) -> tuple[int, str, str]:
    result = cli_runner().invoke(main, ["--redis-url", redis_url, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_dead_list_needs_no_queue_and_shows_the_time_of_death(redis_url: str) -> None:
    app = JobQ(redis_url, clock=FakeClock(T0))
    ids = {}
    for q in ("q1", "q2"):
        job = app.enqueue("t", queue=q)
        app.run(app.store.claim(q, "n1", 1, 30_000, now_ms=T0))
        app.run(app.store.fail(q, "n1", job.id, "boom", dead=True, now_ms=T0 + 3_600_000))
        ids[q] = job.id
    app.close()
    # Like `jobs list`, `dead list` lists every queue without -q, and one with it.
    code, out, err = run(redis_url, "dead", "list")
    assert code == 0, err
    assert ids["q1"] in out and ids["q2"] in out
    # TIME is when the job died (an hour after it was enqueued), not its enqueue time.
    assert "2023-11-14 23:13:20" in out and "22:13:20" not in out
    code, out, _ = run(redis_url, "dead", "list", "-q", "q2", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [ids["q2"]]
    code, out, _ = run(redis_url, "jobs", "list", "--state", "dead")
    assert code == 0 and "2023-11-14 23:13:20" in out


def test_args_are_shown_as_characters_not_escapes(redis_url: str) -> None:
    app = JobQ(redis_url)
    job = app.enqueue("t", ["héllo wörld ☃"], {"name": "日本"})
    app.close()
    code, out, err = run(redis_url, "status", job.id, "--args")
    assert code == 0, err
    assert "héllo wörld ☃" in out and "日本" in out and "\\u" not in out
    code, out, _ = run(redis_url, "status", job.id, "--args", "--json")
    assert code == 0 and "日本" in out and "\\u" not in out
    assert json.loads(out)["kwargs"] == {"name": "日本"}


def test_pause_and_resume_refuse_an_unknown_queue_without_create(redis_url: str) -> None:
    app = JobQ(redis_url)
    app.enqueue("t", queue="emails")
    # A misspelling is refused with a suggestion, and nothing is written.
    code, out, err = run(redis_url, "queue", "pause", "emials")
    assert code == 2
    assert "'emials' is unknown" in err and "did you mean 'emails'" in err and "--create" in err
    assert not app.client.exists(app.keys.paused("emials"))
    code, out, err = run(redis_url, "queue", "resume", "nope")
    assert code == 2 and "'nope' is unknown" in err
    # A known queue pauses as before; --create pauses (and registers) one never used yet.
    assert run(redis_url, "queue", "pause", "emails")[0] == 0
    code, out, err = run(redis_url, "queue", "pause", "later", "--create")
    assert code == 0 and "queue later paused" in out
    code, out, _ = run(redis_url, "stats", "--json")
    paused = {q["queue"]: q["paused"] for q in json.loads(out)["queues"]}
    assert paused == {"emails": True, "later": True}
    # A paused queue is known, so resuming it needs no --create.
    assert run(redis_url, "queue", "resume", "later")[0] == 0
    app.close()


def test_pause_names_the_shards_of_a_sharded_queue(redis_url: str) -> None:
    app = JobQ(redis_url, shards={"hot": 2})
    for i in range(8):
        app.enqueue("t", [i], queue="hot")
    app.close()
    code, _, err = run(redis_url, "queue", "pause", "hot")
    assert code == 2 and "it is sharded" in err and "hot#" in err


def test_a_queue_fed_only_by_cron_is_listed(redis_url: str) -> None:
    import asyncio

    from jobq.storage.calls import AsyncRunner
    from jobq.storage.clients import async_client
    from jobq.worker.scheduler import Scheduler

    app = JobQ(redis_url, clock=FakeClock(T0))

    @app.periodic("* * * * *", name="report", queue="cronly")
    def report() -> None: ...

    async def fire() -> None:
        client = async_client(redis_url)
        await Scheduler(app, AsyncRunner(client), ["cronly"], app.cron_entries).run_once()
        await client.aclose()

    asyncio.run(fire())
    app.close()
    code, out, _ = run(redis_url, "stats", "--json")
    assert [q["queue"] for q in json.loads(out)["queues"]] == ["cronly"]
    code, out, _ = run(redis_url, "jobs", "list")
    assert code == 0 and "report" in out and "cronly" in out


def test_read_commands_warn_about_an_unknown_queue(redis_url: str) -> None:
    """And so do the purges and dead retry, which would otherwise report "0 deleted" for a
    misspelled name as if the queue were just empty."""
    app = JobQ(redis_url)
    app.enqueue("t", queue="emails")
    app.close()
    for argv in (
        ["stats", "-q", "emials"],
        ["jobs", "list", "-q", "emials"],
        ["dead", "list", "-q", "emials"],
        ["queue", "purge", "emials", "--yes"],
        ["dead", "purge", "-q", "emials", "--yes"],
        ["dead", "retry", "-q", "emials", "--yes"],
    ):
        result = cli_runner().invoke(main, ["--redis-url", redis_url, *argv])
        assert result.exit_code == 0, result.output
        assert "warning: queue 'emials' is unknown" in result.stderr, argv
    for argv in (["stats", "-q", "emails"], ["queue", "purge", "emails", "--yes"]):
        result = cli_runner().invoke(main, ["--redis-url", redis_url, *argv])
        assert result.exit_code == 0 and "warning" not in result.stderr, argv
