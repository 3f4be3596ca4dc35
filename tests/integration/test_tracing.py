"""OpenTelemetry tracing (jobq[otel], jobq/tracing.py), with the SDK's in-memory exporter and a
real redis-server: one trace from an HTTP-style parent span through the enqueue's ``send`` span
to the worker's ``process`` span and the task's own spans, for async and sync (thread-run) tasks;
the outcome of each attempt; nothing stored or started without a span, or without the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState
from opentelemetry.util._once import Once

import jobq
from jobq import JobQ, tracing
from jobq.storage.calls import JobSpec
from jobq.worker import Worker, WorkerConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _reset_provider(provider: Any) -> None:
    # The API lets a process set its provider once; tests each set their own.
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    if provider is not None:
        trace.set_tracer_provider(provider)
    tracing._worker_recheck = float("-inf")  # the worker asks again at its next attempt


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_provider(provider)
    yield exporter
    _reset_provider(None)
    provider.shutdown()


@pytest.fixture
def queue() -> str:
    return f"trace-{uuid.uuid4().hex[:8]}"


def burst(app: JobQ, queue: str) -> None:
    asyncio.run(Worker(app, WorkerConfig(burst=True, queues=[(queue, 1)])).run())


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = by_name(exporter, name)
    assert len(found) == 1, (name, [s.name for s in exporter.get_finished_spans()])
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def register(app: JobQ, queue: str) -> None:
    tracer = trace.get_tracer("tests")

    @app.task(name="t.async_work", queue=queue)
    async def async_work(x: int) -> int:
        with tracer.start_as_current_span("async inner"):
            await asyncio.sleep(0)
        return x + 1

    @app.task(name="t.sync_work", queue=queue)
    def sync_work(x: int) -> int:
        assert threading.current_thread() is not threading.main_thread()
        with tracer.start_as_current_span("sync inner"):
            return x * 2

    @app.task(name="t.boom", queue=queue, max_attempts=2, retry_backoff=0)
    def boom() -> None:
        raise ValueError("boom")


def test_one_trace_from_an_http_span_through_enqueue_to_the_tasks_own_spans(
    app: JobQ, queue: str, spans: InMemorySpanExporter, r: redis.Redis
) -> None:
    register(app, queue)
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("POST /signup", kind=SpanKind.SERVER) as http:
        a = app.enqueue("t.async_work", [1])
        s = app.enqueue("t.sync_work", [2])
    # The job carries the send span's W3C traceparent (55 bytes: a listpack-sized field).
    tp = r.hget(f"jobq:{{{queue}}}:job:{a.id}", "tp")
    assert tp is not None and len(tp) == 55 and tp.startswith(b"00-")
    burst(app, queue)
    assert a.result(timeout=5) == 2 and s.result(timeout=5) == 4

    trace_id = http.get_span_context().trace_id
    sends = by_name(spans, f"send {queue}")
    processes = {p.attributes["messaging.message.id"]: p for p in by_name(spans, f"process {queue}")}  # type: ignore[index]
    assert len(sends) == 2 and set(processes) == {a.id, s.id}
    for job, inner_name, task in ((a, "async inner", "t.async_work"), (s, "sync inner", "t.sync_work")):
        send = next(x for x in sends if x.attributes["messaging.message.id"] == job.id)  # type: ignore[index]
        proc, inner = processes[job.id], one(spans, inner_name)
        assert {send.context.trace_id, proc.context.trace_id, inner.context.trace_id} == {trace_id}
        # http -> send -> process -> the task's own span
        assert parent_of(send) == http.get_span_context().span_id
        assert parent_of(proc) == send.context.span_id
        assert parent_of(inner) == proc.context.span_id
        assert [link.context.span_id for link in proc.links] == [send.context.span_id]
        assert send.kind is SpanKind.PRODUCER and proc.kind is SpanKind.CONSUMER
        assert send.attributes == {
            "messaging.system": "jobq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": queue,
            "messaging.message.id": job.id,
        }
        attrs = dict(proc.attributes or {})
        assert attrs.pop("messaging.client.id")
        assert attrs == {
            "messaging.system": "jobq",
            "messaging.destination.name": queue,
            "messaging.message.id": job.id,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "jobq.task": task,
            "jobq.attempt": 1,
            "jobq.outcome": "done",
        }
        assert proc.status.status_code is StatusCode.UNSET


def test_a_failing_task_retried_then_dead_in_one_trace_with_its_error(
    app: JobQ, queue: str, spans: InMemorySpanExporter
) -> None:
    register(app, queue)
    with trace.get_tracer("tests").start_as_current_span("POST /boom", kind=SpanKind.SERVER) as http:
        job = app.enqueue("t.boom")
    burst(app, queue)
    assert job.status() is jobq.JobState.DEAD
    send = one(spans, f"send {queue}")
    procs = sorted(by_name(spans, f"process {queue}"), key=lambda p: p.attributes["jobq.attempt"])  # type: ignore[index,return-value]
    assert [(p.attributes["jobq.attempt"], p.attributes["jobq.outcome"]) for p in procs] == [  # type: ignore[index]
        (1, "retry"),
        (2, "dead"),
    ]
    for p in procs:  # every attempt is a child of the one send span, in the request's trace
        assert p.context.trace_id == http.get_span_context().trace_id
        assert parent_of(p) == send.context.span_id
        assert p.status.status_code is StatusCode.ERROR and "boom" in (p.status.description or "")
        assert p.attributes["error.type"] == "ValueError"  # type: ignore[index]
        (event,) = p.events
        assert event.name == "exception" and event.attributes["exception.message"] == "boom"  # type: ignore[index]


def test_async_producer_and_batches_carry_the_context(
    app: JobQ, queue: str, spans: InMemorySpanExporter, r: redis.Redis
) -> None:
    register(app, queue)
    tracer = trace.get_tracer("tests")

    async def produce() -> list[jobq.Job[Any]]:
        with tracer.start_as_current_span("GET /async", kind=SpanKind.SERVER):
            one_job = await app.aenqueue("t.async_work", [1])
            many = await app.aenqueue_many([jobq.EnqueueRequest("t.sync_work", [i]) for i in range(3)])
        await app.aclose()
        return [one_job, *many]

    jobs = asyncio.run(produce())
    with tracer.start_as_current_span("GET /sync", kind=SpanKind.SERVER):
        jobs += app.enqueue_many([jobq.EnqueueRequest("t.sync_work", [i]) for i in range(2)])
    burst(app, queue)
    assert [j.result(timeout=5) for j in jobs] == [2, 0, 2, 4, 0, 2]
    sends = by_name(spans, f"send {queue}")
    assert sorted(s.attributes.get("messaging.batch.message_count", 1) for s in sends) == [1, 2, 3]  # type: ignore[union-attr]
    procs = by_name(spans, f"process {queue}")
    assert len(procs) == 6
    # Each job's attempt is a child of its own call's send span (a batch's jobs share it).
    send_ids = {s.context.span_id for s in sends}
    assert {parent_of(p) for p in procs} == send_ids


def _wait_spans(exporter: InMemorySpanExporter, name: str, n: int = 1) -> list[ReadableSpan]:
    deadline = time.monotonic() + 10
    while len(found := by_name(exporter, name)) < n:
        assert time.monotonic() < deadline, f"no {name!r} span ended"
        time.sleep(0.01)
    return found


@pytest.mark.parametrize("how", ["cancelled", "interrupted"])
def test_a_running_attempt_stopped_from_outside_ends_its_span_with_that_outcome(
    app: JobQ, queue: str, spans: InMemorySpanExporter, how: str
) -> None:
    started = threading.Event()

    @app.task(name="t.waits", queue=queue)
    async def waits() -> None:
        started.set()
        await asyncio.sleep(60)

    with trace.get_tracer("tests").start_as_current_span("POST /long"):
        job = app.enqueue("t.waits")
    node = Worker(app, WorkerConfig(queues=[(queue, 1)], grace=0.05))
    thread = threading.Thread(target=lambda: asyncio.run(node.run()), daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        if how == "cancelled":
            job.cancel()  # the node hears it on its wake-up channel and cancels the task
        else:
            node.stop(graceful=True)  # the grace (50 ms) runs out: the task is cancelled
        (proc,) = _wait_spans(spans, f"process {queue}")
    finally:
        with contextlib.suppress(RuntimeError):  # the node may have stopped and closed its loop
            node.stop(graceful=False)
        thread.join(10)
    assert proc.attributes["jobq.outcome"] == how  # type: ignore[index]
    assert parent_of(proc) == one(spans, f"send {queue}").context.span_id
    assert proc.status.status_code is StatusCode.UNSET  # stopped from outside: not an error


def test_a_tracestate_travels_too_and_an_oversized_one_is_left_out(
    app: JobQ, queue: str, spans: InMemorySpanExporter, r: redis.Redis
) -> None:
    register(app, queue)
    parent = SpanContext(
        0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1")])
    )
    with trace.use_span(NonRecordingSpan(parent)):
        job = app.enqueue("t.async_work", [1])
    tp = r.hget(f"jobq:{{{queue}}}:job:{job.id}", "tp")
    assert tp is not None and tp.endswith(b" vendor=v1") and len(tp) == 55 + 10
    burst(app, queue)
    proc = one(spans, f"process {queue}")
    assert proc.context.trace_id == 0x1234 and proc.context.trace_state == TraceState([("vendor", "v1")])
    big = SpanContext(
        1,
        2,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([(f"k{i}", "v" * 250) for i in range(3)]),
    )
    with trace.use_span(NonRecordingSpan(big)):
        carrier = tracing.current_carrier()
    assert carrier == "00-" + "0" * 31 + "1-" + "0" * 15 + "2-01"  # the traceparent alone


def test_an_enqueue_outside_any_span_stores_nothing_and_the_attempt_is_a_root_span(
    app: JobQ, queue: str, spans: InMemorySpanExporter, r: redis.Redis
) -> None:
    register(app, queue)
    job = app.enqueue("t.async_work", [1])
    assert r.hget(f"jobq:{{{queue}}}:job:{job.id}", "tp") is None
    assert not by_name(spans, f"send {queue}")
    burst(app, queue)
    proc = one(spans, f"process {queue}")
    assert proc.parent is None and not proc.links
    assert parent_of(one(spans, "async inner")) == proc.context.span_id


def test_without_the_api_nothing_is_carried_and_no_span_is_made(
    app: JobQ, queue: str, spans: InMemorySpanExporter, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jobq acts as if opentelemetry were not installed when tracing.AVAILABLE is False (what
    the import-time probe finds then, see the subprocess test below): even inside a span."""
    monkeypatch.setattr(tracing, "AVAILABLE", False)
    register(app, queue)
    with trace.get_tracer("tests").start_as_current_span("POST /x"):
        job = app.enqueue("t.sync_work", [3])
        many = app.enqueue_many([jobq.EnqueueRequest("t.sync_work", [4])])
    for j in (job, *many):
        assert r.hget(f"jobq:{{{queue}}}:job:{j.id}", "tp") is None
    burst(app, queue)
    assert job.result(timeout=5) == 6
    assert [s.name for s in spans.get_finished_spans()] == ["POST /x", "sync inner", "sync inner"]
    # the task's own span has no jobq parent: no process span was made
    assert all(s.parent is None for s in by_name(spans, "sync inner"))


