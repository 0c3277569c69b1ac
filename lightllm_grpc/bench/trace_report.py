"""``lightllm-grpc bench trace STEPS.jsonl``: where each first token's time went, from a
``serve --step-trace`` file.

Every completion's first token is split into the parts the engine saw, in order:

- ``queue``: submitted (after tokenization) → admitted;
- ``to_send``: admitted → its step sent to the shards;
- ``shard``: the shard's own launch-to-result time for that step;
- ``messages``: the rest of sent → result (the coordinator ↔ shard round trip, and any wait
  behind the step before it);
- ``after``: result → first token delivered;
- ``engine``: their sum, submitted → first token.

``--ttft-json`` adds what a client measured: a ``bench gpu`` result file, whose ``ttft``
workload keeps every request's TTFT in order (``ttft_ms_each``). The requests are then matched
to the trace's first tokens in order (the client sent them one at a time), and ``outside`` is
the client's TTFT less ``engine``: gRPC in and out, request building, and the client itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARTS = ("queue", "to_send", "shard", "messages", "after", "engine")


@dataclass(frozen=True)
class FirstToken:
    """One completion's first token, its parts in ms (``PARTS``; ``outside`` once joined)."""

    request_id: str
    step: int
    parts: dict[str, float]


def first_tokens(lines: Iterable[str]) -> list[FirstToken]:
    """The trace's first tokens, in the order their steps completed."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        s = json.loads(line)
        step_ms = (s["result"] - s["sent"]) * 1e3
        for f in s["first_tokens"]:
            parts = {
                "queue": (f["admitted"] - f["arrived"]) * 1e3,
                "to_send": (s["sent"] - f["admitted"]) * 1e3,
                "shard": s["shard_ms"],
                "messages": step_ms - s["shard_ms"],
                "after": (f["first_token"] - s["result"]) * 1e3,
                "engine": (f["first_token"] - f["arrived"]) * 1e3,
            }
            out.append(FirstToken(f["request_id"], s["step"], parts))
    return out


def join_client(tokens: Sequence[FirstToken], ttft_ms: Sequence[float]) -> list[FirstToken]:
    """``tokens`` with the client's TTFT and ``outside`` added, matched in order from the end
    (a benchmark's warm-up requests come first in the trace and are not in ``ttft_ms``)."""
    if len(ttft_ms) > len(tokens):
        raise ValueError(f"{len(ttft_ms)} client TTFTs but only {len(tokens)} first tokens in the trace")
    matched = tokens[len(tokens) - len(ttft_ms) :]
    return [
        FirstToken(t.request_id, t.step, {**t.parts, "ttft": ttft, "outside": ttft - t.parts["engine"]})
        for t, ttft in zip(matched, ttft_ms, strict=True)
    ]


def client_ttfts(bench_json: Path) -> list[float]:
    """Every request's TTFT, in send order, from a ``bench gpu`` result (its first variant
    with a ``ttft`` workload)."""
    result = json.loads(bench_json.read_text())
    for variant in result.get("variants", {}).values():
        each = variant.get("ours", {}).get("ttft", {}).get("ttft_ms_each")
        if each:
            return [float(x) for x in each]
    raise ValueError(f"{bench_json}: no ttft workload with ttft_ms_each")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of ``values``: always a value that was measured."""
    return float(np.percentile(values, q, method="inverted_cdf"))


def report(tokens: Sequence[FirstToken], slow_ms: float | None = None) -> str:
    """A table of each part's p50 / p90 / p99 / max, then the first tokens over ``slow_ms``
    (of the client's TTFT when joined, else of ``engine``)."""
    if not tokens:
        return "no first tokens in the trace\n"
    names = [n for n in ("ttft", "outside", *PARTS) if n in tokens[0].parts]
    lines = [
        f"{len(tokens)} first tokens; ms",
        "| part | p50 | p90 | p99 | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        values = [t.parts[name] for t in tokens]
        cells = [percentile(values, q) for q in (50, 90, 99)] + [max(values)]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    if slow_ms is not None:
        key = "ttft" if "ttft" in names else "engine"
        slow = [(i, t) for i, t in enumerate(tokens) if t.parts[key] > slow_ms]
        lines.append(f"\n{len(slow)} over {slow_ms:g} ms ({key}):")
        for i, t in slow:
            cells = ", ".join(f"{n} {t.parts[n]:.2f}" for n in names)
            lines.append(f"  #{i} step {t.step} {t.request_id}: {cells}")
    return "\n".join(lines) + "\n"


def trace_main(trace: Path, ttft_json: Path | None, slow_ms: float | None) -> int:
    with trace.open(encoding="utf-8") as f:
        tokens = first_tokens(f)
    if ttft_json is not None:
        tokens = join_client(tokens, client_ttfts(ttft_json))
    print(report(tokens, slow_ms), end="")
    return 0
