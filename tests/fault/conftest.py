"""Fixtures of the fault tests: seeds, the history recorder and the worker fleet.

- ``seed``: the test's random seed (``JOBQ_SEED`` to replay one), printed and kept in the
  report of a failure together with the history path.
- ``history``: a :class:`tests.harness.history.History` in the test's tmp dir.
- ``worker_fleet``: a factory ``worker_fleet(url=None, **options) -> WorkerFleet``
  (default URL: the session redis-server, flushed); every fleet is torn down after the test
  (SIGCONT + SIGKILL of whatever still runs).
- ``figures``: ``figures("F1", trials=3, lost=0, ...)`` prints the measured figures and, when
  ``JOBQ_RESULTS_FILE`` is set (scripts/nightly sets it), appends them there as a JSON line.
- tests marked ``nightly`` run only with ``JOBQ_NIGHTLY=1`` (scripts/nightly); counts that
  differ between the tiers come from :func:`tier`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import WorkerFleet
from tests.harness.history import History

NIGHTLY = os.environ.get("JOBQ_NIGHTLY") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nightly: long fault tests, run by scripts/nightly (JOBQ_NIGHTLY=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if NIGHTLY:
        return
    skip = pytest.mark.skip(reason="nightly tier: run scripts/nightly (JOBQ_NIGHTLY=1)")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


def tier(ci: int, nightly: int) -> int:
    """A trial count (or size) for the running tier."""
    return nightly if NIGHTLY else ci


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    def record(test_id: str, **values: Any) -> None:
        line = {"test": test_id, "nodeid": request.node.nodeid, "tier": "nightly" if NIGHTLY else "ci"}
        line.update(values)
        line["t"] = time.time()
        print(f"\nFIGURES {json.dumps(line, default=str)}")
        path = os.environ.get("JOBQ_RESULTS_FILE")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(line, default=str) + "\n")

    return record


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = int(os.environ.get("JOBQ_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\n[{request.node.nodeid}] seed={value} (replay: JOBQ_SEED={value})")
    return value


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    h = History(tmp_path / "history")
    yield h
    h.close()


@pytest.fixture
def worker_fleet(
    request: pytest.FixtureRequest, tmp_path: Path, history: History
) -> Iterator[Callable[..., WorkerFleet]]:
    fleets: list[WorkerFleet] = []

    def make(url: str | None = None, **kw: Any) -> WorkerFleet:
        kw.setdefault("history", history)
        fleet = WorkerFleet(
            url or request.getfixturevalue("redis_url"), tmp_path / f"fleet{len(fleets)}", **kw
        )
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.kill_all()
