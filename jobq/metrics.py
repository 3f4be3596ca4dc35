"""Prometheus metrics of a worker node (or HTTP server) and of the queues it serves.

Each :class:`Metrics` has its own ``CollectorRegistry`` (never the global one), so tests and
several apps in one process do not collide, and nothing happens at import time.

What a node counts itself (counters and histograms, labels ``queue`` and ``task``):

=====================================  ===========================================================
``jobq_jobs_enqueued_total``           enqueue requests accepted by this process (``JobQ.enqueue``,
                                       ``enqueue_many``, ``jobq enqueue``, ``POST /jobs``)
``jobq_jobs_started_total``            attempts this node started
``jobq_jobs_completed_total``          attempts that succeeded and were acked
``jobq_jobs_failed_total``             attempts that failed (whatever happened next)
``jobq_jobs_retried_total``            failed attempts scheduled for a retry
``jobq_jobs_dead_lettered_total``      jobs this node moved to the dead-letter list (a failure
                                       with no attempts left, ``jobq.Fail``, an expired deadline)
``jobq_jobs_reaped_total``             jobs whose lease expired, recovered by this node's reaper
                                       (label ``queue`` only: the reaper does not read the task)
``jobq_jobs_stale_total``              stale completions: a job finished on this node after its
                                       lease was reaped, so its result was discarded
``jobq_job_duration_seconds``          histogram: run time of an attempt (start to ack or fail)
``jobq_job_wait_seconds``              histogram: ready -> started, on the Redis clock
``jobq_node_jobs_in_flight``           gauge: jobs this node holds (running or being acked)
``jobq_node_busy_slots``               gauge: concurrency slots in use
=====================================  ===========================================================

What every node reads from Redis at scrape time (:class:`QueueCollector`; the same truth on
every node, so aggregate with ``max`` rather than ``sum``), label ``queue``:
``jobq_queue_ready``, ``jobq_queue_scheduled``, ``jobq_queue_active`` (leases held),
``jobq_queue_dead``, ``jobq_queue_paused``, ``jobq_queue_nodes`` (nodes that heartbeated for the
queue within ``node_ttl``), ``jobq_queue_oldest_ready_age_seconds`` (see
:func:`jobq.admin.queue_stats`: the oldest ``ready_ms`` among the heads of each priority band,
not the first job of the ready set, which is the next to run, not the oldest), plus
``jobq_nodes_live`` and ``jobq_redis_up`` (0 when the scrape could not read Redis; the queue
gauges are then absent rather than stale).

Label values are bounded: queue and task names only, never job ids, and at most
``max_label_values`` distinct names of each (names the app registered always pass; others beyond
the cap are counted under ``_other``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from jobq import admin

log = logging.getLogger("jobq.metrics")

#: Seconds; jobs run from milliseconds (webhooks) to an hour (batch work).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
#: Seconds; waits range from instant to a backlog of hours.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600)
OTHER = "_other"
UNKNOWN_TASK = "_unknown"


class _Bounded:
    """Admits at most ``cap`` distinct label values; the rest map to ``_other``."""

    def __init__(self, cap: int, always: Callable[[str], bool]) -> None:
        self.cap = cap
        self.always = always
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self.seen or self.always(value):
            return value
        with self.lock:
            if len(self.seen) < self.cap:
                self.seen.add(value)
                return value
        return OTHER


class QueueCollector(Collector):
    """Per-queue gauges read from Redis when Prometheus scrapes (plain reads, one pipeline plus
    one small read per priority band present)."""

    def __init__(self, app: Any, queues: Sequence[str] | None = None, *, node_ttl_s: float = 60.0) -> None:
        self.app = app
        self.queues = list(queues) if queues is not None else None
        self.node_ttl_s = node_ttl_s

    def describe(self) -> Iterable[Any]:
        # Describing without reading Redis: registering the collector must not do I/O.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("jobq_redis_up", "1 if this scrape could read the queues from Redis")
        try:
            stats = admin.queue_stats(self.app, self.queues, node_ttl_s=self.node_ttl_s)
            live = admin.live_node_count(self.app, node_ttl_s=self.node_ttl_s)
        except Exception as exc:  # a scrape must still answer when Redis is away
            log.warning("queue metrics: cannot read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = {
            "ready": ("jobq_queue_ready", "Jobs runnable now"),
            "scheduled": ("jobq_queue_scheduled", "Delayed and retry-backoff jobs"),
            "active": ("jobq_queue_active", "Jobs claimed by a node (leases held)"),
            "dead": ("jobq_queue_dead", "Jobs in the dead-letter list"),
            "paused": ("jobq_queue_paused", "1 while the queue is paused"),
            "nodes": ("jobq_queue_nodes", "Nodes that heartbeated for the queue recently"),
            "oldest_ready_age_s": (
                "jobq_queue_oldest_ready_age_seconds",
                "Age of the oldest ready job (oldest ready_ms among each priority band's heads)",
            ),
        }
        for attr, (name, doc) in families.items():
            fam = GaugeMetricFamily(name, doc, labels=["queue"])
            for s in stats:
                fam.add_metric([s.queue], float(getattr(s, attr)))
            yield fam
        nodes = GaugeMetricFamily("jobq_nodes_live", "Worker nodes with a recent heartbeat")
        nodes.add_metric([], live)
        yield nodes


class Metrics:
    """Counters, histograms and gauges of one process, on their own registry.

    ``queues``: the queues the scrape-time collector reports (default: every registered queue);
    ``collect_queues=False`` leaves the collector out. Creating one subscribes it to the app's
    enqueue hook (``app.on_enqueued``) when the app has one, so enqueues from this process count.
    ``worker=False`` (a producer such as ``jobq serve``) exports only the enqueue counters and the
    queue gauges: the per-node series a worker sets stay off the registry.
    """

    def __init__(
        self,
        app: Any,
        *,
        node: str = "",
        registry: CollectorRegistry | None = None,
        queues: Sequence[str] | None = None,
        collect_queues: bool = True,
        max_label_values: int = 200,
        node_ttl_s: float = 60.0,
        worker: bool = True,
    ) -> None:
        self.app = app
        self.node = node
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        known = lambda name: name in getattr(app, "tasks", {})  # noqa: E731
        self._task = _Bounded(max_label_values, known)
        self._queue = _Bounded(max_label_values, lambda name: queues is not None and name in queues)
        qt = ["queue", "task"]
        self.enqueued = Counter("jobq_jobs_enqueued", "Enqueue requests accepted", qt, registry=self.registry)
        # A producer's registry leaves the worker's series out (they would read 0 and mislead).
        r = self.registry if worker else CollectorRegistry(auto_describe=False)
        self.started = Counter("jobq_jobs_started", "Attempts started on this node", qt, registry=r)
        self.completed = Counter("jobq_jobs_completed", "Attempts that succeeded", qt, registry=r)
        self.failed = Counter("jobq_jobs_failed", "Attempts that failed", qt, registry=r)
        self.retried = Counter("jobq_jobs_retried", "Failed attempts scheduled for retry", qt, registry=r)
        self.dead = Counter("jobq_jobs_dead_lettered", "Jobs moved to the dead-letter list", qt, registry=r)
        self.stale = Counter(
            "jobq_jobs_stale", "Completions after this node lost the job's lease", qt, registry=r
        )
        self.reaped = Counter(
            "jobq_jobs_reaped", "Jobs recovered from expired leases by this node", ["queue"], registry=r
        )
        self.interrupted = Counter(
            "jobq_jobs_interrupted",
            "Started jobs this node released unfinished at shutdown (each re-runs, counted on the job)",
            ["queue"],
            registry=r,
        )
        self.dead_trimmed = Counter(
            "jobq_dead_trimmed",
            "Dead letters deleted because the dead-letter list was over dead_max",
            ["queue"],
            registry=r,
        )
        self.duration = Histogram(
            "jobq_job_duration_seconds", "Run time of an attempt", qt, buckets=DURATION_BUCKETS, registry=r
        )
        self.wait = Histogram(
            "jobq_job_wait_seconds", "Time from ready to started", qt, buckets=WAIT_BUCKETS, registry=r
        )
        self.inflight = Gauge("jobq_node_jobs_in_flight", "Jobs this node holds", registry=r)
        self.busy = Gauge("jobq_node_busy_slots", "Concurrency slots in use on this node", registry=r)
        self.epoch_changes = Counter(
            "jobq_redis_epoch_changes", "Times this node found the Redis dataset wiped", registry=r
        )
        self.eviction_policy_ok = Gauge(
            "jobq_redis_eviction_policy_ok",
            "1: maxmemory-policy is noeviction; 0: Redis may evict jobs; -1: could not check",
            registry=r,
        )
        self.pubsub_connected = Gauge(
            "jobq_pubsub_connected", "1 while the wake-up subscription is connected", registry=r
        )
        self.zombie_threads = Gauge(
            "jobq_node_zombie_threads",
            "Threads of timed-out sync tasks still running (each keeps its concurrency slot)",
            registry=r,
        )
        #: (queue, task) -> (counter child, histogram child): the per-job hooks skip the label
        #: checks and ``labels()`` lookups after a pair's first job (bounded like the labels).
        self._started_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._completed_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._children_cap = 4 * max_label_values
        self.collector: QueueCollector | None = None
        if collect_queues:
            self.collector = QueueCollector(app, queues, node_ttl_s=node_ttl_s)
            self.registry.register(self.collector)
        hooks = getattr(app, "on_enqueued", None)
        if isinstance(hooks, list):
            hooks.append(self.job_enqueued)

    def _labels(self, queue: str, task: str) -> tuple[str, str]:
        return self._queue(queue), self._task(task or UNKNOWN_TASK)

    # -- hooks the worker (and producers) call ------------------------------------------------
    def job_enqueued(self, queue: str, task: str, n: int = 1) -> None:
        self.enqueued.labels(*self._labels(queue, task)).inc(n)

    def _children(
        self, cache: dict[tuple[str, str], tuple[Any, Any]], queue: str, task: str, counter: Any, hist: Any
    ) -> tuple[Any, Any]:
        labels = self._labels(queue, task)
        pair = (counter.labels(*labels), hist.labels(*labels))
        if len(cache) < self._children_cap:
            cache[(queue, task)] = pair
        return pair

    def job_started(self, queue: str, task: str, wait_s: float) -> None:
        pair = self._started_children.get((queue, task))
        if pair is None:
            pair = self._children(self._started_children, queue, task, self.started, self.wait)
        pair[0].inc()
        pair[1].observe(wait_s if wait_s > 0.0 else 0.0)

    def job_completed(self, queue: str, task: str, run_s: float) -> None:
        pair = self._completed_children.get((queue, task))
        if pair is None:
            pair = self._children(self._completed_children, queue, task, self.completed, self.duration)
        pair[0].inc()
        pair[1].observe(run_s if run_s > 0.0 else 0.0)

    def job_failed(self, queue: str, task: str, run_s: float, outcome: str) -> None:
        """``outcome``: "retry" (scheduled again) or "dead" (dead-lettered). A job dead-lettered
        at claim (expired deadline, bad data) never ran: it is counted dead, not failed."""
        labels = self._labels(queue, task)
        if task:
            self.failed.labels(*labels).inc()
            self.duration.labels(*labels).observe(max(0.0, run_s))
        if outcome == "retry":
            self.retried.labels(*labels).inc()
        elif outcome == "dead":
            self.dead.labels(*labels).inc()

    def job_stale(self, queue: str, task: str) -> None:
        self.stale.labels(*self._labels(queue, task)).inc()

    def jobs_reaped(self, queue: str, n: int) -> None:
        if n > 0:
            self.reaped.labels(self._queue(queue)).inc(n)

    def jobs_interrupted(self, queue: str, n: int) -> None:
        if n > 0:
            self.interrupted.labels(self._queue(queue)).inc(n)

    def dead_trimmed_by_count(self, queue: str, n: int) -> None:
        if n > 0:
            self.dead_trimmed.labels(self._queue(queue)).inc(n)

    def redis_epoch_changed(self) -> None:
        self.epoch_changes.inc()

    def set_eviction_policy_ok(self, ok: bool | None) -> None:
        self.eviction_policy_ok.set(-1 if ok is None else int(ok))

    def pubsub_from(self, source: Callable[[], bool]) -> None:
        self.pubsub_connected.set_function(lambda: float(source()))

    def zombies_from(self, source: Callable[[], int]) -> None:
        self.zombie_threads.set_function(lambda: float(source()))

    def node_gauges_from(self, source: Callable[[], tuple[int, int]]) -> None:
        """Read (in flight, busy) from ``source`` at scrape time instead of being told."""
        self.inflight.set_function(lambda: float(source()[0]))
        self.busy.set_function(lambda: float(source()[1]))

    # -- output ---------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)


# -- the endpoint -------------------------------------------------------------------------------------
Health = Callable[[], tuple[bool, str]]


class _Httpd(ThreadingHTTPServer):
    """The standard library's threaded server with a listen backlog for bursts of scrapes (its
    default is 5) and a cap on the threads serving connections at once (more connects wait in
    the backlog instead of each getting a thread)."""

    request_queue_size = 128
    daemon_threads = True
    max_threads = 16

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_threads)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """A background HTTP server serving ``/metrics`` and ``/health`` (the standard library's,
    with ``TCP_NODELAY`` per connection, a larger backlog, a thread cap and an idle timeout)."""

    def __init__(self, metrics: Metrics, host: str, port: int, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        handler = type("Handler", (_MetricsHandler,), {"server_ref": self})
        self.httpd = _Httpd((host, port), handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="jobq-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def health_response(health: Health) -> tuple[int, bytes]:
    """(status, JSON body) for a health callback; a raising callback is unhealthy."""
    try:
        ok, detail = health()
    except Exception as exc:
        ok, detail = False, f"health check raised {type(exc).__name__}: {exc}"
    body = json.dumps({"status": "ok" if ok else "unhealthy", "detail": detail}).encode()
    return (200 if ok else 503), body


class _MetricsHandler(BaseHTTPRequestHandler):
    server_ref: MetricsServer
    protocol_version = "HTTP/1.1"
    server_version = "jobq-metrics"
    # Headers and body go out as separate writes: with Nagle's algorithm on, the body of every
    # keep-alive response after the first waited for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    # An idle or trickling connection is dropped after this many seconds (per read)...
    timeout = 30
    # ...and a request must arrive whole within this many seconds of the connection (or the
    # previous response) being ready for it: one byte every 10 s does not hold a thread longer.
    request_deadline = 30.0

    def handle_one_request(self) -> None:
        timer = threading.Timer(self.request_deadline, self._cut_off)
        timer.daemon = True
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()

    def _cut_off(self) -> None:
        # Reading the request is past its deadline: end the connection (the read fails, the
        # thread returns). A GET has no body, so once the headers are in, the timer is cancelled.
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors as JSON like the API's; a method nobody routes is 405 with ``Allow``."""
        allow = code in (HTTPStatus.NOT_IMPLEMENTED, HTTPStatus.METHOD_NOT_ALLOWED)
        if allow:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} not allowed (allowed: GET, HEAD)"
        field = "method" if allow else "request"
        body = json.dumps(
            {"error": message or self.responses.get(code, ("error",))[0], "field": field}
        ).encode()
        self.log_error("code %d, message %s", code, message)
        self.send_response(code)
        self.send_header("Connection", "close")
        if allow:
            self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = self.server_ref.metrics.exposition()
            except Exception as exc:  # pragma: no cover - collectors already guard Redis errors
                log.exception("metrics exposition failed")
                self._send(500, b"error: " + str(exc).encode(), "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/health":
            status, body = health_response(self.server_ref.health)
            self._send(status, body, "application/json")
        else:
            self._send(404, b'{"error": "not found"}', "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def serve(
    metrics: Metrics, host: str = "127.0.0.1", port: int = 9100, health: Health | None = None
) -> MetricsServer:
    """Serve ``/metrics`` and ``/health`` on a daemon thread; ``port=0`` picks a free port (see
    ``.port``). ``health()`` returns ``(ok, detail)``: 200 when ok, else 503. ``.close()`` stops."""
    return MetricsServer(metrics, host, port, health or (lambda: (True, "ok")))
