"""The printed table of a ``bench serve`` run (laid out like ``vllm bench serve``'s)."""

from __future__ import annotations

from lightllm_grpc.bench.metrics import Distribution, Summary

WIDTH = 50


def _row(label: str, value: object) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40}{text:>10}"


def _section(title: str, name: str, d: Distribution) -> list[str]:
    return [
        f" {title} ".center(WIDTH, "-"),
        _row(f"Mean {name} (ms):", d.mean),
        _row(f"Median {name} (ms):", d.median),
        _row(f"P90 {name} (ms):", d.p90),
        _row(f"P99 {name} (ms):", d.p99),
    ]


def format_summary(s: Summary) -> str:
    lines = [
        " Serving Benchmark Result ".center(WIDTH, "="),
        _row("Successful requests:", s.completed),
        _row("Failed requests:", s.num_failed),
        *(_row(f"  {code}:", n) for code, n in s.failed.items()),
        _row("Benchmark duration (s):", s.duration_s),
        _row("Total input tokens:", s.total_input_tokens),
        _row("Total generated tokens:", s.total_output_tokens),
        _row("Request throughput (req/s):", s.request_throughput),
        _row("Input token throughput (tok/s):", s.input_token_throughput),
        _row("Output token throughput (tok/s):", s.output_token_throughput),
        _row("Prefix cache hit share:", s.prefix_cache_hit_share),
        *_section("Time to First Token", "TTFT", s.ttft_ms),
        *_section("Time per Output Token (excl. 1st token)", "TPOT", s.tpot_ms),
        *_section("Inter-token Latency", "ITL", s.itl_ms),
        "=" * WIDTH,
    ]
    return "\n".join(lines)
