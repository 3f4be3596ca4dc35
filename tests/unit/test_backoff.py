"""Full-jitter retry waits (jobq/backoff.py): the window doubles up to the cap, and the waits
spread over the whole window, so nodes that failed together do not retry together."""

from __future__ import annotations

import random

import pytest
import redis

from jobq.backoff import Backoff, worth_a_line
from jobq.storage import clients


def test_the_window_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(0.1, 2.0, random.Random(1))
    windows = []
    for _ in range(7):
        windows.append(min(b.cap, b.base * 2**b.attempts))
        assert 0.0 <= b.next() <= windows[-1]
    assert windows == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0] and b.at_cap
    b.reset()
    assert b.attempts == 0 and not b.at_cap and b.next() <= 0.1


def test_waits_spread_over_the_whole_window() -> None:
    # 1,000 nodes that failed at the same moment, each on its fifth try (window 1.6 s): their
    # retries fill the window evenly, about a third of them in its first 500 ms (a +-20 % jitter
    # around 1.6 s puts none there, and all within 0.64 s of each other).
    rng = random.Random(7)
    waits = []
    for _ in range(1000):
        b = Backoff(0.1, 5.0, rng)
        for _ in range(4):
            b.next()
        waits.append(b.next())
    assert max(waits) <= 1.6
    early = sum(w <= 0.5 for w in waits) / len(waits)
    assert 0.25 <= early <= 0.38, early
    assert max(waits) - min(waits) > 1.5


def test_a_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="0 < base <= cap"):
        Backoff(2.0, 1.0)


def _calls_until_raised(client: object, error: Exception) -> int:
    """How many times the client's retry policy runs a call that keeps raising ``error``."""
    import asyncio

    retry = client.connection_pool.connection_kwargs["retry"]  # type: ignore[attr-defined]
    calls = 0

    async def do() -> None:
        nonlocal calls
        calls += 1
        raise error

    async def fail(_: Exception) -> None:
        return None

    with pytest.raises(type(error)):
        asyncio.run(retry.call_with_retry(do, fail))
    return calls


@pytest.mark.skipif(not clients._RETRY_REFINES, reason="needs redis-py >= 8.2 (Retry is_retryable)")
def test_worker_clients_do_not_retry_a_refused_connection_inside_the_call() -> None:
    refused = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    dropped = redis.ConnectionError("Connection closed by server.")
    worker = clients.async_client("redis://127.0.0.1:6379/0", retry_refused=False)
    default = clients.async_client("redis://127.0.0.1:6379/0")
    # Redis not running: the worker's loop backs off with full jitter instead (S4).
    assert _calls_until_raised(worker, refused) == 1
    # A dropped connection (CLIENT KILL, a restart mid-call) is still retried: 1 + 3 tries.
    assert _calls_until_raised(worker, dropped) == 4
    assert _calls_until_raised(default, refused) == 4


def test_a_run_of_failures_logs_its_first_then_every_tenth() -> None:
    assert [n for n in range(1, 36) if worth_a_line(n)] == [1, 10, 20, 30]
