"""Fallback worker entry point for the fleet, used only while ``jobq worker`` is unavailable.

``python -m tests.harness.node -A module:attr --queues q --node-id n --concurrency N --lease 2s
--grace 3s --reap-interval 0.5s --poll-interval 0.5s [--burst]``: the same options as
``jobq worker``, run through :func:`jobq.worker.run_worker`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from jobq.worker import WorkerConfig, run_worker


def duration(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(ms|s|m)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests.harness.node")
    p.add_argument("-A", "--app", required=True)
    p.add_argument("--queues", default="default")
    p.add_argument("--node-id")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--lease", type=duration, default=30.0)
    p.add_argument("--grace", type=duration, default=30.0)
    p.add_argument("--reap-interval", type=duration)
    p.add_argument("--poll-interval", type=duration, default=1.0)
    p.add_argument("--burst", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, _, attr = a.app.partition(":")
    app = getattr(importlib.import_module(module), attr or "app")
    cfg = WorkerConfig(
        queues=[(q, 1) for q in a.queues.split(",")],
        concurrency=a.concurrency,
        lease=a.lease,
        grace=a.grace,
        node_id=a.node_id,
        burst=a.burst,
        poll_interval=a.poll_interval,
        reap_interval=a.reap_interval,
    )
    run_worker(app, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
