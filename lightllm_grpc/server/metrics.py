"""Prometheus metrics under ``lightllm:`` (vLLM's names), served on ``--metrics-port``.

Cumulative scheduler counts and gauges are read at scrape time (``MetricsCollector``); the
per-request histograms are filled by ``RequestMetrics``, the engine's ``RequestObserver``.
Inter-token gaps are added per step with numpy (one ``searchsorted`` for the whole batch),
because a Python ``observe`` per token costs about a microsecond and there are tens of
thousands of tokens a second at a large batch. Everything runs on the event loop, the
scrape included (a small asyncio HTTP server), so nothing reads the scheduler from a thread.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import grpc
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from lightllm_grpc.scheduler.engine import Engine
from lightllm_grpc.scheduler.request import FinishReason, Request

log = logging.getLogger(__name__)
PREFIX = "lightllm:"
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (*_FAST, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (*_FAST, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (*_FAST, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = _FAST
HTTP_READ_TIMEOUT_S = 10.0


class Buckets:
    """A Prometheus histogram's state: counts per upper bound (the last is +Inf) and the sum."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[int(np.searchsorted(self.bounds, value, side="left"))] += 1
        self.sum += value

    def observe_many(self, values: np.ndarray) -> None:
        if values.size:
            np.add.at(self.counts, np.searchsorted(self.bounds, values, side="left"), 1)
            self.sum += float(values.sum())

    def cumulative(self) -> list[tuple[str, float]]:
        running = np.cumsum(self.counts)
        les = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        return list(zip(les, running.tolist()))


HISTOGRAMS = {
    "time_to_first_token_seconds": ("Time from arrival to the first output token.", TTFT_BUCKETS),
    "inter_token_latency_seconds": ("Time between consecutive output tokens of a request.", ITL_BUCKETS),
    "e2e_request_latency_seconds": ("Time from arrival to the end of a completion.", REQUEST_BUCKETS),
    "request_queue_time_seconds": ("Time from arrival to first admission.", REQUEST_BUCKETS),
    "request_prefill_time_seconds": ("Time from first admission to the first token.", REQUEST_BUCKETS),
    "step_duration_seconds": ("Time one engine step took (see docs/operations.md).", STEP_BUCKETS),
}


class RequestMetrics:
    """The engine's ``RequestObserver``: fills the histograms and the token and outcome counters."""

    def __init__(self) -> None:
        self.hist = {name: Buckets(bounds) for name, (_, bounds) in HISTOGRAMS.items()}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: Counter[str] = Counter()  # by finish reason
        self.errors: Counter[str] = Counter()  # by gRPC status code name

    def on_tokens(self, reqs: Sequence[Request], now: float) -> None:
        self.generation_tokens += len(reqs)
        gaps = [now - r.last_token_at for r in reqs if r.last_token_at is not None]
        self.hist["inter_token_latency_seconds"].observe_many(np.asarray(gaps))
        for req in reqs:
            if req.first_token_at is None:
                self._first_token(req, now)

    def _first_token(self, req: Request, now: float) -> None:
        self.prompt_tokens += req.prompt_len
        if req.arrived_at is not None:
            self.hist["time_to_first_token_seconds"].observe(now - req.arrived_at)
        if req.admitted_at is not None:
            self.hist["request_prefill_time_seconds"].observe(now - req.admitted_at)

    def on_finish(self, req: Request, error: str) -> None:
        if req.arrived_at is not None and req.finished_at is not None:
            self.hist["e2e_request_latency_seconds"].observe(req.finished_at - req.arrived_at)
        if req.admitted_at is not None and req.arrived_at is not None:
            self.hist["request_queue_time_seconds"].observe(req.admitted_at - req.arrived_at)
        if not error:
            self.success[FinishReason(req.finish_reason).name.lower()] += 1

    def on_step(self, seconds: float) -> None:
        self.hist["step_duration_seconds"].observe(seconds)

    def on_error(self, code: grpc.StatusCode) -> None:
        """A call failed with ``code`` (refused, invalid, or failed while generating)."""
        self.errors[code.name] += 1


