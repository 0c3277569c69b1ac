"""Load generation against a running server over gRPC: throughput and per-token latency."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass

import grpc

from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc


@dataclass(frozen=True)
class Workload:
    num_requests: int
    input_len: int
    output_len: int
    concurrency: int  # requests in flight at once (num_requests = all at once)
    vocab_size: int
    seed: int = 0
    # Sampling (0 = greedy); each request gets its own seed, so a run is reproducible.
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    presence_penalty: float = 0.0


@dataclass
class RequestTiming:
    ttft: float  # seconds to the first token
    total: float
    output_tokens: int

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.total - self.ttft) / max(1, self.output_tokens - 1)


@dataclass
class LoadResult:
    workload: Workload
    seconds: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    tpot_mean_ms: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d["workload"] = asdict(self.workload)
        return d


def _prompt(rng: random.Random, w: Workload) -> list[int]:
    # Random ids away from the specials at the bottom of most vocabularies.
    return [rng.randrange(min(1000, w.vocab_size // 4), w.vocab_size) for _ in range(w.input_len)]


async def _one(
    stub: generation_pb2_grpc.GenerationStub, ids: list[int], w: Workload, seed: int = 0
) -> RequestTiming:
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids))
    req.sampling.temperature = w.temperature
    if w.temperature > 0:
        req.sampling.top_p, req.sampling.top_k, req.sampling.seed = w.top_p, w.top_k, seed
        req.sampling.presence_penalty = w.presence_penalty
    req.stopping.max_new_tokens = w.output_len
    req.stopping.ignore_eos = True
    start = time.perf_counter()
    first, n = 0.0, 0
    async for msg in stub.GenerateStream(req):
        if n == 0 and msg.token_ids:
            first = time.perf_counter() - start
        n += len(msg.token_ids)
    return RequestTiming(first, time.perf_counter() - start, n)


async def run_load(address: str, w: Workload) -> LoadResult:
    rng = random.Random(w.seed)
    prompts = [_prompt(rng, w) for _ in range(w.num_requests)]
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        await _one(stub, prompts[0][:8], Workload(1, 8, 2, 1, w.vocab_size))  # connect + warm
        sem = asyncio.Semaphore(w.concurrency)

        async def bounded(i: int, ids: list[int]) -> RequestTiming:
            async with sem:
                return await _one(stub, ids, w, seed=w.seed * 1_000_003 + i)

        start = time.perf_counter()
        # Every call runs to its end even if one fails: a plain gather would leave the
        # channel at the first error and cancel all the others (CANCELLEDs nobody asked for).
        outcomes = await asyncio.gather(
            *(bounded(i, p) for i, p in enumerate(prompts)), return_exceptions=True
        )
        seconds = time.perf_counter() - start
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    if failed:
        codes = Counter(
            o.code().name if isinstance(o, grpc.aio.AioRpcError) else type(o).__name__ for o in failed
        )
        raise RuntimeError(
            f"{len(failed)} of {len(outcomes)} requests failed ({dict(codes)}); the first: {failed[0]!r}"
        )
    timings = [o for o in outcomes if isinstance(o, RequestTiming)]
    tokens = sum(t.output_tokens for t in timings)
    tpots = [t.tpot for t in timings]
    return LoadResult(
        workload=w,
        seconds=seconds,
        output_tokens=tokens,
        output_tokens_per_s=tokens / seconds,
        ttft_p50_ms=statistics.median(t.ttft for t in timings) * 1e3,
        tpot_p50_ms=statistics.median(tpots) * 1e3,
        tpot_mean_ms=statistics.fmean(tpots) * 1e3,
    )
