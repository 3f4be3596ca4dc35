"""Prometheus metrics of a worker node and of the queues it serves.

INTERFACE CONTRACT (the worker calls these; the ops work fills them in):

- ``Metrics(app, node=..., registry=None)``: counters/histograms/gauges on its own registry.
- ``job_enqueued(queue, task, n=1)``, ``job_started(queue, task, wait_s)``,
  ``job_completed(queue, task, run_s)``, ``job_failed(queue, task, run_s, outcome)`` with
  ``outcome`` in {"retry", "dead"}, ``job_stale(queue, task)``, ``jobs_reaped(queue, n)``,
  ``set_node_gauges(inflight, busy)``.
- ``serve(metrics, host, port, health)``: a background HTTP server for ``/metrics`` and
  ``/health``; ``health()`` returns ``(ok, detail)``. Returns an object with ``.port`` and
  ``.close()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Metrics:
    """Placeholder until the ops work lands: records nothing."""

    def __init__(self, app: Any, *, node: str = "", registry: Any = None) -> None:
        self.app = app
        self.node = node

    def job_enqueued(self, queue: str, task: str, n: int = 1) -> None:
        pass

    def job_started(self, queue: str, task: str, wait_s: float) -> None:
        pass

    def job_completed(self, queue: str, task: str, run_s: float) -> None:
        pass

    def job_failed(self, queue: str, task: str, run_s: float, outcome: str) -> None:
        pass

    def job_stale(self, queue: str, task: str) -> None:
        pass

    def jobs_reaped(self, queue: str, n: int) -> None:
        pass

    def set_node_gauges(self, inflight: int, busy: int) -> None:
        pass


def serve(metrics: Metrics, host: str, port: int, health: Callable[[], tuple[bool, str]]) -> Any:
    raise NotImplementedError("the metrics endpoint is not built yet")
