"""The log redaction's list of secrets is cached between records, but a change of the
environment or a secret added later is masked from the next record on."""

from __future__ import annotations

import pytest

from jobq import logs


def test_secrets_follow_the_environment_and_add_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_HTTP_TOKEN", "first-t0ken")
    monkeypatch.setenv("JOBQ_REDIS_URL", "redis://:redis-pw-1@h:6379/0")
    assert logs.redact("a first-t0ken b redis-pw-1") == "a *** b ***"
    assert logs.redact("again first-t0ken") == "again ***"  # from the cache
    monkeypatch.setenv("JOBQ_HTTP_TOKEN", "second-t0ken")
    monkeypatch.setenv("JOBQ_REDIS_URL", "redis://:redis-pw-2@h:6379/0")
    assert logs.redact("first-t0ken second-t0ken redis-pw-2") == "first-t0ken *** ***"
    logs.add_secret("added-later-9")
    assert logs.redact("x added-later-9") == "x ***"
