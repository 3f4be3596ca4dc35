"""Fixtures shared by the core integration tests: a JobQ on the test server driven by a FakeClock,
so leases, delays and deadlines move only when a test advances the clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import jobq

#: The fake clock's start, ms (2023-11-14).
T0 = 1_700_000_000_000


@pytest.fixture
def clock() -> jobq.FakeClock:
    return jobq.FakeClock(T0)


@pytest.fixture
def fapp(redis_url: str, clock: jobq.FakeClock) -> Iterator[jobq.JobQ]:
    a = jobq.JobQ(redis_url, clock=clock)
    yield a
    a.close()