def test_no_process_span_without_a_tracer_provider(app: JobQ, queue: str) -> None:
    _reset_provider(None)
    assert not tracing.worker_tracing()
    register(app, queue)
    job = app.enqueue("t.async_work", [1])
    burst(app, queue)
    assert job.result(timeout=5) == 2


def test_opentelemetry_not_importable_is_probed_as_not_available() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import jobq, jobq.tracing as t\n"
        "assert t.AVAILABLE is False, t.AVAILABLE\n"
        "assert 'opentelemetry' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_importing_jobq_does_not_load_the_api() -> None:
    # (redis-py imports parts of opentelemetry itself when it is installed: jobq's own use is
    # what is checked)
    code = "import jobq, jobq.worker, jobq.tracing as t; assert t.AVAILABLE and t._otel is None\n"
    subprocess.run([sys.executable, "-c", code], check=True)


TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


def test_the_enqueue_script_checks_the_trace_field(app: JobQ, queue: str) -> None:
    payload = b"\x92\x90\x80"
    for bad in ("00-x", "x", TRACEPARENT + "\n", TRACEPARENT + " " + "k=v," * 150):
        with pytest.raises(jobq.errors.ScriptError, match="trace not a W3C traceparent"):
            app.run(app.store.enqueue(queue, [JobSpec("id1", "t.x", payload, trace=bad)]))
    # 12 fields per job, none with a trace: refused (a stray extra argument is no trace)
    call = app.store.enqueue(queue, [JobSpec("id1", "t.x", payload, trace=TRACEPARENT)])
    with pytest.raises(jobq.errors.ScriptError, match="argv"):
        app.run(replace(call, args=[*call.args[:-2], "", call.args[-1]]))  # the last is events_max
    # One traced job in a call: the other sends an empty field and stores none; claim returns both.
    ok = [JobSpec("a1", "t.x", payload, trace=TRACEPARENT + " k=v"), JobSpec("a2", "t.x", payload)]
    assert app.run(app.store.enqueue(queue, ok)) == ["a1", "a2"]
    claimed = app.run(app.store.claim(queue, "n1", 5, 30_000)).jobs
    assert [(c.id, c.trace) for c in claimed] == [("a1", ok[0].trace), ("a2", "")]


