"""OpenTelemetry tracing, with the ``jobq[otel]`` extra (``opentelemetry-api``).

The producer's trace context travels with the job: an enqueue made inside a span runs in a
``send <queue>`` span (kind PRODUCER) whose W3C ``traceparent`` (and ``tracestate``, if any) is
stored on the job (the hash field ``tp``). A worker runs each attempt in a ``process <queue>``
span (kind CONSUMER) whose parent is that context, with a link to it as well (the messaging
semantic conventions' "creation context"), so the web request, the enqueue and the task's own
spans make one trace. Names and attributes follow the OpenTelemetry messaging semantic
conventions; ``messaging.system`` is ``"jobq"`` (there is no registered value for jobq).

Cost: without ``opentelemetry`` installed, the enqueue path and the worker check one module
boolean (:data:`AVAILABLE`) and do nothing else. Installed but unused, an enqueue outside any
span checks that the current span context is invalid and adds nothing to the job, and a worker
whose process has no tracer provider (the API's proxy) starts no span.

This module imports nothing of jobq (it is in the base layer) and imports ``opentelemetry``
only on first use; every object of it is typed ``Any`` here, so jobq type-checks without it.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterable
from typing import Any

#: The messaging system's name in the spans (no value is registered for jobq in the semantic
#: conventions, so it is jobq's own name).
SYSTEM = "jobq"
#: The ``jobq.outcome`` attribute of an attempt's ``process`` span takes one of these.
OUTCOMES = ("done", "retry", "dead", "cancelled", "interrupted", "lost")
#: Longest trace context text carried with a job (traceparent, a space, tracestate: W3C allows
#: a tracestate of 512 characters; enqueue.lua refuses more). Past it the tracestate is left
#: out, never cut into a wrong one.
MAX_CARRIER = 600


def _probe() -> bool:
    """Whether the ``opentelemetry`` package is there, without importing anything (a package
    without the API in it is found out at first use, which then turns :data:`AVAILABLE` off)."""
    try:
        return importlib.util.find_spec("opentelemetry") is not None
    except (ImportError, ValueError):  # a parent set to None in sys.modules, a broken install
        return False


#: ``opentelemetry-api`` is installed. The one check the enqueue path and the worker pay when
#: it is not; tests set it to False to act as if it were missing.
AVAILABLE = _probe()

_otel: Any = None  # the loaded API (a namespace of what this module uses), once imported


class _Api:
    """What this module uses of the OpenTelemetry API, looked up once."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context = context
        self.trace = trace
        self.propagator = TraceContextTextMapPropagator()
        self.proxy_types = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self.tracer: Any = None
        self.provider: Any = None


def _api() -> Any:
    global _otel, AVAILABLE
    if _otel is None:
        try:
            _otel = _Api()
        except ImportError:  # found but not importable: act as if it were not installed
            AVAILABLE = False
            return None
    return _otel


def _tracer(api: Any) -> Any:
    # Kept per provider: one set (or replaced, in tests) after the first span gets its own.
    provider = api.trace.get_tracer_provider()
    if api.provider is not provider:
        api.tracer = provider.get_tracer("jobq")
        api.provider = provider
    return api.tracer


# -- producer -----------------------------------------------------------------------------------
def in_trace() -> bool:
    """Whether the caller runs inside a valid span (so an enqueue is traced). Call only when
    :data:`AVAILABLE`."""
    api = _api()
    return api is not None and bool(api.trace.get_current_span().get_span_context().is_valid)


class SendSpan:
    """The ``send`` span (kind PRODUCER) of one enqueue call, current while it is open. It is
    opened before the requests are validated (a refused request is recorded on it); then
    :meth:`describe` names it and returns the trace context each job stores. A batch
    (``enqueue_many``) is one span and its jobs share its context: no per-message ``create``
    spans."""

    __slots__ = ("_cm", "span")

    def __init__(self) -> None:
        api = _api()
        attrs = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
        }
        self._cm = _tracer(api).start_as_current_span(
            "send", kind=api.trace.SpanKind.PRODUCER, attributes=attrs
        )
        self.span: Any = None

    def __enter__(self) -> SendSpan:
        self.span = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)

    def describe(self, queues: Iterable[str], n: int, message_id: str | None = None) -> str:
        """Name the span after its destination and say what it sends; returns the trace
        context to store on each job (:func:`current_carrier`)."""
        names = sorted(set(queues))
        span = self.span
        if len(names) == 1:  # a batch over several queues keeps the plain name "send"
            span.update_name(f"send {names[0]}")
            span.set_attribute("messaging.destination.name", names[0])
        if message_id is not None:
            span.set_attribute("messaging.message.id", message_id)
        if n > 1:
            span.set_attribute("messaging.batch.message_count", n)
        return current_carrier()


