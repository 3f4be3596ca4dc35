"""The last hour of each queue's activity, for the dashboard's charts: jobs made ready per
second, jobs finished per second, and the wait (ready to started) of the jobs that finished,
p50 and p95.

The dashboard process samples Redis every ``SAMPLE_S`` seconds on a daemon thread of its own
(started by the first dashboard request) and keeps the points in memory, so a chart covers the
time since the dashboard started, up to ``WINDOW_S``. A sample is two pipelined round trips
whatever the load: the queues' FIFO sequence counters (every job made ready takes one number),
the finished index above the last sample's watermark (a ZCOUNT), and the times of at most
``WAIT_SAMPLE`` of the jobs that finished since (HMGET ``ready_ms``, ``started_ms``).

What the figures can see: a queue whose jobs are not kept after they finish (``result_ttl=0``)
has no finished index, so its finished rate and waits stay empty; made-ready counts a job again
when it is retried after a backoff.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from jobq import admin
from jobq.app import JobQ
from jobq.storage import reads

#: Seconds between samples.
SAMPLE_S = 10.0
#: Seconds of history kept (and drawn).
WINDOW_S = 3600.0
#: Most finished jobs per queue and sample whose wait is read.
WAIT_SAMPLE = 200
#: Most queues charted.
MAX_QUEUES = 50


@dataclass(frozen=True, slots=True)
class Point:
    """One sample interval of one queue, ending at ``t_ms`` (Redis time)."""

    t_ms: int
    #: Jobs made ready per second (enqueued, or due after a delay or a retry backoff).
    ready_per_s: float
    #: Jobs finished per second (done or cancelled, as the finished index records them).
    finished_per_s: float
    #: Wait from ready to started of the sampled jobs that finished, ms (None: none finished).
    wait_p50_ms: float | None
    wait_p95_ms: float | None


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


class History:
    """Samples of every queue's activity over the last ``WINDOW_S``; :meth:`sample` takes one
    (the thread :meth:`start` runs calls it every ``interval`` seconds)."""

    def __init__(self, app: JobQ, interval: float | None = None) -> None:
        self.app = app
        self.interval = SAMPLE_S if interval is None else interval
        self.points: dict[str, deque[Point]] = {}
        self._last: dict[str, tuple[int, int]] = {}  # queue -> (t_ms, seq) of the last sample
        self._watermark: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Sample on a daemon thread until :meth:`close` (idempotent)."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="jobq-ui-history", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # Redis away: the next sample tries again; the charts show a gap
                pass
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """Read one sample of every queue (two pipelined round trips) and append its points."""
        queues = admin.queues(self.app)[:MAX_QUEUES]
        if not queues:
            return
        now = admin.server_now_ms(self.app)
        with self._lock:
            since = {q: self._watermark[q] for q in queues if q in self._watermark}
        rows = reads.activity(self.app.client, self.app.keys, queues, since, WAIT_SAMPLE)
        keep = int(WINDOW_S * 1000)
        with self._lock:
            for q, (seq, top, finished, times) in zip(queues, rows, strict=True):
                # An empty finished index: everything that appears in it later is new.
                self._watermark[q] = top if top is not None else self._watermark.get(q, 0.0)
                last = self._last.get(q)
                self._last[q] = (now, seq)
                if last is None or now <= last[0]:
                    continue
                secs = (now - last[0]) / 1000
                waits = [float(s - r) for r, s in times if r is not None and s is not None and s >= r]
                point = Point(
                    now,
                    round(max(0, seq - last[1]) / secs, 2),
                    round(finished / secs, 2),
                    percentile(waits, 50),
                    percentile(waits, 95),
                )
                series = self.points.setdefault(q, deque())
                series.append(point)
                while series and series[0].t_ms < now - keep:
                    series.popleft()

    def to_json(self) -> dict[str, Any]:
        """``{"interval_s", "window_s", "now_ms", "queues": {queue: {field: [values]}}}``, the
        fields those of :class:`Point`, oldest first."""
        with self._lock:
            snapshot = {q: list(ps) for q, ps in self.points.items()}
            now = max((q[0] for q in self._last.values()), default=0)
        queues: dict[str, dict[str, list[Any]]] = {}
        for q, ps in snapshot.items():
            cols: dict[str, list[Any]] = {name: [] for name in Point.__dataclass_fields__}
            for p in ps:
                for name, value in asdict(p).items():
                    cols[name].append(value)
            queues[q] = cols
        return {"interval_s": self.interval, "window_s": WINDOW_S, "now_ms": now, "queues": queues}
