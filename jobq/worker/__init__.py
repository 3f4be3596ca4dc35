"""The worker: a node that claims, runs and acks jobs, and its background components.

``node.py`` is the node itself (:class:`Worker`, :class:`WorkerConfig`, :func:`run_worker`);
``heartbeat.py`` renews leases and keeps the node registry, ``reaper.py`` recovers expired
leases, ``scheduler.py`` promotes scheduled jobs and fires cron entries, ``loop.py`` is the event
loop the node runs on, and ``slots.py`` backs a queue off while its Redis Cluster slot moves.
"""

from jobq.worker.node import MAX_CONCURRENCY, Worker, WorkerConfig, default_node_id, run_worker

__all__ = ["MAX_CONCURRENCY", "Worker", "WorkerConfig", "default_node_id", "run_worker"]
