"""Figures of a ``bench serve`` run, computed from per-request stream timings (pure).

Definitions (all per request, times from the moment the call was started):

- **TTFT**: time to the first stream message that carries at least one token id.
- **ITL** (inter-token latency): for each later token-carrying message, the gap since the
  previous token-carrying message divided by the number of tokens it carries, counted once
  per token. A server that coalesces k tokens into one message thus yields k ITL values of
  gap/k, and the ITL values of a request sum to (last token time - first token time).
  Tokens that arrive in the first message beside the first token add no ITL value.
- **TPOT** (time per output token): (e2e - TTFT) / (output tokens - 1), for requests with
  at least 2 output tokens; e2e is the time to the end of the stream.
- **Prefix-cache hit share**: sum(usage.cached_tokens) / sum(usage.prompt_tokens) over the
  completed requests, from the usage of each stream's last message.

Distributions are reported in milliseconds as mean, median, p90 and p99 (linear
interpolation between order statistics, as numpy's default).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """A token-carrying stream message: when it arrived (s after the call began) and its tokens."""

    t: float
    tokens: int


@dataclass(frozen=True)
class RequestOutcome:
    """What one request did. ``error`` is the gRPC status code name when it failed."""

    chunks: tuple[Chunk, ...] = ()
    e2e: float = 0.0  # s from the call to the end of the stream
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0].t if self.chunks else None

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return None if n < 2 or self.ttft is None else (self.e2e - self.ttft) / (n - 1)

    def itls(self) -> list[float]:
        out: list[float] = []
        for prev, cur in zip(self.chunks, self.chunks[1:]):
            out += [(cur.t - prev.t) / cur.tokens] * cur.tokens
        return out


@dataclass(frozen=True)
class Distribution:
    """Summary of a set of latencies, in milliseconds (all zero when the set is empty)."""

    mean: float = 0.0
    median: float = 0.0
    p90: float = 0.0
    p99: float = 0.0

    @classmethod
    def of_seconds(cls, values: list[float]) -> Distribution:
        if not values:
            return cls()
        ms = np.asarray(values, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class Summary:
    duration_s: float
    completed: int
    failed: dict[str, int] = field(default_factory=dict)  # status code name → count
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    request_throughput: float = 0.0  # completed requests / s
    input_token_throughput: float = 0.0  # prompt tokens of completed requests / s
    output_token_throughput: float = 0.0
    prefix_cache_hit_share: float = 0.0
    ttft_ms: Distribution = Distribution()
    tpot_ms: Distribution = Distribution()
    itl_ms: Distribution = Distribution()
    e2e_ms: Distribution = Distribution()

    @property
    def num_failed(self) -> int:
        return sum(self.failed.values())

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(outcomes: list[RequestOutcome], duration_s: float) -> Summary:
    """The run's figures from its requests' outcomes and its wall-clock duration."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive (got {duration_s})")
    done = [o for o in outcomes if o.error is None]
    failed = Counter(o.error for o in outcomes if o.error is not None)
    prompt = sum(o.prompt_tokens for o in done)
    output = sum(o.output_tokens for o in done)
    return Summary(
        duration_s=duration_s,
        completed=len(done),
        failed=dict(sorted(failed.items())),
        total_input_tokens=prompt,
        total_output_tokens=output,
        request_throughput=len(done) / duration_s,
        input_token_throughput=prompt / duration_s,
        output_token_throughput=output / duration_s,
        prefix_cache_hit_share=sum(o.cached_tokens for o in done) / prompt if prompt else 0.0,
        ttft_ms=Distribution.of_seconds([o.ttft for o in done if o.ttft is not None]),
        tpot_ms=Distribution.of_seconds([o.tpot for o in done if o.tpot is not None]),
        itl_ms=Distribution.of_seconds([v for o in done for v in o.itls()]),
        e2e_ms=Distribution.of_seconds([o.e2e for o in done]),
    )
