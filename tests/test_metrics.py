"""Prometheus metrics on a real server: every documented metric is exported and moves the
right way after known traffic."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lightllm_grpc.bench.server import free_port
from lightllm_grpc.server.metrics import Buckets
from tests.server_harness import ServerProcess, greedy_request, make_served_model

MODEL = "tiny-llama"
HISTOGRAMS = (
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "step_duration_seconds",
)
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_capacity_tokens")
COUNTERS = (
    "prompt_tokens",
    "generation_tokens",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
    "request_success",
    "request_errors",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_served_model("llama", tmp_path_factory.mktemp("model") / "llama")
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = ServerProcess(model_dir, log, "--metrics-port", str(port), "--served-model-name", MODEL)
    srv.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield srv
    srv.stop()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, dict[tuple, float]]:
    """``{family: {(sample name, sorted labels): value}}``; families keyed without ``lightllm:``."""
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("lightllm:"):
            samples = out.setdefault(fam.name.removeprefix("lightllm:"), {})
            for s in fam.samples:
                samples[(s.name.removeprefix("lightllm:"), tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, family: str, sample: str | None = None, **labels: str) -> float:
    """A sample's value (a counter's ``_total`` unless ``sample`` names another); 0 if absent."""
    names = (sample,) if sample else (family, f"{family}_total")
    keys = [(name, tuple(sorted({"model_name": MODEL, **labels}.items()))) for name in names]
    return next((m[family][k] for k in keys if k in m[family]), 0.0)


def count(m: dict, hist: str) -> float:
    return value(m, hist, f"{hist}_count")


def test_every_metric_is_exported_with_the_model_name(server) -> None:
    m = scrape(server.metrics_url)
    for name in (*HISTOGRAMS, *GAUGES, *COUNTERS):
        assert name in m, f"lightllm:{name} missing; have {sorted(m)}"
        assert all(dict(labels)["model_name"] == MODEL for _, labels in m[name]), name
    le = [dict(labels)["le"] for s, labels in m["step_duration_seconds"] if s.endswith("_bucket")]
    assert le[-1] == "+Inf"
    # The pool's size, labelled with its storage (a CPU server's fp32 model: float32).
    assert value(m, "kv_cache_capacity_tokens", kv_cache_dtype="float32") == server.info().kv_total_tokens


def test_metrics_move_the_right_way_after_known_traffic(server) -> None:
    before = scrape(server.metrics_url)
    prompt = list(range(1, 41))
    for _ in range(2):  # the second shares the first's prompt through the prefix cache
        server.stub.Generate(greedy_request(prompt, 8))
    call = server.stub.GenerateStream(greedy_request([5, 6, 7], 480))  # outlives a scrape anywhere
    next(iter(call))
    during = scrape(server.metrics_url)
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(greedy_request([1, 2], 8, min_new_tokens=9))  # min > max: invalid
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = server.wait_idle()
    after = scrape(server.metrics_url)

    def delta(family: str, sample: str | None = None, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert value(during, "num_requests_running") == 1
    assert value(during, "kv_cache_usage_perc") > 0
    assert value(after, "num_requests_running") == value(after, "num_requests_waiting") == 0
    assert value(after, "kv_cache_usage_perc") == 0

    assert delta("request_success", finish_reason="length") == 2
    assert delta("request_success", finish_reason="abort") == 1
    assert delta("request_errors", code="INVALID_ARGUMENT") == 1
    assert delta("prompt_tokens", "prompt_tokens_total") == 2 * 40 + 3
    generated = delta("generation_tokens", "generation_tokens_total")
    assert generated >= 2 * 8 + 1
    # Three completions got a first token; every later token is one inter-token gap.
    for hist in ("time_to_first_token_seconds", "request_prefill_time_seconds"):
        assert count(after, hist) - count(before, hist) == 3, hist
    assert count(after, "inter_token_latency_seconds") - count(before, "inter_token_latency_seconds") == (
        generated - 3
    )
    for hist in ("e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert count(after, hist) - count(before, hist) == 3, hist
    assert count(after, "step_duration_seconds") > count(before, "step_duration_seconds")
    assert value(after, "e2e_request_latency_seconds", "e2e_request_latency_seconds_sum") > 0

    # The cumulative cache counters are the scheduler's, as GetServerInfo reports them.
    assert value(after, "prefix_cache_hits", "prefix_cache_hits_total") == info.prefix_cache_hit_tokens
    assert delta("prefix_cache_hits", "prefix_cache_hits_total") >= 39
    queries = value(after, "prefix_cache_queries", "prefix_cache_queries_total")
    assert queries == info.prefix_cache_query_tokens
    assert value(after, "num_preemptions", "num_preemptions_total") == info.num_preemptions


def test_metrics_endpoint_answers_only_get_metrics(server) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.metrics_url.replace("/metrics", "/nope"), timeout=10)
    assert err.value.code == 404


def test_buckets_follow_prometheus_le_semantics() -> None:
    b = Buckets([0.1, 1.0])
    b.observe(0.1)  # on a bound: counts in that bucket (le = less or equal)
    b.observe_many(np.array([0.05, 0.5, 1.0, 7.0]))
    assert b.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert b.sum == pytest.approx(8.65)
