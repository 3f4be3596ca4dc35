"""Test-only fault injection for the reliability tests: named crash points in the worker.

Nothing here runs in production: with neither variable below set, :data:`ACTIVE` is False and
the worker does not call into this module at all.

``JOBQ_CRASH_POINT`` is read once, when this module is imported. It holds comma-separated
``name:probability[:delay_s]`` entries, e.g. ``JOBQ_CRASH_POINT=before_ack:0.3``. Each time the
worker passes a point named there, the process exits at once with :data:`CRASH_EXIT_CODE`
(``os._exit``: no cleanup, no release, no flushing, like a SIGKILL) with that probability. With a
delay, the exit happens that many seconds later on a timer thread, so the worker and its tasks
keep running meanwhile (``mid_execute:1:0.2`` = 0.2 s into the first job's execution).
``JOBQ_CRASH_SEED`` makes the draws reproducible. Unset (production), the worker skips every
point on one module attribute (:data:`ACTIVE`).

The points, in the order one job passes them:

- ``after_claim``: the claim script returned jobs (attempts counted, leases set), none started;
- ``mid_execute``: a job is about to run (use a delay to crash while it runs);
- ``before_ack``: jobs finished running; their ack script call is about to be sent;
- ``after_ack_sent``: the ack script returned (Redis finished the jobs); the node has not yet
  updated its own state.

``JOBQ_HOLD_POINT=<name>`` (``before_ack`` only) holds the worker at that point the first time it
passes it: that one ack waits, the rest of the node (claims, runs, renewals) goes on, until the
process receives SIGUSR1. A test orders events with it: e.g. a job claimed again while the ack
of its earlier attempt is still on its way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import threading

log = logging.getLogger("jobq.faults")

#: The environment variable read at import.
ENV = "JOBQ_CRASH_POINT"
#: The exit status of a process that crashed at a point (distinct from 1, 2 and signals).
CRASH_EXIT_CODE = 99
#: Every point the worker calls.
POINTS = frozenset({"after_claim", "mid_execute", "before_ack", "after_ack_sent"})


def parse(spec: str) -> dict[str, tuple[float, float]]:
    """``"before_ack:0.3,mid_execute:1:0.2"`` -> ``{name: (probability, delay_s)}``.

    Raises ``ValueError`` naming the bad entry."""
    points: dict[str, tuple[float, float]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        name = parts[0]
        if name not in POINTS or not 2 <= len(parts) <= 3:
            raise ValueError(
                f"{ENV}: bad entry {entry!r} (name:probability[:delay_s]; names {sorted(POINTS)})"
            )
        try:
            prob = float(parts[1])
            delay = float(parts[2]) if len(parts) == 3 else 0.0
        except ValueError:
            raise ValueError(f"{ENV}: bad number in {entry!r}") from None
        if not 0.0 <= prob <= 1.0 or delay < 0:
            raise ValueError(f"{ENV}: probability must be 0..1 and delay >= 0 in {entry!r}")
        points[name] = (prob, delay)
    return points


def _load() -> dict[str, tuple[float, float]]:
    spec = os.environ.get(ENV, "")
    if not spec:
        return {}
    try:
        return parse(spec)
    except ValueError as exc:
        log.error("%s; crash points disabled", exc)
        return {}


_points = _load()
_rng = random.Random(os.environ.get("JOBQ_CRASH_SEED"))
_armed = threading.Event()


def crash_point(name: str) -> None:
    """Exit the process here with the configured probability (see the module docstring)."""
    if not _points:
        return
    cfg = _points.get(name)
    if cfg is None or _armed.is_set():
        return
    prob, delay = cfg
    if _rng.random() >= prob:
        return
    _armed.set()
    sys.stderr.write(f"jobq.faults: crash point {name} (pid {os.getpid()}, in {delay:g} s)\n")
    sys.stderr.flush()
    if delay <= 0:
        os._exit(CRASH_EXIT_CODE)
    timer = threading.Timer(delay, os._exit, (CRASH_EXIT_CODE,))
    timer.daemon = True
    timer.start()


#: The environment variable naming the hold point (see the module docstring).
HOLD_ENV = "JOBQ_HOLD_POINT"
#: The points a worker can be held at.
HOLD_POINTS = frozenset({"before_ack"})
#: The configured hold point ("" = none: the worker does not call :func:`hold_point`).
HOLD = os.environ.get(HOLD_ENV, "") if os.environ.get(HOLD_ENV, "") in HOLD_POINTS else ""
#: Is any crash or hold point configured? The worker checks this before calling in.
ACTIVE = bool(_points) or bool(HOLD)
_held = threading.Event()


async def hold_point(name: str) -> None:
    """Wait here for SIGUSR1 the first time the configured hold point is passed."""
    if name != HOLD or _held.is_set():
        return
    _held.set()
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    sys.stderr.write(f"jobq.faults: holding at {name} (pid {os.getpid()}) until SIGUSR1\n")
    sys.stderr.flush()
    try:
        await go.wait()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    sys.stderr.write(f"jobq.faults: released at {name}\n")
    sys.stderr.flush()