def test_a_worker_process_continues_the_producers_trace(
    app: JobQ, spans: InMemorySpanExporter, redis_url: str, tmp_path: Path
) -> None:
    """A real ``jobq worker`` process (its spans written to a file by its own SDK set-up)."""
    queue = "otel-proc"
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("POST /work", kind=SpanKind.SERVER) as http:
        jobs = [
            app.enqueue("otel.sync_work", [2], queue=queue),
            app.enqueue("otel.async_work", [2], queue=queue),
            app.enqueue("otel.fails", queue=queue, max_attempts=1),
        ]
    out = tmp_path / "spans.jsonl"
    env = {
        **os.environ,
        "JOBQ_REDIS_URL": redis_url,
        "JOBQ_TEST_SPANS": str(out),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "jobq",
        "worker",
        "-A",
        "tests.integration.otel_tasks",
        "-Q",
        queue,
        "--burst",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert [j.status() for j in jobs] == [jobq.JobState.DONE, jobq.JobState.DONE, jobq.JobState.DEAD]

    worker_spans = [json.loads(line) for line in out.read_text().splitlines()]
    sends = {s.attributes["messaging.message.id"]: s for s in by_name(spans, f"send {queue}")}  # type: ignore[index]
    procs = {
        s["attributes"]["messaging.message.id"]: s for s in worker_spans if s["name"] == f"process {queue}"
    }
    inner = {s["name"]: s for s in worker_spans if s["name"].endswith(" inner")}
    trace_id = http.get_span_context().trace_id
    outcomes = {}
    for job in jobs:
        send, p = sends[job.id], procs[job.id]
        assert send.context.trace_id == p["trace_id"] == trace_id
        assert p["parent"] == send.context.span_id and p["links"] == [send.context.span_id]
        assert p["kind"] == "CONSUMER" and p["attributes"]["jobq.attempt"] == 1
        outcomes[p["attributes"]["jobq.task"]] = (p["attributes"]["jobq.outcome"], p["status"])
    assert outcomes == {
        "otel.sync_work": ("done", "UNSET"),
        "otel.async_work": ("done", "UNSET"),
        "otel.fails": ("dead", "ERROR"),
    }
    assert inner["sync inner"]["parent"] == procs[jobs[0].id]["span_id"]
    assert inner["async inner"]["parent"] == procs[jobs[1].id]["span_id"]
    assert {s["trace_id"] for s in inner.values()} == {trace_id}