class MetricsCollector(Collector):
    """Builds every ``lightllm:`` family at scrape time from the engine and ``RequestMetrics``."""

    def __init__(self, model_name: str, recorder: RequestMetrics) -> None:
        self.model_name = model_name
        self.recorder = recorder
        self.engine: Engine | None = None  # set once the shards are warm
        self.kv_cache_dtype = ""  # what the KV pool stores, set with the engine

    def collect(self) -> Iterator:
        labels = [self.model_name]
        for name, (doc, _) in HISTOGRAMS.items():
            fam = HistogramMetricFamily(PREFIX + name, doc, labels=["model_name"])
            h = self.recorder.hist[name]
            fam.add_metric(labels, h.cumulative(), h.sum)
            yield fam
        yield from self._gauges(labels)
        yield from self._counters(labels)
        reasons = [r.name.lower() for r in FinishReason if r is not FinishReason.NONE]
        yield self._by("request_success_total", "Completions ended without an error, by finish reason.",
                       "finish_reason", self.recorder.success, reasons)  # fmt: skip
        yield self._by("request_errors_total", "Generation calls that ended with an error status, by code.",
                       "code", self.recorder.errors, [])  # fmt: skip

    def _gauges(self, labels: list[str]) -> Iterator[GaugeMetricFamily]:
        stats = self.engine.scheduler.stats() if self.engine is not None else None
        values = {
            "num_requests_running": ("Completions holding KV (prefill or decode).", stats and stats.running),
            "num_requests_waiting": ("Completions waiting for admission.", stats and stats.waiting),
            "kv_cache_usage_perc": (
                "Fraction of KV slots used by live requests (0..1; evictable cache excluded).",
                stats and stats.used / stats.total,
            ),
        }
        for name, (doc, value) in values.items():
            fam = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            fam.add_metric(labels, float(value or 0))
            yield fam
        if stats is not None:  # the pool's size and storage are known once the shards are up
            doc = (
                "KV slots (tokens) in the pool, labelled with what they store (fp8_e4m3 or the model dtype)."
            )
            fam = GaugeMetricFamily(
                PREFIX + "kv_cache_capacity_tokens", doc, labels=["model_name", "kv_cache_dtype"]
            )
            fam.add_metric([*labels, self.kv_cache_dtype], float(stats.total))
            yield fam

    def _counters(self, labels: list[str]) -> Iterator[CounterMetricFamily]:
        c = self.engine.scheduler.counters if self.engine is not None else None
        values = {
            "prompt_tokens_total": ("Prompt tokens of completions that got their first token.",
                                    self.recorder.prompt_tokens),
            "generation_tokens_total": ("Output tokens generated.", self.recorder.generation_tokens),
            "prefix_cache_queries_total": ("Prompt tokens looked up in the prefix cache.",
                                           c and c.prefix_query_tokens),
            "prefix_cache_hits_total": ("Prompt tokens served from the prefix cache.",
                                        c and c.prefix_hit_tokens),
            "num_preemptions_total": ("Running completions preempted to free KV.", c and c.preemptions),
        }  # fmt: skip
        for name, (doc, value) in values.items():
            fam = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            fam.add_metric(labels, float(value or 0))
            yield fam

    def _by(
        self, name: str, doc: str, label: str, counts: Counter[str], always: list[str]
    ) -> CounterMetricFamily:
        fam = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", label])
        for key in sorted({*always, *counts}):
            fam.add_metric([self.model_name, key], float(counts[key]))
        return fam


class MetricsServer:
    """``GET /metrics`` over HTTP (HTTPS with a context) on the event loop.

    With ``check`` set (auth on), a request needs the API's bearer token; 401 otherwise.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        check: Callable[[str | None], bool] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.registry = registry
        self.check = check
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port, ssl=self.ssl_context)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_READ_TIMEOUT_S)
            writer.write(self._respond(head.decode("latin-1")))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that sends no valid request gets no answer
        finally:
            writer.close()

    def _respond(self, head: str) -> bytes:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        headers = dict(_header(line) for line in lines[1:] if ":" in line)
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return _http(405, b"only GET\n")
        if parts[1].split("?")[0] not in ("/metrics", "/"):
            return _http(404, b"see /metrics\n")
        if self.check is not None and not self.check(headers.get("authorization")):
            return _http(401, b"a bearer token is required\n", {"WWW-Authenticate": "Bearer"})
        body = generate_latest(self.registry)
        return _http(200, body if parts[0] == "GET" else b"", {"Content-Type": CONTENT_TYPE_LATEST})


def _header(line: str) -> tuple[str, str]:
    key, value = line.split(":", 1)
    return key.strip().lower(), value.strip()


def _http(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def metrics_registry(collector: MetricsCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