def current_carrier() -> str:
    """The current trace context as text for the job ("" when there is none)."""
    api = _api()
    if api is None:
        return ""
    headers: dict[str, str] = {}
    api.propagator.inject(headers)
    tp = headers.get("traceparent", "")
    if not tp:
        return ""
    ts = headers.get("tracestate", "")
    text = f"{tp} {ts}" if ts else tp
    return text if len(text) <= MAX_CARRIER else tp


# -- worker -------------------------------------------------------------------------------------
#: worker_tracing()'s answer, and when it is asked of the API again (monotonic seconds).
_worker_on = False
_worker_recheck = float("-inf")
#: How long the worker's answer is kept: a provider set after the node started is used from
#: at most this much later (asking the API costs ~1.5 us, an environment lookup included).
WORKER_RECHECK_S = 1.0


def worker_tracing() -> bool:
    """Whether a worker should open ``process`` spans: the API is installed and a tracer
    provider is set (not the API's proxy or no-op one)."""
    global _worker_on, _worker_recheck
    now = time.monotonic()
    if now < _worker_recheck:
        return _worker_on
    api = _api() if AVAILABLE else None
    _worker_on = api is not None and not isinstance(api.trace.get_tracer_provider(), api.proxy_types)
    _worker_recheck = now + WORKER_RECHECK_S
    return _worker_on


def _extract(carrier: str) -> Any:
    """The producer's context from a job's ``tp`` field (None when absent or unreadable)."""
    if not carrier:
        return None
    api = _api()
    tp, _, ts = carrier.partition(" ")
    headers = {"traceparent": tp}
    if ts:
        headers["tracestate"] = ts
    ctx = api.propagator.extract(headers)
    sc = api.trace.get_current_span(ctx).get_span_context()
    return ctx if sc.is_valid else None


class ProcessSpan:
    """The ``process <queue>`` span of one attempt (kind CONSUMER). :attr:`context` is the
    OpenTelemetry context with this span current, for the task's own spans (a sync task's
    thread attaches it); :meth:`end` records the outcome and ends it."""

    __slots__ = ("context", "span", "token")

    def __init__(self, *, queue: str, job_id: str, task: str, attempt: int, node: str, carrier: str) -> None:
        api = _api()
        parent = _extract(carrier)
        links = []
        if parent is not None:
            links.append(api.trace.Link(api.trace.get_current_span(parent).get_span_context()))
        self.span = _tracer(api).start_span(
            f"process {queue}",
            context=parent,
            kind=api.trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.destination.name": queue,
                "messaging.message.id": job_id,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.client.id": node,
                "jobq.task": task,
                "jobq.attempt": attempt,
            },
        )
        self.context = api.trace.set_span_in_context(self.span, parent)
        # Current in the calling asyncio task (its own context copy) for an async task's spans.
        self.token = api.context.attach(self.context)

    def end(self, outcome: str, error: BaseException | str | None = None) -> None:
        assert outcome in OUTCOMES, outcome
        api = _otel
        span = self.span
        span.set_attribute("jobq.outcome", outcome)
        if error is not None:
            if isinstance(error, BaseException):
                span.record_exception(error)
                span.set_attribute("error.type", type(error).__qualname__)
                description = f"{type(error).__name__}: {error}"
            else:
                span.set_attribute("error.type", outcome)
                description = error
            span.set_status(api.trace.Status(api.trace.StatusCode.ERROR, description))
        span.end()
        api.context.detach(self.token)  # (the API logs, never raises, a detach out of order)


def attach(ctx: Any) -> Any:
    """Make ``ctx`` current in this thread (a sync task's pool thread); returns the token."""
    return _otel.context.attach(ctx)


def detach(token: Any) -> None:
    _otel.context.detach(token)
