"""Arguments are checked against the task's signature at enqueue when the producer has the task
registered (issue 17 §4: a missing argument was retried 5 times, then dead-lettered with a
TypeError): a clear InvalidArguments, nothing stored; opt-outs per task and per call."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from jobq import InvalidArguments, InvalidInput, JobQ

pytestmark = [pytest.mark.integration]


def stored(r: redis.Redis) -> int:
    return len([k for k in r.keys("*") if b":job:" in k])


@pytest.fixture
def app(redis_url: str) -> Any:
    a = JobQ(redis_url)

    @a.task(name="send", queue="emails")
    def send(to: str, subject: str = "", *, cc: str | None = None) -> None: ...

    @a.task(name="loose")
    def loose(a: int, *rest: int, **extra: Any) -> None: ...

    @a.task(name="posonly")
    def posonly(a: int, /, b: int = 0) -> None: ...

    @a.task(name="unchecked", check_args=False)
    def unchecked(x: int) -> None: ...

    yield a
    a.close()


@pytest.mark.parametrize(
    ("task", "args", "kwargs", "message"),
    [
        ("send", (), {}, "missing a required argument: 'to'"),
        ("send", ("a", "b", "c"), {}, "too many positional arguments"),
        ("send", ("a",), {"bcc": "x"}, "unexpected keyword argument 'bcc'"),
        ("send", ("a",), {"to": "b"}, "multiple values for argument 'to'"),
        ("send", ("a", "s", "c"), {}, "too many positional arguments"),
        ("loose", (), {"x": 1}, "missing a required argument: 'a'"),
        # Python 3.13 words it "positional-only arguments passed as keyword arguments: 'a'"
        ("posonly", (), {"a": 1}, "'a' parameter is positional only|positional-only arguments .*: 'a'"),
    ],
)
def test_bad_arguments_are_refused_at_enqueue(
    app: JobQ, r: redis.Redis, task: str, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArguments, match=message) as err:
        app.enqueue(task, args, kwargs)
    assert err.value.field == "args" and f"task {task}(" in str(err.value) and "str" not in str(err.value)
    with pytest.raises(InvalidArguments):
        app.tasks[task].enqueue(*args, **kwargs)
    with pytest.raises(InvalidArguments):
        app.enqueue_many([app.tasks["send"].request("ok"), app.tasks[task].request(*args, **kwargs)])
    with pytest.raises(InvalidArguments):  # with per-call options (the full prepare path)
        app.tasks[task].enqueue(*args, _priority=3, **kwargs)
    assert stored(r) == 0


@pytest.mark.parametrize(
    ("task", "args", "kwargs"),
    [
        ("send", ("a",), {}),
        ("send", (), {"to": "a", "cc": "b"}),
        ("send", ("a", "s"), {"cc": "c"}),
        ("loose", (1, 2, 3), {"anything": 4}),
        ("posonly", (1,), {"b": 2}),
        ("unchecked", (), {"nope": 1}),  # the task opted out
        ("not.registered", (1, 2), {"x": 3}),  # unknown here: nothing to check against
    ],
)
def test_good_arguments_pass(app: JobQ, task: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    assert app.enqueue(task, args, kwargs).status().value == "ready"


def test_a_call_can_opt_out(app: JobQ, r: redis.Redis) -> None:
    send = app.tasks["send"]
    send.enqueue(_check_args=False)
    send.options(check_args=False).enqueue(1, 2, 3)
    app.enqueue("send", kwargs={"bcc": "x"}, check_args=False)
    with pytest.raises(InvalidInput, match="unknown option"):
        send.options(check=False)
    assert stored(r) == 3


def test_http_checks_when_the_app_knows_the_task(redis_url: str, r: redis.Redis) -> None:
    import http.client
    import json

    from jobq.web import ApiServer

    app = JobQ(redis_url)

    @app.task(name="send")
    def send(to: str) -> None: ...

    server = ApiServer(app, "127.0.0.1", 0).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"task": "send", "kwargs": {"too": "x"}}).encode()
        conn.request("POST", "/jobs", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
    finally:
        server.close()
        app.close()
    assert resp.status == 400 and data["field"] == "args"
    assert data["error"].startswith("args: missing a required argument: 'to' (task send(to);")
    assert stored(r) == 0


def test_periodic_arguments_are_checked_at_registration(app: JobQ) -> None:
    with pytest.raises(InvalidArguments, match="missing a required argument: 'day'"):

        @app.periodic("@daily", name="report")
        def report(day: str) -> None: ...

    assert "report" not in app.tasks and not app.cron_entries

    @app.periodic("@daily", name="report2", args=("mon",))
    def report2(day: str) -> None: ...

    assert app.cron_entries[0].args == ("mon",)


# -- the built-in tasks' arguments --------------------------------------------------------------
BAD_BUILTIN = [
    ("webhook", {"url": "https://example.com/hook", "body": {"a": 1}}, "body must be a string"),
    ("webhook", {"url": "ftp://example.com/x"}, "url must be an http(s) URL"),
    ("webhook", {"url": "https://[::1/x"}, "url must be an http(s) URL"),
    ("webhook", {"url": "https://e.com", "method": "FETCH"}, "method must be one of"),
    ("webhook", {"url": "https://e.com", "headers": {"X": 1}}, "headers must map strings"),
    ("webhook", {"url": "https://e.com", "headers": {"X": "a\r\nEvil: 1"}}, "without line breaks"),
    ("webhook", {"url": "https://e.com", "body": "x", "json": {}}, "give body or json, not both"),
    ("webhook", {"url": "https://e.com", "timeout": 0}, "timeout must be a number"),
    ("webhook", {"url": "https://e.com", "timeout": 601}, "timeout must be a number"),
    ("webhook", {"uri": "https://e.com"}, "missing a required argument: 'url'"),
    ("email", {"to": "nobody", "subject": "s", "body": "b"}, "to must be email addresses"),
    ("email", {"to": [], "subject": "s", "body": "b"}, "to must name at least one address"),
    ("email", {"to": "a@b.c", "subject": "two\nlines", "body": "b"}, "subject must be a single line"),
    ("email", {"to": "a@b.c", "subject": "s", "body": {"html": 1}}, "body must be text"),
    ("email", {"to": "a@b.c", "subject": "s", "body": "b", "cc": 5}, "cc must be an email address"),
    ("email", {"to": "a@b.c", "subject": "s"}, "missing a required argument: 'body'"),
]


@pytest.mark.parametrize(("task", "kwargs", "message"), BAD_BUILTIN)
def test_builtin_arguments_are_refused_at_enqueue_by_the_cli(
    redis_url: str, r: redis.Redis, task: str, kwargs: dict[str, Any], message: str
) -> None:
    import json

    from jobq.cli import main
    from tests.harness.cli import cli_runner

    argv = ["--redis-url", redis_url, "enqueue", task, "--kwargs", json.dumps(kwargs)]
    res = cli_runner().invoke(main, argv)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert stored(r) == 0


def test_builtin_arguments_are_refused_at_enqueue_over_http(redis_url: str, r: redis.Redis) -> None:
    import http.client
    import json

    from jobq import builtin
    from jobq.web import ApiServer

    app = JobQ(redis_url)
    builtin.register(app)
    server = ApiServer(app, "127.0.0.1", 0).start()
    try:
        for task, kwargs, message in BAD_BUILTIN:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            body = json.dumps({"task": task, "kwargs": kwargs}).encode()
            conn.request("POST", "/jobs", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            conn.close()
            assert resp.status == 400 and data["field"] == "args" and message in data["error"], data
        assert stored(r) == 0
        # Good ones are accepted.
        app.enqueue("webhook", kwargs={"url": "https://e.com/h", "json": {"a": [1, "x"]}, "method": "put"})
        app.enqueue("email", ["a@b.c", "hi", "text"], {"cc": ["c@d.e"], "sender": ""})
        assert stored(r) == 2
    finally:
        server.close()
        app.close()
