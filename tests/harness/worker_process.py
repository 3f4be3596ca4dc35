"""A ``jobq worker`` process for tests that need jobs to finish while the test process itself
waits (its event loop must not share a GIL with the worker's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def worker_process(
    url: str, app: str = "tests.harness.result_tasks:app", *, queues: str = "default", concurrency: int = 8
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``jobq worker -A app`` against ``url`` until the block ends (then SIGTERM)."""
    env = dict(os.environ, JOBQ_REDIS_URL=url, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobq",
            "worker",
            "-A",
            app,
            "--redis-url",
            url,
            "--queues",
            queues,
            "--concurrency",
            str(concurrency),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
