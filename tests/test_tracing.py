"""Tracing: a span per request under the caller's trace context, with its phases, exported
over OTLP/gRPC (to a collector this test runs)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lightllm_grpc.bench.server import free_port
from tests.server_harness import ServerProcess, greedy_request, make_served_model

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []

    def Export(self, request, context):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    sink = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield sink, f"127.0.0.1:{port}"
    server.stop(0)


def test_request_span_with_phases_under_the_callers_trace(collector, tmp_path) -> None:
    sink, endpoint = collector
    model_dir = make_served_model("llama", tmp_path / "llama")
    server = ServerProcess(
        model_dir,
        tmp_path / "server.log",
        "--otlp-traces-endpoint",
        endpoint,
        env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    try:
        metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),)
        calls = list(server.stub.GenerateStream(greedy_request([5, 6, 7], 6), metadata=metadata))
        assert calls[-1].usage.completion_tokens == 6
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(s.name == "lightllm.generate" for s in sink.spans):
            time.sleep(0.1)
    finally:
        server.stop()
    by_name = {s.name: s for s in sink.spans}
    request = by_name["lightllm.generate"]
    assert request.trace_id.hex() == TRACE_ID  # the caller's trace continues here
    rpc = next(s for s in sink.spans if s.span_id == request.parent_span_id)
    assert rpc.parent_span_id.hex() == PARENT_SPAN and "GenerateStream" in rpc.name
    attrs = {a.key: a.value for a in request.attributes}
    assert attrs["lightllm.completion_tokens"].int_value == 6
    assert attrs["lightllm.finish_reason"].string_value == "LENGTH"
    phases = [by_name[n] for n in ("queue", "prefill", "decode")]
    for phase in phases:
        assert phase.parent_span_id == request.span_id and phase.trace_id == request.trace_id
    assert request.start_time_unix_nano == phases[0].start_time_unix_nano
    assert phases[0].end_time_unix_nano == phases[1].start_time_unix_nano
    assert phases[1].end_time_unix_nano == phases[2].start_time_unix_nano
    assert phases[2].end_time_unix_nano == request.end_time_unix_nano
