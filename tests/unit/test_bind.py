"""Rebinding an app to another Redis URL or key prefix (``jobq worker -A ... --prefix``) keeps
every setting of the app: its tasks, limits and durable mode. No Redis: nothing connects."""

from __future__ import annotations

import click
import pytest

from jobq import InvalidInput, JobQ
from jobq.cli.apps import bind
from jobq.cli.common import Settings

URL = "redis://127.0.0.1:1/0"  # never connected to


def _durable_app() -> JobQ:
    app = JobQ(URL, durable=True, durable_timeout=2.5, dead_max=7)

    @app.task(name="t.add")
    def add(a: int, b: int) -> int:
        return a + b

    return app


def test_a_new_prefix_keeps_durable_acks_and_the_limits() -> None:
    app = _durable_app()
    app.bind(prefix="other")
    assert app.keys.prefix == "other" and app.store.keys is app.keys
    assert (app.store.wait_replicas, app.store.wait_timeout_ms) == (1, 2500)
    assert app.store.limits.dead_max == 7
    assert app.store.keys.queues.startswith("other:")
    assert "t.add" in app.tasks


def test_a_new_url_keeps_durable_acks_but_not_on_a_cluster() -> None:
    app = _durable_app()
    app.bind(url="redis://127.0.0.1:2/0")
    assert app.url == "redis://127.0.0.1:2/0" and app.store.wait_replicas == 1
    with pytest.raises(InvalidInput, match="durable"):
        app.bind(url="redis+cluster://127.0.0.1:7000")


def test_a_bad_prefix_is_refused() -> None:
    with pytest.raises(InvalidInput, match="prefix"):
        JobQ(URL).bind(prefix="a{b}")


def test_the_command_lines_prefix_keeps_durable_acks() -> None:
    app = _durable_app()

    @click.command()
    @click.option("--sub-prefix", "sub_prefix")
    @click.option("--sub-redis-url", "sub_redis_url")
    def cmd(sub_prefix: str | None, sub_redis_url: str | None) -> None:
        ctx = click.get_current_context()
        bind(app, Settings(redis_url=URL, prefix=sub_prefix or "jobq"), ctx)

    cmd.main(["--sub-prefix", "other"], standalone_mode=False)
    assert app.keys.prefix == "other" and app.store.wait_replicas == 1
