"""``jobq worker``: run a worker node (see :mod:`jobq.worker`).

``-A module[:attr]`` names the application whose tasks the node runs (``attr`` defaults to the
module's ``app``, or its only :class:`jobq.JobQ`); without it the node runs the built-in tasks
only. ``--processes N`` forks N nodes and supervises them: SIGTERM/SIGINT are forwarded, a node
that crashes is restarted, and the supervisor exits 0 when every node exited 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from jobq.app import JobQ
from jobq.cli.apps import bind, explicit, load_app
from jobq.cli.common import Settings, connection_options
from jobq.cron import parse_duration
from jobq.errors import InvalidInput, JobqError
from jobq.storage import clients
from jobq.storage.keys import validate_node, validate_queue
from jobq.worker import MAX_CONCURRENCY, Worker, WorkerConfig
from jobq.worker import loop as jobq_loop

log = logging.getLogger("jobq.cli")


def parse_queues(text: str) -> tuple[list[tuple[str, int]], bool]:
    """``"a,b,c"`` (strict order) or ``"critical:6,default:3,low:1"`` (weighted)."""
    out: list[tuple[str, int]] = []
    weighted = False
    seen: set[str] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise InvalidInput(f"queues: empty queue name in {text!r}", "queues")
        name, sep, weight_s = part.rpartition(":")
        if not sep:
            name, weight = part, 1
        else:
            if not weight_s.isdigit() or not 1 <= int(weight_s) <= 1000:
                raise InvalidInput(
                    f"queues: weight {weight_s!r} of queue {name!r} must be an integer 1-1000",
                    "queues",
                )
            weight, weighted = int(weight_s), True
        name = validate_queue(name)
        if name in seen:
            raise InvalidInput(f"queues: queue {name!r} is listed twice", "queues")
        seen.add(name)
        out.append((name, weight))
    return out, weighted


#: The shortest durations ``jobq worker`` accepts, seconds, and why. A lease is renewed every
#: lease/3 over the network, so below 1 s a node flaps between fenced and unfenced; a poll
#: interval below 50 ms busy-loops on Redis; a grace is 0 (release at once) or at least 100 ms.
MINIMUMS: dict[str, tuple[float, str]] = {
    "lease": (1.0, "1s"),
    "grace": (0.1, "100ms"),
    "poll-interval": (0.05, "50ms"),
    "reap-interval": (0.05, "50ms"),
}


def _duration(name: str) -> Callable[[click.Context, click.Parameter, str | None], float | None]:
    least, least_text = MINIMUMS[name]

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
        if value is None:
            return None
        try:
            secs = parse_duration(value, name)
        except InvalidInput as exc:
            raise click.BadParameter(str(exc)) from None
        if name == "grace" and secs == 0:
            return secs  # release at once
        if secs <= 0:
            raise click.BadParameter(f"{name}: must be greater than 0 (the minimum is {least_text})")
        if secs < least:
            zero = " (or 0: release at once)" if name == "grace" else ""
            raise click.BadParameter(f"{name}: {value.strip()} is below the minimum of {least_text}{zero}")
        return secs

    return convert


def _default_queues(app: JobQ) -> list[tuple[str, int]]:
    names = [app.defaults.queue]
    for task in app.tasks.values():
        if task.defaults.queue not in names:
            names.append(task.defaults.queue)
    return [(n, 1) for n in names]


@click.command("worker")
@connection_options
@click.option(
    "-A",
    "--app",
    "app_spec",
    envvar="JOBQ_APP",
    metavar="MODULE[:ATTR]",
    default=None,
    help="The application to run (its module is imported; default: $JOBQ_APP). Without it: "
    "built-in tasks only. `jobq tasks -A MODULE` lists its tasks.",
)
@click.option(
    "-Q",
    "--queues",
    default=None,
    metavar="Q1,Q2|Q1:W1,Q2:W2",
    help="Queues to serve: 'a,b,c' in strict order, or 'critical:6,default:3,low:1' weighted "
    "(default: the app's default queue and the queues of its tasks, strict).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(1, MAX_CONCURRENCY),
    default=20,
    show_default=True,
    help="Jobs run at once per node.",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker nodes to fork and supervise.",
)
@click.option(
    "--lease",
    default="30s",
    show_default=True,
    callback=_duration("lease"),
    help="Lease per claimed job (at least 1s); renewed every lease/3. A dead node's jobs run again after it.",
)
@click.option(
    "--grace",
    default="30s",
    show_default=True,
    callback=_duration("grace"),
    help="On SIGTERM/SIGINT, how long running jobs may finish before they are released (0, or at "
    "least 100ms).",
)
@click.option("--node-id", default=None, help="This node's name (default: host-pid-random).")
@click.option("--burst", is_flag=True, help="Exit once nothing is left to run.")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve /metrics and /health on this port (off by default; node i of --processes "
    "uses PORT+i; 0 picks a free port).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--poll-interval",
    default="1s",
    show_default=True,
    callback=_duration("poll-interval"),
    help="Longest idle wait between looks at the queues while wake-ups are down; with every "
    "wake-up token armed, 10 poll intervals, at most 10s (at least 50ms).",
)
@click.option(
    "--reap-interval",
    default=None,
    callback=_duration("reap-interval"),
    hidden=True,
    help="Reaper pass interval (default: lease/6, at most 5 s).",
)
@click.option(
    "--max-zombies",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Drain and exit 0 once this many timed-out sync tasks are stuck in their threads "
    "(so a supervisor restarts the node); 0 = never.",
)
@click.option(
    "--max-interruptions",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Dead-letter a job (reason 'interrupted') once it was released unfinished by this many "
    "shutdowns; a task's own max_interruptions wins; 0 = never.",
)
@click.option(
    "--loop",
    "loop_choice",
    type=click.Choice(list(jobq_loop.LOOP_CHOICES), case_sensitive=False),
    envvar=jobq_loop.LOOP_ENV,
    default="auto",
    show_default=True,
    help="The node's event loop: auto = uvloop when it is installed (jobq[web] brings it; "
    "a faster wake-up and claim), else asyncio's with timers to the microsecond; asyncio; uvloop "
    "(an error without it). The start line says which runs. Env: JOBQ_WORKER_LOOP.",
)
@click.option("--no-maintenance", is_flag=True, hidden=True, help="Run no reaper/scheduler.")
@click.pass_context
def worker(
    ctx: click.Context,
    settings: Settings,
    app_spec: str | None,
    queues: str | None,
    concurrency: int,
    processes: int,
    lease: float,
    grace: float,
    node_id: str | None,
    burst: bool,
    metrics_port: int | None,
    metrics_host: str,
    log_format: str,
    log_level: str,
    poll_interval: float,
    reap_interval: float | None,
    max_zombies: int,
    max_interruptions: int,
    loop_choice: str,
    no_maintenance: bool,
) -> None:
    """Run a worker node: claim jobs from QUEUES and run them.

    SIGTERM/SIGINT: stop claiming, let running jobs finish within --grace, release the rest back
    to ready and exit 0. A second signal releases at once. A released job that never started
    counts no attempt; one that started keeps its attempt and counts an interruption (dead-
    lettered at --max-interruptions).
    """
    from jobq import builtin, logs

    logs.configure(log_format, log_level.upper())
    if clients.redact_url(settings.redis_url) != settings.redis_url and explicit(
        ctx, "sub_redis_url", "redis_url"
    ):
        src = ctx.get_parameter_source("sub_redis_url")
        psrc = ctx.parent.get_parameter_source("redis_url") if ctx.parent is not None else None
        if any(s is not None and s.name == "COMMANDLINE" for s in (src, psrc)):
            log.warning(
                "the Redis password was given on the command line, where other users can read "
                "it; prefer JOBQ_REDIS_URL"
            )
    app = load_app(app_spec) if app_spec else JobQ(settings.redis_url, prefix=settings.prefix)
    url = bind(app, settings, ctx)
    builtin.register(app)
    try:
        if queues is not None:
            queue_list, weighted = parse_queues(queues)
        else:
            queue_list, weighted = _default_queues(app), False
        if node_id is not None:
            validate_node(node_id if processes == 1 else f"{node_id}-{processes}")
    except (InvalidInput, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        jobq_loop.loop_kind(loop_choice)
    except jobq_loop.LoopChoiceError as exc:
        raise click.BadParameter(str(exc), param_hint="--loop") from None
    assert lease is not None and grace is not None and poll_interval is not None
    config = WorkerConfig(
        queues=queue_list,
        weighted=weighted,
        concurrency=concurrency,
        lease=lease,
        grace=grace,
        node_id=node_id,
        burst=burst,
        poll_interval=poll_interval,
        reap_interval=reap_interval,
        maintenance=not no_maintenance,
        max_zombies=max_zombies,
        max_interruptions=max_interruptions,
    )
    if processes == 1:
        code = _run_node(app, config, url, metrics_host, metrics_port, loop_choice)
    else:
        code = _supervise(app, config, url, processes, metrics_host, metrics_port, loop_choice)
    ctx.exit(code)


def _run_node(
    app: JobQ,
    config: WorkerConfig,
    url: str,
    metrics_host: str,
    metrics_port: int | None,
    loop_choice: str = "auto",
) -> int:
    """Run one node in this process until it stops (on the event loop ``loop_choice`` picks:
    :func:`jobq.worker.loop.loop_kind`). Returns the exit code."""
    import asyncio

    from jobq.metrics import Metrics, serve

    # A signal that arrives before the event loop takes over is not lost: it is replayed.
    pending: list[int] = []

    def early(sig: int, _frame: Any) -> None:
        pending.append(sig)

    previous = {sig: signal.signal(sig, early) for sig in (signal.SIGTERM, signal.SIGINT)}
    node = Worker(app, config, url=url)
    node.metrics = metrics = Metrics(app, node=node.node, queues=node.queues)
    metrics.node_gauges_from(lambda: (len(node.running), node.busy))
    server: Any = None
    if metrics_port is not None:
        try:
            server = serve(metrics, metrics_host, metrics_port, node.health)
        except (OSError, NotImplementedError) as exc:
            log.error("cannot serve metrics on %s:%d: %s", metrics_host, metrics_port, exc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            return 1
        log.info("metrics on http://%s:%d/metrics", metrics_host, server.port)

    async def main() -> None:
        node.install_signal_handlers()
        loop = asyncio.get_running_loop()
        for sig in pending:
            loop.call_soon(node.on_signal, sig)
        await node.run()

    try:
        # uvloop, or asyncio's with timers to the microsecond (jobq/worker/loop.py)
        jobq_loop.run(main(), kind=loop_choice)
    except JobqError as exc:  # fatal at startup: wrong password, missing permission, old Redis
        log.error("worker node %s cannot run: %s", node.node, clients.redact(str(exc)))
        return 1
    finally:
        if server is not None:
            server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if node.zombie_threads():
        # A sync task overran and its thread cannot be stopped; the job was released (or failed)
        # already. Do not let the interpreter wait for the thread at exit.
        log.warning("%d task thread(s) still running at exit: abandoning them", node.zombie_threads())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _term_with_parent(parent: int) -> None:
    """Linux: get SIGTERM (a graceful stop) if the supervisor dies, rather than run on orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to do
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _supervise(
    app: JobQ,
    config: WorkerConfig,
    url: str,
    processes: int,
    metrics_host: str,
    metrics_port: int | None,
    loop_choice: str = "auto",
) -> int:
    """Fork ``processes`` nodes; forward SIGTERM/SIGINT; restart a node that crashes."""
    children: dict[int, int] = {}  # pid -> slot
    parent = os.getpid()
    stopping = False
    failed = False

    def spawn(slot: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: one node
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _term_with_parent(parent)
                node_id = None if config.node_id is None else f"{config.node_id}-{slot}"
                cfg = dataclasses.replace(config, node_id=node_id)
                port = None if metrics_port is None else metrics_port + slot if metrics_port else 0
                code = _run_node(app, cfg, url, metrics_host, port, loop_choice)
            except BaseException:
                log.exception("worker node crashed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = slot

    def forward(sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for slot in range(processes):
        spawn(slot)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("supervising %d worker nodes (pids %s)", processes, " ".join(map(str, children)))
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait
            continue
        if pid not in children:
            continue
        slot = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            continue
        if stopping or config.burst:
            failed = True
            log.error("worker node %d (pid %d) exited with %d", slot, pid, code)
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        log.error("worker node %d (pid %d) exited with %d; restarting it", slot, pid, code)
        if len(restarts) > 5 * processes:
            time.sleep(1.0)  # a crash loop: slow it down
        if not stopping:
            spawn(slot)
    return 1 if failed else 0
