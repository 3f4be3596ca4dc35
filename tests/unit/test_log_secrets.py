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


def _full_redact(text: str) -> str:
    """The substitutions without the quick test for words that could start a secret."""
    text = logs.redact_urls(text)
    for pattern in (logs._HEADER_RE, logs._BEARER_RE, logs._PAIR_RE):
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return text


@pytest.mark.parametrize(
    "line",
    [
        "GET /jobs?Authorization: s3cr3t-value",
        "Proxy-Authorization=abcd1234",
        "X-API-KEY: k-123456",
        "api_key='zzzz9999'",
        "Cookie: sid=abcdef",
        "BEARER abcdefgh",
        "Basic dXNlcjpwYXNz",
        "Token abcdefghi",
        "PassWord=hunter22",
        "passwd: hunter22",
        "PWD=hunter22",
        "Secret=hunter22",
        "redis://user:pw1234@host/0",
        "redis+sentinel://h/m?sentinel_password=pw1234&x=1",
        "POST /jobs -> 201 (0.4 ms)",
        "GET /jobs/abc%20def -> 404 (0.2 ms)",
    ],
)
def test_quick_word_test_skips_only_lines_without_secrets(line: str) -> None:
    # Lines holding no secret word skip the substitutions; every other is masked as before.
    assert logs.redact(line) == _full_redact(line)
    if "->" not in line:
        assert "***" in logs.redact(line)


def test_text_and_json_times_change_with_the_second() -> None:
    import logging

    text, js = logs.TextFormatter(), logs.JsonFormatter()
    for created, shown in ((0.25, "1970-01-01T00:00:00.250Z"), (1.5, "1970-01-01T00:00:01.500Z")):
        rec = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        rec.created, rec.msecs = created, (created % 1) * 1000
        assert text.format(rec).startswith(shown)
        assert f'"time": "{shown}"' in js.format(rec)
