"""Tasks for a ``jobq worker`` process started by tests/integration/test_tracing.py
(``jobq worker -A tests.integration.otel_tasks``): the process sets up the OpenTelemetry SDK and
appends every finished span as one JSON line to ``$JOBQ_TEST_SPANS``, which the test reads."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import jobq

_lock = threading.Lock()


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with _lock, open(self.path, "a", encoding="utf-8") as f:
            for s in spans:
                ctx = s.get_span_context()
                assert ctx is not None
                f.write(
                    json.dumps(
                        {
                            "name": s.name,
                            "kind": s.kind.name,
                            "trace_id": ctx.trace_id,
                            "span_id": ctx.span_id,
                            "parent": None if s.parent is None else s.parent.span_id,
                            "links": [link.context.span_id for link in s.links],
                            "attributes": dict(s.attributes or {}),
                            "status": s.status.status_code.name,
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(os.environ["JOBQ_TEST_SPANS"])))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("tests.otel_tasks")

app = jobq.JobQ()


@app.task(name="otel.sync_work")
def sync_work(x: int) -> int:
    with tracer.start_as_current_span("sync inner"):
        return x * 2


@app.task(name="otel.async_work")
async def async_work(x: int) -> int:
    with tracer.start_as_current_span("async inner"):
        await asyncio.sleep(0)
    return x + 1


@app.task(name="otel.fails", max_attempts=1)
def fails() -> None:
    raise RuntimeError("no luck")
