"""OpenTelemetry tracing (optional extra ``lightllm-grpc[tracing]``): a span per request with
its queue, prefill and decode phases, exported over OTLP/gRPC to ``--otlp-traces-endpoint``.

The incoming trace context comes from the call's gRPC metadata (W3C ``traceparent``): the
gRPC server instrumentation opens a span per RPC from it, and the request's span is that
span's child. Request spans are written when the request ends, from the times the core
stamped on it (``arrived_at`` … ``finished_at``), so nothing is traced inside the step loop
but one dictionary operation per request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc

from lightllm_grpc.scheduler.observer import RequestObserver
from lightllm_grpc.scheduler.request import Request

SPAN_NAME = "lightllm.generate"


def _imports() -> Any:
    try:
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            "--otlp-traces-endpoint needs the tracing extra: pip install 'lightllm-grpc[tracing]'"
        ) from exc
    return (
        context,
        trace,
        OTLPSpanExporter,
        aio_server_interceptor,
        Resource,
        TracerProvider,
        BatchSpanProcessor,
    )


class Tracing:
    """Owns the tracer provider; ``interceptor()`` goes on the gRPC server, ``on_submit`` is
    called by the servicer with each request's completions, and the engine's observer
    (``observer()``) ends their spans."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        ctx, trace, exporter, interceptor, resource, provider_cls, processor = _imports()
        self._context, self._trace, self._interceptor = ctx, trace, interceptor
        self.provider = provider_cls(resource=resource.create({"service.name": service_name}))
        self.provider.add_span_processor(processor(exporter(endpoint=endpoint, insecure=True)))
        self.tracer = self.provider.get_tracer("lightllm_grpc")
        self._parents: dict[int, Any] = {}  # id(request) -> the context its span goes under
        # Request times are time.monotonic(); spans want wall-clock nanoseconds.
        self._epoch_ns = time.time_ns() - time.monotonic_ns()

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return self._interceptor(tracer_provider=self.provider)

    def on_submit(self, reqs: Sequence[Request]) -> None:
        parent = self._context.get_current()  # the RPC's span, child of the caller's context
        for req in reqs:
            self._parents[id(req)] = parent

    def observer(self) -> RequestObserver:
        return _SpanWriter(self)

    def write(self, req: Request, error: str) -> None:
        parent = self._parents.pop(id(req), None)
        if parent is None or req.arrived_at is None or req.finished_at is None:
            return
        ns = self._ns
        span = self.tracer.start_span(SPAN_NAME, context=parent, start_time=ns(req.arrived_at))
        span.set_attributes(
            {
                "lightllm.request_id": req.request_id,
                "lightllm.index": req.index,
                "lightllm.prompt_tokens": req.prompt_len,
                "lightllm.completion_tokens": len(req.output_ids),
                "lightllm.cached_tokens": req.cached_tokens,
                "lightllm.preemptions": req.preemptions,
                "lightllm.finish_reason": req.finish_reason.name,
            }
        )
        if error:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
        under = self._trace.set_span_in_context(span, parent)
        for name, start, end in _phases(req):
            self.tracer.start_span(name, context=under, start_time=ns(start)).end(end_time=ns(end))
        span.end(end_time=ns(req.finished_at))

    def _ns(self, monotonic: float) -> int:
        return self._epoch_ns + int(monotonic * 1e9)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what is queued


def _phases(req: Request) -> list[tuple[str, float, float]]:
    """Queue (arrival to admission), prefill (to the first token), decode (to the end)."""
    marks = [("queue", req.arrived_at), ("prefill", req.admitted_at), ("decode", req.first_token_at)]
    out: list[tuple[str, float, float]] = []
    for i, (name, start) in enumerate(marks):
        end = next((m for _, m in marks[i + 1 :] if m is not None), req.finished_at)
        if start is not None and end is not None:
            out.append((name, start, end))
    return out


class _SpanWriter:
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def on_tokens(self, reqs: Sequence[Request], now: float) -> None:
        pass

    def on_finish(self, req: Request, error: str) -> None:
        self.tracing.write(req, error)

    def on_step(self, seconds: float) -> None:
        pass


class FanOut:
    """Several observers behind the engine's one hook (metrics and tracing)."""

    def __init__(self, *observers: RequestObserver) -> None:
        self.observers = observers

    def on_tokens(self, reqs: Sequence[Request], now: float) -> None:
        for o in self.observers:
            o.on_tokens(reqs, now)

    def on_finish(self, req: Request, error: str) -> None:
        for o in self.observers:
            o.on_finish(req, error)

    def on_step(self, seconds: float) -> None:
        for o in self.observers:
            o.on_step(seconds)
