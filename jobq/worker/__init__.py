"""The worker: a node that claims, runs and acks jobs, and its background components.

``node.py`` is the node itself (:class:`Worker`, :class:`WorkerConfig`, :func:`run_worker`),
the only module that wires the components: ``fetcher.py`` (claims), ``executor.py`` (runs jobs
in the concurrency slots), ``acker.py`` (acks, fails, releases), ``wakeups.py`` (pub/sub and the
poll fallback) and ``held.py`` (the table of held jobs, at the bottom). ``heartbeat.py`` renews
leases and keeps the node registry, ``reaper.py`` recovers expired leases, ``scheduler.py``
promotes scheduled jobs and fires cron entries, ``loop.py`` is the event loop the node runs on,
and ``slots.py`` backs a queue off while its Redis Cluster slot moves.
"""

from jobq.worker.node import MAX_CONCURRENCY, Worker, WorkerConfig, default_node_id, run_worker

__all__ = ["MAX_CONCURRENCY", "Worker", "WorkerConfig", "default_node_id", "run_worker"]
